"""ai.leptonc.CachedAttention's contract in numpy (float64): what targets/kernels/attention.cuh computes, and the
one-node GroupQueryAttention graph it replaces.

tests/test_kernels.py holds the contract against ONNX Runtime's own GroupQueryAttention on the CPU, and
tests/test_kernels_gpu.py holds the CUDA kernels against both on the GPU."""

from __future__ import annotations

import numpy as np


def gqa_graph(h: int, kvh: int, d: int, cos: np.ndarray, sin: np.ndarray, dtype=np.float16, **attrs):
    """One GroupQueryAttention in the GPU form passes/fuse_gqa.py writes (packed Q/K/V, rotary folded in),
    with the runner's names for the cache: inputs qkv, past_key_values.0.{key,value}, gqa/seqlens_k,
    gqa/total_sequence_length; outputs attn, present.0.{key,value}. `attrs` adds or overrides attributes."""
    import onnx_graphsurgeon as gs

    b, s, cap = "batch", "seq", "capacity"
    qkv = gs.Variable("qkv", dtype=dtype, shape=[b, s, (h + 2 * kvh) * d])
    cache = [gs.Variable(f"{io}.0.{kind}", dtype=dtype, shape=[b, kvh, cap, d])
             for io in ("past_key_values", "present") for kind in ("key", "value")]
    seqlens = gs.Variable("gqa/seqlens_k", dtype=np.int32, shape=[b])
    total = gs.Variable("gqa/total_sequence_length", dtype=np.int32, shape=[])
    out = gs.Variable("attn", dtype=dtype, shape=[b, s, h * d])
    tables = [gs.Constant(f"rotary.{n}_cache0", np.asarray(t, dtype)) for n, t in (("cos", cos), ("sin", sin))]
    e = gs.Variable.empty
    node = gs.Node("GroupQueryAttention", "layer0/gqa", domain="com.microsoft",
                   attrs={"num_heads": h, "kv_num_heads": kvh, "scale": float(1 / np.sqrt(d)), "do_rotary": 1,
                          "rotary_interleaved": 0, **attrs},
                   inputs=[qkv, e(), e(), cache[0], cache[1], seqlens, total, *tables], outputs=[out, cache[2], cache[3]])
    return gs.Graph(nodes=[node], inputs=[qkv, cache[0], cache[1], seqlens, total], outputs=[out, cache[2], cache[3]],
                    opset=17)


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
