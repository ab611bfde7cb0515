"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights with a per-input-channel
factor s, so that both X / s and W * s quantize well to int8:

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)        Y = (X / s) @ (W * s)^T = X @ W^T

The rewrite is exact in real arithmetic; only rounding changes. Layers that read the same input
(q/k/v, gate/up) share one s (the weight maximum runs over all of them)."""

from __future__ import annotations

import numpy as np

MIN_FACTOR = 1e-5


def smoothing_factors(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """s [K] for an activation with per-channel max `act_absmax` [K] read by `weights` ([N_m, K] each)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    w_absmax = np.max([np.abs(w).max(axis=0) for w in weights], axis=0)
    a = np.maximum(np.asarray(act_absmax, np.float64), MIN_FACTOR)
    w = np.maximum(np.asarray(w_absmax, np.float64), MIN_FACTOR)
    s = a ** alpha / w ** (1.0 - alpha)
    return np.clip(s, MIN_FACTOR, None).astype(np.float32)


def smooth(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(x / s, [W * s]): the smoothed pair, same product before rounding."""
    return x / s, [w * s[None, :] for w in weights]


ALPHA_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.30 .. 0.95


def search_alpha(samples: np.ndarray, act_absmax: np.ndarray, weights: list[np.ndarray],
                 grid: tuple[float, ...] = ALPHA_GRID, rows: int = 128, fmt: str = "int8") -> tuple[np.ndarray, float, dict]:
    """Per-group alpha: the migration strength whose W8A8 output (per-tensor static activations with
    the min/max range of x / s, per-channel weights; int8 or fp8 E4M3) is closest to the fp32 output on
    calibration rows. Down projections, whose inputs carry the largest outliers, usually want more
    migration than q/k/v. Returns (s, alpha, {alpha: mse})."""
    from leptonc.calibration.scales import compute_scales, fake_quant_fp8, fake_quant_int8, scale_from_amax

    fake = fake_quant_fp8 if fmt == "fp8" else fake_quant_int8

    x = np.asarray(samples, np.float32)[:rows]
    w = np.concatenate(weights, axis=0)
    ref = x @ w.T
    errors, best = {}, None
    for alpha in grid:
        s = smoothing_factors(act_absmax, weights, alpha)
        a_scale = scale_from_amax(float((act_absmax / s).max()), fmt)
        xq = fake(x / s, a_scale)
        ws = w * s[None, :]
        wq = fake(ws, compute_scales(ws, fmt, "per_channel", axis=0), axis=0)
        err = float(((xq @ wq.T - ref) ** 2).mean())
        errors[alpha] = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errors
