"""Scale computation shared by every backend's quantization passes (ONNX Runtime here; the TensorRT
pipeline places its own Q/DQ and reuses these): per-tensor and per-channel symmetric scales for INT8
and FP8 E4M3, block-wise INT4/INT8 for weight-only `MatMulNBits`, fake quantization, and SQNR.

Conventions: a scale maps the format's largest magnitude to `amax` (scale = amax / qmax); weights
are given in PyTorch's [out, in] layout unless a function says otherwise, so "per channel" means
one scale per output row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP8_E4M3_MAX = 448.0
QMAX = {"int8": 127.0, "uint8": 255.0, "fp8": FP8_E4M3_MAX, "int4": 7.0}
TINY = 1e-12  # floor for a scale: an all-zero channel must not divide by zero
CHUNK_ELEMENTS = 1 << 21  # a weight or layer output larger than this is processed in slices (a 262,144-row LM head)


def scale_from_amax(amax, fmt: str = "int8") -> np.ndarray:
    """Symmetric scale(s) for |x| <= amax in `fmt` (int8, fp8, int4)."""
    if fmt not in QMAX:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(QMAX)}")
    return np.maximum(np.asarray(amax, np.float32) / np.float32(QMAX[fmt]), np.float32(TINY)).astype(np.float32)


def compute_scales(tensor: np.ndarray, fmt: str = "int8", granularity: str = "per_channel", axis: int = 0,
                   amax: float | None = None) -> np.ndarray:
    """The public entry point for Q/DQ placement: symmetric scales for `tensor` in `fmt`.

    granularity "per_tensor": one scale (from `amax` if given, e.g. an activation observer's
    result, else from the tensor itself); "per_channel": one scale per index of `axis`
    (the reduction runs over every other axis)."""
    if granularity == "per_tensor":
        return scale_from_amax(np.abs(tensor).max() if amax is None else amax, fmt)
    if granularity != "per_channel":
        raise ValueError("granularity is per_tensor or per_channel")
    axis = axis % tensor.ndim
    other = tuple(a for a in range(tensor.ndim) if a != axis)
    return scale_from_amax(np.abs(tensor).max(axis=other), fmt)


def quantize_int8(x: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Round-to-nearest-even symmetric int8 codes (ONNX QuantizeLinear semantics, zero point 0)."""
    s = _bcast(scale, x.ndim, axis)
    return np.clip(np.rint(x / s), -128, 127).astype(np.int8)


def fake_quant_int8(x: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    return quantize_int8(x, scale, axis).astype(np.float32) * _bcast(scale, x.ndim, axis)


def to_fp8(x: np.ndarray) -> np.ndarray:
    """float32 -> float8 E4M3FN codes (saturating, round to nearest even), as ml_dtypes arrays."""
    import ml_dtypes

    return np.asarray(np.clip(x, -FP8_E4M3_MAX, FP8_E4M3_MAX)).astype(ml_dtypes.float8_e4m3fn)


def fake_quant_fp8(x: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    s = _bcast(scale, x.ndim, axis)
    return to_fp8(x / s).astype(np.float32) * s


def _bcast(scale, ndim: int, axis: int | None) -> np.ndarray:
    scale = np.asarray(scale, np.float32)
    if axis is None or scale.ndim == 0:
        return scale
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return scale.reshape(shape)


@dataclass
class BlockQuantized:
    """Block-wise weight quantization along the input dimension of an [N, K] ([out, in]) weight.

    codes: uint8 [N, K_padded] unsigned codes in [0, 2**bits); scales float32 [N, blocks];
    zero_points uint8 [N, blocks]. Dequantized: (codes - zero_point) * scale."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    k: int  # the unpadded input size

    def dequantize(self) -> np.ndarray:
        n, kp = self.codes.shape
        w = self.codes.reshape(n, -1, self.block_size).astype(np.float32)
        w -= self.zero_points[..., None].astype(np.float32)  # in place: one [N, K] float32 array, not three
        w *= self.scales[..., None]
        return w.reshape(n, kp)[:, : self.k]

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: uint8 [N, blocks, block_size * bits / 8], low nibble first for 4 bits."""
        n, kp = self.codes.shape
        c = self.codes.reshape(n, kp // self.block_size, self.block_size)
        if self.bits == 8:
            return np.ascontiguousarray(c)
        return np.ascontiguousarray((c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8))

    def packed_zero_points(self) -> np.ndarray:
        """MatMulNBits' zero_points: uint8 [N, ceil(blocks * bits / 8)] (two 4-bit points a byte)."""
        if self.bits == 8:
            return np.ascontiguousarray(self.zero_points)
        z = self.zero_points
        if z.shape[1] % 2:
            z = np.concatenate([z, np.full((z.shape[0], 1), 8, np.uint8)], axis=1)
        return np.ascontiguousarray((z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8))


@dataclass
class Fp8Rows:
    """An [N, K] ([out, in]) weight as float8 E4M3FN codes with one float32 scale per output row (a GPTQ
    rounding kept between calibration and the Q/DQ pass). Dequantized: codes * scales[:, None]."""

    codes: np.ndarray  # ml_dtypes float8_e4m3fn [N, K]
    scales: np.ndarray  # float32 [N]

    @classmethod
    def from_values(cls, values: np.ndarray, scales: np.ndarray) -> "Fp8Rows":
        """Values that already lie on the grid (each an E4M3 value times its row's scale) -> their codes."""
        scales = np.asarray(scales, np.float32)
        return cls(to_fp8(np.asarray(values, np.float64) / scales[:, None].astype(np.float64)), scales)

    def dequantize(self) -> np.ndarray:
        return self.codes.astype(np.float32) * self.scales[:, None]


def unpack_nibbles(raw: np.ndarray) -> np.ndarray:
    """[N, B] bytes of two 4-bit values, low nibble first (MatMulNBits' B and zero points) -> [N, 2B]."""
    raw = np.asarray(raw, np.uint8)
    out = np.empty((raw.shape[0], raw.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = raw & 0x0F, raw >> 4
    return out


def block_quantize(w: np.ndarray, bits: int = 4, block_size: int = 128, symmetric: bool = False,
                   scale_multiplier: float = 1.0, clip_rows: np.ndarray | None = None,
                   clip_ratios: tuple[float, ...] = (), refine: int = 0) -> BlockQuantized:
    """Round-to-nearest block quantization of an [N, K] weight along K (padded with zeros to a
    whole block). Asymmetric (min/max with a zero point) unless `symmetric`.

    With `clip_ratios` (asymmetric only), each block's range is also tried shrunk by each ratio and
    the one with the least error is kept: with `clip_rows` ([R, K] calibration inputs), AWQ's clip
    loss, the mean squared error of the block's partial output x_b . w_b over those rows
    (d^T C_b d with C_b = X_b^T X_b / R, cross terms included), else the plain squared weight error.

    With `refine` > 0 (and `clip_rows` with `clip_ratios`), each block's scale is then refit up to that
    many rounds: with the codes fixed, the scale that minimises the same loss is (q^T C_b w) / (q^T C_b q),
    q = code - zero point; the codes are re-rounded with it, and a block keeps the new scale only where
    its loss fell.
    (Moving the integer zero point one step as well gained nothing on smollm2-135m.)"""
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError("block_size must be a power of two >= 16")
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if n > 1 and n * k > CHUNK_ELEMENTS:  # rows are independent: a large weight (a 262,144-row head) in row slices,
        # so that the temporaries below are a slice's, not several copies of the whole weight
        step = max(1, CHUNK_ELEMENTS // k)
        parts = [block_quantize(w[i:i + step], bits, block_size, symmetric, scale_multiplier, clip_rows,
                                clip_ratios, refine) for i in range(0, n, step)]
        return BlockQuantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                              np.concatenate([p.zero_points for p in parts]), bits, block_size, k)
    pad = (-k) % block_size
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), np.float32)], axis=1)
    blocks = w.reshape(n, -1, block_size)
    levels = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        amax = np.abs(blocks).max(-1)
        scales = np.maximum(amax / (mid - 1 if bits == 8 else mid), TINY).astype(np.float32)
        zp = np.full(scales.shape, mid, np.int32)
    else:
        lo0 = np.minimum(blocks.min(-1), 0.0)
        hi0 = np.maximum(blocks.max(-1), 0.0)
        cov = None  # [blocks, block, block]: each block's input second moment on the calibration rows
        if clip_rows is not None and clip_ratios:
            x = np.asarray(clip_rows, np.float32)
            if pad:
                x = np.concatenate([x, np.zeros((x.shape[0], pad), np.float32)], axis=1)
            xb = np.ascontiguousarray(x.reshape(x.shape[0], -1, block_size).transpose(1, 0, 2))
            cov = np.matmul(xb.transpose(0, 2, 1), xb) / np.float32(x.shape[0])
        best_err = None
        for ratio in (1.0, *clip_ratios):
            lo, hi = lo0 * ratio, hi0 * ratio
            sc = np.maximum((hi - lo) / levels, TINY).astype(np.float32)
            z = np.clip(np.rint(-lo / sc), 0, levels).astype(np.int32)
            if not clip_ratios:
                scales, zp = sc, z
                break
            err = _block_loss(blocks, sc, z, levels, cov)
            if best_err is None:
                best_err, scales, zp = err, sc, z
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                scales, zp = np.where(better, sc, scales), np.where(better, z, zp)
        if refine and cov is not None:
            wt = np.ascontiguousarray(blocks.transpose(1, 0, 2), np.float32)  # [blocks, N, block]
            for _ in range(refine):
                q = np.clip(np.rint(blocks / scales[..., None]) + zp[..., None], 0, levels) - zp[..., None]
                qt = np.ascontiguousarray(q.transpose(1, 0, 2), np.float32)
                qc = np.matmul(qt, cov)
                num, den = (qc * wt).sum(-1).T, (qc * qt).sum(-1).T
                fit = np.maximum(np.where(den > 0, num / np.maximum(den, TINY), scales), TINY).astype(np.float32)
                err = _block_loss(blocks, fit, zp, levels, cov)
                better = err < best_err
                if not better.any():
                    break
                best_err = np.where(better, err, best_err)
                scales = np.where(better, fit, scales).astype(np.float32)
    scales = (scales * np.float32(scale_multiplier)).astype(np.float32)
    codes = np.clip(np.rint(blocks / scales[..., None]) + zp[..., None], 0, levels).astype(np.uint8)
    return BlockQuantized(codes.reshape(n, -1), scales, zp.astype(np.uint8), bits, block_size, k)


def _block_loss(blocks: np.ndarray, sc: np.ndarray, z: np.ndarray, levels: int, cov) -> np.ndarray:
    """[N, blocks] rounding loss of `blocks` ([N, blocks, block]) on the grid (sc, z): the squared
    weight error, or with `cov` ([blocks, block, block]) the error of the blocks' partial outputs."""
    d = blocks - (np.clip(np.rint(blocks / sc[..., None]) + z[..., None], 0, levels) - z[..., None]) * sc[..., None]
    if cov is None:
        return (d * d).sum(-1)
    dt = np.ascontiguousarray(d.transpose(1, 0, 2), np.float32)  # [blocks, N, block]
    return (np.matmul(dt, cov) * dt).sum(-1).T


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; torchao asserts > 20 dB). Summed in float64
    over slices of CHUNK_ELEMENTS along the first axis, so a large tensor is never copied whole."""
    ref, app = np.broadcast_arrays(np.asarray(reference), np.asarray(approx))
    rows = ref.shape[0] if ref.ndim else 1
    ref, app = ref.reshape(rows, -1), app.reshape(rows, -1)
    step = max(1, CHUNK_ELEMENTS // max(1, ref.shape[1]))
    return _sliced_db((ref[i:i + step], app[i:i + step]) for i in range(0, rows, step))


def output_sqnr_db(x: np.ndarray, w_ref: np.ndarray, w_q: np.ndarray, x_q: np.ndarray | None = None) -> float:
    """SQNR of a linear layer's output on rows `x` ([R, K]): x @ w_ref^T against x_q @ w_q^T (x_q defaults to x),
    weights [N, K]. Computed over slices of the output channels, so that R x N (a 262,144-token head on 2,048
    calibration rows would be 2 GB in float32) is never held at once."""
    xq = x if x_q is None else x_q
    step = max(1, CHUNK_ELEMENTS // max(1, x.shape[0]))
    return _sliced_db((x @ w_ref[j:j + step].T, xq @ w_q[j:j + step].T) for j in range(0, w_ref.shape[0], step))


def _sliced_db(pairs) -> float:
    """SQNR over (reference, approximation) slices, summed in float64."""
    signal = noise = 0.0
    for reference, approx in pairs:
        r = np.asarray(reference, np.float64)
        d = np.asarray(approx, np.float64) - r
        noise += float(np.einsum("ij,ij->", d, d))
        signal += float(np.einsum("ij,ij->", r, r))
    return _db(signal, noise)


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-300) / noise)
