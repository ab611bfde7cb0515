"""Graph passes, one at a time: each runs on a real export (tiny-llama, or small synthetic graphs for
the cleanup passes), then ONNX Runtime runs the graph before and after on seeded random inputs
(left-padded batches, prefill, decode and a chunked prefill over a cache) and the results must agree
within a per-dtype tolerance; the operator counts must show the rewrite. Near-matches (an
intermediate read elsewhere) must be left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from leptonc.passes import PassContext, run_pipeline
from leptonc.targets.backends.onnxruntime import CLEANUP, CPU_PIPELINE

TOL = {"fp32": 1e-4, "fp16": 2e-2}  # max |difference| relative to max(1, max |logit|)
SHAPES = ((2, 7, 0), (2, 1, 9), (3, 4, 6))  # (batch, new tokens, past tokens): prefill, decode, chunk


# ---- helpers -------------------------------------------------------------------------------------

def export_model(module, out_dir, dtype="fp32"):
    from leptonc.export import export_decoder
    from leptonc.models.adapters import get_adapter

    adapter = get_adapter(module.config.model_type)
    spec = adapter.spec(module)
    export_decoder(spec, adapter.weights(module, spec), out_dir, dtype=dtype)
    return out_dir / "model.onnx", spec


def apply(model_path, passes, spec, dtype="fp32", out_name="fused.onnx", options=None):
    """Run `passes` on the exported graph; returns (fused model path, records, op counts before, after)."""
    graph = gs.import_onnx(onnx.load(str(model_path)))
    before = _ops(graph)
    records = run_pipeline(graph, list(passes), PassContext(spec=spec, precision=dtype, options=options or {}))
    model = gs.export_onnx(graph.cleanup().toposort())
    out = model_path.with_name(out_name)
    onnx.save_model(model, str(out), save_as_external_data=True, location=out_name + ".data", size_threshold=1024)
    return out, {r["name"]: r for r in records}, before, _ops(graph)


def _ops(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.nodes:
        counts[n.op] = counts.get(n.op, 0) + 1
    return counts


def feeds(spec, np_dtype, batch, seq, past, seed=0, padded=True):
    """Left-padded rows (row 1 starts with 3 pad tokens), position ids as the runtime computes them."""
    rng = np.random.default_rng(seed)
    total = past + seq
    mask = np.ones((batch, total), np.int64)
    if padded:
        mask[1, :3] = 0
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, past:]
    f = {"input_ids": rng.integers(0, spec.vocab_size, (batch, seq)), "attention_mask": mask,
         "position_ids": positions.astype(np.int64)}
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            f[f"past_key_values.{i}.{kind}"] = rng.standard_normal(
                (batch, spec.num_kv_heads, past, spec.head_dim)).astype(np_dtype)
    return f


def max_errors(before_path, after_path, spec, dtype="fp32", padded=True, shapes=None):
    """Max |logits| and |present| difference over real (unpadded) positions, relative to the logit
    scale, for every shape in SHAPES. ORT's own optimizer is off so the comparison sees our graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    a = ort.InferenceSession(str(before_path), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(after_path), so, providers=["CPUExecutionProvider"])
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    worst = 0.0
    for batch, seq, past in shapes or SHAPES:
        f = feeds(spec, np_dtype, batch, seq, past, padded=padded)
        fb = dict(f)
        if "logits_positions" in {i.name for i in b.get_inputs()}:  # passes/select_logits.py: every position
            fb["logits_positions"] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        ra, rb = a.run(None, f), b.run(None, fb)
        new_rows = f["attention_mask"][:, past:].astype(bool)
        all_rows = f["attention_mask"].astype(bool)
        scale = max(1.0, float(np.abs(ra[0]).max()))
        worst = max(worst, float(np.abs(ra[0].astype(np.float64) - rb[0])[new_rows].max()) / scale)
        names = [o.name for o in a.get_outputs()]
        for name, x, y in zip(names[1:], ra[1:], rb[1:]):
            d = np.abs(x.astype(np.float64) - y)
            if name.startswith("present."):  # [B, kv, T, D]: padding slots hold don't-care values
                d = d.transpose(0, 2, 1, 3)[all_rows]
            worst = max(worst, float(d.max()) / scale)
        assert np.isfinite(rb[0][new_rows]).all()
    return worst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-llama exported in fp32 and fp16: {dtype: (model path, spec)}."""
    from leptonc.models.intake import load_model

    lm = load_model("tiny-llama")
    root = tmp_path_factory.mktemp("tiny_passes")
    out = {}
    for dtype in ("fp32", "fp16"):
        out[dtype] = export_model(lm.module, root / dtype, dtype)
    return out


# ---- each fusion on tiny-llama (2 layers): numbers and operator counts --------------------------

# pass -> (passes it needs first, {op: count after it ran}); a count of 0 means the pattern is gone
L = 2
FUSIONS = {
    "fuse_rmsnorm": ([], {"SimplifiedLayerNormalization": 2 * L + 1, "Pow": 0, "ReduceMean": 0, "Sqrt": 0}),
    "fuse_skip_rmsnorm": (["fuse_rmsnorm"], {"SkipSimplifiedLayerNormalization": 2 * L,
                                             "SimplifiedLayerNormalization": 1}),
    "fuse_rotary": ([], {"RotaryEmbedding": 2 * L, "Neg": 0, "Cos": 0, "Sin": 0}),
    "fuse_gqa": (["fuse_rotary"], {"GroupQueryAttention": L, "Softmax": 0, "Expand": 2}),  # lengths: 2 Expand
    "merge_qkv": (["fuse_rotary", "fuse_gqa"], {"MatMul": 5 * L, "Split": L}),  # qkv, o, gate, up, down
    "merge_gate_up": ([], {"MatMul": 8 * L, "Split": L + 2 * L}),  # q k v o qk pv gate_up down; 2 rotary Splits
    "fuse_silu": ([], {"QuickGelu": L, "Sigmoid": 0}),
}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("name", list(FUSIONS))
def test_fusion_numbers_and_op_counts(tiny, name, dtype):
    model, spec = tiny[dtype]
    prereq, expected = FUSIONS[name]
    fused, records, before, after = apply(model, CLEANUP + prereq + [name], spec, dtype, f"{name}.onnx")
    assert records[name]["status"] == "applied", records[name]
    assert records[name]["counts"], records[name]  # every applied pass reports what it did
    for op, count in expected.items():
        assert after.get(op, 0) == count, (op, after)
    assert after != before
    assert max_errors(model, fused, spec, dtype) <= TOL[dtype]


def test_full_cpu_pipeline_on_tiny(tiny):
    model, spec = tiny["fp32"]
    fused, records, before, after = apply(model, CPU_PIPELINE, spec)
    for name in ("fuse_rmsnorm", "fuse_skip_rmsnorm", "fuse_rotary", "fuse_gqa", "merge_qkv", "merge_gate_up"):
        assert records[name]["status"] == "applied", records[name]
    # the gpt2-only fusions say why they did not run
    assert records["fuse_skip_layernorm"]["status"] == "skipped" and "LayerNormalization" in \
        records["fuse_skip_layernorm"]["detail"]
    assert records["fuse_gelu"]["status"] == "skipped" and records["fuse_gelu"]["detail"]
    assert sum(after.values()) <= 0.4 * sum(before.values()), (before, after)
    assert max_errors(model, fused, spec) <= TOL["fp32"]


def test_fp16_pipeline_keeps_fp16_io_and_matches(tiny):
    """The CUDA pipeline's graph (fp16, Casts around the RMSNorm math), run by ORT's CPU kernels."""
    from leptonc.targets.backends.onnxruntime import CUDA_PIPELINE

    model, spec = tiny["fp16"]
    fused, records, _, after = apply(model, CUDA_PIPELINE, spec, "fp16")
    assert after.get("GroupQueryAttention") == L and after.get("SkipSimplifiedLayerNormalization") == 2 * L
    assert after.get("Cast", 0) <= 4  # the RMSNorm Casts are gone; the mask/length/logits ones remain
    m = onnx.load(str(fused), load_external_data=False)
    kv = [i for i in m.graph.input if i.name.startswith("past_key_values")]
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT16 for i in kv)
    assert max_errors(model, fused, spec, "fp16") <= TOL["fp16"]


def test_gpu_contract_pipeline_fp16_matches_unpadded(tiny):
    """The GPU targets' graph (lengths from the mask's contents, no bias, rotary and packed Q/K/V folded
    into GroupQueryAttention), fp16, on ORT's CPU kernels. That contract expects right padding, which the
    runtime supplies (tests/test_runtime.py checks padded batches); here every row is full."""
    from leptonc.targets.backends.onnxruntime import CUDA_PIPELINE

    model, spec = tiny["fp16"]
    fused, records, _, after = apply(model, CUDA_PIPELINE, spec, "fp16", out_name="gpu.onnx",
                                     options={"gqa_lengths": "mask_sum"})
    assert records["fuse_gqa"]["counts"]["mask_sum"] == 1
    assert records["fold_rotary_into_gqa"]["counts"] == {"fused": L, "left_alone": 0}
    assert after.get("GroupQueryAttention") == L and "RotaryEmbedding" not in after and "Where" not in after
    assert after.get("Split") == L  # gate/up only: Q/K/V go packed into attention
    # Not a multi-token step over a cache at batch > 1 (a chunked prefill): without query_seqlens (which
    # ONNX Runtime 1.31 lacks) the kernel refuses that, and the runtime never asks for it.
    shapes = [(b, s, p) for b, s, p in SHAPES if not (b > 1 and s > 1 and p > 0)] + [(1, 4, 6)]
    assert max_errors(model, fused, spec, "fp16", padded=False, shapes=shapes) <= TOL["fp16"]


def test_fold_rotary_leaves_biased_attention_alone(tiny):
    """On the CPU contract (an attention bias masks left padding), GQA's own rotary would count padding
    as positions: the fold must leave every layer alone and say why."""
    from leptonc.targets.backends.onnxruntime import CPU_PIPELINE

    model, spec = tiny["fp32"]
    _, records, _, after = apply(model, CPU_PIPELINE, spec, out_name="cpu.onnx")
    rec = records["fold_rotary_into_gqa"]
    assert rec["status"] != "applied" and "attention has a bias" in rec["detail"]
    assert after.get("RotaryEmbedding") == 2 * L


# ---- near-matches are left alone -----------------------------------------------------------------

def test_rmsnorm_with_intermediate_read_elsewhere_is_left_alone(tiny, tmp_path):
    """Expose one RMSNorm's mean-square as an extra graph output: that norm must not be fused (the
    safety rule), the others still are, and the graph still computes the same thing."""
    model, spec = tiny["fp32"]
    graph = gs.import_onnx(onnx.load(str(model)))
    mean = next(n for n in graph.nodes if n.op == "ReduceMean" and n.name.startswith("layers.1.ln1"))
    mean.outputs[0].dtype, mean.outputs[0].shape = np.float32, ["batch", "sequence", 1]
    graph.outputs.append(mean.outputs[0])
    probe = tmp_path / "probe.onnx"
    onnx.save_model(gs.export_onnx(graph), str(probe), save_as_external_data=True, location="probe.onnx.data")
    fused, records, _, after = apply(probe, ["infer_shapes", "fuse_rmsnorm"], spec)
    assert records["fuse_rmsnorm"]["counts"] == {"fused": 2 * L, "left_alone": 1}
    assert "left 1 alone" in records["fuse_rmsnorm"]["detail"]
    assert after["ReduceMean"] == 1 and after["SimplifiedLayerNormalization"] == 2 * L
    assert max_errors(probe, fused, spec) <= TOL["fp32"]


def test_attention_with_probabilities_read_elsewhere_is_left_alone(tiny, tmp_path):
    model, spec = tiny["fp32"]
    graph = gs.import_onnx(onnx.load(str(model)))
    softmax = next(n for n in graph.nodes if n.op == "Softmax" and n.name.startswith("layers.0"))
    softmax.outputs[0].dtype = np.float32
    graph.outputs.append(softmax.outputs[0])
    probe = tmp_path / "probe.onnx"
    onnx.save_model(gs.export_onnx(graph), str(probe), save_as_external_data=True, location="probe.onnx.data")
    fused, records, _, after = apply(probe, ["infer_shapes", "fuse_rotary", "fuse_gqa"], spec)
    assert records["fuse_gqa"]["counts"] == {"fused": 1, "left_alone": 1, "mask_sum": 0}
    assert after["GroupQueryAttention"] == 1 and after["Softmax"] == 1


# ---- cleanup passes on small synthetic graphs ----------------------------------------------------

def _small_graph(tmp_path, nodes, inits, outputs=("y",)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph(nodes, "g", [x], outs, [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "small.onnx"
    onnx.save(m, str(path))
    return path


def _run_small(before, after):
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(str(before), so).run(None, {"x": x})
    b = ort.InferenceSession(str(after), so).run(None, {"x": x})
    return max(float(np.abs(p - q).max()) for p, q in zip(a, b))


def test_fold_constants(tmp_path):
    c = {"a": np.arange(4, dtype=np.float32), "b": np.full(4, 2.0, np.float32)}
    nodes = [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Exp", ["ab"], ["e"]),
             helper.make_node("Add", ["x", "e"], ["y"])]
    path = _small_graph(tmp_path, nodes, c)
    out, records, before, after = apply(path, ["infer_shapes", "fold_constants"], None)
    assert records["fold_constants"]["counts"] == {"folded": 2}
    assert after == {"Add": 1} and before == {"Mul": 1, "Exp": 1, "Add": 1}
    assert _run_small(path, out) <= 1e-6


def test_remove_dead_nodes(tmp_path):
    nodes = [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Relu", ["xi"], ["y"]),
             helper.make_node("Exp", ["x"], ["dead"]), helper.make_node("Neg", ["dead"], ["dead2"])]
    path = _small_graph(tmp_path, nodes, {})
    out, records, before, after = apply(path, ["remove_dead_nodes"], None)
    assert records["remove_dead_nodes"]["counts"]["dead"] == 2
    assert records["remove_dead_nodes"]["counts"]["identity"] == 1
    assert after == {"Relu": 1}
    assert _run_small(path, out) == 0.0


def test_dedupe_initializers(tmp_path):
    w = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    c = {"w1": w, "w2": w.copy(), "w3": w + 1}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("MatMul", ["x", "w3"], ["c"]), helper.make_node("Sum", ["a", "b", "c"], ["y"])]
    path = _small_graph(tmp_path, nodes, c)
    out, records, _, _ = apply(path, ["dedupe_initializers"], None)
    assert records["dedupe_initializers"]["counts"] == {"merged": 1, "bytes_saved": w.nbytes}
    m = onnx.load(str(out))
    assert len(m.graph.initializer) == 2  # w1 and w2 are stored once; w3 differs
    assert _run_small(path, out) == 0.0


def test_infer_shapes_annotates_tiny(tiny):
    model, spec = tiny["fp32"]
    graph = gs.import_onnx(onnx.load(str(model)))
    records = run_pipeline(graph, ["infer_shapes"], PassContext(spec=spec))
    assert records[0]["status"] == "applied" and records[0]["counts"]["annotated"] > 100
    residual = next(n for n in graph.nodes if n.name == "layers.0/residual_attn")
    # both residual operands are known to be [batch, sequence, hidden]: the skip-norm fusion relies on it
    assert residual.inputs[0].shape == residual.inputs[1].shape == ["batch", "sequence", spec.hidden_size]


# ---- through compile: the report, --disable-pass, and the runtime on the fused graph --------------

def test_compile_reports_every_pass(tiny_bundle):
    import json

    report = json.loads((tiny_bundle / "report.json").read_text())
    records = {r["name"]: r for r in report["passes"]}
    assert list(records) == CPU_PIPELINE
    assert records["fuse_gqa"]["status"] == "applied" and records["fuse_gqa"]["detail"].startswith("fused 2")
    assert all(r["detail"] for r in records.values())
    assert report["graph"]["op_counts"].get("GroupQueryAttention") == 2
    assert report["verification"]["status"] == "passed"


def test_disable_pass_skips_its_dependents(tmp_path):
    import json

    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    out = tmp_path / "t.lepton"
    compile_model(CompileConfig(source="tiny-llama", target="cpu", output=str(out), disabled_passes=("fuse_rmsnorm",)))
    records = {r["name"]: r for r in json.loads((out / "report.json").read_text())["passes"]}
    assert records["fuse_rmsnorm"]["status"] == "disabled"
    assert records["fuse_skip_rmsnorm"]["status"] == "skipped"
    assert "requires fuse_rmsnorm" in records["fuse_skip_rmsnorm"]["detail"]
    assert records["fuse_gqa"]["status"] == "applied"


def _generate(runner, tokenizer, prompts, n):
    from leptonc.runtime.generate import SamplingConfig, generate

    res = generate(runner, tokenizer, prompts, SamplingConfig(max_new_tokens=n, stop_at_eos=False))
    return [g.token_ids for g in res.outputs]


@pytest.mark.slow
def test_smollm2_fused_graph(smollm2_bundle, smollm2_hf):
    """Acceptance on the real model: <= 40% of the plain export's nodes, GroupQueryAttention and
    (Skip)SimplifiedLayerNormalization present, parity <= 1e-3 (compile's verify), greedy equality
    with transformers for 16 tokens, and a left-padded batch of different-length prompts decoding
    exactly as each prompt does alone."""
    import json

    import torch

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner

    report = json.loads((smollm2_bundle / "report.json").read_text())
    ops = report["graph"]["op_counts"]
    assert report["graph"]["nodes"] <= 0.4 * report["export"]["nodes"], (report["graph"]["nodes"], report["export"])
    assert ops.get("GroupQueryAttention") == 30
    assert ops.get("SimplifiedLayerNormalization", 0) + ops.get("SkipSimplifiedLayerNormalization", 0) == 61
    v = report["verification"]
    assert v["status"] == "passed" and v["max_abs_error"] <= 1e-3, v

    tok, module = smollm2_hf.tokenizer, smollm2_hf.module
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of 100 degrees"]
    runner = open_bundle_runner(load_bundle(smollm2_bundle))
    try:
        batched = _generate(runner, tok, prompts, 16)
        for prompt, got in zip(prompts, batched):
            enc = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                out = module.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            assert got == out[0, enc["input_ids"].shape[1]:].tolist(), prompt
            assert _generate(runner, tok, [prompt], 16)[0] == got, prompt
    finally:
        runner.release()


STANDARD_OP_PASSES = CLEANUP + ["merge_qkv", "merge_gate_up"]  # usable in a TensorRT pipeline


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_standard_op_passes_write_no_contrib_ops(tiny, dtype):
    model, spec = tiny[dtype]
    fused, records, _, after = apply(model, STANDARD_OP_PASSES, spec, dtype, "standard.onnx")
    assert records["merge_qkv"]["counts"] == {"merged": L} and records["merge_gate_up"]["counts"] == {"merged": L}
    m = onnx.load(str(fused), load_external_data=False)
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    assert max_errors(model, fused, spec, dtype) <= TOL[dtype]


def test_each_quantize_pass_of_each_backend_has_a_quantizer():
    """Every quantize pass a backend's pipeline names has a rewrite in passes/quantizers.py's table, and the
    backends are found by name in targets/backends/base.py's registry."""
    from leptonc.errors import UnsupportedRequestError
    from leptonc.passes.quantizers import quantizer_for
    from leptonc.targets.backends.base import get_backend

    for name in ("onnxruntime", "tensorrt"):
        assert get_backend(name).name == name
        for precision in ("int8", "fp8", "int4"):
            assert callable(quantizer_for(precision, name))
    with pytest.raises(UnsupportedRequestError):
        quantizer_for("int4", "nosuch")
    with pytest.raises(UnsupportedRequestError):
        get_backend("nosuch")
