"""Pruning: structured MLP channels (--prune), KV-head groups (--prune-heads), 2:4 sparsity.

Fast tests compile tiny random models in process; one slow test compiles the real smollm2-135m.
Every compile here runs the compiler's own verification: parity of the bundle against the *pruned*
PyTorch model (fp32, <= 1e-3), which fails the compile if the graph and the pruned model disagree.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from leptonc.passes.pruning import (channel_scores, group_scores, kept_channels, mask_2_4, mlp_keep_count,
                                         violates_2_4)
from conftest import assert_clean_error, run_cli

PROMPT = "The capital of France is"


def _compile(source: str, out, **options):
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    precision = options.pop("precision", None)
    names = {"prune": "mlp_ratio", "prune_heads": "kv_heads", "sparsity": "sparsity"}
    return compile_model(CompileConfig(source=str(source), target="cpu", output=str(out), precision=precision,
                                       pruning={names[k]: v for k, v in options.items()}))


def _weights(bundle) -> dict[str, np.ndarray]:
    """The bundle's initializers by name (external data loaded)."""
    model = onnx.load(str(bundle.model_path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _matmul_weights(bundle) -> dict[str, np.ndarray]:
    """Weights read as the B input ([K, N]) of a MatMul: the decoder's linears (the LM head is a Gemm)."""
    model = onnx.load(str(bundle.model_path))
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            arr = numpy_helper.to_array(inits[node.input[1]])
            if arr.ndim == 2 and arr.size > 64:
                out[node.input[1]] = arr
    return out


def _greedy(runner, ids: np.ndarray, steps: int) -> list[int]:
    logits = runner.prefill(ids, np.ones_like(ids))[0]
    token, out = int(logits[-1].argmax()), []
    for _ in range(steps):
        out.append(token)
        token = int(runner.decode(np.asarray([token]))[0].argmax())
    return out


# ---- the pieces ------------------------------------------------------------------------------------

def test_2_4_mask_keeps_the_two_largest_of_each_group_of_four():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 32)).astype(np.float32)
    mask = mask_2_4(w)
    groups = mask.reshape(16, 8, 4)
    assert (groups.sum(-1) == 2).all()
    mags = np.abs(w).reshape(16, 8, 4)
    kept_min = np.where(groups, mags, np.inf).min(-1)
    dropped_max = np.where(groups, -np.inf, mags).max(-1)
    assert (kept_min >= dropped_max).all()  # by magnitude
    # violates_2_4 checks the [K, N] MatMul layout along K (axis 0)
    assert violates_2_4((w * mask).T, axis=0) == 0
    assert violates_2_4(w.T, axis=0) > 0


def test_scores_are_activation_times_weight_norm_and_groups_follow_repeat_kv():
    act = np.array([1.0, 2.0, 0.5, 4.0])
    w = np.array([[3.0, 0.0, 1.0, 0.1], [4.0, 1.0, 0.0, 0.1]])
    np.testing.assert_allclose(channel_scores(act, w), [5.0, 2.0, 0.5, 4.0 * np.hypot(0.1, 0.1)])
    assert kept_channels(channel_scores(act, w), 2).tolist() == [0, 1]  # original order, top-2 scores
    # 4 query heads, 2 KV heads, head_dim 1: query heads 0,1 read KV head 0; 2,3 read KV head 1
    np.testing.assert_allclose(group_scores(np.ones(4), np.eye(4) * [1, 2, 3, 4], 4, 2, 1), [3.0, 7.0])
    assert mlp_keep_count(1536, 0.25, 8) == 1152 and mlp_keep_count(1536, 0.3, 8) % 8 == 0
    assert mlp_keep_count(176, 0.25, 8) == 132


# ---- tiny-llama: --prune, --sparsity ------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned_tiny(tmp_path_factory):
    return _compile("tiny-llama", tmp_path_factory.mktemp("prune") / "tiny.p25.lepton", prune=0.25)


def test_prune_removes_mlp_channels_and_passes_parity_against_the_pruned_model(pruned_tiny, tiny_bundle):
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner

    report = pruned_tiny.report()
    pr = report["pruning"]
    assert pr["requested"]["prune"] == 0.25
    assert abs(pr["parameters"]["mlp_removed_ratio"] - 0.25) <= 0.01
    assert pr["parameters"]["after"]["total"] < pr["parameters"]["before"]["total"]
    assert [row["intermediate_after"] for row in pr["layers"]] == [132, 132]
    assert all(abs(row["mlp_ratio"] - 0.25) < 1e-9 for row in pr["layers"])
    acc = pr["accuracy"]
    assert np.isfinite(acc["reference_perplexity"]) and np.isfinite(acc["pruned_perplexity"])
    assert acc["reference_perplexity"] != acc["pruned_perplexity"] and 0 < acc["top1_agreement"] <= 1
    v = report["verification"]
    assert v["status"] == "passed" and v["max_abs_error"] <= 1e-3 and v["reference"] == "pruned PyTorch fp32"
    assert pruned_tiny.manifest["model"]["intermediate_size"] == 132
    # the graph really is smaller: every MLP matrix has 132 channels where the unpruned one has 176
    w = _weights(pruned_tiny)
    assert w["layers.0.down.weight"].shape == (132, 64)
    assert _weights(load_bundle(tiny_bundle))["layers.0.down.weight"].shape == (176, 64)
    assert pruned_tiny.manifest["engine"]["file"]  # and it runs: greedy tokens come out
    runner = open_bundle_runner(pruned_tiny)
    try:
        ids = np.asarray([[1, 70, 80, 90, 100]], np.int64)
        assert len(_greedy(runner, ids, 4)) == 4
    finally:
        runner.release()


def test_sparsity_2_4_every_linear_weight_has_at_most_two_nonzeros_per_group(tmp_path):
    bundle = _compile("tiny-llama", tmp_path / "tiny.s24.lepton", sparsity="2:4")
    weights = _matmul_weights(bundle)
    assert len(weights) >= 2 * 4  # per layer at least q|k|v (maybe merged), o, gate|up, down
    for name, w in weights.items():
        assert violates_2_4(w, axis=0) == 0, name
        assert (w == 0).mean() >= 0.5 - 1e-6, name
    pr = bundle.report()["pruning"]
    assert pr["sparsity"]["mode"] == "simulated" and pr["sparsity"]["weights"] == 14
    assert "simulated" in pr["note"]
    assert np.isfinite(pr["accuracy"]["pruned_perplexity"])
    assert bundle.report()["verification"]["status"] == "passed"


def test_prune_composes_with_int8(tmp_path, monkeypatch):
    monkeypatch.setenv("LEPTONC_CACHE", str(tmp_path / "cache"))
    # an unpruned int8 compile first fills the calibration cache: the pruned model must not be served
    # those statistics (its MLP inputs have 132 channels, not 176)
    plain = _compile("tiny-llama", tmp_path / "tiny.int8.lepton", precision="int8")
    bundle = _compile("tiny-llama", tmp_path / "tiny.p25.int8.lepton", prune=0.25, precision="int8")
    assert bundle.manifest["calibration"]["cache"]["key"] != plain.manifest["calibration"]["cache"]["key"]
    assert bundle.manifest["source"]["hash"] == plain.manifest["source"]["hash"]  # still the same source model
    report = bundle.report()
    assert report["precision"] == "int8" and report["quantization"]["accuracy_gate"]["status"] == "passed"
    assert abs(report["pruning"]["parameters"]["mlp_removed_ratio"] - 0.25) <= 0.01
    ops = report["graph"]["op_counts"]
    assert ops.get("QuantizeLinear", 0) + ops.get("MatMulNBits", 0) + ops.get("MatMulInteger", 0) > 0, ops
    assert bundle.manifest["model"]["intermediate_size"] == 132


# ---- a model with 3 KV heads: --prune-heads 1 ------------------------------------------------------

@pytest.fixture(scope="module")
def gqa3_dir(tmp_path_factory):
    """A seeded random Llama with 9 query heads and 3 KV heads (SmolLM2-135M's layout), saved as HF."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from leptonc.models.intake import byte_level_tokenizer

    d = tmp_path_factory.mktemp("gqa3") / "llama-gqa3"
    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=144, intermediate_size=192,
                                  num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                                  max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=True)
    torch.manual_seed(3)
    module = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    module.save_pretrained(d)
    byte_level_tokenizer().save_pretrained(d)
    return d, module


def test_prune_heads_gives_a_consistent_runnable_graph(gqa3_dir, tmp_path):
    import onnxruntime as ort
    import torch

    src, module = gqa3_dir
    bundle = _compile(src, tmp_path / "gqa3.h1.lepton", prune_heads=1)
    report, manifest = bundle.report(), bundle.manifest
    rows = report["pruning"]["layers"]
    assert [r["kv_heads_after"] for r in rows] == [2, 2] and [r["query_heads_after"] for r in rows] == [6, 6]
    assert manifest["model"]["num_kv_heads"] == 2 and manifest["model"]["num_heads"] == 6
    assert manifest["model"]["head_dim"] == 16 and manifest["model"]["hidden_size"] == 144
    io = manifest["engine"]["io"]
    assert io["num_kv_heads"] == 2
    kv_specs = [t for t in io["inputs"] + io["outputs"] if t["name"].startswith(("past_key_values.", "present."))]
    assert len(kv_specs) == 8 and all(t["shape"][1] == 2 and t["shape"][3] == 16 for t in kv_specs)
    v = report["verification"]
    assert v["status"] == "passed" and v["max_abs_error"] <= 1e-3 and v["reference"] == "pruned PyTorch fp32"

    # the ONNX graph's declared I/O and what ONNX Runtime actually produces agree with the spec
    model = onnx.load(str(bundle.model_path), load_external_data=False)
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name.startswith(("past_key_values.", "present.")):
            assert vi.type.tensor_type.shape.dim[1].dim_value == 2, vi.name
    sess = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    ids = np.asarray([[1, 84, 104, 101, 32, 99]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None, :],
            "logits_positions": np.arange(6)[None, :]}  # passes/select_logits.py: every position
    for i in range(2):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 0, 16), np.float32)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feed)))
    assert outs["present.0.key"].shape == (1, 2, 6, 16) and outs["present.1.value"].shape == (1, 2, 6, 16)
    # a decode step through the cache
    step = {"input_ids": np.asarray([[int(outs["logits"][0, -1].argmax())]]), "attention_mask": np.ones((1, 7), np.int64),
            "position_ids": np.asarray([[6]]), "logits_positions": np.asarray([[0]])}
    step.update({f"past_key_values.{i}.{k}": outs[f"present.{i}.{k}"] for i in range(2) for k in ("key", "value")})
    outs2 = dict(zip(names, sess.run(None, step)))
    assert outs2["present.0.key"].shape == (1, 2, 7, 16)
    # the bundle is the pruned model, not the original: its logits moved away from the unpruned ones
    with torch.no_grad():
        ref = module(torch.from_numpy(ids)).logits[0].numpy()
    assert np.abs(outs["logits"][0] - ref).max() > 1e-2


def test_prune_heads_must_leave_a_head(tmp_path, capsys):
    from leptonc.cli import main

    with pytest.raises(SystemExit) as exc:  # tiny-llama has 2 KV heads
        main(["compile", "tiny-llama", "--prune-heads", "2", "-o", str(tmp_path / "x.lepton")])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "Traceback" not in err
    assert "--prune-heads 2" in err and "--prune-heads 1..1" in err
    assert not (tmp_path / "x.lepton").exists()


@pytest.mark.parametrize("args, needle", [
    (["--prune", "1.5"], "between 0 and 1"),
    (["--prune", "0"], "between 0 and 1"),
    (["--sparsity", "1:2"], "supported pattern is 2:4"),
    (["--prune-heads", "-1"], "--prune-heads -1"),
])
def test_bad_pruning_flags_exit_2(args, needle, capsys):
    from leptonc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["compile", "tiny-llama", *args, "--dry-run", "--json"])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "Traceback" not in err and needle in err, err


def test_sparsity_is_accepted_on_cpu_and_recorded_in_the_plan():
    proc = run_cli("compile", "tiny-llama", "--sparsity", "2:4", "--prune", "0.3", "--dry-run", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["config"]["pruning"]["mlp_ratio"] == 0.3 and plan["config"]["pruning"]["sparsity"] == "2:4"


def test_pruning_an_unsupported_architecture_is_refused(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from leptonc.models.intake import byte_level_tokenizer

    d = tmp_path / "gpt2"
    config = AutoConfig.for_model("gpt2", vocab_size=320, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    byte_level_tokenizer().save_pretrained(d)
    proc = run_cli("compile", d, "--prune", "0.25", "-o", tmp_path / "g.lepton", timeout=300)
    assert_clean_error(proc, 2)
    assert "pruning supports the Llama-layout architectures" in " ".join(proc.stderr.split())


# ---- the real model --------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_prune_025_removes_a_quarter_of_the_mlp_and_matches_the_pruned_model(tmp_path):
    bundle = _compile("smollm2-135m", tmp_path / "smol.p25.lepton", prune=0.25)
    report = bundle.report()
    pr = report["pruning"]
    assert 0.24 <= pr["parameters"]["mlp_removed_ratio"] <= 0.26
    assert len(pr["layers"]) == 30 and all(r["intermediate_after"] == 1152 for r in pr["layers"])
    v = report["verification"]
    assert v["status"] == "passed" and v["max_abs_error"] <= 1e-3 and v["reference"] == "pruned PyTorch fp32"
    acc = pr["accuracy"]
    assert 5 < acc["reference_perplexity"] < 30  # the unpruned model (~12.7 on wikitext in DESIGN.md)
    assert acc["pruned_perplexity"] > acc["reference_perplexity"] and np.isfinite(acc["pruned_perplexity"])
    print(json.dumps({"parameters": pr["parameters"], "accuracy": acc}, indent=1))
