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
