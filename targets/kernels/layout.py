"""The weight layout of `ai.leptonc.MatMulNBitsTiled`: MatMulNBits' codes rearranged so that each lane of
a warp loads, in one 16-byte read, exactly the B operands of its `mma.sync.m16n8k16` instructions.

A tile is 8 output columns (n) by one *step* of K: 128 values for 4 bits, 64 for 8 bits (16 bytes a
lane either way). The step holds CH = step / 16 products of k16 each. In the m16n8k16 fragments, lane
L = 4 g + t holds column g of B and the k *slots* 2t, 2t + 1 (register b0) and 2t + 8, 2t + 9 (b1); A's
registers hold the same slots of rows g and g + 8. Which actual k a slot stands for is ours to choose,
the same for A and B: product c's four slots of lane t are k = 32 (c // 2) + 8 t + 4 (c % 2) + 0..3 of
the step, so a lane's A values for products 2i and 2i + 1 are 8 consecutive fp16 (one 16-byte load).
The lane's 16 bytes of B are four 32-bit words:

  4 bits: word i holds products 2i (e) and 2i + 1 (o), as nibbles
          e0 | e2 << 4 | o0 << 8 | o2 << 12 | e1 << 16 | e3 << 20 | o1 << 24 | o3 << 28
          (v0..v3 = the slots 2t, 2t+1, 2t+8, 2t+9), so `(word >> 8c) & 0x000F000F` is b0 of product
          c and `(word >> (8c + 4)) & 0x000F000F` its b1, each half ready for the 0x6400 exponent trick;
  8 bits: word i holds product i as bytes v0, v1, v2, v3 (b0 = bytes 0-1, b1 = bytes 2-3).

Tiles are stored [n_tiles, steps, 32 lanes, 16 bytes], so a warp's read of one tile step is 512
contiguous bytes. Scales and zero points become one fp16 pair per (column, block): [n_tiles, blocks, 8, 2]
= (scale, 1024 + zero point). The kernel's B operands are the exact integers (1024 + q) - (1024 + z);
each block's partial sums are multiplied by the column's scale in fp32 after the products. N is padded
to whole tiles and K to whole steps with zero weights. Blocks must be multiples of 32 (a product pair
never straddles two).

8 bits without zero points (`scales_only`; the node's attribute symmetric = 1): every zero point is 128,
so SZ holds the scales alone, [n_tiles, blocks, 8], and the kernel takes 1152 as each pair's second half.
For llama-1b-shape's int8 LM head that is 8.2 MB less read a decode step.
"""

from __future__ import annotations

import numpy as np

from leptonc.calibration.scales import unpack_nibbles

LANES = 32
TILE_N = 8


def step_k(bits: int) -> int:
    return 128 if bits == 4 else 64


def codes_of(b: np.ndarray, n: int, bits: int) -> np.ndarray:
    """MatMulNBits' B ([N, blocks, block * bits / 8] uint8, low nibble first) -> codes [N, blocks * block]."""
    raw = np.asarray(b, np.uint8).reshape(n, -1)
    return raw if bits == 8 else unpack_nibbles(raw)


def zero_points_of(zp: np.ndarray | None, n: int, blocks: int, bits: int) -> np.ndarray:
    """MatMulNBits' zero points (packed two a byte for 4 bits; absent means 2^(bits-1)) -> [N, blocks]."""
    if zp is None:
        return np.full((n, blocks), 1 << (bits - 1), np.uint8)
    raw = np.asarray(zp, np.uint8).reshape(n, -1)
    return (raw if bits == 8 else unpack_nibbles(raw))[:, :blocks]


def tile_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, bits: int,
               block: int, *, scales_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' (B, scales, zero points) -> (B tiled uint8 [n_tiles, steps, 32, 16], SZ fp16
    [n_tiles, blocks_t, 8, 2]), blocks_t = the blocks that the padded K spans. With `scales_only` (8 bits,
    no zero points) SZ is [n_tiles, blocks_t, 8]: the pairs' first halves."""
    if bits not in (4, 8) or block % 32:
        raise ValueError(f"bits {bits}, block {block}: the tiled layout needs 4 or 8 bits and blocks of 32k")
    if scales_only and (bits != 8 or zero_points is not None):
        raise ValueError(f"scales_only needs 8 bits and no zero-point input (got bits {bits}, zero points "
                         f"{'none' if zero_points is None else 'given'}); leave it off to store (scale, zero) pairs")
    blocks = -(-k // block)
    sk = step_k(bits)
    steps = -(-k // sk)
    kp = steps * sk
    blocks_t = -(-kp // block)
    n_tiles = -(-n // TILE_N)
    np_ = n_tiles * TILE_N

    zps = zero_points_of(zero_points, n, blocks, bits)
    codes = np.zeros((np_, kp), np.uint8)
    src = codes_of(b, n, bits)[:, :min(kp, blocks * block)]
    codes[:n, :src.shape[1]] = src
    if src.shape[1] < kp:  # past MatMulNBits' last block: the zero point's code, i.e. weight 0
        codes[:n, src.shape[1]:] = zps[:, -1:]

    sz = np.zeros((np_, blocks_t, 2), np.float16)
    sz[:, :, 1] = 1024.0  # padding: scale 0, zero point 0
    sz[:n, :blocks, 0] = np.asarray(scales, np.float16).reshape(n, blocks)
    sz[:n, :blocks, 1] = 1024.0 + zps.astype(np.float32)
    sz = np.ascontiguousarray(sz.reshape(n_tiles, TILE_N, blocks_t, 2).transpose(0, 2, 1, 3))
    if scales_only:
        sz = np.ascontiguousarray(sz[..., 0])

    # k within a step = 32 pair + 8 t + 4 h + p, product c = 2 pair + h, slot p = 2t, 2t+1, 2t+8, 2t+9
    r = codes.reshape(n_tiles, TILE_N, steps, sk // 32, 4, 2, 4).astype(np.uint32)
    v = r.transpose(0, 1, 2, 3, 5, 4, 6).reshape(n_tiles, TILE_N, steps, sk // 16, 4, 4)
    # v: [tile, g, step, product, t, 4 values] -> per lane (g, t) and product
    if bits == 4:
        e, o = v[:, :, :, 0::2], v[:, :, :, 1::2]  # products 2i and 2i + 1: [tile, g, step, 4 words, t, 4]
        words = (e[..., 0] | e[..., 2] << 4 | o[..., 0] << 8 | o[..., 2] << 12
                 | e[..., 1] << 16 | e[..., 3] << 20 | o[..., 1] << 24 | o[..., 3] << 28)
    else:
        words = v[..., 0] | v[..., 1] << 8 | v[..., 2] << 16 | v[..., 3] << 24  # [tile, g, step, 4 words, t]
    # -> [tile, step, g, t, word] = [tile, step, lane, word]
    words = words.transpose(0, 2, 1, 4, 3).reshape(n_tiles, steps, LANES, 4).astype("<u4")
    return np.ascontiguousarray(words).view(np.uint8).reshape(n_tiles, steps, LANES, 16), sz


def interleave_gate_up(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, n: int,
                       gate_first: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits' (B, scales, zero points) of a merged gate|up product (gate = columns 0..F-1 and up =
    F..2F-1, or the reverse when not `gate_first`) -> the same with columns in (gate j, up j) pairs, for
    the kernel's SwiGLU epilogue (`activation` 1): a lane's C fragment then holds one feature's gate and
    up. Same shapes as given."""
    if n % 8:
        raise ValueError(f"N {n}: the SwiGLU epilogue needs gate|up columns in whole tiles (N a multiple of 8)")
    return (gate_up_pairs(b, n, gate_first), gate_up_pairs(scales, n, gate_first),
            gate_up_pairs(zero_points, n, gate_first) if zero_points is not None else None)


def gate_up_pairs(a: np.ndarray, n: int, gate_first: bool = True) -> np.ndarray:
    """The n output rows of `a` (its first axis, n = 2F: gate then up, or up then gate when not
    `gate_first`) reordered as (gate j, up j) pairs: gate_0, up_0, gate_1, up_1, ... Same shape as given."""
    f = n // 2
    gate, up = (np.arange(f), f + np.arange(f)) if gate_first else (f + np.arange(f), np.arange(f))
    order = np.stack([gate, up], axis=1).reshape(-1)
    a = np.asarray(a)
    return np.ascontiguousarray(a.reshape(n, -1)[order]).reshape(a.shape)
