"""AWQ (Lin et al., 2024) scale search for block-wise weight-only quantization.

Salient input channels (large mean |x|) are protected by scaling their weight columns up before
rounding and the activation down by the same factor: for each group of layers that read one input,
search s = mean|x| ** alpha over a grid of alpha and keep the one whose quantized output is closest
to the full-precision output on calibration rows. alpha = 0 is plain round-to-nearest, so the chosen
scales are never worse than RTN on the calibration rows.

Where the group is a gated MLP's gate and up projections, the error is measured after the gate,
on act(x W_gate^T) * (x W_up^T) (the down projection's input), as AWQ measures it on the block's
output rather than on each weight alone: a gate channel the activation saturates matters less than
one it passes."""

from __future__ import annotations

import numpy as np

from leptonc.calibration.scales import BlockQuantized, block_quantize

GRID = 20
AWQ_CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(1, 21))  # down to 50%, AWQ's max_shrink
AWQ_REFINE_ROUNDS = 4  # least-squares refit of each block's scale after the clip search (scales.block_quantize):
# smollm2-135m int4 AWQ +17.03% -> +16.56% on the tuning text (a fake-quantization screen)


def awq_grid(ws: np.ndarray, block: int, rows: np.ndarray, scale_multiplier: float = 1.0) -> BlockQuantized:
    """4-bit blocks of an AWQ-scaled weight W * s ([N, K]) with AWQ's second step, activation-aware range
    clipping on `rows` (calibration inputs of W * s, i.e. x / s), then each block's scale refit: the grid
    that nearest rounding (the pass) and GPTQ (gptq.py) both round on."""
    return block_quantize(ws, 4, block, clip_rows=rows, clip_ratios=AWQ_CLIP_RATIOS, refine=AWQ_REFINE_ROUNDS,
                          scale_multiplier=scale_multiplier)


def activation_fn(name: str):
    """The MLP activation (models/spec.py's names) as a numpy -> numpy function, through torch's
    definitions (the ones the model runs)."""
    import torch
    import torch.nn.functional as F

    fns = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
    if name not in fns:
        raise ValueError(f"unknown activation {name!r}; use one of {', '.join(fns)}")
    fn = fns[name]
    return lambda v: fn(torch.from_numpy(np.ascontiguousarray(v, np.float32))).numpy()


def gated_output(activation: str, n_gate: int):
    """Group output -> act(gate) * up, for a [gate | up] output concatenated along columns."""
    act = activation_fn(activation)
    return lambda y: act(y[:, :n_gate]) * y[:, n_gate:]


def awq_search(samples: np.ndarray, absmean: np.ndarray, weights: list[np.ndarray], bits: int = 4,
               block_size: int = 128, grid: int = GRID, output=None) -> tuple[np.ndarray, dict]:
    """(s [K], info) for input rows `samples` [R, K] read by `weights` ([N_m, K] each). `output`
    maps the group's concatenated linear output to the tensor whose error counts (default: itself)."""
    x = np.asarray(samples, np.float32)
    w = np.concatenate(weights, axis=0)
    out = output or (lambda y: y)
    ref = out(x @ w.T)
    best = (np.inf, 0.0, np.ones(w.shape[1], np.float32))
    base_err = None
    xm = np.maximum(np.asarray(absmean, np.float64), 1e-8)
    for i in range(grid + 1):
        alpha = i / grid
        s = xm ** alpha
        s = s / np.sqrt(s.max() * s.min())
        s = s.astype(np.float32)
        q = block_quantize(w * s[None, :], bits, block_size).dequantize() / s[None, :]
        err = float(((out(x @ q.T) - ref) ** 2).mean())
        if i == 0:
            base_err = err
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], {"alpha": best[1], "mse": best[0], "rtn_mse": base_err}
