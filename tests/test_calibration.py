"""Calibration building blocks, checked against hand-computed values and against ONNX Runtime's own
kernels: observers, scale functions, block packing (MatMulNBits / GatherBlockQuantized layouts),
SmoothQuant's exactness before rounding, AWQ's search, the calibration text split and the cache."""

from __future__ import annotations

import numpy as np
import pytest

from leptonc.calibration.observers import EntropyObserver, MinMaxObserver, PercentileObserver, make_observer
from leptonc.calibration.scales import FP8_E4M3_MAX, block_quantize, compute_scales, fake_quant_fp8, \
    fake_quant_int8, scale_from_amax, sqnr_db


# ---- observers ----------------------------------------------------------------------------------

def test_minmax_observer_is_running_max_abs():
    obs = MinMaxObserver()
    obs.observe(np.array([0.5, -3.0, 2.0]))
    obs.observe(np.array([[1.0, -2.5], [2.9, 0.0]]))
    assert obs.amax() == 3.0
    assert scale_from_amax(obs.amax(), "int8") == pytest.approx(3.0 / 127)
    assert scale_from_amax(obs.amax(), "fp8") == pytest.approx(3.0 / 448)


def test_percentile_observer_matches_hand_computed_percentile():
    # |x| = 1..10000 once each: the 99th percentile is 9900 (to a bin width of 10000/2048)
    obs = PercentileObserver(percentile=99.0)
    values = np.arange(1, 10001, dtype=np.float32)
    obs.observe(-values[:5000])  # sign does not matter; two batches with a growing range re-bin
    obs.observe(values[5000:])
    assert abs(obs.amax() - 9900) <= 2 * 10000 / 2048


def test_entropy_observer_clips_a_lone_outlier_and_keeps_a_flat_range():
    rng = np.random.default_rng(0)
    bulk = rng.normal(0, 1, 200_000).astype(np.float32)
    obs = EntropyObserver()
    obs.observe(np.append(bulk, 200.0))  # one outlier 50x the bulk
    amax = obs.amax()
    assert 3.0 < amax < 50.0, amax  # clipped well below the outlier, above the bulk's ~4.5 sigma
    flat = EntropyObserver()
    flat.observe(rng.uniform(-1, 1, 100_000).astype(np.float32))  # nothing to clip: keep (almost) all
    assert flat.amax() > 0.9
    with pytest.raises(ValueError):
        make_observer("mse")


def test_per_channel_and_per_tensor_scales_by_hand():
    w = np.array([[1.0, -2.0], [0.5, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(compute_scales(w, "int8", "per_channel", axis=0), [2 / 127, 4 / 127, 1e-12], rtol=1e-6)
    np.testing.assert_allclose(compute_scales(w, "int8", "per_channel", axis=1), [1 / 127, 4 / 127], rtol=1e-6)
    assert compute_scales(w, "fp8", "per_tensor") == pytest.approx(4 / FP8_E4M3_MAX)
    assert compute_scales(w, "int8", "per_tensor", amax=2.54) == pytest.approx(0.02)
    # int8 fake quantization: round half to even, clip to [-128, 127]
    np.testing.assert_array_equal(fake_quant_int8(np.array([0.25, 0.35, 20.0], np.float32), np.float32(0.1)),
                                  np.array([0.2, 0.4, 12.7], np.float32))
    # fp8 E4M3: 1.0625 is not representable (3 mantissa bits): it rounds to 1.0 or 1.125
    assert fake_quant_fp8(np.array([1.0625, 448.0, 1000.0], np.float32), np.float32(1.0)).tolist() == [1.0, 448.0, 448.0]


def test_block_quantize_by_hand():
    w = np.array([[0.0, 1.5, 3.0, -1.5] * 4], np.float32)  # one row, one block of 16
    q = block_quantize(w, bits=4, block_size=16)
    assert q.scales[0, 0] == pytest.approx(4.5 / 15)  # (max - min) / 15 with min -1.5, max 3
    assert q.zero_points[0, 0] == 5  # round(1.5 / 0.3)
    np.testing.assert_allclose(q.dequantize(), w, atol=q.scales[0, 0] / 2 + 1e-6)
    q8 = block_quantize(w, bits=8, block_size=16, symmetric=True)
    assert q8.scales[0, 0] == pytest.approx(3.0 / 127) and q8.zero_points[0, 0] == 128
    assert sqnr_db(w, q8.dequantize()) > 40


@pytest.mark.parametrize("bits,block,k", [(4, 32, 64), (4, 128, 176), (8, 64, 96)])
def test_packing_matches_onnxruntime_matmulnbits(bits, block, k):
    """Our packed codes / scales / zero points, run by ORT's kernel, equal x @ dequantize(W)^T."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits + block)
    n = 24
    w = rng.normal(0, 1, (n, k)).astype(np.float32)
    x = rng.normal(0, 1, (3, k)).astype(np.float32)
    q = block_quantize(w, bits, block, symmetric=bits == 8)
    inits = [numpy_helper.from_array(q.packed(), "B"), numpy_helper.from_array(q.scales.reshape(-1), "S")]
    inputs = ["x", "B", "S"]
    if bits == 4:
        inits.append(numpy_helper.from_array(q.packed_zero_points().reshape(-1), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ q.dequantize().T, rtol=1e-4, atol=1e-4)


# ---- SmoothQuant and AWQ ------------------------------------------------------------------------

def test_smoothquant_is_exact_before_rounding_and_flattens_outliers():
    from leptonc.calibration.smoothquant import smooth, smoothing_factors

    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (64, 32)).astype(np.float32)
    x[:, 3] *= 60  # an outlier channel, as in real LLM activations
    ws = [rng.normal(0, 0.05, (16, 32)).astype(np.float32), rng.normal(0, 0.05, (8, 32)).astype(np.float32)]
    s = smoothing_factors(np.abs(x).max(0), ws, alpha=0.5)
    xs, wss = smooth(x, ws, s)
    for w, w2 in zip(ws, wss):
        np.testing.assert_allclose(xs @ w2.T, x @ w.T, rtol=1e-4, atol=1e-4)
    ratio = lambda a: np.abs(a).max() / np.median(np.abs(a).max(0))  # noqa: E731
    assert ratio(xs) < ratio(x) / 4


def test_awq_search_never_loses_to_rtn_on_its_rows():
    from leptonc.calibration.awq import awq_search

    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (128, 256)).astype(np.float32)
    x[:, :4] *= 20  # salient channels
    w = rng.normal(0, 0.05, (64, 256)).astype(np.float32)
    s, info = awq_search(x, np.abs(x).mean(0), [w], bits=4, block_size=128)
    assert info["mse"] <= info["rtn_mse"]
    assert info["alpha"] > 0 and info["mse"] < 0.9 * info["rtn_mse"]  # protecting salient channels pays here
    assert s.shape == (256,)


def test_awq_gated_group_search_beats_rtn_on_the_mlp_output():
    """AWQ on a gate/up group, with the error measured after the activation (act(gate) * up): the
    chosen scales are never worse than RTN there, win clearly when a few channels are salient, and
    the search really looks at that output (not at the linear outputs)."""
    from leptonc.calibration.awq import awq_search, gated_output
    from leptonc.calibration.scales import block_quantize

    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (256, 256)).astype(np.float32)
    x[:, :4] *= 25  # salient input channels
    gate, up = (rng.normal(0, 0.05, (96, 256)).astype(np.float32) for _ in range(2))
    out = gated_output("silu", gate.shape[0])
    s, info = awq_search(x, np.abs(x).mean(0), [gate, up], bits=4, block_size=128, output=out)

    def mlp_err(scale):
        q = [block_quantize(w * scale[None, :], 4, 128).dequantize() / scale[None, :] for w in (gate, up)]
        return float(((out(x @ np.concatenate(q).T) - out(x @ np.concatenate([gate, up]).T)) ** 2).mean())

    assert info["mse"] == pytest.approx(mlp_err(s), rel=1e-5)  # the loss is the MLP-output error
    assert info["rtn_mse"] == pytest.approx(mlp_err(np.ones(256, np.float32)), rel=1e-5)
    assert info["alpha"] > 0 and info["mse"] < 0.9 * info["rtn_mse"]
    silu = out(np.concatenate([np.full((1, 96), -30.0), np.ones((1, 96))], 1).astype(np.float32))
    assert np.abs(silu).max() < 1e-9  # silu(-30) * 1 ~ 0: the activation really is applied


def test_awq_clip_minimises_the_block_output_error_not_the_weight_error():
    """Clip search with calibration rows keeps, per (row, block), the range whose partial output
    x_b . w_b is closest on those rows (AWQ's clip loss, cross terms included). With one block per
    row (K = 128) that is the row's whole output error: no single shrink ratio does better on any
    row, which a per-channel (diagonal) weighting does not guarantee for correlated inputs."""
    from leptonc.calibration.scales import block_quantize

    rng = np.random.default_rng(4)
    base = rng.normal(0, 1, (512, 1)).astype(np.float32)
    x = (0.9 * base + 0.3 * rng.normal(0, 1, (512, 128))).astype(np.float32)  # strongly correlated channels
    w = rng.standard_t(3, (48, 128)).astype(np.float32) * 0.05  # heavy tails: clipping pays
    ratios = tuple(1.0 - 0.025 * i for i in range(1, 21))
    row_err = lambda q: ((x @ (q.dequantize() - w).T) ** 2).mean(0)  # noqa: E731
    best = row_err(block_quantize(w, 4, 128, clip_rows=x, clip_ratios=ratios))
    for r in (1.0, *ratios):
        fixed = row_err(_fixed_ratio(w, r))
        assert (best <= fixed * (1 + 1e-4) + 1e-9).all(), r
    assert best.sum() < row_err(block_quantize(w, 4, 128)).sum() * 0.95  # and clipping pays here
    by_weight = row_err(block_quantize(w, 4, 128, clip_ratios=ratios))
    assert best.sum() < by_weight.sum()


def _fixed_ratio(w, r):
    """Asymmetric 4-bit block-128 rounding with every block's range shrunk by exactly `r`."""
    from leptonc.calibration.scales import block_quantize

    lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
    return block_quantize(np.clip(w, (lo * r)[:, None], (hi * r)[:, None]), 4, 128)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_smoothquant_graph_rewrite_keeps_the_fp32_function(tmp_path, precision):
    """Fold SmoothQuant into the tiny-llama graph (norm weights / Mul, W * s) without rounding: the
    model's logits must match the unsmoothed graph to 1e-4, for int8 W8A8's searched factors and for
    fp8 smoothed with --smoothquant-alpha 0.5."""
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from leptonc.calibration.quantize import QuantSettings, calibrate
    from leptonc.export import export_decoder
    from leptonc.models.adapters import get_adapter
    from leptonc.models.intake import load_model
    from leptonc.passes import PassContext, run_pipeline
    from leptonc.passes.quantize_qdq import smooth_only
    from leptonc.targets import get_target
    from leptonc.targets.backends.onnxruntime import CPU_PIPELINE

    lm = load_model("tiny-llama")
    adapter = get_adapter(lm.model_type)
    spec = adapter.spec(lm.module)
    weights = adapter.weights(lm.module, spec)
    # fp8 smooths with a fixed alpha (0.5 by default); int8 searches alpha per group
    settings = QuantSettings(precision, calib_samples=4, calib_seq_len=64)
    import os

    os.environ["LEPTONC_CACHE"] = str(tmp_path / "cache")
    try:
        result = calibrate(lm.module, lm.tokenizer, weights, settings, lm.source_hash)
    finally:
        os.environ.pop("LEPTONC_CACHE")
    assert all(g.prescale is not None for g in result.stats.groups if g.members != ["lm_head"])
    exported = export_decoder(spec, weights, tmp_path / "export")
    ctx = PassContext(target=get_target("cpu"), precision=precision, spec=spec, work_dir=tmp_path,
                      quantization=settings, activation_stats=result.stats)
    graph = gs.import_onnx(onnx.load(str(exported.model_path)))
    run_pipeline(graph, CPU_PIPELINE, ctx)  # the fused graph the quantizer sees in a real compile
    reference = gs.export_onnx(graph.copy())
    res = smooth_only(graph, ctx)
    assert res.applied and res.counts["smooth_folded"] >= 2 * spec.num_layers  # qkv and gate/up into the norms
    smoothed = gs.export_onnx(graph.cleanup().toposort())

    rng = np.random.default_rng(0)
    ids = rng.integers(0, spec.vocab_size, (2, 9))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(9), (2, 1))}
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((2, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    if "logits_positions" in {i.name for i in reference.graph.input}:  # passes/select_logits.py: every position
        feed["logits_positions"] = np.tile(np.arange(9, dtype=np.int64), (2, 1))
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
            for m in (reference, smoothed)]
    assert np.abs(outs[0] - outs[1]).max() <= 1e-4 * max(1.0, np.abs(outs[0]).max())


# ---- calibration data and cache ----------------------------------------------------------------

def test_calibration_holds_the_first_wikitext_characters_and_heldout_comes_well_after(wikitext):
    from leptonc.calibration.data import CALIB_WIKITEXT_CHARS, EVAL_OFFSET_CHARS, default_calibration_text
    from leptonc.calibration.gate import default_heldout_text

    full = wikitext.read_text(encoding="utf-8")
    calib = default_calibration_text().read_text(encoding="utf-8")
    held = default_heldout_text().read_text(encoding="utf-8")
    lines = [line for line in full[:CALIB_WIKITEXT_CHARS].splitlines() if len(line) > 40]
    assert lines and all(line in calib for line in lines)  # whole lines, in pieces among the other domains
    after = [line for line in full[CALIB_WIKITEXT_CHARS:CALIB_WIKITEXT_CHARS + 20_000].splitlines() if len(line) > 40]
    assert after and not any(line in calib for line in after)
    assert full.index(held) >= EVAL_OFFSET_CHARS > CALIB_WIKITEXT_CHARS


def test_calibration_cache_hits_on_the_second_run(tmp_path, monkeypatch):
    from leptonc.calibration.quantize import QuantSettings, calibrate
    from leptonc.models.adapters import get_adapter
    from leptonc.models.intake import load_model

    monkeypatch.setenv("LEPTONC_CACHE", str(tmp_path))
    lm = load_model("tiny-llama")
    adapter = get_adapter(lm.model_type)
    weights = adapter.weights(lm.module, adapter.spec(lm.module))
    settings = QuantSettings("fp8", calib_samples=3, calib_seq_len=32, calib_method="percentile")
    first = calibrate(lm.module, lm.tokenizer, weights, settings, lm.source_hash)
    second = calibrate(lm.module, lm.tokenizer, weights, settings, lm.source_hash)
    assert not first.summary["cache"]["hit"] and second.summary["cache"]["hit"]
    assert first.summary["cache"]["path"].startswith(str(tmp_path))
    assert [g.amax for g in first.stats.groups] == pytest.approx([g.amax for g in second.stats.groups])
    assert all(g.amax > 0 for g in first.stats.groups)
    # a different setting is a different key
    other = calibrate(lm.module, lm.tokenizer, weights, QuantSettings("fp8", calib_samples=3, calib_seq_len=32),
                      lm.source_hash)
    assert not other.summary["cache"]["hit"]
    # groups: q/k/v and gate/up share their input; the tied head reads the final norm
    members = [tuple(g.members) for g in first.stats.groups]
    assert ("layers.0.q.weight", "layers.0.k.weight", "layers.0.v.weight") in members
    assert ("layers.0.gate.weight", "layers.0.up.weight") in members
    assert ("lm_head",) in members


@pytest.mark.parametrize("precision,options,says,never", [
    ("int4", {"int4_method": "rtn"}, "--int4-method awq", "--calib-method"),
    ("int4", {}, "--int4-block", "--int4-method awq"),
    ("int4", {"int4_rounding": "nearest"}, "--int4-rounding gptq", "--int4-method awq"),
    ("int4", {"int4_rounding": "gptq"}, "--int4-block", "--int4-rounding"),
    ("int8", {}, "--int8-mode weight-only", "--int4"),
    ("fp8", {"calib_method": "percentile"}, "--calib-method minmax", "--int4"),
    ("fp8", {}, "--keep-fp", "--int4"),
])
def test_failed_gate_hint_names_the_failing_formats_flags(precision, options, says, never):
    from leptonc.calibration.gate import gate_hint
    from leptonc.calibration.quantize import QuantSettings

    hint = gate_hint(QuantSettings(precision, **options))
    assert says in hint and never not in hint
    assert "--max-ppl-increase" in hint


def test_block_scale_refit_never_raises_the_block_output_loss():
    """`refine` refits each block's scale by least squares on the calibration rows' block covariance:
    per (row, block) the partial-output loss is never above the clip search's, and it falls overall."""
    from leptonc.calibration.scales import _block_loss, block_quantize

    rng = np.random.default_rng(7)
    x = (rng.normal(0, 1, (400, 256)) * rng.lognormal(0, 1, 256)).astype(np.float32)  # uneven channels
    w = (rng.standard_t(4, (32, 256)) * 0.05).astype(np.float32)
    ratios = tuple(1.0 - 0.05 * i for i in range(1, 11))
    xb = x.reshape(400, 2, 128).transpose(1, 0, 2)
    cov = np.matmul(xb.transpose(0, 2, 1), xb) / 400
    blocks = w.reshape(32, 2, 128)

    def loss(q):
        return _block_loss(blocks, q.scales, q.zero_points.astype(np.int32), 15, cov)

    clipped = block_quantize(w, 4, 128, clip_rows=x, clip_ratios=ratios)
    refit = block_quantize(w, 4, 128, clip_rows=x, clip_ratios=ratios, refine=4)
    assert (loss(refit) <= loss(clipped) * (1 + 1e-5)).all()
    assert loss(refit).sum() < loss(clipped).sum() * 0.97
    err = lambda q: float(((x @ (q.dequantize() - w).T) ** 2).mean())  # noqa: E731
    assert err(refit) < err(clipped)
