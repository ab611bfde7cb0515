"""The quantization recipes' pieces, fast (tiny-llama and synthetic weights): W8A8 with dynamic per-token
activations (int8 and fp8) on the CPU (static Q/DQ elsewhere), mixed-precision int4 from measured sensitivity under a bit
budget, GPTQ in activation order, and the shipped texts' roles (calibration, tuning, evaluation) kept apart
and named by the accuracy gate."""

from __future__ import annotations

import numpy as np
import pytest

SMALL = {"calib_samples": 4, "calib_seq_len": 64, "check_tokens": 512}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEPTONC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _compile(tmp_path, name, precision, options, target="cpu"):
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    return compile_model(CompileConfig(source="tiny-llama", target=target, output=str(tmp_path / f"{name}.lepton"),
                                       precision=precision, quantization={**SMALL, **options}))


def _nodes(bundle):
    import onnx

    path = next(bundle.path / f for f in bundle.manifest["files"] if f.endswith(".onnx"))
    return list(onnx.load(str(path), load_external_data=False).graph.node)


# ---- W8A8: dynamic per-token activations on the CPU --------------------------------------------

def test_cpu_w8a8_quantizes_activations_per_token_in_matmulnbits(tmp_path, cache):
    bundle = _compile(tmp_path, "w8a8", "int8", {})
    nodes = _nodes(bundle)
    ops = {n.op_type for n in nodes}
    assert "QuantizeLinear" not in ops and "MatMul" not in ops, ops
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    # accuracy_level 4: ONNX Runtime's CPU kernel quantizes each input row to int8 per block and multiplies in int8
    assert nbits and all(a["bits"] == 8 and a["accuracy_level"] == 4 for a in attrs), attrs
    m = bundle.manifest
    assert m["calibration"]["settings"]["activations"] == "dynamic"
    assert "per token" in m["calibration"]["activations"] and "smoothquant_alpha" not in m["calibration"]
    assert bundle.report()["quantization"]["format"] == "int8-w8a8"
    assert m["verification"]["accuracy_gate"]["status"] == "passed"


def test_cpu_fp8_rounds_each_token_with_its_own_scale(tmp_path, cache):
    import onnx

    bundle = _compile(tmp_path, "fp8", "fp8", {})
    casts = [n for n in _nodes(bundle) if n.op_type == "Cast"
             and {a.name: a.i for a in n.attribute}.get("to") == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(casts) == 2 * 4, len(casts)  # one per linear input (qkv, o, gate_up, down) of each layer
    m = bundle.manifest
    assert m["calibration"]["settings"]["activations"] == "dynamic" and "per token" in m["calibration"]["activations"]
    detail = next(p["detail"] for p in m["passes"] if p["name"] == "quantize_fp8")
    assert "per-token dynamic" in detail and m["verification"]["accuracy_gate"]["status"] == "passed"
    static = _compile(tmp_path, "fp8s", "fp8", {"activations": "static"})
    assert not [n for n in _nodes(static) if n.op_type == "Cast"
                and {a.name: a.i for a in n.attribute}.get("to") == onnx.TensorProto.FLOAT8E4M3FN]


def test_static_w8a8_stays_available_and_gpu_targets_default_to_it():
    from leptonc.config import CompileConfig
    from leptonc.errors import UnsupportedRequestError

    cpu = CompileConfig(source="tiny-llama", target="cpu", precision="int8",
                        quantization={"activations": "static"}).quantization
    assert cpu.activations == "static" and cpu.static_activations and not cpu.dynamic_activations
    gpu = CompileConfig(source="tiny-llama", target="h100", precision="int8").quantization
    assert gpu.activations == "static"
    with pytest.raises(UnsupportedRequestError, match="ONNX Runtime on the CPU"):
        CompileConfig(source="tiny-llama", target="h100", precision="int8", quantization={"activations": "dynamic"})
    with pytest.raises(UnsupportedRequestError, match="W8A8 and --fp8 only"):
        CompileConfig(source="tiny-llama", target="cpu", precision="int4", quantization={"activations": "dynamic"})


def test_ort_matmulnbits_8bit_level4_quantizes_activations_per_block():
    """What the dynamic W8A8 form relies on: at accuracy_level 4 an outlier in one 64-channel block of the input
    coarsens only that block's rounding (per-token, per-block scales), and level 0 computes in float."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from leptonc.calibration.scales import block_quantize

    k, n = 256, 64
    rng = np.random.default_rng(0)
    q = block_quantize(rng.standard_normal((n, k)).astype(np.float32), 8, 64, symmetric=True)
    x = rng.standard_normal((2, k)).astype(np.float32)
    x[1, 3] = 50.0  # row 1's first block holds an outlier; row 0 has none
    errs = {}
    for level in (0, 4):
        node = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                block_size=64, accuracy_level=level)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                                  [numpy_helper.from_array(q.packed(), "B"),
                                   numpy_helper.from_array(q.scales.reshape(-1).astype(np.float32), "s")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        ref = x @ q.dequantize().T
        errs[level] = [float(np.linalg.norm(y[r] - ref[r]) / np.linalg.norm(ref[r])) for r in range(2)]
    assert max(errs[0]) < 1e-5, errs
    assert 1e-5 < errs[4][0] < 2e-2 and errs[4][1] > errs[4][0], errs  # int8 rounding, coarser where the outlier is


# ---- mixed-precision int4 -----------------------------------------------------------------------

def test_layer_bits_by_hand():
    from leptonc.calibration.sensitivity import effective_bits, layer_bits

    # 4-bit codes, a 16-bit scale a block, 4-bit zero points two a byte (9 blocks: 5 bytes)
    assert layer_bits(576, 4, 64) == pytest.approx((576 * 4 + 9 * 16 + 5 * 8) / 576)
    assert layer_bits(1536, 4, 64) == pytest.approx(4 + 20 / 64)
    assert layer_bits(576, 4, 128) == pytest.approx((640 * 4 + 5 * 16 + 3 * 8) / 576)  # K padded to 5 blocks
    assert layer_bits(1536, 8, 64) == pytest.approx(8 + 16 / 64)
    shapes = {"a": (10, 1536), "b": (30, 1536)}
    assert effective_bits(shapes, 64, {"a"}) == pytest.approx((10 * 8.25 + 30 * 4.3125) / 40)


def test_choice_keeps_the_budget_and_takes_score_per_bit():
    from leptonc.calibration.sensitivity import choose_eight_bit, effective_bits

    shapes = {"big": (400, 256), "small1": (50, 256), "small2": (50, 256), "rest": (4000, 256)}
    groups = [["big"], ["small1"], ["small2"], ["rest"]]
    scores = {"big": 8.0, "small1": 3.0, "small2": 2.0, "rest": 1.0}
    chosen, bits = choose_eight_bit(groups, scores, shapes, 64, budget=4.5)
    # per extra bit the small groups beat the big one; the budget then has no room for it
    assert chosen == ["small1", "small2"], chosen
    assert bits == pytest.approx(effective_bits(shapes, 64, {"small1", "small2"})) and bits <= 4.5
    assert choose_eight_bit(groups, scores, shapes, 64, budget=4.0) == ([], pytest.approx(4.3125))


def test_fisher_scores_rank_the_layer_whose_error_reaches_the_loss():
    """A layer whose quantization error is zeroed scores zero; the others score by their effect on the loss."""
    from leptonc.calibration.collect import find_linears
    from leptonc.calibration.sensitivity import fisher_scores
    from leptonc.models.adapters import get_adapter
    from leptonc.models.intake import load_model

    lm = load_model("tiny-llama")
    adapter = get_adapter(lm.model_type)
    weights = adapter.weights(lm.module, adapter.spec(lm.module))
    linears = {n: m for n, m in find_linears(lm.module, weights).items() if n != "lm_head"}
    exact = "layers.0.down.weight"
    noise = np.random.default_rng(0)
    quant = lambda name, w: w if name == exact else w + 0.05 * noise.standard_normal(w.shape).astype(np.float32)  # noqa: E731
    ids = np.random.default_rng(1).integers(3, 200, size=(2, 32))
    scores = fisher_scores(lm.module, linears, quant, ids)
    assert set(scores) == set(linears) and scores[exact] == 0.0
    assert all(v > 0 for n, v in scores.items() if n != exact)
    assert all(p.grad is None for p in lm.module.parameters())  # no gradients left behind


def test_int4_budget_sends_the_most_sensitive_groups_to_8_bits(tmp_path, cache):
    bundle = _compile(tmp_path, "mixed", "int4", {"int4_block": 32, "int4_bits_budget": 5.6})
    mixed = bundle.manifest["calibration"]["mixed_precision"]
    assert mixed["eight_bit_groups"] and mixed["uniform_int4_bits"] < mixed["effective_bits"] <= 5.6
    assert mixed["eight_bit_groups"][0] in [g["group"] for g in mixed["most_sensitive"]]
    eight = [n for n in _nodes(bundle) if n.op_type == "MatMulNBits"
             and {a.name: a.i for a in n.attribute}["bits"] == 8]
    assert len(eight) == 1 + len(mixed["eight_bit_groups"])  # the LM head, and each chosen (merged) group
    detail = next(p["detail"] for p in bundle.manifest["passes"] if p["name"] == "quantize_int4")
    assert "measured sensitivity under --int4-bits-budget 5.6" in detail
    off = _compile(tmp_path, "uniform", "int4", {"int4_block": 32, "int4_bits_budget": 0})
    assert "mixed_precision" not in off.manifest["calibration"]


def test_gptq_in_activation_order_stays_on_the_grid_and_beats_nearest():
    from leptonc.calibration.gptq import gptq_fixed_grid, output_error
    from leptonc.calibration.scales import block_quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    x = rng.standard_normal((2048, 256)) @ (np.eye(256) + 0.6 * rng.standard_normal((256, 256)) / 16)
    x *= rng.uniform(0.2, 3.0, 256)  # uneven channel energy: the order matters
    h = x.T @ x
    grid = block_quantize(w, 4, 128)
    dq, c = gptq_fixed_grid(w, h, grid.scales, grid.zero_points, 128, act_order=True)
    zp = np.repeat(grid.zero_points.astype(np.float64), 128, axis=1)
    assert np.array_equal(c, np.rint(c)) and (c + zp >= 0).all() and (c + zp <= 15).all()
    assert np.allclose(dq, c * np.repeat(grid.scales, 128, axis=1), rtol=0, atol=1e-12)
    assert output_error(w, dq, h) < 0.85 * output_error(w, grid.dequantize(), h)


def test_gptq_defaults_to_activation_order_and_only_with_gptq():
    from leptonc.calibration.quantize import QuantSettings
    from leptonc.errors import UnsupportedRequestError

    assert QuantSettings("int4").gptq_act_order is True
    assert QuantSettings("int4", gptq_act_order=False).gptq_act_order is False
    assert QuantSettings("int4", int4_rounding="nearest").gptq_act_order is False
    assert QuantSettings("int8").gptq_act_order is False
    with pytest.raises(UnsupportedRequestError, match="only applies to GPTQ rounding"):
        QuantSettings("int4", int4_method="rtn", gptq_act_order=True)


# ---- texts and their roles ----------------------------------------------------------------------

def test_shipped_texts_have_one_role_each_and_do_not_overlap(wikitext):
    from leptonc.calibration.data import CALIB_WIKITEXT_CHARS, TEXT_ROLES, default_calibration_text, shipped_text
    from leptonc.calibration.gate import default_gate_text, default_heldout_text

    full = wikitext.read_text(encoding="utf-8")
    calib = default_calibration_text().read_text(encoding="utf-8")
    tuning = {name: shipped_text(name).read_text(encoding="utf-8") for name in ("tuning_docs.txt", "tuning_code.txt")}
    tuning["heldout.txt"] = default_heldout_text().read_text(encoding="utf-8")
    docs = shipped_text("eval_python_docs.txt").read_text(encoding="utf-8")
    code = shipped_text("eval_python_code.txt").read_text(encoding="utf-8")
    assert default_gate_text().name == "eval_python_docs.txt" and set(TEXT_ROLES) == {"calibration", "tuning", "evaluation"}
    # calibration mixes domains all through: WikiText pieces from its first characters, Rust, Node.js and Python
    pieces = [calib[i:i + 200] for i in range(0, len(calib) - 200, 5000)]
    wiki = [p for p in pieces if p in full]
    assert wiki and all(full.index(p) < CALIB_WIKITEXT_CHARS for p in wiki) and len(wiki) < len(pieces) / 2
    for marker in ("fn main()", "require('node:", "def "):
        assert calib.count(marker) >= 2 and calib.index(marker) < len(calib) // 4, marker
    assert full.index(tuning["heldout.txt"]) > CALIB_WIKITEXT_CHARS
    for name, text in tuning.items():  # tuning splits are apart from calibration
        assert len(text) > 20_000 and text[3000:3200] not in calib, name
    for text in (docs, code):  # evaluation text is not WikiText, and no slice of it is in calibration or tuning
        assert len(text) > 30_000 and text[1000:1200] not in full
        assert text[1000:1200] not in calib and not any(text[1000:1200] in t for t in tuning.values())
    assert "Execution model" in docs and "def " in code


def test_gate_names_its_text_and_role(tmp_path, cache):
    bundle = _compile(tmp_path, "wo", "int8", {"int8_mode": "weight-only"})
    gate = bundle.manifest["verification"]["accuracy_gate"]
    assert gate["data"].endswith("eval_python_docs.txt") and gate["text_role"].startswith("evaluation")
    assert set(gate["texts"]) == {"calibration", "tuning", "evaluation"}
    assert bundle.manifest["calibration"]["role"].startswith("calibration")
