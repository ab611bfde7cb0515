"""ai.leptonc.CachedAttention's contract in numpy (float64): what targets/kernels/attention.cuh computes.

tests/test_kernels.py holds it against ONNX Runtime's own GroupQueryAttention on the CPU (the op it replaces), and
bench/device_attention_check.py holds the CUDA kernels against both on the GPU."""

from __future__ import annotations

import numpy as np


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half rotary over the last axis: x [..., D], cos/sin broadcastable to [..., D / 2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def cached_attention(qkv, past_key, past_value, seqlens_k, total_sequence_length: int, cos, sin, *, num_heads: int,
                     kv_num_heads: int, scale: float = 0.0):
    """(output [B, S, H D], present_key, present_value) for a packed qkv [B, S, (H + 2 KVH) D] and caches
    [B, KVH, C, D]. A row's new tokens sit at positions past + i: past = 0 for a first prompt (total length == S),
    else seqlens_k + 1 - S; query i sees keys 0 .. past + i. Present has max(C, total) positions."""
    b_n, s_n, _ = qkv.shape
    h_n, kv_n = num_heads, kv_num_heads
    d = past_key.shape[3]
    cap = max(past_key.shape[2], int(total_sequence_length))
    group = h_n // kv_n
    scale = scale or 1.0 / np.sqrt(d)
    f = np.float64
    x = np.asarray(qkv, f)
    q = x[..., :h_n * d].reshape(b_n, s_n, h_n, d)
    k_new = x[..., h_n * d:(h_n + kv_n) * d].reshape(b_n, s_n, kv_n, d)
    v_new = x[..., (h_n + kv_n) * d:].reshape(b_n, s_n, kv_n, d)
    keys = np.zeros((b_n, kv_n, cap, d), f)
    values = np.zeros((b_n, kv_n, cap, d), f)
    keys[:, :, :past_key.shape[2]] = past_key
    values[:, :, :past_value.shape[2]] = past_value
    cos, sin = np.asarray(cos, f), np.asarray(sin, f)
    first = int(total_sequence_length) == s_n
    out = np.zeros((b_n, s_n, h_n * d), f)
    for b in range(b_n):
        past = 0 if first else int(np.clip(int(seqlens_k[b]) + 1 - s_n, 0, cap - s_n))
        pos = past + np.arange(s_n)
        rope = np.minimum(pos, cos.shape[0] - 1)
        c, s = cos[rope][:, None, :], sin[rope][:, None, :]  # [S, 1, D / 2]
        keys[b][:, pos] = _rotate(k_new[b], c, s).transpose(1, 0, 2)
        values[b][:, pos] = v_new[b].transpose(1, 0, 2)
        qr = _rotate(q[b], c, s)  # [S, H, D]
        n = pos[-1] + 1
        visible = np.arange(n)[None, :] <= pos[:, None]  # [S, n]
        for h in range(h_n):
            j = h // group
            scores = qr[:, h] @ keys[b, j, :n].T * scale
            scores = np.where(visible, scores, -np.inf)
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out[b, :, h * d:(h + 1) * d] = p @ values[b, j, :n]
    return out, keys, values
