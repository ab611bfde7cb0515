"""GPTQ rounding (Frantar et al., 2023) on a fixed grid: AWQ's for int4 `MatMulNBits` weights, E4M3 with a
scale per row for fp8 Q/DQ weights.

AWQ (calibration/awq.py) chooses per-channel scales s and, in the pass, each 128-block's range (clip
search + least-squares refit); rounding each weight to its nearest code then leaves errors that add
up in the layer's output. GPTQ rounds the columns one at a time and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse of the input's second moment
H = sum over calibration tokens of x x^T, so the output error X (W - Wq)^T is what is minimised.

Here the grid is fixed before GPTQ runs ("static groups"): each block's scale and integer zero point
are the ones AWQ's clip search and refit chose for W * s, so the codes GPTQ picks fit the same
MatMulNBits layout. GPTQ runs on W' = W * s with H' = diag(1/s) H diag(1/s) (the input of W * s).
For fp8, s is SmoothQuant's factor and each row's scale is its max |W * s| / 448, as nearest rounding has it;
GPTQ then picks among E4M3's values (smollm2-135m on the three tuning splits: +0.85% / +1.15% / +0.86%
against nearest rounding's +2.04% / +2.35% / +2.01%; BENCHMARKS.md).

Measured on smollm2-135m (a fake-quantization screen on the WikiText tuning split, with the earlier
WikiText-only calibration text, never the evaluation text): the Hessian needs many calibration tokens
(119 sequences of 256: +9.13%; 16 sequences: +15.68%, no gain over nearest rounding's +15.62%), and
damping 0.1 x mean diag H'.
"""

from __future__ import annotations

import numpy as np

from leptonc.calibration.scales import FP8_E4M3_MAX

GPTQ_DAMP = 0.1  # x mean diag H': 0.01 (the paper's) +10.3%, 0.1 +9.1% on the tuning text (BENCHMARKS.md)
GPTQ_LAZY = 128  # columns per lazy batch update (the paper's B)
GPTQ_SAMPLES = 128  # calibration sequences for the Hessian (--gptq-samples): 32,768 tokens, 89% of the shipped
# text's 144 sequences of 256, every domain of it (it is interleaved); 16 gained nothing on smollm2-135m (the screen)
HESSIAN_BYTES = 4 << 30  # float64 Hessians held at once; more layers than fit are done in windows


class _Stop(Exception):
    """Raised by a Hessian hook to end a forward once the window's last input is recorded."""


def hessians(module, linears: dict, firsts: list[str], batches: np.ndarray, stop_at: str | None = None,
             chunk: int = 8, on_batch=None) -> tuple[dict, int]:
    """({name: H = sum over every token of x x^T, float64 [K, K]}, tokens) for the inputs of the
    linears named in `firsts` (one per input group), over `batches` ([n, seq] token ids). With
    `stop_at`, each forward stops once that linear's input is recorded."""
    import torch

    acc: dict = {}
    tokens = 0

    def hook(name):
        def fn(mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            acc[name] = acc[name] + x.T @ x if name in acc else x.T @ x
            if name == stop_at:
                raise _Stop
        return fn

    handles = [linears[n].register_forward_pre_hook(hook(n)) for n in firsts]
    try:
        with torch.no_grad():
            for i in range(0, len(batches), chunk):
                rows = torch.from_numpy(np.ascontiguousarray(batches[i:i + chunk]))
                tokens += rows.numel()
                try:
                    module(rows, use_cache=False)
                except _Stop:
                    pass
                if on_batch:
                    on_batch(min(i + chunk, len(batches)), len(batches))
    finally:
        for h in handles:
            h.remove()
    return {n: h.numpy() for n, h in acc.items()}, tokens


def gptq_fixed_grid(w: np.ndarray, h: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block: int,
                    levels: int = 15, damp: float = GPTQ_DAMP, act_order: bool = False,
                    lazy: int = GPTQ_LAZY) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of an [N, K] weight whose integer grid is fixed: column k rounds with its block's scale and zero
    point (scales / zero_points [N, blocks], block k // `block`), so act-order only changes the order
    in which columns are rounded. `h` [K, K] is the input second moment. Returns (dequantized weight
    [N, K], codes minus zero point [N, K]), float64."""
    import torch

    sc_all = torch.from_numpy(np.asarray(scales, np.float64))
    zp_all = torch.from_numpy(np.asarray(zero_points, np.float64))

    def round_column(col, k):
        sc, zp = sc_all[:, k // block], zp_all[:, k // block]
        c = torch.clamp(torch.round(col / sc) + zp, 0, levels) - zp
        return c * sc, c

    return _gptq(w, h, round_column, damp, act_order, lazy)


def gptq_fp8(w: np.ndarray, h: np.ndarray, scales: np.ndarray, damp: float = GPTQ_DAMP, act_order: bool = False,
             lazy: int = GPTQ_LAZY) -> np.ndarray:
    """GPTQ of an [N, K] weight onto float8 E4M3 with one fixed scale per output row (`scales` [N]): each
    column rounds to the nearest E4M3 value of w / scale (saturating at +-448). Returns the dequantized weight
    [N, K], float64, whose every value is an E4M3 value times its row's scale."""
    import torch

    sc = torch.from_numpy(np.asarray(scales, np.float64))

    def round_column(col, k):
        c = torch.clamp(col / sc, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float64)
        return c * sc, c

    return _gptq(w, h, round_column, damp, act_order, lazy)[0]


def _gptq(w: np.ndarray, h: np.ndarray, round_column, damp: float, act_order: bool,
          lazy: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's loop over an [N, K] weight: round_column(column [N], k) -> (rounded column, its codes), k the
    column's index before act-order's permutation. Returns (rounded weight, codes), [N, K] float64 each."""
    import torch

    W = torch.from_numpy(np.array(w, np.float64))
    H = torch.from_numpy(np.array(h, np.float64))
    k = W.shape[1]
    dead = torch.diag(H) == 0  # an input channel that is always zero: its weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    C = torch.zeros_like(W)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1, hinv1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            col = W1[:, i]
            q, c = round_column(col, int(perm[j]))
            Q[:, j], C[:, j] = q, c
            e = (col - q) / hinv1[i, i]
            W1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return Q[:, inv].numpy(), C[:, inv].numpy()


def output_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """Relative output error on the Hessian's tokens: tr(D H D^T) / tr(W H W^T), D = W - Wq."""
    w = np.asarray(w, np.float64)
    d = w - wq
    return float(np.einsum("nk,nk->", d @ h, d) / max(np.einsum("nk,nk->", w @ h, w), 1e-300))


def round_groups(module, weights, stats, batches: np.ndarray, block: int, damp: float = GPTQ_DAMP,
                 on_progress=None, act_order: bool = False, fmt: str = "int4") -> dict:
    """GPTQ-round every scaled group of `stats` (groups with a prescale: AWQ's or SmoothQuant's) into
    `group.rounded` ({member: codes of W * s}): for int4 a BlockQuantized on AWQ's grid (block `block`), for
    fp8 an Fp8Rows (E4M3, one scale per output row); returns the summary the manifest records."""
    from leptonc.calibration.collect import find_linears

    linears = find_linears(module, weights)
    groups = [g for g in stats.groups if g.prescale is not None and g.members[0] in linears]
    windows, window, held = [], [], 0
    for g in groups:  # forward order (collect's): a window's forward stops at its last group
        size = 8 * g.samples.shape[1] ** 2
        if window and held + size > HESSIAN_BYTES:
            windows.append(window)
            window, held = [], 0
        window.append(g)
        held += size
    if window:
        windows.append(window)
    total = sum(len(g.members) for g in groups)
    done, ratios, tokens = 0, [], 0
    round_member = _round_fp8 if fmt == "fp8" else _round_int4
    for wi, window in enumerate(windows):
        firsts = [g.members[0] for g in window]
        progress = (lambda i, n: on_progress(i, n, f"GPTQ Hessians {wi + 1}/{len(windows)}")) if on_progress else None
        # every window's forwards stop at its last group, the last window's too: the rest of the model (the LM
        # head: gemma-3-270m's 262,144-token logits are 2 GB a chunk of 8 sequences) adds nothing to a Hessian
        hs, tokens = hessians(module, linears, firsts, batches, stop_at=firsts[-1], on_batch=progress)
        for g in window:
            h = hs.pop(g.members[0])
            s = g.prescale.astype(np.float64)
            hp = h / np.outer(s, s)  # the input of W * s is x / s
            g.rounded = {}
            for m in g.members:
                w = np.asarray(weights(m), np.float32)
                g.rounded[m], dq, nearest = round_member(w * g.prescale[None, :], hp, g, block, damp, act_order)
                ratios.append(output_error(w, dq / s[None, :], h) /
                              max(output_error(w, nearest / g.prescale[None, :], h), 1e-300))
                done += 1
                if on_progress:
                    on_progress(done, total, "GPTQ rounding")
            del h
    grid = ("static: each row's E4M3 scale (its max |W * s| / 448)" if fmt == "fp8" else
            "static: each block's scale and zero point from AWQ's clip search and refit")
    return {"rounding": "gptq", "format": fmt, "sequences": int(len(batches)), "tokens": int(tokens), "damp": damp,
            "order": "activation (decreasing diag H)" if act_order else "natural", "windows": len(windows),
            "grid": grid,
            "output_error_vs_nearest": {"median": round(float(np.median(ratios)), 4) if ratios else None,
                                        "lower": int(sum(r < 1 for r in ratios)), "linears": len(ratios)}}


def _round_int4(ws: np.ndarray, hp: np.ndarray, group, block: int, damp: float, act_order: bool):
    """(BlockQuantized codes of W * s on AWQ's grid, GPTQ's dequantized W * s, nearest rounding's)."""
    from leptonc.calibration.awq import awq_grid
    from leptonc.calibration.scales import BlockQuantized

    k = ws.shape[1]
    grid = awq_grid(ws, block, group.samples / group.prescale[None, :])
    dq, c = gptq_fixed_grid(ws, hp, grid.scales, grid.zero_points, block, damp=damp, act_order=act_order)
    codes = grid.codes.copy()  # padded columns keep their (zero-weight) codes
    zp = np.repeat(grid.zero_points.astype(np.float64), block, axis=1)[:, :k]
    codes[:, :k] = np.rint(c + zp).astype(np.uint8)
    return BlockQuantized(codes, grid.scales, grid.zero_points, 4, block, k), dq, grid.dequantize()


def _round_fp8(ws: np.ndarray, hp: np.ndarray, group, block: int, damp: float, act_order: bool):
    """(Fp8Rows of W * s, GPTQ's dequantized W * s, nearest rounding's), one E4M3 scale per output row."""
    from leptonc.calibration.scales import Fp8Rows, compute_scales, fake_quant_fp8

    scales = compute_scales(ws, "fp8", "per_channel", axis=0)
    dq = gptq_fp8(ws, hp, scales, damp=damp, act_order=act_order)
    return Fp8Rows.from_values(dq, scales), dq, fake_quant_fp8(ws, scales, axis=0)
