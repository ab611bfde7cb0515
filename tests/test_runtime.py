"""The runner interface and generation features on the CPU, on the tiny-llama bundle (random weights).

Also runs the CUDA runner's I/O-binding code (OrtCudaRunner with device_type="cpu") against the plain
CPU runner: the same cache handling that keeps the KV cache on the GPU, checked here without a GPU.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import HostMemoryDriver, assert_clean_error, run_cli

from leptonc.bundle import load_bundle
from leptonc.errors import InputError
from leptonc.runtime import open_bundle_runner
from leptonc.runtime.base import Runner
from leptonc.runtime.generate import SamplingConfig, generate


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    from transformers import AutoTokenizer

    return bundle, AutoTokenizer.from_pretrained(str(bundle.tokenizer_dir))


def _runner(bundle, kind="cpu", **kw):
    if kind == "cpu":
        return open_bundle_runner(bundle)
    from leptonc.runtime.ort_cuda import OrtCudaRunner

    return OrtCudaRunner(bundle.model_path, bundle.io, bundle.engine["session"], device_type="cpu",
                         max_sequence=kw.get("max_sequence", bundle.max_sequence), max_batch=bundle.max_batch)


# ---- the Runner interface ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cpu", "iobinding"])
def test_runner_shapes_and_cache_consistency(tiny, kind):
    """Prefill then decode equals one prefill over the longer sequence (the KV cache is right)."""
    bundle, _ = tiny
    rng = np.random.default_rng(0)
    ids = rng.integers(3, bundle.io["vocab_size"], size=(2, 12), dtype=np.int64)
    with _runner(bundle, kind) as r:
        full = r.prefill(ids, np.ones_like(ids))
        assert full.shape == (2, 12, bundle.io["vocab_size"]) and full.dtype == np.float32
        last = r.prefill(ids[:, :9], np.ones_like(ids[:, :9]), last_only=True)
        assert last.shape == (2, bundle.io["vocab_size"])
        np.testing.assert_allclose(last, full[:, 8], atol=1e-4)
        assert r.sequence_length == 9
        for t in range(9, 12):
            step = r.decode(ids[:, t])
            assert step.shape == (2, bundle.io["vocab_size"])
            np.testing.assert_allclose(step, full[:, t], atol=1e-4)
        assert r.sequence_length == 12


def test_iobinding_runner_matches_cpu_runner_with_left_padding(tiny):
    bundle, _ = tiny
    ids = np.array([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    with _runner(bundle) as a, _runner(bundle, "iobinding") as b:
        la, lb = a.prefill(ids, mask, last_only=True), b.prefill(ids, mask, last_only=True)
        np.testing.assert_allclose(la, lb, atol=1e-5)
        for _ in range(6):
            tok = la.argmax(-1)
            la, lb = a.decode(tok), b.decode(tok)
            np.testing.assert_allclose(la, lb, atol=1e-5)


@pytest.mark.parametrize("kind", ["cpu", "iobinding"])
def test_runner_limits(tiny, kind):
    bundle, _ = tiny
    r = _runner(bundle, kind, max_sequence=8)
    if kind == "cpu":
        r.max_sequence = 8
    with pytest.raises(RuntimeError):
        r.decode(np.array([5]))
    with pytest.raises(InputError, match="at most 8"):
        r.prefill(np.ones((1, 9), np.int64), np.ones((1, 9), np.int64))
    r.prefill(np.ones((1, 7), np.int64), np.ones((1, 7), np.int64))
    r.decode(np.array([5]))
    with pytest.raises(InputError, match="limit of 8"):
        r.decode(np.array([5]))
    r.release()


def test_cuda_bundle_without_cuda_provider_is_a_clean_error(tiny_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider; the refusal path cannot be seen here")
    proc = run_cli("run", tiny_bundle, "--prompt", "hi", "--device", "cuda")
    assert_clean_error(proc, 5)
    assert "onnxruntime-gpu" in proc.stderr


# ---- generation ----------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible(tiny):
    bundle, tok = tiny
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_at_eos=False)
    with _runner(bundle) as r:
        a = generate(r, tok, ["Once upon"], cfg).outputs[0].token_ids
        b = generate(r, tok, ["Once upon"], cfg).outputs[0].token_ids
        c = generate(r, tok, ["Once upon"], SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9,
                                                           seed=8, stop_at_eos=False)).outputs[0].token_ids
        greedy = generate(r, tok, ["Once upon"], SamplingConfig(max_new_tokens=16, stop_at_eos=False)).outputs[0]
    assert a == b and len(a) == 16
    assert a != c, "a different seed gave the same 16 sampled tokens"
    assert a != greedy.token_ids


def test_top_k_one_is_greedy(tiny):
    bundle, tok = tiny
    with _runner(bundle) as r:
        greedy = generate(r, tok, ["abc"], SamplingConfig(max_new_tokens=10, stop_at_eos=False)).outputs[0]
        k1 = generate(r, tok, ["abc"], SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=1, seed=1,
                                                      stop_at_eos=False)).outputs[0]
    assert k1.token_ids == greedy.token_ids


def test_stop_string_and_eos_end_generation(tiny):
    bundle, tok = tiny
    with _runner(bundle) as r:
        free = generate(r, tok, ["Hello"], SamplingConfig(max_new_tokens=24, stop_at_eos=False)).outputs[0]
        assert free.finish_reason == "length" and len(free.token_ids) == 24
        # A stop string taken from the middle of the free text: generation ends right before it.
        stop = free.text[6:8]
        assert stop, free.text
        cut = generate(r, tok, ["Hello"], SamplingConfig(max_new_tokens=24, stop=(stop,), stop_at_eos=False)).outputs[0]
        assert cut.finish_reason == "stop"
        assert cut.text == free.text[: free.text.find(stop)]
        assert len(cut.token_ids) < 24
        # End-of-sequence: declare the 4th greedy token as EOS; generation stops before it.
        eos = free.token_ids[3]
        first = free.token_ids.index(eos)
        ended = generate(r, tok, ["Hello"], SamplingConfig(max_new_tokens=24), eos_ids=(eos,)).outputs[0]
        assert ended.finish_reason == "eos"
        assert ended.token_ids == free.token_ids[:first]


def test_batch_of_different_lengths_matches_each_alone(tiny):
    bundle, tok = tiny
    prompts = ["a", "The quick brown fox jumps over", "Hello, world"]
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    with _runner(bundle) as r:
        alone = [generate(r, tok, [p], cfg).outputs[0].token_ids for p in prompts]
        batch = [g.token_ids for g in generate(r, tok, prompts, cfg).outputs]
    assert batch == alone


def test_streaming_callback_reassembles_the_text(tiny):
    bundle, tok = tiny
    pieces: list[str] = []
    with _runner(bundle) as r:
        out = generate(r, tok, ["stream"], SamplingConfig(max_new_tokens=12, stop_at_eos=False),
                       on_text=lambda row, t: pieces.append(t)).outputs[0]
    assert len(pieces) > 1 and "".join(pieces) == out.text.rstrip("\ufffd")


# ---- the `leptonc run` command -------------------------------------------------------------------

def test_run_repeated_prompts_and_prompt_file(tiny_bundle, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("from a file\n\nsecond line\n")
    proc = run_cli("run", tiny_bundle, "-p", "one", "-p", "two words", "--prompt-file", f, "-n", 5, "--json",
                   "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    outs = json.loads(proc.stdout)["outputs"]
    assert [o["prompt"] for o in outs] == ["one", "two words", "from a file", "second line"]
    assert all(len(o["token_ids"]) == 5 for o in outs)


def test_run_seed_cli_reproducible_and_streams(tiny_bundle):
    args = ("run", tiny_bundle, "-p", "seed", "-n", 8, "--temperature", "1.0", "--top-k", 20, "--top-p", "0.95",
            "--seed", 11, "--ignore-eos")
    a, b = run_cli(*args, "--json"), run_cli(*args, "--json")
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["outputs"][0]["token_ids"] == json.loads(b.stdout)["outputs"][0]["token_ids"]
    streamed = run_cli(*args)  # no --json: the prompt, then the text streamed to stdout
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.rstrip("\n") == "seed" + json.loads(a.stdout)["outputs"][0]["text"]


def test_run_stop_flag(tiny_bundle):
    free = json.loads(run_cli("run", tiny_bundle, "-p", "Hello", "-n", 24, "--ignore-eos", "--json").stdout)
    text = free["outputs"][0]["text"]
    proc = run_cli("run", tiny_bundle, "-p", "Hello", "-n", 24, "--ignore-eos", "--json", "--stop", text[6:8])
    out = json.loads(proc.stdout)["outputs"][0]
    assert out["finish_reason"] == "stop" and out["text"] == text[: text.find(text[6:8])]


def test_run_chat_without_template_is_a_clean_error(tiny_bundle):
    proc = run_cli("run", tiny_bundle, "-p", "hi", "--chat")
    assert_clean_error(proc, 8)
    assert "chat template" in proc.stderr


def test_prompt_too_long_names_both_lengths(tiny_bundle, tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("x" * 3000 + "\n")  # byte-level tokenizer: 3000 tokens; the bundle allows 2048
    proc = run_cli("run", tiny_bundle, "--prompt-file", f, "-n", 4)
    assert_clean_error(proc, 8)
    assert "3000" in proc.stderr and "2048" in proc.stderr


@pytest.mark.parametrize("bad", [["--top-p", "0"], ["--top-k", "-1"], ["--temperature", "-1"], ["-n", "0"]])
def test_bad_sampling_options_are_clean_errors(tiny_bundle, bad):
    assert_clean_error(run_cli("run", tiny_bundle, "-p", "hi", *bad), 2)  # a bad option: exit 2, as README says


# ---- bench ---------------------------------------------------------------------------------------

def test_bench_json_with_hf_baseline(tiny_bundle):
    # the floor needs a bandwidth: the CPU has no measured one, so give the H100's (3.0 TB/s)
    proc = run_cli("bench", tiny_bundle, "--batch", "1,2", "--prompt-len", 8, "--gen-len", 6, "--warmup", 1,
                   "--iters", 2, "--baseline", "hf", "--bandwidth", "3.0e12", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["device"].startswith("cpu")
    assert [r["batch"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        for key in ("ttft_ms", "decode_tokens_per_s", "p50_ms", "p99_ms", "peak_host_mb", "peak_gpu_mb"):
            assert key in r
        assert r["decode_tokens_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
        floor = r["memory_floor"]
        assert floor["floor_tokens_per_s"] == pytest.approx(r["batch"] * 3.0e12 / floor["weight_bytes"], rel=1e-3)
    base = data["baseline"]
    assert base["source"] == "tiny-llama" and "transformers" in base["framework"]
    for c, r, h in zip(data["comparison"], data["results"], base["results"]):
        assert c["decode_speedup"] == pytest.approx(r["decode_tokens_per_s"] / h["decode_tokens_per_s"], rel=0.01)


def test_bench_rejects_unknown_baseline(tiny_bundle):
    proc = run_cli("bench", tiny_bundle, "--baseline", "vllm", "--iters", 1)
    assert_clean_error(proc, 2)  # a bad option: exit 2, as README says
    assert "'hf'" in proc.stderr


def test_eval_of_bundle_and_model_source_agree(tiny_bundle, tmp_path):
    """`leptonc eval` on a bundle (ONNX Runtime) and on the model source (PyTorch) give one perplexity."""
    f = tmp_path / "text.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    args = ("--data", f, "--max-tokens", 300, "--window", 128, "--stride", 64, "--json")
    bundle, source = run_cli("eval", tiny_bundle, *args), run_cli("eval", "tiny-llama", *args)
    assert bundle.returncode == 0 and source.returncode == 0, bundle.stderr + source.stderr
    b, s = json.loads(bundle.stdout), json.loads(source.stdout)
    assert (b["evaluated"], s["evaluated"]) == ("bundle", "pytorch")
    assert b["tokens"] == s["tokens"] == 300 and b["scored_tokens"] == 299
    assert b["perplexity"] == pytest.approx(s["perplexity"], rel=1e-3)


@pytest.fixture(scope="module")
def mask_sum_bundle(tmp_path_factory):
    """tiny-llama built with the GPU targets' attention contract (lengths from the mask's contents,
    packed Q/K/V and rotary folded into GroupQueryAttention), run here on ONNX Runtime's CPU provider."""
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig
    from leptonc.passes import fuse_gqa

    out = tmp_path_factory.mktemp("bundles") / "tiny.masksum.lepton"
    with pytest.MonkeyPatch.context() as patch:  # the GPU contract, which no CPU compile chooses
        patch.setattr(fuse_gqa, "lengths_contract", lambda ctx: "mask_sum")
        compile_model(CompileConfig(source="tiny-llama", target="cpu", output=str(out)))
    return load_bundle(out)


def test_mask_sum_graph_is_capture_ready(mask_sum_bundle):
    """What CUDA-graph capture needs from the graph: no attention bias, rotary and Q/K/V packed into
    GroupQueryAttention, lengths from the mask on the device, and no shape arithmetic feeding a
    device-side input (which would put a Memcpy node in the graph: ONNX Runtime then refuses capture)."""
    import onnx

    b = mask_sum_bundle
    assert b.engine["session"]["gqa_lengths"] == "mask_sum"
    g = onnx.load(str(b.model_path), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert "RotaryEmbedding" not in ops and "Range" not in ops and "Where" not in ops
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == b.io["num_layers"]
    for n in gqa:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        assert a["do_rotary"] == 1 and n.input[1] == n.input[2] == ""  # packed Q/K/V
        assert len(n.input) <= 10  # no attention_bias, no query_seqlens (ONNX Runtime 1.31 takes at most 16)
    # Host-side values (Shape and what is computed from it) may only feed inputs ONNX Runtime reads on
    # the host: Reshape's shape and GroupQueryAttention's total_sequence_length.
    producers = {o: n for n in g.node for o in n.output}
    host = set()
    for n in g.node:
        if n.op_type == "Shape" or (n.input and all(i in host or (i not in producers and i not in
                                                               {x.name for x in g.input}) for i in n.input if i)
                                    and any(i in host for i in n.input)):
            host.update(n.output)
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in host and n.output[0] not in host:
                assert (n.op_type, k) in {("Reshape", 1), ("GroupQueryAttention", 6)}, (n.op_type, k, i)


def test_mask_sum_runner_right_pads_and_matches_left_padded_graph(tiny, mask_sum_bundle):
    """The runtime side of the contract: callers pass left-padded batches; the runner right-pads them,
    decodes against a fixed [B, capacity] mask, and returns logits in the caller's layout, equal to
    the CPU graph's (which masks padding with a bias instead)."""
    bundle, _ = tiny
    r = _runner(mask_sum_bundle, "iobinding", max_sequence=64)
    assert r.right_pad and r.shared_kv and r.describe()["padding"].startswith("right")
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 500, size=(3, 10), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = mask[2, :6] = 0
    ids[mask == 0] = 0
    with r, _runner(bundle) as ref:
        full, want = r.prefill(ids, mask), ref.prefill(ids, mask)
        np.testing.assert_allclose(full[mask == 1], want[mask == 1], atol=1e-5)
        for _ in range(2):  # a second sequence on the same buffers starts clean
            a, b = r.prefill(ids, mask, last_only=True), ref.prefill(ids, mask, last_only=True)
            np.testing.assert_allclose(a, b, atol=1e-5)
            for _ in range(20):
                tok = b.argmax(-1)
                a, b = r.decode(tok), ref.decode(tok)
                np.testing.assert_allclose(a, b, atol=1e-5)
        assert r.sequence_length == ref.sequence_length == 30
        # the step's ids, positions and mask are views of one buffer: one copy to the device a step
        assert "inputs" in r._static[3] and not {"ids", "pos", "mask"} & set(r._static[3])
        with pytest.raises(Exception, match="limit"):
            for _ in range(64):
                r.decode(np.zeros(3, np.int64))


@pytest.mark.parametrize("graph", ["cpu contract", "mask_sum"])
def test_prefill_in_row_chunks_matches_one_run(tiny, mask_sum_bundle, graph):
    """A prefill split into runs of whole rows (each bound to its rows of the one K/V block) gives the
    same logits and the same cache as one run over the batch, for a padded batch and both contracts."""
    from leptonc.runtime.engine_settings import EngineSettings
    from leptonc.runtime.ort_cuda import OrtCudaRunner

    bundle = tiny[0] if graph == "cpu contract" else mask_sum_bundle
    rng = np.random.default_rng(5)
    ids = rng.integers(3, 500, size=(3, 10), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = mask[2, :7] = 0
    ids[mask == 0] = 0

    def runner(tokens):
        return OrtCudaRunner(bundle.model_path, bundle.io, bundle.engine["session"], device_type="cpu", max_sequence=48,
                             max_batch=bundle.max_batch, run_settings=EngineSettings(prefill_tokens=tokens))

    with runner(512) as whole, runner(20) as chunked:  # 20 tokens: rows of 10 go two, then one
        assert chunked.describe()["prefill_tokens"] == 20 and chunked.shared_kv
        a, b = whole.prefill(ids, mask), chunked.prefill(ids, mask)
        np.testing.assert_allclose(b[mask == 1], a[mask == 1], atol=1e-5)
        a, b = whole.prefill(ids, mask, last_only=True), chunked.prefill(ids, mask, last_only=True)
        np.testing.assert_allclose(b, a, atol=1e-5)
        for _ in range(6):  # the decode steps read what each chunk wrote into the cache
            tok = a.argmax(-1)
            a, b = whole.decode(tok), chunked.decode(tok)
            np.testing.assert_allclose(b, a, atol=1e-5)


@pytest.mark.parametrize("option, message", [("prefill_tokens=abc", "not a whole number"),
                                              ("prefill_tokens=0", "below 1"), ("prefill_token=8", "unknown engine")])
def test_bad_engine_option_is_a_clean_error(tiny_bundle, option, message):
    proc = run_cli("run", tiny_bundle, "-p", "hi", "-n", "2", "--engine-option", option)
    assert_clean_error(proc, 8)
    assert message in proc.stderr


def test_engine_settings_are_in_the_manifest_and_an_override_is_recorded_in_bench_json(tiny, tiny_bundle):
    """The run-time settings live in the bundle's engine section; `--engine-option` overrides one for a run,
    and `bench --json` records the settings the runner used."""
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.engine_settings import EngineSettings

    bundle = tiny[0]
    assert bundle.engine["run_settings"] == EngineSettings().as_dict()
    with open_bundle_runner(bundle, overrides={"prefill_tokens": "64"}) as runner:
        assert runner.prefill_tokens == 64
    proc = run_cli("bench", tiny_bundle, "--batch", "1", "--prompt-len", "8", "--gen-len", "2", "--warmup", "0",
                   "--iters", "1", "--json", "--engine-option", "prefill_tokens=64")
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(proc.stdout)["runner"]["engine_settings"]
    assert settings == {**EngineSettings().as_dict(), "prefill_tokens": 64}


def test_kv_cache_that_cannot_be_allocated_is_an_input_error(tiny):
    """A batch whose K/V block does not fit names the size and the next step, instead of ONNX Runtime's
    allocator failure."""
    bundle, _ = tiny
    with _runner(bundle, "iobinding", max_sequence=10**12) as r:
        ids = np.ones((2, 4), np.int64)
        with pytest.raises(InputError, match=r"KV cache for batch 2 .* GiB") as err:
            r.prefill(ids, np.ones_like(ids))
        assert "--max-seq" in err.value.hint


def test_lm_head_runs_on_selected_positions_only(tiny, tmp_path):
    """passes/select_logits.py: the graph takes `logits_positions`; a last-only prefill computes [B, 1, V]
    (not [B, S, V]) and equals the last column of the full prefill, for left-padded rows too; the
    manifest's I/O spec lists the input."""
    import onnx

    bundle, _ = tiny
    assert any(t["name"] == "logits_positions" for t in bundle.io["inputs"])
    g = onnx.load(str(bundle.model_path), load_external_data=False).graph
    gather = [n for n in g.node if n.op_type == "GatherND"]
    assert len(gather) == 1 and any(n.op_type == "Gemm" for n in g.node)
    ids = np.random.default_rng(5).integers(3, 500, size=(2, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    for kind in ("cpu", "iobinding"):
        with _runner(bundle, kind) as r:
            full = r.prefill(ids, mask)
            assert full.shape == (2, 9, bundle.io["vocab_size"])
            last = r.prefill(ids, mask, last_only=True)
            np.testing.assert_allclose(last, full[:, -1], atol=1e-5)


def test_cpu_graph_keeps_left_padding_contract(tiny):
    """CPU bundles keep the mask-length contract (left padding in the graph): no right-padding, no
    CUDA graph, and the runner says why."""
    bundle, _ = tiny
    r = _runner(bundle, "iobinding")
    assert not r.right_pad and "mask's length" in r.describe()["cuda_graph"]
    assert "gqa_lengths" not in bundle.engine["session"]


def test_gpu_compile_without_cuda_provider_names_the_install(tmp_path):
    """A GPU bundle cross-compiles where ONNX Runtime has no CUDA provider: the summary names the GPU check
    left pending and what runs it, and running the bundle here is a clean exit 5 naming the install."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider; the cross-compile path cannot be seen here")
    out = tmp_path / "x.lepton"
    proc = run_cli("compile", "tiny-llama", "--target", "h100", "--backend", "onnxruntime", "-o", out)
    assert proc.returncode == 0, proc.stderr
    summary = " ".join(proc.stdout.split())
    assert "gpu_parity pending" in summary and "leptonc verify" in summary and "onnxruntime-gpu" in summary
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in manifest["verification"]["pending_gpu_checks"]] == ["gpu_parity"]
    run = run_cli("run", out, "--prompt", "hi", "-n", 2)
    assert_clean_error(run, 5)
    assert "pip install onnxruntime-gpu" in run.stderr


def test_last_position_gather_runs_on_the_runners_provider(tiny):
    """The one-node helper session that slices each row's last position out of [B, S, vocab] logits
    (used when a graph has no logits_positions input) returns logits[b, last[b]]."""
    from leptonc.runtime.ort_cuda import OrtCudaRunner

    bundle = tiny[0]
    logits = np.random.default_rng(3).standard_normal((3, 7, bundle.io["vocab_size"])).astype(np.float32)
    last = np.array([6, 2, 4])
    with OrtCudaRunner(bundle.model_path, bundle.io, bundle.engine["session"], device_type="cpu",
                       max_sequence=48, max_batch=bundle.max_batch) as runner:
        got = runner._last_position(runner._ortvalue(logits), last)
    np.testing.assert_array_equal(got, logits[np.arange(3), last])


@pytest.mark.parametrize("graph", ["cpu contract", "mask_sum"])
def test_greedy_tokens_come_from_the_graph(tiny, mask_sum_bundle, graph):
    """passes/greedy_token.py: the bundle has a `next_token` output (ArgMax in the graph, listed in the
    manifest), and a greedy step that copies only it gives the argmax of the same step's logits, for
    left-padded rows and through the shared and growing cache layouts."""
    import onnx

    bundle = tiny[0] if graph == "cpu contract" else mask_sum_bundle
    assert {"name": "next_token", "dtype": "int64", "shape": ["batch", "logits_sequence"]} in bundle.io["outputs"]
    g = onnx.load(str(bundle.model_path), load_external_data=False).graph
    assert [o.name for o in g.output].count("next_token") == 1
    assert sum(n.op_type == "ArgMax" for n in g.node) == 1
    rng = np.random.default_rng(11)
    ids = rng.integers(3, 500, size=(3, 7), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[2, :3] = 0
    kinds = ["iobinding"] if graph == "mask_sum" else ["cpu", "iobinding"]
    for kind in kinds:
        with _runner(bundle, kind, max_sequence=48) as greedy, _runner(bundle, kind, max_sequence=48) as full:
            assert getattr(greedy, "greedy_output", True)
            tok = greedy.prefill(ids, mask, last_only=True).argmax(-1)
            full.prefill(ids, mask, last_only=True)
            seen = set()
            for _ in range(12):
                want = full.decode(tok).argmax(-1)
                tok = greedy.decode_tokens(tok)
                assert tok.shape == (3,) and tok.dtype == np.int64
                np.testing.assert_array_equal(tok, want)
                seen.update(tok.tolist())
            assert len(seen) > 3  # the tokens move: not a constant answer


def test_greedy_generation_reads_tokens_not_logits(tiny):
    """`generate` at temperature 0 runs decode_tokens; its tokens equal greedy decoding from the logits."""
    bundle, tok = tiny

    class LogitsOnly:  # the same runner, forced through decode() + host argmax
        def __init__(self, r):
            self.r = r

        def __getattr__(self, name):
            return getattr(self.r, name)

        def decode_tokens(self, token_ids):
            return self.r.decode(token_ids).argmax(-1)

        def greedy_tokens(self, token_ids, steps):  # the base loop, so it calls the decode_tokens above
            return Runner.greedy_tokens(self, token_ids, steps)

    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    with _runner(bundle, "iobinding") as r:
        a = generate(r, tok, ["The capital of France is", "hi"], cfg)
        b = generate(LogitsOnly(r), tok, ["The capital of France is", "hi"], cfg)
    assert [g.token_ids for g in a.outputs] == [g.token_ids for g in b.outputs]
    assert all(len(g.token_ids) == 12 for g in a.outputs)


def _pipelined(runner):
    runner._driver, runner._stream, runner.pipelined = HostMemoryDriver(), 1, True
    return runner


def test_pipelined_greedy_tokens_match_step_by_step_decode(mask_sum_bundle):
    """Runner.greedy_tokens with the pipeline (ids copied from the step before's next_token, positions and mask
    from a slot per step in flight) gives the tokens of decode_tokens step by step; stopping early leaves the
    runner where the caller stopped, so decoding goes on correctly; the sequence limit is an InputError after
    the tokens that fit."""
    from leptonc.runtime.fixed_decode import PIPELINE_DEPTH

    rng = np.random.default_rng(5)
    ids = rng.integers(3, 500, size=(3, 7), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    with _runner(mask_sum_bundle, "iobinding", max_sequence=24) as ref, \
            _pipelined(_runner(mask_sum_bundle, "iobinding", max_sequence=24)) as pipe:
        first = ref.prefill(ids, mask, last_only=True).argmax(-1)
        np.testing.assert_array_equal(pipe.prefill(ids, mask, last_only=True).argmax(-1), first)
        want, tok = [], first
        for _ in range(10):
            tok = ref.decode_tokens(tok)
            want.append(tok)
        got = list(pipe.greedy_tokens(first, 10))
        np.testing.assert_array_equal(np.stack(got), np.stack(want))
        assert len({t for row in want for t in row.tolist()}) > 3  # the tokens move
        assert pipe._driver.copies == 10 * 3 - 1  # inputs in, tokens out, ids from the step before (not the first)

        # stop after 4 of 10 (the pipeline has launched more): the runner continues from the 4th token
        pipe.prefill(ids, mask, last_only=True)
        stream = pipe.greedy_tokens(first, 10)
        head = [next(stream) for _ in range(4)]
        assert pipe.sequence_length == 7 + 4 + PIPELINE_DEPTH - 1
        stream.close()
        assert pipe.sequence_length == 7 + 4
        np.testing.assert_array_equal(np.stack(head), np.stack(want[:4]))
        tok = head[-1]
        for k in range(4, 10):
            tok = pipe.decode_tokens(tok)
            np.testing.assert_array_equal(tok, want[k])

        # 24 - 7 = 17 steps fit: 20 asked yields 17 tokens, then the limit
        pipe.prefill(ids, mask, last_only=True)
        stream = pipe.greedy_tokens(first, 20)
        got = []
        with pytest.raises(InputError, match="limit of 24 tokens"):
            for t in stream:
                got.append(t)
        assert len(got) == 17
        np.testing.assert_array_equal(np.stack(got[:10]), np.stack(want))


def test_pipeline_is_off_with_a_reason_where_it_cannot_run(mask_sum_bundle, monkeypatch):
    """Without captured decode steps (here: ONNX Runtime's CPU provider) the pipeline is off and describe() says why;
    greedy_tokens is then the step-by-step loop. Where the CUDA driver cannot be loaded, CudaDriver raises its own
    error (the runner turns it into that reason) instead of an OSError."""
    from leptonc.runtime import cuda_driver

    with _runner(mask_sum_bundle, "iobinding", max_sequence=24) as r:
        assert not r.pipelined and r.describe()["greedy_pipeline"].startswith("off: needs captured decode steps")
    monkeypatch.setattr(cuda_driver.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(f"{name}: not found")))
    with pytest.raises(cuda_driver.CudaDriverError, match="CUDA driver library is not loadable"):
        cuda_driver.CudaDriver(0)


def test_cublas_workspace_env_is_set_where_unset_kept_where_given_and_restored(monkeypatch):
    """Device memory: the CUDA runner caps cuBLAS's default workspace pool only where the user said nothing,
    and `bench --baseline hf` gets the user's environment back."""
    from leptonc.runtime import ort_cuda_session as ort_cuda

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(ort_cuda, "_cublas_env_set", False)
    assert ort_cuda.cublas_workspace_env() == ":4096:1 (leptonc's default)"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:1"
    ort_cuda.restore_cublas_env()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert ort_cuda.cublas_workspace_env() == ":4096:8 (set by the user)"
    ort_cuda.restore_cublas_env()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_memory_bound_is_weights_plus_kv_held_plus_a_quarter():
    """The device-memory bound's arithmetic, with llama-1b-shape fp16's figures from the H100 (2026-11-23)."""
    from leptonc.runtime.bench import memory_bound

    mib = 2**20
    ok = memory_bound(2373 * mib, 640 * mib, 3732.8)
    assert ok == {"weights_mb": 2373.0, "kv_held_mb": 640.0, "bound_mb": 3766.2, "peak_mb": 3732.8, "within": True}
    assert not memory_bound(2373 * mib, 640 * mib, 4004.8)["within"]


def test_bench_reports_peak_against_the_memory_bound(mask_sum_bundle, monkeypatch):
    """`leptonc bench` on the shared-cache runner (ONNX Runtime's CPU provider standing in for CUDA, with a
    device peak supplied): each batch's K/V blocks held, the bound, and whether the peak is within it."""
    from typer.testing import CliRunner

    from leptonc import cli, cli_runtime
    from leptonc.runtime.bench import kv_bytes_per_token
    from leptonc.runtime.ort_cuda import OrtCudaRunner

    runner = _runner(mask_sum_bundle, "iobinding")
    peaks = iter([1.0, 1e9])  # batch 1 within its bound, batch 2 far over
    monkeypatch.setattr(runner, "peak_device_memory_mb", lambda: next(peaks))
    monkeypatch.setattr(cli_runtime, "_open", lambda *a, **k: (runner, None, (), mask_sum_bundle))
    assert isinstance(runner, OrtCudaRunner) and runner.shared_kv
    res = CliRunner().invoke(cli.app, ["bench", str(mask_sum_bundle.path), "--batch", "1,2", "--prompt-len", "8",
                                       "--gen-len", "4", "--warmup", "0", "--iters", "1", "--json"])
    assert res.exit_code == 0, res.output
    results = json.loads(res.stdout)["results"]
    kv = kv_bytes_per_token(mask_sum_bundle.io) * runner.capacity / 2**20
    b1, b2 = (r["memory_bound"] for r in results)
    assert b1["kv_held_mb"] == pytest.approx(kv, abs=0.1) and b2["kv_held_mb"] == pytest.approx(3 * kv, abs=0.1)
    assert b1["bound_mb"] == pytest.approx(1.25 * (b1["weights_mb"] + b1["kv_held_mb"]), abs=0.2)
    assert (b1["within"], b2["within"]) == (True, False)
