"""The TensorRT compatibility lint (no TensorRT needed): graphs with unsupported operators, data
types and misplaced Q/DQ are reported by node name; clean Q/DQ graphs pass; every graph the TensorRT
pipeline produces from tiny-llama and smollm2-135m lints clean."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from leptonc.targets.backends.tensorrt_lint import lint_model, lint_onnx

F, F16, I8, I32, I64, U8 = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT32,
                            TensorProto.INT64, TensorProto.UINT8)


def _model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    return helper.make_model(graph, opset_imports=opsets)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _by_node(result):
    out: dict[str, list[str]] = {}
    for issue in result["issues"]:
        out.setdefault(issue["node"], []).append(issue["rule"])
    return out


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


# ---- operators, domains, opsets, types ------------------------------------------------------------

def test_unsupported_and_contrib_operators_are_reported_by_node_name():
    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="dedupe_tokens"),
        helper.make_node("Relu", ["x"], ["r"], name="act"),
        helper.make_node("SimplifiedLayerNormalization", ["r", "w"], ["n"], name="ln_ort", domain="com.microsoft",
                         epsilon=1e-5),
        helper.make_node("MyOp", ["n"], ["y"], name="mystery", domain="acme.ops"),
    ]
    model = _model(nodes, [_vi("x", F, [4])], [_vi("y", F, [4]), _vi("u", F, None)], [_init("w", np.ones(4, np.float32))],
                   extra_opsets=[("com.microsoft", 1), ("acme.ops", 1)])
    result = lint_onnx(model)
    assert _by_node(result) == {"dedupe_tokens": ["unsupported-op"], "ln_ort": ["contrib-op"],
                                "mystery": ["custom-op"]}
    assert not result["clean"] and result["tensorrt_matrix"] == "10.15"
    msg = next(i["message"] for i in result["issues"] if i["node"] == "ln_ort")
    assert "ONNX Runtime contrib" in msg


def test_unsupported_data_types_are_reported_by_node_name():
    nodes = [
        helper.make_node("MatMul", ["a", "b"], ["ab"], name="int_matmul"),  # MatMul: float types only
        helper.make_node("Cast", ["ab"], ["c"], name="to_int16", to=TensorProto.INT16),  # not a TensorRT type
        helper.make_node("Sin", ["f"], ["s"], name="sine"),  # fine: fp16 is listed
        helper.make_node("Cos", ["dbl"], ["cd"], name="cos_double"),  # DOUBLE: cast down, a warning
    ]
    model = _model(nodes, [_vi("a", I32, [2, 2]), _vi("b", I32, [2, 2]), _vi("f", F16, [2]),
                           _vi("dbl", TensorProto.DOUBLE, [2])],
                   [_vi("c", TensorProto.INT16, [2, 2]), _vi("s", F16, [2]), _vi("cd", TensorProto.DOUBLE, [2])])
    onnx.checker.check_model(model)
    result = lint_onnx(model)
    issues = _by_node(result)
    assert issues["int_matmul"] == ["dtype"] and issues["to_int16"] == ["dtype"]
    assert "sine" not in issues and "cos_double" not in issues
    assert [w["node"] for w in result["warnings"]] == ["cos_double"]
    io = {i["node"] for i in result["issues"] if i["op"] == "<io>"}
    assert io == {"dbl", "c", "cd"}  # DOUBLE and INT16 cannot be engine I/O
    msg = next(i["message"] for i in result["issues"] if i["node"] == "int_matmul")
    assert "INT32" in msg and "FP16" in msg


def test_opset_rules():
    # RMSNormalization exists from opset 23: a graph at opset 17 that uses it is not parseable
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], name="rms", axis=-1)
    model = _model([node], [_vi("x", F, [2, 4])], [_vi("y", F, [2, 4])], [_init("w", np.ones(4, np.float32))])
    assert _by_node(lint_onnx(model)) == {"rms": ["opset"]}
    model.opset_import[0].version = 23
    assert lint_onnx(model)["clean"]
    relu = helper.make_node("Relu", ["x"], ["y"], name="r")
    old = _model([relu], [_vi("x", F, [2])], [_vi("y", F, [2])], opset=8)
    assert [i["rule"] for i in lint_onnx(old)["issues"]] == ["opset"]


def test_operator_restrictions():
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk_unsorted", sorted=0),
        helper.make_node("LayerNormalization", ["x", "g"], ["ln", "mean"], name="ln_two_outputs", axis=-1),
        helper.make_node("Shape", ["x"], ["sh"], name="shape"),
        helper.make_node("Slice", ["sh", "zero", "one"], ["ax"], name="slice"),
        helper.make_node("Unsqueeze", ["x", "ax"], ["xu"], name="unsq_dynamic_axes"),
    ]
    inits = [_init("k", np.array([2], np.int64)), _init("g", np.ones(8, np.float32)),
             _init("zero", np.array([0], np.int64)), _init("one", np.array([1], np.int64))]
    model = _model(nodes, [_vi("x", F, [2, 8])], [_vi("v", F, None), _vi("ln", F, None), _vi("mean", F, None),
                                                  _vi("xu", F, None)], inits)
    issues = _by_node(lint_onnx(model))
    assert issues == {"topk_unsorted": ["attribute"], "ln_two_outputs": ["restriction"],
                      "unsq_dynamic_axes": ["restriction"]}


# ---- explicit quantization (Q/DQ) ----------------------------------------------------------------

def _w8a8(scale_x=np.float32(0.05), zp_x=np.int8(0), w_axis=1, w_shape=(8, 4), x_scale_shape=()):
    """x -> Q -> DQ -> MatMul <- DQ(w int8 per-channel): TensorRT's placement for W8A8."""
    w = np.random.default_rng(0).integers(-127, 127, size=w_shape, dtype=np.int8)
    ws = np.full(w_shape[w_axis], 0.01, np.float32)
    q_inputs = ["x", "sx"] + (["zx"] if zp_x is not None else [])
    nodes = [
        helper.make_node("QuantizeLinear", q_inputs, ["xq"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["xq", "sx"] + (["zx"] if zp_x is not None else []), ["xdq"],
                         name="x_dequant"),
        helper.make_node("DequantizeLinear", ["w", "ws"], ["wdq"], name="w_dequant", axis=w_axis),
        helper.make_node("MatMul", ["xdq", "wdq"], ["y"], name="proj"),
    ]
    inits = [_init("sx", np.full(x_scale_shape, scale_x, np.float32)), _init("w", w), _init("ws", ws)]
    if zp_x is not None:
        inits.append(_init("zx", zp_x))
    return _model(nodes, [_vi("x", F, [2, 8])], [_vi("y", F, [2, 4])], inits, opset=17)


def test_clean_qdq_graph_passes():
    model = _w8a8(zp_x=np.int8(0))
    onnx.checker.check_model(model)
    result = lint_onnx(model)
    assert result["clean"], result["issues"]


def test_misplaced_and_malformed_qdq_are_reported_by_node_name():
    # asymmetric uint8 activation quantization (ONNX Runtime's CPU style): zero point 128, type UINT8
    result = lint_onnx(_w8a8(zp_x=np.uint8(128)))
    issues = _by_node(result)
    assert set(issues) == {"x_quant", "x_dequant"}
    text = " ".join(i["message"] for i in result["issues"])
    assert "symmetric" in text and "UINT8" in text
    # no zero point at all: ONNX's default output type is UINT8, which TensorRT does not quantize to
    assert {i["node"] for i in lint_onnx(_w8a8(zp_x=None))["issues"]} == {"x_quant", "x_dequant"}
    # per-channel scale on an activation
    result = lint_onnx(_w8a8(x_scale_shape=(8,)))
    assert "per-tensor" in " ".join(i["message"] for i in result["issues"] if i["node"] == "x_quant")
    # per-channel weight scale along the reduction axis (K) instead of the output channels (N)
    result = lint_onnx(_w8a8(w_axis=0))
    assert _by_node(result) == {"w_dequant": ["qdq"]}
    assert "output-channel axis" in result["issues"][0]["message"]


def test_quantized_tensor_read_by_a_non_dq_node_is_reported():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_act"),
        helper.make_node("Transpose", ["xq"], ["xt"], name="transpose_int8", perm=[1, 0]),
        helper.make_node("DequantizeLinear", ["xt", "s", "z"], ["y"], name="dq_after_transpose"),
        helper.make_node("Mul", ["x", "s_dyn"], ["s2"], name="scale_math"),
        helper.make_node("QuantizeLinear", ["x", "s2"], ["xq2"], name="q_dynamic_scale"),
        helper.make_node("DequantizeLinear", ["xq2", "s2"], ["y2"], name="dq_dynamic_scale"),
    ]
    inits = [_init("s", np.float32(0.1)), _init("z", np.int8(0)), _init("s_dyn", np.float32(0.5))]
    model = _model(nodes, [_vi("x", F, [2, 2])], [_vi("y", F, [2, 2]), _vi("y2", F, [2, 2])], inits)
    issues = _by_node(lint_onnx(model))
    assert issues["q_act"] == ["qdq"]  # its int8 output feeds a Transpose
    assert issues["dq_after_transpose"] == ["qdq"]  # its input is not a Q output nor a constant
    assert "qdq" in issues["q_dynamic_scale"] and "qdq" in issues["dq_dynamic_scale"]  # scale not a constant


def test_fp8_and_int4_rules():
    # FP8 must be E4M3FN; E5M2 is not a TensorRT type (opset 19 float8 Q/DQ)
    for elem, ok in ((TensorProto.FLOAT8E4M3FN, True), (TensorProto.FLOAT8E5M2, False)):
        zp = helper.make_tensor("z", elem, [], [0])
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q8"),
                 helper.make_node("DequantizeLinear", ["xq", "s"], ["y"], name="dq8")]
        model = _model(nodes, [_vi("x", F, [4])], [_vi("y", F, [4])], [_init("s", np.float32(0.1)), zp], opset=19)
        result = lint_onnx(model)
        assert result["clean"] is ok, result["issues"]
        if not ok:
            assert "E4M3FN" in result["issues"][0]["message"] and result["issues"][0]["node"] == "q8"
    # INT4 block-quantized weights (opset 21): clean; the same block quantization on INT8 is refused
    for elem, ok in ((TensorProto.INT4, True), (TensorProto.INT8, False)):
        w = helper.make_tensor("w", elem, [8, 4], [1] * 32)
        nodes = [helper.make_node("DequantizeLinear", ["w", "ws"], ["wdq"], name="w_block_dq", axis=0, block_size=4),
                 helper.make_node("MatMul", ["x", "wdq"], ["y"], name="proj")]
        model = _model(nodes, [_vi("x", F, [2, 8])], [_vi("y", F, [2, 4])],
                       [w, _init("ws", np.full((2, 4), 0.01, np.float32))], opset=21)
        result = lint_onnx(model)
        assert result["clean"] is ok, result["issues"]
        if not ok:
            assert _by_node(result) == {"w_block_dq": ["qdq"]}
    # INT4 on an activation: weight-only in TensorRT
    zp = helper.make_tensor("z", TensorProto.INT4, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q4_act"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq4_act")]
    model = _model(nodes, [_vi("x", F, [4])], [_vi("y", F, [4])], [_init("s", np.float32(0.1)), zp], opset=21)
    assert "weight-only" in " ".join(i["message"] for i in lint_onnx(model)["issues"] if i["node"] == "q4_act")


# ---- the CLI ------------------------------------------------------------------------------------

def test_inspect_trt_exits_2_and_names_the_nodes(tmp_path):
    bad = tmp_path / "bad.onnx"
    onnx.save(_w8a8(zp_x=np.uint8(128)), str(bad))
    proc = run_cli("inspect", bad, "--trt", "--json", timeout=300)
    info = json.loads(proc.stdout)
    assert {i["node"] for i in info["trt_lint"]["issues"]} == {"x_quant", "x_dequant"}
    proc = run_cli("inspect", bad, "--trt", timeout=300)
    assert proc.returncode == 2 and "x_quant" in proc.stdout, proc.stderr
    good = tmp_path / "good.onnx"
    onnx.save(_w8a8(zp_x=np.int8(0)), str(good))
    proc = run_cli("inspect", good, "--trt", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- what the TensorRT pipeline produces from real models ------------------------------------------

def _pipeline_graph(lm, target_name: str, precision: str, work, **context):
    """Export + the TensorRT pipeline, as `compile --backend tensorrt` runs them before the build."""
    import onnx_graphsurgeon as gs

    from leptonc.export import export_decoder
    from leptonc.models.adapters import get_adapter
    from leptonc.passes import PassContext, run_pipeline
    from leptonc.targets import get_target
    from leptonc.targets.backends import tensorrt as backend

    target = get_target(target_name)
    adapter = get_adapter(lm.model_type)
    spec = adapter.spec(lm.module)
    exported = export_decoder(spec, adapter.weights(lm.module, spec), work,
                              dtype=backend.export_dtype(target, precision))
    ctx = PassContext(backend="tensorrt", target=target, precision=precision, spec=spec, work_dir=work, **context)
    graph = gs.import_onnx(onnx.load(str(exported.model_path)))
    records = run_pipeline(graph, backend.pipeline(target, precision), ctx)
    return gs.export_onnx(graph.cleanup().toposort()), records


@pytest.fixture(scope="module")
def tiny_lm():
    from leptonc.models.intake import load_model

    return load_model("tiny-llama")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tiny_llama_tensorrt_pipeline_lints_clean(tiny_lm, precision, tmp_path):
    model, records = _pipeline_graph(tiny_lm, "h100", precision, tmp_path)
    assert [r["status"] for r in records] == ["applied"] * len(records)
    result = lint_onnx(model)
    assert result["clean"], result["issues"][:5]
    assert result["nodes_without_type_info"] == 0 and result["nodes"] > 100


@pytest.mark.slow
def test_smollm2_tensorrt_pipeline_lints_clean(smollm2_hf, tmp_path):
    model, _ = _pipeline_graph(smollm2_hf, "h100", "fp16", tmp_path)
    path = tmp_path / "trt.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="trt.onnx.data")
    result = lint_model(path)
    assert result["clean"], result["issues"][:5]
    assert result["nodes"] > 1000 and result["nodes_without_type_info"] == 0


def _quantized_graph(lm, precision, work, source="tiny-llama", options=None):
    from leptonc.config import CompileConfig
    from leptonc.models.adapters import get_adapter

    try:
        from leptonc.calibration.quantize import calibrate_for_compile
    except ImportError as exc:
        pytest.skip(f"quantization is not in this leptonc build: {exc}")
    config = CompileConfig(source=source, target="h100", backend="tensorrt", precision=precision,
                           quantization={"calib_samples": 4, "calib_seq_len": 64, **(options or {})})
    adapter = get_adapter(lm.model_type)
    quant = calibrate_for_compile(config, lm, adapter, adapter.spec(lm.module))
    model, records = _pipeline_graph(lm, "h100", precision, work, quantization=config.quantization,
                                     activation_stats=quant.calibration.stats)
    assert records[-1]["name"] == f"quantize_{precision}" and records[-1]["status"] == "applied", records[-1]
    return model


def _assert_trt_clean(model):
    """Lints clean, and is type-consistent: a strongly typed TensorRT network takes every tensor's type
    from the graph, so ONNX's strict type inference must agree with every declared type (an fp32 DQ
    output feeding an fp16 MatMul lints clean node by node but is refused by the builder)."""
    result = lint_onnx(model)
    assert result["clean"], result["issues"][:5]
    assert result["nodes_without_type_info"] == 0
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return result


def _qdq_summary(model):
    """(zero-point element types of Q/DQ nodes, {(op, block_size)}, weight code types) of a graph."""
    inits = {t.name: t for t in model.graph.initializer}
    zp_types, forms, code_types = set(), set(), set()
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
            forms.add((n.op_type, block))
            if len(n.input) > 2 and n.input[2] in inits:
                zp = inits[n.input[2]]
                zp_types.add(zp.data_type)
                assert not numpy_helper.to_array(zp).astype(np.float64).any(), f"{n.name}: non-zero zero point"
            if n.op_type == "DequantizeLinear" and n.input[0] in inits:
                code_types.add(inits[n.input[0]].data_type)
    return zp_types, forms, code_types


def test_tiny_llama_tensorrt_fp8_pipeline_lints_clean(tiny_lm, tmp_path):
    model = _quantized_graph(tiny_lm, "fp8", tmp_path)
    result = _assert_trt_clean(model)
    assert result["opset"] == 19
    zp_types, forms, codes = _qdq_summary(model)
    assert zp_types == {TensorProto.FLOAT8E4M3FN} and codes == {TensorProto.FLOAT8E4M3FN}
    assert forms == {("QuantizeLinear", 0), ("DequantizeLinear", 0)}


def test_tiny_llama_tensorrt_int8_pipeline_lints_clean(tiny_lm, tmp_path):
    model = _quantized_graph(tiny_lm, "int8", tmp_path)
    result = _assert_trt_clean(model)
    ops = {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
    assert not any(d == "com.microsoft" for d, _ in ops)  # no MatMulNBits / GatherBlockQuantized
    zp_types, forms, codes = _qdq_summary(model)
    assert zp_types == {I8} and codes == {I8}  # symmetric signed int8, never uint8 / 128
    assert forms == {("QuantizeLinear", 0), ("DequantizeLinear", 0)} and result["opset"] == 19
    # every linear layer, the tied LM head included, reads a dequantized activation and weight
    by_out = {o: n for n in model.graph.node for o in n.output}
    linears = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in by_out
               and by_out[n.input[1]].op_type == "DequantizeLinear"]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down in each of the 2 layers, and the head
    assert all(by_out[n.input[0]].op_type == "DequantizeLinear" for n in linears)
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in by_out)
    assert by_out[gather.input[0]].op_type == "DequantizeLinear"  # the embedding reads the head's int8 rows


def test_tiny_llama_tensorrt_int8_weight_only_lints_clean(tiny_lm, tmp_path):
    model = _quantized_graph(tiny_lm, "int8", tmp_path, options={"int8_mode": "weight-only"})
    _assert_trt_clean(model)
    zp_types, forms, codes = _qdq_summary(model)
    assert forms == {("DequantizeLinear", 0)} and codes == {I8} and zp_types == {I8}


@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_tiny_llama_tensorrt_int4_pipeline_lints_clean(tiny_lm, tmp_path, method):
    model = _quantized_graph(tiny_lm, "int4", tmp_path, options={"int4_method": method})
    result = _assert_trt_clean(model)
    assert result["opset"] == 21
    assert not any(n.domain == "com.microsoft" for n in model.graph.node)
    zp_types, forms, codes = _qdq_summary(model)
    assert codes == {TensorProto.INT4, I8}  # INT4 layers, the 8-bit per-channel LM head (and embedding)
    blocks = {b for op, b in forms if op == "DequantizeLinear" and b}
    assert forms <= {("DequantizeLinear", 0), *(("DequantizeLinear", b) for b in blocks)} and blocks
    assert not any(op == "QuantizeLinear" for op, _ in forms)  # weight-only: activations stay fp16


# smollm2-135m through the TensorRT pipeline in each quantized format: one loaded model (session
# fixture), calibration at 4 x 64 tokens (cached per format under the test's LEPTONC_CACHE).
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_smollm2_tensorrt_quantized_pipeline_lints_clean(smollm2_hf, tmp_path, precision):
    # a fixed SmoothQuant alpha and RTN int4 keep calibration short: the searches change scale values,
    # not the form of the graph (the tiny-llama tests cover the searched alpha and AWQ's pre-scales)
    fast = {"int8": {"smoothquant_alpha": 0.5}, "fp8": {"smoothquant_alpha": 0.5}, "int4": {"int4_method": "rtn", "int4_block": 128}}
    model = _quantized_graph(smollm2_hf, precision, tmp_path, source="smollm2-135m",
                             options={"calib_samples": 2, **fast[precision]})
    _, forms, codes = _qdq_summary(model)  # before saving: the save moves the tensors' bytes out
    path = tmp_path / "trt.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="trt.onnx.data")
    result = lint_model(path)
    assert result["clean"], result["issues"][:5]
    assert result["nodes"] > 1000 and result["nodes_without_type_info"] == 0
    onnx.shape_inference.infer_shapes_path(str(path), str(tmp_path / "inferred.onnx"), strict_mode=True)
    assert not any(n.domain == "com.microsoft" for n in model.graph.node)
    want = {"int8": {I8}, "fp8": {TensorProto.FLOAT8E4M3FN}, "int4": {TensorProto.INT4, I8}}[precision]
    assert codes == want
    if precision == "int4":  # K = 576 or 1536: --int4-block 128 is halved to 64 where it does not divide K
        assert {b for _, b in forms if b} == {64, 128}


def test_int4_graph_the_build_parses_is_written_and_lints_clean(tiny_lm, tmp_path):
    """The file `build` hands TensorRT's parser (load_graph -> passes -> save_graph, external data):
    the INT4 weights survive the save (two codes a byte) and the file lints clean."""
    from leptonc.calibration.quantize import calibrate_for_compile
    from leptonc.config import CompileConfig
    from leptonc.export import export_decoder
    from leptonc.models.adapters import get_adapter
    from leptonc.passes import PassContext
    from leptonc.targets import get_target
    from leptonc.targets.backends import tensorrt as backend

    config = CompileConfig(source="tiny-llama", target="h100", backend="tensorrt", precision="int4",
                           quantization={"calib_samples": 4, "calib_seq_len": 64})
    adapter = get_adapter(tiny_lm.model_type)
    spec = adapter.spec(tiny_lm.module)
    quant = calibrate_for_compile(config, tiny_lm, adapter, spec)
    target = get_target("h100")
    exported = export_decoder(spec, adapter.weights(tiny_lm.module, spec), tmp_path / "export", dtype="fp16")
    ctx = PassContext(backend="tensorrt", target=target, precision="int4", spec=spec, work_dir=tmp_path,
                      quantization=config.quantization, activation_stats=quant.calibration.stats)
    (tmp_path / "work").mkdir()
    path, records = backend._graph_for_build(exported, tmp_path / "work", backend.pipeline(target, "int4"), ctx,
                                             (), None)
    assert records[-1]["status"] == "applied" and "INT4 block-quantized" in records[-1]["detail"]
    result = lint_model(path)
    assert result["clean"], result["issues"][:5]
    model = onnx.load(str(path))  # with the external data
    int4 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT4]
    assert len(int4) == 2 * 7  # every layer's projection; the head and embedding are 8-bit
    codes = numpy_helper.to_array(int4[0]).astype(np.int8)
    assert codes.min() >= -7 and codes.max() <= 7 and codes.min() < 0 < codes.max()
