"""Quantizing a model with a large vocabulary (gemma-3-270m: a tied 262,144-row embedding / LM head) holds no
vocabulary x calibration-rows array: the 8-bit head's rewrite and error record work in slices, GPTQ's Hessian
forwards stop before the LM head, the layer sensitivity's backward computes no parameter gradients and takes
fewer sequences at a time where their logits would be large, and the accuracy gate takes each window's
log-softmax a few positions at a time. Fast: synthetic graphs and tiny-llama."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_graphsurgeon as gs

VOCAB, HIDDEN, ROWS = 131_072, 64, 1024  # the head's output on the rows: 134M floats, 537 MB in float32


def _head_graph(rng) -> gs.Graph:
    """ids -> Gather(embed) -> Gemm(embed, transB) -> logits: a tied embedding / LM head alone."""
    embed = gs.Constant("embed", (0.02 * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32))
    ids = gs.Variable("ids", dtype=np.int64, shape=[8])
    hidden = gs.Variable("hidden", dtype=np.float32, shape=[8, HIDDEN])
    logits = gs.Variable("logits", dtype=np.float32, shape=[8, VOCAB])
    nodes = [gs.Node("Gather", "embed_tokens", inputs=[embed, ids], outputs=[hidden]),
             gs.Node("Gemm", "lm_head", attrs={"transB": 1}, inputs=[hidden, embed], outputs=[logits])]
    return gs.Graph(nodes=nodes, inputs=[ids], outputs=[logits], opset=17)


def test_int4_pass_on_a_large_vocab_head_holds_no_vocab_by_rows_array():
    """The int4 pass quantizes the tied head to 8 bits and records its output SQNR on 1,024 calibration rows;
    its peak allocation stays under half of the float32 head output on those rows (the whole product, in
    float64 as the SQNR was summed, was 8x that)."""
    from leptonc.calibration.collect import ActivationStats, GroupStats
    from leptonc.calibration.quantize import QuantSettings
    from leptonc.passes.quantize_nbits import rewrite_weight_only
    from leptonc.passes.registry import PassContext

    rng = np.random.default_rng(0)
    graph = _head_graph(rng)
    rows = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
    stats = ActivationStats(groups=[GroupStats(["lm_head"], np.abs(rows).max(0), np.abs(rows).mean(0), rows)])
    settings = QuantSettings("int4", int4_method="rtn", int4_bits_budget=0)
    ctx = PassContext(precision="int4", quantization=settings, activation_stats=stats)
    tracemalloc.start()
    try:
        result = rewrite_weight_only(graph, ctx, bits=4, block=64, awq=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.applied and result.counts["embedding"] == 1
    head = next(r for r in ctx.quant_report["layers"] if r["name"] == "lm_head")
    assert head["on"] == "output" and head["sqnr_db"] > 35  # 8-bit block 64: about 40 dB
    assert peak < VOCAB * ROWS * 4 / 2, f"peak {peak / 1e6:.0f} MB"


def test_sliced_sqnr_and_block_quantize_match_the_whole_computation(monkeypatch):
    from leptonc.calibration import scales

    rng = np.random.default_rng(1)
    w = rng.standard_normal((1000, 96)).astype(np.float32)
    x = rng.standard_normal((40, 96)).astype(np.float32)
    rows = rng.standard_normal((64, 96)).astype(np.float32)
    q = scales.block_quantize(w, 4, 32, clip_rows=rows, clip_ratios=(0.9, 0.8), refine=2)
    wq = q.dequantize()
    whole = (scales.sqnr_db(w, wq), scales.output_sqnr_db(x, w, wq))
    monkeypatch.setattr(scales, "CHUNK_ELEMENTS", 5000)  # 52 row slices of the weight, 125 column slices of x @ w^T
    sliced = scales.block_quantize(w, 4, 32, clip_rows=rows, clip_ratios=(0.9, 0.8), refine=2)
    assert np.array_equal(sliced.codes, q.codes) and np.array_equal(sliced.zero_points, q.zero_points)
    # the refit scales agree to float32 rounding, not bit for bit: BLAS's kernels sum a slice's last rows in another
    # order than the same rows inside the whole weight (OpenBLAS on AMD EPYC: 1 ulp in about a sixth of the blocks)
    assert np.allclose(sliced.scales, q.scales, rtol=4e-7, atol=0)
    ref = x @ w.T
    by_hand = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - x @ wq.T).astype(np.float64) ** 2).sum())
    assert abs(scales.sqnr_db(w, wq) - whole[0]) < 1e-9
    assert abs(scales.output_sqnr_db(x, w, wq) - whole[1]) < 1e-5  # x @ w^T in float32, by BLAS, of other widths
    assert abs(whole[1] - by_hand) < 1e-4


def _tiny():
    from leptonc.models.adapters import get_adapter
    from leptonc.models.intake import load_model

    lm = load_model("tiny-llama")
    adapter = get_adapter(lm.model_type)
    return lm, adapter.weights(lm.module, adapter.spec(lm.module))


def test_gptq_hessian_forwards_never_reach_the_lm_head():
    from leptonc.calibration.collect import collect
    from leptonc.calibration.gptq import round_groups

    lm, weights = _tiny()
    batches = np.random.default_rng(2).integers(3, 200, size=(4, 32))
    stats = collect(lm.module, weights, batches, need_ranges=False)
    for g in stats.groups:
        if g.members != ["lm_head"]:
            g.prescale = np.ones(g.samples.shape[1], np.float32)
    calls = []
    handle = lm.module.lm_head.register_forward_hook(lambda *args: calls.append(1))
    try:
        summary = round_groups(lm.module, weights, stats, batches, 64)
    finally:
        handle.remove()
    assert summary["tokens"] == batches.size and summary["output_error_vs_nearest"]["linears"] > 0
    assert not calls, "a Hessian forward computed the logits"


def test_fisher_scores_take_no_parameter_gradients_and_do_not_depend_on_the_chunk(monkeypatch):
    from leptonc.calibration import sensitivity
    from leptonc.calibration.collect import find_linears

    lm, weights = _tiny()
    linears = {n: m for n, m in find_linears(lm.module, weights).items() if n != "lm_head"}
    noise = {n: 0.05 * np.random.default_rng(i).standard_normal(m.weight.shape).astype(np.float32)
             for i, (n, m) in enumerate(linears.items())}
    quant = lambda name, w: w + noise[name]  # noqa: E731
    ids = np.random.default_rng(3).integers(3, 200, size=(4, 32))
    seen = []
    for p in lm.module.parameters():
        p.register_hook(lambda g: seen.append(1))
    whole = sensitivity.fisher_scores(lm.module, linears, quant, ids)
    assert not seen and all(p.requires_grad and p.grad is None for p in lm.module.parameters())
    vocab = lm.module.config.vocab_size
    monkeypatch.setattr(sensitivity, "LOGITS_BYTES", 4 * vocab * ids.shape[1])  # one sequence at a time
    one = sensitivity.fisher_scores(lm.module, linears, quant, ids)
    assert all(abs(one[n] - whole[n]) <= 1e-4 * whole[n] for n in whole), (one, whole)


def test_a_window_is_scored_a_few_positions_at_a_time():
    from leptonc.runtime.evaluate import NLL_ROWS, nll_sum

    rng = np.random.default_rng(4)
    ids = rng.integers(0, 500, 600)
    logits = (3 * rng.standard_normal((300, 500))).astype(np.float32)
    for begin, first, end in ((0, 1, 300), (200, 250, 500), (100, 101, 100 + 2 * NLL_ROWS + 1)):
        pred = logits[first - 1 - begin: end - 1 - begin].astype(np.float64)  # the whole window's log-softmax at once
        whole = float(-(pred - np.log(np.exp(pred).sum(-1, keepdims=True)))[np.arange(end - first), ids[first:end]].sum())
        assert abs(nll_sum(logits[: end - begin], ids, begin, first, end) - whole) <= 1e-9 * whole
