"""GPTQ rounding on AWQ's grid and on fp8's (calibration/gptq.py): the error feedback lowers the output error
against nearest rounding on correlated inputs and reduces to nearest rounding when the inputs are
uncorrelated; on tiny-llama the compile's MatMulNBits carry GPTQ's codes, whose output SQNR on the
calibration rows beats nearest rounding's; the codes survive the calibration cache exactly."""

from __future__ import annotations

import numpy as np
import pytest

SMALL = {"calib_samples": 4, "calib_seq_len": 64, "check_tokens": 512}


def _problem(seed=0, n=48, k=256, rows=4096):
    """An [n, k] weight and 2 x `rows` correlated input rows (the same mixing): fit half, test half."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    mix = np.eye(k) + 0.6 * rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((2 * rows, k)) @ mix
    return w, x[:rows], x[rows:]


def _grid(w):
    from leptonc.calibration.scales import block_quantize

    return block_quantize(w, 4, 128)


def test_gptq_lowers_output_error_on_correlated_inputs():
    from leptonc.calibration.gptq import gptq_fixed_grid, output_error

    w, x, x2 = _problem()
    h = x.T @ x
    grid = _grid(w)
    dq, c = gptq_fixed_grid(w, h, grid.scales, grid.zero_points, 128)
    nearest = grid.dequantize()
    # the codes lie on the fixed grid: integers, in range, and the weight is exactly code x scale
    zp = np.repeat(grid.zero_points.astype(np.float64), 128, axis=1)
    assert np.array_equal(c, np.rint(c)) and (c + zp >= 0).all() and (c + zp <= 15).all()
    assert np.allclose(dq, c * np.repeat(grid.scales, 128, axis=1), rtol=0, atol=1e-12)
    e_gptq, e_near = output_error(w, dq, h), output_error(w, nearest, h)
    assert e_gptq < 0.85 * e_near, (e_gptq, e_near)
    # and on rows it never saw (same distribution): the gain is in the output, not an overfit
    mse = lambda wq: float(((x2 @ (w - wq).T) ** 2).mean())  # noqa: E731
    assert mse(dq) < 0.9 * mse(nearest)


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding():
    """H diagonal: no column's error can be compensated by another, so GPTQ picks the nearest codes."""
    from leptonc.calibration.gptq import gptq_fixed_grid

    w, _, _ = _problem()
    h = np.diag(np.random.default_rng(1).uniform(0.5, 2.0, w.shape[1]))
    grid = _grid(w)
    _, c = gptq_fixed_grid(w, h, grid.scales, grid.zero_points, 128)
    nearest = grid.codes.astype(np.float64) - np.repeat(grid.zero_points, 128, axis=1)
    assert np.array_equal(c, nearest)


def test_rounded_codes_survive_the_calibration_cache(tmp_path):
    from leptonc.calibration.collect import ActivationStats, GroupStats
    from leptonc.calibration.quantize import _load, _save
    from leptonc.calibration.scales import block_quantize

    w = np.random.default_rng(2).standard_normal((10, 200)).astype(np.float32)
    q = block_quantize(w, 4, 64)  # K padded 200 -> 256: an odd number of blocks' worth of codes
    g = GroupStats(["a.weight"], np.ones(200, np.float32), np.ones(200, np.float32), np.zeros((4, 200), np.float32),
                   prescale=np.ones(200, np.float32), rounded={"a.weight": q})
    stats = ActivationStats(groups=[g], tokens=4)
    _save(stats, tmp_path / "c.npz")
    back = _load(tmp_path / "c.npz").groups[0].rounded["a.weight"]
    assert np.array_equal(back.codes, q.codes) and np.array_equal(back.scales, q.scales)
    assert np.array_equal(back.zero_points, q.zero_points) and (back.k, back.block_size) == (200, 64)


def test_gptq_on_the_fp8_grid_keeps_every_value_on_it_and_lowers_the_output_error():
    """fp8 E4M3 with a fixed scale per row: each GPTQ value is an E4M3 value times its row's scale (so the
    codes Fp8Rows keeps are exact), and the output error is lower than nearest rounding's, also on rows GPTQ
    never saw."""
    from leptonc.calibration.gptq import gptq_fp8, output_error
    from leptonc.calibration.scales import Fp8Rows, compute_scales, fake_quant_fp8

    w, x, x2 = _problem(seed=3)
    h = x.T @ x
    scales = compute_scales(w, "fp8", "per_channel", axis=0)
    dq = gptq_fp8(w, h, scales, act_order=True)
    rows = Fp8Rows.from_values(dq, scales)
    assert np.allclose(rows.dequantize(), dq, rtol=1e-6, atol=0) and np.abs(dq).max() <= 448 * scales.max() * 1.0001
    nearest = fake_quant_fp8(w, scales, axis=0)
    e_gptq, e_near = output_error(w, dq, h), output_error(w, nearest, h)
    assert e_gptq < 0.85 * e_near, (e_gptq, e_near)
    mse = lambda wq: float(((x2 @ (w - wq).T) ** 2).mean())  # noqa: E731
    assert mse(dq) < 0.9 * mse(nearest)


def test_fp8_codes_survive_the_calibration_cache(tmp_path):
    from leptonc.calibration.collect import ActivationStats, GroupStats
    from leptonc.calibration.quantize import _load, _save
    from leptonc.calibration.scales import Fp8Rows, compute_scales, to_fp8

    w = np.random.default_rng(4).standard_normal((10, 200)).astype(np.float32)
    scales = compute_scales(w, "fp8", "per_channel", axis=0)
    q = Fp8Rows(to_fp8(w / scales[:, None]), scales)
    g = GroupStats(["a.weight"], np.ones(200, np.float32), np.ones(200, np.float32), np.zeros((4, 200), np.float32),
                   prescale=np.ones(200, np.float32), rounded={"a.weight": q})
    _save(ActivationStats(groups=[g], tokens=4), tmp_path / "c.npz")
    back = _load(tmp_path / "c.npz").groups[0].rounded["a.weight"]
    assert isinstance(back, Fp8Rows) and back.codes.dtype == q.codes.dtype
    assert np.array_equal(back.codes.view(np.uint8), q.codes.view(np.uint8)) and np.array_equal(back.scales, scales)


@pytest.mark.parametrize("rounding", ["gptq", "nearest"])
def test_fp8_compile_carries_the_gptq_codes(tmp_path, rounding):
    """tiny-llama --fp8: the Q/DQ weights are the calibration's GPTQ codes (the manifest and the pass say so;
    each graph weight equals them exactly), or with --fp8-rounding nearest each weight's nearest E4M3 value."""
    import os

    import onnx
    from onnx import numpy_helper

    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    os.environ["LEPTONC_CACHE"] = str(tmp_path / "cache")
    try:
        bundle = compile_model(CompileConfig(source="tiny-llama", target="cpu", output=str(tmp_path / "f.lepton"),
                                             precision="fp8", quantization={**SMALL, "fp8_rounding": rounding}))
    finally:
        os.environ.pop("LEPTONC_CACHE", None)
    manifest = bundle.manifest
    detail = next(p["detail"] for p in manifest["passes"] if p["name"] == "quantize_fp8")
    rounding_record = manifest["calibration"]["rounding"]
    assert rounding_record["rounding"] == rounding
    assert manifest["config"]["quantization"]["fp8_rounding"] == rounding
    if rounding == "nearest":
        assert "rounded by GPTQ" not in detail
        return
    assert "8 of them rounded by GPTQ" in detail, detail  # 2 layers x (qkv, o, gate+up, down) after the merges
    ratio = rounding_record["output_error_vs_nearest"]
    assert ratio["linears"] == 14 and ratio["lower"] == 14 and ratio["median"] < 0.8, ratio
    model = onnx.load(str(bundle.model_path))
    codes = [n for n in model.graph.initializer if n.name.endswith("/fp8")]
    assert len(codes) == 8 and all(numpy_helper.to_array(c).dtype.itemsize == 1 for c in codes)


@pytest.fixture(scope="module")
def int4_pair(tmp_path_factory):
    """tiny-llama int4 AWQ block 32: GPTQ codes (the default), nearest rounding, and GPTQ with the down
    projections' AWQ scales applied by an explicit Mul instead of folded into the up projections."""
    import os

    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig
    from leptonc.passes import quantize_nbits

    root = tmp_path_factory.mktemp("gptq")
    old = os.environ.get("LEPTONC_CACHE")
    os.environ["LEPTONC_CACHE"] = str(root / "cache")
    try:
        out = {}
        variants = {"gptq": {}, "nearest": {"int4_rounding": "nearest"}, "mul": {}}
        for name, extra in variants.items():
            opts = {**SMALL, "int4_block": 32, **extra}
            quantize_nbits.AWQ_FOLD_UP = name != "mul"  # "mul": AWQ's explicit Mul instead of the fold into up
            try:
                out[name] = compile_model(CompileConfig(source="tiny-llama", target="cpu", precision="int4",
                                                        output=str(root / f"{name}.lepton"), quantization=opts))
            finally:
                quantize_nbits.AWQ_FOLD_UP = True
        yield out
    finally:
        if old is None:
            os.environ.pop("LEPTONC_CACHE", None)
        else:
            os.environ["LEPTONC_CACHE"] = old


def test_tiny_llama_int4_carries_gptq_codes_with_better_output_sqnr(int4_pair):
    gptq, nearest = int4_pair["gptq"], int4_pair["nearest"]
    cal = gptq.manifest["calibration"]
    assert cal["settings"]["int4_rounding"] == "gptq" and cal["rounding"]["rounding"] == "gptq"
    # the Hessian took every calibration token asked for: 128 sequences of 64 (the text holds more)
    assert cal["rounding"]["sequences"] == 128 and cal["rounding"]["tokens"] == 128 * 64
    err = cal["rounding"]["output_error_vs_nearest"]
    assert err["linears"] == 2 * 7 and err["median"] < 0.9 and err["lower"] >= 12, err
    detail = next(p["detail"] for p in gptq.manifest["passes"] if p["name"] == "quantize_int4")
    assert "GPTQ rounding on AWQ's grid for 8 int4 MatMulNBits" in detail, detail  # 2 layers x qkv, o, gate_up, down
    assert "rounded to nearest" not in detail
    near_detail = next(p["detail"] for p in nearest.manifest["passes"] if p["name"] == "quantize_int4")
    assert "--int4-rounding nearest" in near_detail and nearest.manifest["calibration"]["rounding"]["rounding"] == "nearest"
    # output SQNR on the calibration rows (report layers): GPTQ's codes beat nearest rounding's
    layers = lambda b: {r["name"]: r for r in b.report()["quantization"]["layers"] if r["format"].startswith("int4")}  # noqa: E731
    lg, ln = layers(gptq), layers(nearest)
    assert set(lg) == set(ln) and len(lg) == 8 and all(r["format"] == "int4-awq-gptq" for r in lg.values())
    better = [name for name in lg if lg[name]["sqnr_db"] > ln[name]["sqnr_db"]]
    assert len(better) >= 6, {n: (lg[n]["sqnr_db"], ln[n]["sqnr_db"]) for n in lg}
    assert np.mean([lg[n]["sqnr_db"] - ln[n]["sqnr_db"] for n in lg]) > 0.5
    for bundle in (gptq, nearest):
        gate = bundle.manifest["verification"]["accuracy_gate"]
        assert gate["status"] == "passed" and abs(gate["ppl_increase_pct"]) < 5


def test_bundle_codes_are_the_calibration_codes(int4_pair):
    """The pass writes the cached GPTQ codes (rows of q, k, v in the merged projection) into MatMulNBits."""
    import onnx
    from onnx import numpy_helper

    from leptonc.calibration.quantize import _load

    bundle = int4_pair["gptq"]
    stats = _load(__import__("pathlib").Path(bundle.manifest["calibration"]["cache"]["path"]))
    rounded = {m: q for g in stats.groups if g.rounded for m, q in g.rounded.items()}
    assert len(rounded) == 2 * 7
    model = onnx.load(str(bundle.model_path))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    inits = {t.name: t for t in model.graph.initializer}
    want = {}
    for name, q in rounded.items():
        want.setdefault(name.split(".")[1] + "." + {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gu", "up": "gu"}.get(
            name.split(".")[2], name.split(".")[2]), []).append(q.packed())
    found = 0
    for node in nodes:
        b = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        if b is None:
            continue
        for key, parts in want.items():
            if b.shape[0] == sum(p.shape[0] for p in parts) and np.array_equal(b, np.concatenate(parts)):
                found += 1
    assert found == 8, found


def test_fp16_gpu_graph_finds_every_group(tmp_path, monkeypatch):
    """An fp16 export (a GPU target) holds the weights rounded to fp16: the merged q|k|v and gate|up
    projections must still be matched to their calibration groups (AWQ scales, GPTQ codes), not
    fall back to round-to-nearest, and AWQ's explicit Mul (o, down) is fp16 like its input.
    (A GPU bundle cross-compiles here: no verify, no gate. The lowering to leptonc's CUDA kernels is left out,
    so that the CPU's ONNX Runtime can resolve the graph the quantizer wrote.)"""
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    monkeypatch.setenv("LEPTONC_CACHE", str(tmp_path / "cache"))
    bundle = compile_model(CompileConfig(source="tiny-llama", target="h100", backend="onnxruntime", precision="int4",
                                         output=str(tmp_path / "g.lepton"), verify=False,
                                         disabled_passes=("use_leptonc_kernels",),
                                         quantization={**SMALL, "int4_block": 32, "check": False}))
    assert bundle.manifest["precision"] == "int4"
    detail = next(p["detail"] for p in bundle.manifest["passes"] if p["name"] == "quantize_int4")
    assert "GPTQ rounding on AWQ's grid for 8 int4 MatMulNBits" in detail and "folded into 4 norms" in detail, detail
    layers = [r for r in bundle.report()["quantization"]["layers"] if r["format"].startswith("int4")]
    assert len(layers) == 8 and all(r["format"] == "int4-awq-gptq" for r in layers), layers
    assert any("+" in r["name"] for r in layers)  # the merged projections are among them
    # the graph type-checks: ONNX Runtime resolves it (types included) even where it will not run it
    import onnxruntime as ort

    ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])


def test_down_scales_folded_into_up_rows_change_nothing(int4_pair):
    """x / s before each down projection is folded into the up projection's scale rows (exact for block
    quantization): the same function as the explicit Mul, with one node fewer per layer."""
    folded, mul = int4_pair["gptq"], int4_pair["mul"]
    detail = lambda b: next(p["detail"] for p in b.manifest["passes"] if p["name"] == "quantize_int4")  # noqa: E731
    assert "folded into 4 norms, 2 up-projection scales, 2 via Mul" in detail(folded), detail(folded)
    assert "folded into 4 norms, 4 via Mul" in detail(mul), detail(mul)
    ops = lambda b: b.report()["graph"]["op_counts"]  # noqa: E731
    assert ops(mul)["Mul"] - ops(folded)["Mul"] == 2
    g1, g2 = (b.manifest["verification"]["accuracy_gate"] for b in (folded, mul))
    assert g1["quantized_perplexity"] == pytest.approx(g2["quantized_perplexity"], rel=1e-4)
    assert g1["top1_agreement"] == pytest.approx(g2["top1_agreement"], abs=2e-3)


def test_hessian_windows_give_the_same_codes(monkeypatch):
    """Models whose Hessians do not fit HESSIAN_BYTES at once are done a window of layers at a time, each
    forward stopping after its window: the codes must be exactly those of one window."""
    import copy

    import leptonc.calibration.gptq as gptq
    from leptonc.calibration.collect import collect
    from leptonc.calibration.data import calibration_batches
    from leptonc.calibration.quantize import QuantSettings, _awq
    from leptonc.models.adapters import get_adapter
    from leptonc.models.intake import load_model

    lm = load_model("tiny-llama")
    adapter = get_adapter(lm.model_type)
    spec = adapter.spec(lm.module)
    weights = adapter.weights(lm.module, spec)
    settings = QuantSettings("int4", int4_block=32)
    batches = calibration_batches(lm.tokenizer, None, 4, 64)
    stats = collect(lm.module, weights, batches, prescales=lambda st: _awq(st, weights, settings, spec.activation),
                    need_ranges=False, sample_rows=256)
    one, windowed = stats, copy.deepcopy(stats)
    s1 = gptq.round_groups(lm.module, weights, one, batches, 32)
    monkeypatch.setattr(gptq, "HESSIAN_BYTES", 1)  # every group its own window
    s2 = gptq.round_groups(lm.module, weights, windowed, batches, 32)
    assert s1["windows"] == 1 and s2["windows"] == len([g for g in stats.groups if g.prescale is not None]) == 8
    assert s1["tokens"] == s2["tokens"] == 4 * 64
    for g1, g2 in zip(one.groups, windowed.groups):
        assert (g1.rounded is None) == (g2.rounded is None)
        for m in g1.rounded or {}:
            assert np.array_equal(g1.rounded[m].codes, g2.rounded[m].codes), m


@pytest.mark.parametrize("options", [{"int4_rounding": "gptq"}, {"gptq_samples": 64}])
def test_tensorrt_refuses_gptq_flags_and_rounds_to_nearest(options):
    """TensorRT's int4 weights are symmetric blocks: GPTQ's flags are refused there, and a default int4
    AWQ compile for it calibrates without GPTQ (no Hessians to pay for)."""
    from leptonc.calibration.quantize import QuantSettings
    from leptonc.config import CompileConfig
    from leptonc.errors import UnsupportedRequestError

    with pytest.raises(UnsupportedRequestError, match="GPTQ rounding is for ONNX Runtime"):
        CompileConfig(source="tiny-llama", target="h100", backend="tensorrt", precision="int4", quantization=options)
    default = CompileConfig(source="tiny-llama", target="h100", backend="tensorrt", precision="int4")
    assert not default.quantization.uses_gptq
    assert QuantSettings("int4").uses_gptq  # the onnxruntime default
