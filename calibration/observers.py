"""Activation observers: each sees calibration tensors one batch at a time and returns the range
(`amax`, the absolute value that maps to the format's largest code) a per-tensor scale is cut from.

- `minmax`: the largest |x| seen. Exact, but one outlier stretches the grid for every other value.
- `percentile`: the p-th percentile of |x| over everything seen (default 99.99), from a histogram.
- `entropy`: TensorRT's calibrator: the clipping threshold whose clipped-and-quantized histogram
  diverges least (KL) from the observed one.

Histogram observers keep a fixed number of bins over [0, running max]; when the max grows, the
old counts are re-binned into the wider range (as PyTorch's HistogramObserver does).
"""

from __future__ import annotations

import numpy as np

METHODS = ("minmax", "percentile", "entropy")


class MinMaxObserver:
    method = "minmax"

    def __init__(self) -> None:
        self._amax = 0.0

    def observe(self, x: np.ndarray) -> None:
        if x.size:
            self._amax = max(self._amax, float(np.abs(x).max()))

    def amax(self) -> float:
        return self._amax


class HistogramObserver:
    """|x| histogram over [0, max seen], re-binned when the range grows."""

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.hist = np.zeros(bins, np.float64)
        self.max = 0.0

    def observe(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, np.float32)).ravel()
        if not a.size:
            return
        top = float(a.max())
        if top > self.max:
            if self.max > 0 and self.hist.any():  # spread old counts into the wider bins
                centers = (np.arange(self.bins) + 0.5) * (self.max / self.bins)
                self.hist = np.histogram(centers, bins=self.bins, range=(0, top), weights=self.hist)[0]
            self.max = top
        if self.max == 0:
            self.hist[0] += a.size
            return
        self.hist += np.histogram(a, bins=self.bins, range=(0, self.max))[0]

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0, self.max, self.bins + 1)


class PercentileObserver(HistogramObserver):
    method = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 0 < percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        self.percentile = percentile

    def amax(self) -> float:
        total = self.hist.sum()
        if total == 0 or self.max == 0:
            return 0.0
        cdf = np.cumsum(self.hist) / total
        idx = int(np.searchsorted(cdf, self.percentile / 100.0))
        return float(self.edges[min(idx + 1, self.bins)])


class EntropyObserver(HistogramObserver):
    """KL-divergence calibration (TensorRT's IInt8EntropyCalibrator2 algorithm)."""

    method = "entropy"

    def __init__(self, bins: int = 2048, levels: int = 128) -> None:
        super().__init__(bins)
        self.levels = levels  # quantized magnitudes (int8: 128)

    def amax(self) -> float:
        if self.max == 0 or self.hist.sum() == 0:
            return 0.0
        hist, levels = self.hist, self.levels
        best_kl, best_i = np.inf, self.bins
        for i in range(levels, self.bins + 1, max(1, self.bins // 256)):
            p = hist[:i].copy()
            p[i - 1] += hist[i:].sum()  # clip the tail into the last kept bin
            # Merge the first i bins into `levels` bins, then spread each back over its non-empty bins.
            starts = np.linspace(0, i, levels + 1).astype(np.int64)[:-1]
            lengths = np.diff(np.append(starts, i))
            nonzero = hist[:i] > 0
            sums = np.add.reduceat(hist[:i], starts)
            counts = np.add.reduceat(nonzero.astype(np.float64), starts)
            q = np.repeat(np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0), lengths) * nonzero
            kl = _kl(p, q)
            if kl < best_kl:
                best_kl, best_i = kl, i
        return float(self.edges[best_i])


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL(p || q), with q's empty bins given a little mass (as ONNX Runtime's and TensorRT's
    calibrators smooth it): the clipped tail lands in p's last bin, where q may be empty."""
    p = p / p.sum()
    qs = q.sum()
    if qs == 0:
        return np.inf
    q = q / qs
    zeros = q == 0
    if zeros.all():
        return np.inf
    if zeros.any():
        q = np.where(zeros, eps, q)
        q = q / q.sum()
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / q[mask])).sum())


def make_observer(method: str):
    if method == "minmax":
        return MinMaxObserver()
    if method == "percentile":
        return PercentileObserver()
    if method == "entropy":
        return EntropyObserver()
    raise ValueError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
