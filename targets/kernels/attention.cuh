// CachedAttention's kernels: grouped-query attention over a preallocated K/V cache, with the rotary embedding
// and the cache append folded in. No ONNX Runtime types here: leptonc_cuda.cu wraps them as the custom op, and
// tests/test_kernels_gpu.py runs them on the GPU against a float64 reference.
//
// The contract is ONNX Runtime's com.microsoft.GroupQueryAttention as passes/fuse_attention.py builds it for GPU
// targets (do_rotary 1, packed Q/K/V, rotate-half rotary over the whole head, past and present one buffer):
//   qkv      fp16 [B, S, (H + 2 KVH) D]: per token the H query heads, then KVH key heads, then KVH value heads
//   k, v     fp16 [B, KVH, C, D]: the cache, written in place at the new tokens' positions
//   seqlens  int32 [B]: per row, the index of its last valid token (total length - 1)
//   cos, sin fp16 [P, D / 2]: the rotary tables by position
//   out      fp16 [B, S, H D]
// A row's new tokens sit at positions past + i, i < S, where past = 0 for a first prompt (the caller's total
// length equals S; right-padded rows then hold garbage past their length, which nothing reads) and otherwise
// seqlens + 1 - S. Query i sees keys 0 .. past + i (causal).
//
//   S = 1 (decode): decode_attention, one block per (split of the keys, KV head, row) serving the KV head's G
//     query heads; the split holding the new token first rotates its key and appends K and V. Lanes own keys for
//     the scores and head columns for P x V; with more than one split, the last split of a (row, KV head) to
//     finish (an atomic count) merges the partial
//     (max, sum, output) triples. The launch shape depends only on B, KVH and C, so a captured decode step
//     replays with the lengths it reads from seqlens at run time.
//   S > 1 (prefill): rope_append writes the new keys and values, then prefill_attention runs 64 query rows a
//     block (16 a warp) over 64-key tiles with mma.sync.m16n8k16 (fp16 in, fp32 accumulation) and an online
//     softmax in base 2 (the scale x log2(e) folded into Q), the probabilities going from the score
//     accumulators straight into the A operands of P x V.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"

namespace leptonc_attn {

constexpr int kMaxGroup = 8;         // query heads per KV head in the decode kernel
constexpr int kDecodeThreads = 128;  // 4 warps
constexpr int kMaxSplits = 16;       // decode splits of the keys at most
constexpr int kPrefillRows = 64;     // query rows a prefill block (16 a warp)
constexpr int kKeyTile = 64;         // keys a prefill tile

struct Params {
  const half* qkv;
  half* k_cache;
  half* v_cache;
  const int32_t* seqlens;
  const half* cos;
  const half* sin;
  half* out;
  float* partial_o;    // decode with splits > 1: [B, H, splits, D] unnormalized outputs
  float2* partial_ml;  // [B, H, splits]: (running max, sum of exponentials), base 2
  unsigned* counters;  // [B, KVH]: splits finished, zero between calls (the last split resets its own)
  int B, S, H, KVH, D, C, P;
  int first_prompt;    // 1: the new tokens start at position 0
  int splits;          // decode splits of the keys (1: no combine step)
  float scale_log2;    // softmax scale x log2(e)
};

__device__ __forceinline__ int past_length(const Params& p, int b) {
  if (p.first_prompt) return 0;
  const int past = p.seqlens[b] + 1 - p.S;
  return min(max(past, 0), p.C - p.S);  // the host checks S <= C
}

__device__ __forceinline__ uint32_t pack_floats(float lo, float hi) {
  half2 v = __floats2half2_rn(lo, hi);  // .x (the low 16 bits) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_halves(half lo, half hi) {
  half2 v = __halves2half2(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// One rotate-half pair of a head: (x1, x2) at columns i and i + D/2 -> (x1 cos - x2 sin, x2 cos + x1 sin).
__device__ __forceinline__ void rotate(float& x1, float& x2, float c, float s) {
  const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
  x1 = y1;
  x2 = y2;
}

// ---- S > 1: the new keys (rotated) and values into the cache, one block a token --------------------------------
__global__ void rope_append(Params p) {
  const int token = blockIdx.x, b = token / p.S, s = token % p.S;
  const int pos = past_length(p, b) + s;
  if (pos >= p.C) return;
  const int half_d = p.D / 2, rope = min(pos, p.P - 1);
  const half* row = p.qkv + size_t(token) * (p.H + 2 * p.KVH) * p.D;
  for (int idx = threadIdx.x; idx < p.KVH * half_d; idx += blockDim.x) {
    const int j = idx / half_d, i = idx % half_d;
    const half* k = row + size_t(p.H + j) * p.D;
    const half* v = row + size_t(p.H + p.KVH + j) * p.D;
    float x1 = __half2float(k[i]), x2 = __half2float(k[i + half_d]);
    rotate(x1, x2, __half2float(p.cos[size_t(rope) * half_d + i]), __half2float(p.sin[size_t(rope) * half_d + i]));
    const size_t dst = ((size_t(b) * p.KVH + j) * p.C + pos) * p.D;
    p.k_cache[dst + i] = __float2half(x1);
    p.k_cache[dst + i + half_d] = __float2half(x2);
    p.v_cache[dst + i] = v[i];
    p.v_cache[dst + i + half_d] = v[i + half_d];
  }
}

// ---- S > 1: causal attention over the cache, tensor cores --------------------------------------------------------
// With mma16816's fragments (common.cuh), two adjacent 8-key score tiles are one 16-key A operand of P x V.
template <int D>
__global__ void __launch_bounds__(128) prefill_attention(Params p) {
  static_assert(D % 32 == 0, "head size a multiple of 32");
  constexpr int kStride = D + 8;  // halves a shared row: consecutive rows start 4 banks apart
  constexpr int kSteps = D / 16;  // k steps of Q K^T
  __shared__ __align__(16) half k_s[kKeyTile * kStride];
  __shared__ __align__(16) half v_s[kKeyTile * kStride];
  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kPrefillRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int j = h / (p.H / p.KVH);
  const int past = past_length(p, b);
  const size_t width = size_t(p.H + 2 * p.KVH) * D;
  const int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;  // this lane's two query rows

  // Q as A operands: rotated (a column and its rotate-half partner are in the same lane, k steps apart),
  // scaled by scale x log2(e), rounded to fp16.
  uint32_t qa[kSteps][4];
  {
    float qf[2][kSteps][4];  // [row g / g + 8][k step][cols 2t, 2t + 1, 2t + 8, 2t + 9]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = min(r ? r_hi : r_lo, p.S - 1);  // rows past S compute garbage that is never stored
      const half* q = p.qkv + (size_t(b) * p.S + row) * width + size_t(h) * D;
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk) {
        const half2 lo = *reinterpret_cast<const half2*>(q + 16 * kk + 2 * t);
        const half2 hi = *reinterpret_cast<const half2*>(q + 16 * kk + 8 + 2 * t);
        qf[r][kk][0] = __low2float(lo);
        qf[r][kk][1] = __high2float(lo);
        qf[r][kk][2] = __low2float(hi);
        qf[r][kk][3] = __high2float(hi);
      }
      const int rope = min(past + row, p.P - 1);
      const half* cs = p.cos + size_t(rope) * (D / 2);
      const half* sn = p.sin + size_t(rope) * (D / 2);
#pragma unroll
      for (int kk = 0; kk < kSteps / 2; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 16 * kk + 2 * t + (e & 1) + (e >> 1) * 8;  // < D / 2; its partner is k step kk + kSteps / 2
          rotate(qf[r][kk][e], qf[r][kk + kSteps / 2][e], __half2float(cs[col]), __half2float(sn[col]));
        }
    }
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      qa[kk][0] = pack_floats(qf[0][kk][0] * p.scale_log2, qf[0][kk][1] * p.scale_log2);
      qa[kk][1] = pack_floats(qf[1][kk][0] * p.scale_log2, qf[1][kk][1] * p.scale_log2);
      qa[kk][2] = pack_floats(qf[0][kk][2] * p.scale_log2, qf[0][kk][3] * p.scale_log2);
      qa[kk][3] = pack_floats(qf[1][kk][2] * p.scale_log2, qf[1][kk][3] * p.scale_log2);
    }
  }

  const int n_keys = past + min(q0 + kPrefillRows, p.S);            // keys the block's rows can see
  const int warp_last = past + min(q0 + warp * 16 + 15, p.S - 1);  // the warp's last visible key
  const int pos_lo = past + r_lo, pos_hi = past + r_hi;
  const half* kc = p.k_cache + (size_t(b) * p.KVH + j) * p.C * D;
  const half* vc = p.v_cache + (size_t(b) * p.KVH + j) * p.C * D;
  float o[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

  for (int k0 = 0; k0 < n_keys; k0 += kKeyTile) {
    __syncthreads();  // the previous tile is no longer read
    for (int i = threadIdx.x; i < kKeyTile * (D / 8); i += blockDim.x) {
      const int r = i / (D / 8), c = (i % (D / 8)) * 8;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;
      if (k0 + r < n_keys) {
        kv = *reinterpret_cast<const uint4*>(kc + size_t(k0 + r) * D + c);
        vv = *reinterpret_cast<const uint4*>(vc + size_t(k0 + r) * D + c);
      }
      *reinterpret_cast<uint4*>(k_s + r * kStride + c) = kv;
      *reinterpret_cast<uint4*>(v_s + r * kStride + c) = vv;
    }
    __syncthreads();
    if (k0 > warp_last) continue;  // every key of the tile is in the future of the warp's rows

    float s[kKeyTile / 8][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      const half* kr = k_s + (nt * 8 + g) * kStride + 2 * t;
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr + 16 * kk);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + 16 * kk + 8);
        mma16816(s[nt], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b0, b1);
      }
    }
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = k0 + nt * 8 + 2 * t + e;
        if (key > pos_lo) s[nt][e] = -INFINITY;
        if (key > pos_hi) s[nt][2 + e] = -INFINITY;
        mx_lo = fmaxf(mx_lo, s[nt][e]);
        mx_hi = fmaxf(mx_hi, s[nt][2 + e]);
      }
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {  // the four lanes of a row
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
    // a row that has seen only masked keys keeps -inf; 0 as its reference makes every exponential 0, not NaN
    const float ref_lo = new_lo == -INFINITY ? 0.f : new_lo, ref_hi = new_hi == -INFINITY ? 0.f : new_hi;
    const float a_lo = exp2f(m_lo - ref_lo), a_hi = exp2f(m_hi - ref_hi);
    m_lo = new_lo;
    m_hi = new_hi;
    l_lo *= a_lo;
    l_hi *= a_hi;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      o[nd][0] *= a_lo;
      o[nd][1] *= a_lo;
      o[nd][2] *= a_hi;
      o[nd][3] *= a_hi;
    }
    uint32_t pa[kKeyTile / 16][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt) {
      const float p0 = exp2f(s[nt][0] - ref_lo), p1 = exp2f(s[nt][1] - ref_lo);
      const float p2 = exp2f(s[nt][2] - ref_hi), p3 = exp2f(s[nt][3] - ref_hi);
      l_lo += p0 + p1;
      l_hi += p2 + p3;
      // tile nt is keys 8 nt .. 8 nt + 7: the low (even nt) or high (odd nt) half of A's 16 keys
      pa[nt / 2][(nt & 1) * 2 + 0] = pack_floats(p0, p1);
      pa[nt / 2][(nt & 1) * 2 + 1] = pack_floats(p2, p3);
    }
#pragma unroll
    for (int jk = 0; jk < kKeyTile / 16; ++jk) {
      const half* vr = v_s + (jk * 16 + 2 * t) * kStride + g;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        const half* v0 = vr + nd * 8;
        const uint32_t b0 = pack_halves(v0[0], v0[kStride]);
        const uint32_t b1 = pack_halves(v0[8 * kStride], v0[9 * kStride]);
        mma16816(o[nd], pa[jk][0], pa[jk][1], pa[jk][2], pa[jk][3], b0, b1);
      }
    }
  }

#pragma unroll
  for (int off = 1; off < 4; off *= 2) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
  }
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f, inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
  const size_t out_width = size_t(p.H) * D;
  half* out_lo = p.out + (size_t(b) * p.S + r_lo) * out_width + size_t(h) * D + 2 * t;
  half* out_hi = p.out + (size_t(b) * p.S + r_hi) * out_width + size_t(h) * D + 2 * t;
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) {
    if (r_lo < p.S) *reinterpret_cast<half2*>(out_lo + nd * 8) = __floats2half2_rn(o[nd][0] * inv_lo, o[nd][1] * inv_lo);
    if (r_hi < p.S) *reinterpret_cast<half2*>(out_hi + nd * 8) = __floats2half2_rn(o[nd][2] * inv_hi, o[nd][3] * inv_hi);
  }
}

// ---- S = 1: decode ----------------------------------------------------------------------------------------------
//
// A decode block's cached key and value rows (all but the new token's), asked of L2 ahead (the note above launch_decode).
__device__ __forceinline__ void prefetch_rows(const Params& p, const half* kc, const half* vc, int k_begin, int k_end,
                                              int pos) {
  const int last = min(k_end, pos), lines = p.D / 64;  // 128-byte lines a row
  const int n = last > k_begin ? (last - k_begin) * 2 * lines : 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int row = i / lines, line = i % lines;
    const half* base = (row & 1) ? vc : kc;
    asm volatile("prefetch.global.L2 [%0];" ::"l"(base + size_t(k_begin + row / 2) * p.D + line * 64));
  }
}

// PRE (head size 64): a warp's first 16 value rows of each
// 32-key chunk are loaded with its key rows, before the scores, so a short split (the batch-1 case: about 12 keys a
// split at 200 keys) waits for memory once instead of once for the keys and once per 8 values.
template <int D, int G, bool PRE = false>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention(Params p) {
  static_assert(D % 64 == 0 && G >= 1 && G <= kMaxGroup, "head size 64 or 128, at most 8 heads a group");
  static_assert(!PRE || D == 64, "the value prefetch is instantiated for head size 64");
  constexpr int kWarps = kDecodeThreads / 32, kPer = D / 32, kHalf = D / 2;  // kPer: output columns a lane owns
  constexpr int kPre = PRE ? 16 : 0;  // value rows a chunk loads with its keys
  __shared__ float q_s[G][D];
  __shared__ float red_m[kWarps][G], red_l[kWarps][G];
  __shared__ float red_o[kWarps][G][D];
  const int split = blockIdx.x, j = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  pdl_trigger();
  half* kc = p.k_cache + (size_t(b) * p.KVH + j) * p.C * D;
  half* vc = p.v_cache + (size_t(b) * p.KVH + j) * p.C * D;
  // the split's cached rows into L2 before the dependency wait: seqlens_k is complete before any of our kernels
  // starts (the note above launch_decode)
  const int pos = past_length(p, b);  // the new token's position
  const int n_keys = pos + 1;
  const int k_begin = int(int64_t(split) * n_keys / p.splits), k_end = int(int64_t(split + 1) * n_keys / p.splits);
  prefetch_rows(p, kc, vc, k_begin, k_end, pos);
  pdl_wait();  // every input but the tables comes from the kernels before (common.cuh)
  const half* row = p.qkv + size_t(b) * (p.H + 2 * p.KVH) * D;
  const int rope = min(pos, p.P - 1);
  const half* cs = p.cos + size_t(rope) * kHalf;
  const half* sn = p.sin + size_t(rope) * kHalf;
  for (int idx = threadIdx.x; idx < G * kHalf; idx += blockDim.x) {
    const int hh = idx / kHalf, i = idx % kHalf;
    const half* q = row + size_t(j * G + hh) * D;
    float x1 = __half2float(q[i]), x2 = __half2float(q[i + kHalf]);
    rotate(x1, x2, __half2float(cs[i]), __half2float(sn[i]));
    q_s[hh][i] = x1 * p.scale_log2;
    q_s[hh][i + kHalf] = x2 * p.scale_log2;
  }
  if (split == p.splits - 1) {  // the last split's range ends with the new token: append it first
    const half* k = row + size_t(p.H + j) * D;
    const half* v = row + size_t(p.H + p.KVH + j) * D;
    for (int i = threadIdx.x; i < kHalf; i += blockDim.x) {
      float x1 = __half2float(k[i]), x2 = __half2float(k[i + kHalf]);
      rotate(x1, x2, __half2float(cs[i]), __half2float(sn[i]));
      kc[size_t(pos) * D + i] = __float2half(x1);
      kc[size_t(pos) * D + i + kHalf] = __float2half(x2);
      vc[size_t(pos) * D + i] = v[i];
      vc[size_t(pos) * D + i + kHalf] = v[i + kHalf];
    }
  }
  __syncthreads();  // the queries are staged and the block's own appended key and value are visible to it

  float m[G], l[G], o[G][kPer];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int e = 0; e < kPer; ++e) o[h][e] = 0.f;
  }
  for (int base = k_begin + warp * 32; base < k_end; base += kWarps * 32) {
    const int key = base + lane;
    const int n = min(32, k_end - base);
    half2 vpre[kPre > 0 ? kPre : 1];  // rows base + u, this lane's two columns (D = 64); zeros past the chunk
    if constexpr (kPre > 0) {
#pragma unroll
      for (int u = 0; u < kPre; ++u)
        vpre[u] = u < n ? *reinterpret_cast<const half2*>(vc + size_t(base + u) * D + lane * kPer)
                        : __floats2half2_rn(0.f, 0.f);
    }
    float sc[G];
    if (key < k_end) {  // scores: each lane one key, the whole head
#pragma unroll
      for (int h = 0; h < G; ++h) sc[h] = 0.f;
      const uint4* kr = reinterpret_cast<const uint4*>(kc + size_t(key) * D);
#pragma unroll
      for (int c = 0; c < D / 8; ++c) {
        const uint4 kv = kr[c];
        const half2* k2 = reinterpret_cast<const half2*>(&kv);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 kf = __half22float2(k2[e]);
#pragma unroll
          for (int h = 0; h < G; ++h) sc[h] = fmaf(q_s[h][c * 8 + 2 * e], kf.x, fmaf(q_s[h][c * 8 + 2 * e + 1], kf.y, sc[h]));
        }
      }
    } else {
#pragma unroll
      for (int h = 0; h < G; ++h) sc[h] = -INFINITY;
    }
    float pr[G];
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float mx = sc[h];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float mn = fmaxf(m[h], mx);  // finite: lane 0's key is valid
      const float alpha = exp2f(m[h] - mn);
      m[h] = mn;
      l[h] *= alpha;
#pragma unroll
      for (int e = 0; e < kPer; ++e) o[h][e] *= alpha;
      pr[h] = exp2f(sc[h] - mn);
      l[h] += pr[h];
    }
    // P x V: the chunk's keys eight at a time, lanes own columns; the eight V rows are loaded before any is used,
    // so their latencies overlap (a key past the chunk has probability 0 and a zero row). With PRE the first kPre
    // rows are already in registers.
    if constexpr (kPre > 0) {
#pragma unroll
      for (int u = 0; u < kPre; ++u) {
        const float2 x = __half22float2(vpre[u]);
#pragma unroll
        for (int h = 0; h < G; ++h) {
          const float ph = __shfl_sync(0xffffffffu, pr[h], u);
          o[h][0] = fmaf(ph, x.x, o[h][0]);
          o[h][1] = fmaf(ph, x.y, o[h][1]);
        }
      }
    }
    for (int j0 = kPre; j0 < n; j0 += 8) {
      float vf[8][kPer];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (j0 + u < n) {
          const half* vr = vc + size_t(base + j0 + u) * D + lane * kPer;
          if constexpr (kPer == 2) {
            const float2 x = __half22float2(*reinterpret_cast<const half2*>(vr));
            vf[u][0] = x.x;
            vf[u][1] = x.y;
          } else {
            const uint2 raw = *reinterpret_cast<const uint2*>(vr);
            const float2 x = __half22float2(*reinterpret_cast<const half2*>(&raw.x));
            const float2 y = __half22float2(*reinterpret_cast<const half2*>(&raw.y));
            vf[u][0] = x.x;
            vf[u][1] = x.y;
            vf[u][2] = y.x;
            vf[u][3] = y.y;
          }
        } else {
#pragma unroll
          for (int e = 0; e < kPer; ++e) vf[u][e] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
#pragma unroll
        for (int h = 0; h < G; ++h) {
          const float ph = __shfl_sync(0xffffffffu, pr[h], j0 + u);
#pragma unroll
          for (int e = 0; e < kPer; ++e) o[h][e] = fmaf(ph, vf[u][e], o[h][e]);
        }
      }
    }
  }

  // the block's four warps, then (with splits) the partial triple for the merge
#pragma unroll
  for (int h = 0; h < G; ++h) {
    float sum = l[h];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
      red_m[warp][h] = m[h];
      red_l[warp][h] = sum;
    }
#pragma unroll
    for (int e = 0; e < kPer; ++e) red_o[warp][h][lane * kPer + e] = o[h][e];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int hh = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, red_m[w][hh]);
    float sum = 0.f, acc = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(red_m[w][hh] - mx);
        sum += red_l[w][hh] * f;
        acc += red_o[w][hh][d] * f;
      }
    }
    const int h = j * G + hh;
    if (p.splits == 1) {
      p.out[(size_t(b) * p.H + h) * D + d] = __float2half(sum > 0.f ? acc / sum : 0.f);
    } else {
      const size_t slot = (size_t(b) * p.H + h) * p.splits + split;
      p.partial_o[slot * D + d] = acc;
      if (d == 0) p.partial_ml[slot] = make_float2(mx, sum);
    }
  }
  if (p.splits == 1) return;

  // The last of the (row, KV head)'s splits to finish merges the partial triples, weighted by their maxima (no
  // second kernel). Its counter goes back to 0 for the next call, so a captured step replays.
  __shared__ int is_last;
  __threadfence();  // this block's partials are visible before its count
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* counter = p.counters + size_t(b) * p.KVH + j;
    is_last = atomicAdd(counter, 1u) == unsigned(p.splits - 1);
    if (is_last) *counter = 0u;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int hh = idx / D, d = idx % D;
    const size_t slot0 = (size_t(b) * p.H + j * G + hh) * p.splits;
    float2 ml[kMaxSplits];
    float po[kMaxSplits];
    float mx = -INFINITY;
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) {  // all loads first (L2: other blocks wrote them)
      if (sp < p.splits) {
        ml[sp] = __ldcg(p.partial_ml + slot0 + sp);
        po[sp] = __ldcg(p.partial_o + (slot0 + sp) * D + d);
        mx = fmaxf(mx, ml[sp].x);
      }
    }
    float sum = 0.f, acc = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int sp = 0; sp < kMaxSplits; ++sp) {
        if (sp < p.splits) {
          const float f = exp2f(ml[sp].x - mx);
          sum += ml[sp].y * f;
          acc += po[sp] * f;
        }
      }
    }
    p.out[(size_t(b) * p.H + j * G + hh) * D + d] = __float2half(sum > 0.f ? acc / sum : 0.f);
  }
}

// Splits of the keys for decode: enough blocks to cover the GPU twice at short lengths, at most kMaxSplits, and no
// more than 32-key pieces of the cache's capacity. A function of the shapes only (a captured step keeps it).
inline int decode_splits(int B, int KVH, int C, int sms) {
  const int blocks = B * KVH;
  int splits = (2 * sms + blocks - 1) / blocks;
  splits = splits < 1 ? 1 : splits;
  splits = splits > kMaxSplits ? kMaxSplits : splits;
  const int by_capacity = (C + 31) / 32;
  return splits > by_capacity ? (by_capacity < 1 ? 1 : by_capacity) : splits;
}

// Decode prefetches, both measured on the H100 with the same greedy tokens (BENCHMARKS.md):
// - decode_attention's PRE instances (head size 64): llama-1b-shape fp16 868.1 -> 880.3 tok/s at batch 1, int4
//   1,368 -> 1,400;
// - each decode block asks L2 for its split's cached key and value rows (all but the new token's, which it appends
//   itself) before its dependency wait, reading seqlens_k early: fp16 880.3 -> 891.9, int4 1,404.6 -> 1,425.2 (after
//   the wait instead: 1,414.8). This relies on seqlens_k being complete before any kernel of ours in the step
//   starts: the graph computes it at the step's start (MaskLengths or ONNX Runtime's own kernels), which launch
//   without PDL and so finish before the next kernel begins (tests/test_kernels.py checks that no other ai.leptonc
//   op feeds it); the rows are earlier steps' or the prefill's.
template <int D, int G>
void launch_decode(const Params& p, cudaStream_t stream) {
  launch_dependent(decode_attention<D, G, D == 64>, dim3(p.splits, p.KVH, p.B), dim3(kDecodeThreads), 0, stream, p);
}

template <int D>
bool launch_decode_group(const Params& p, int G, cudaStream_t stream) {
  switch (G) {
    case 1: launch_decode<D, 1>(p, stream); return true;
    case 2: launch_decode<D, 2>(p, stream); return true;
    case 3: launch_decode<D, 3>(p, stream); return true;
    case 4: launch_decode<D, 4>(p, stream); return true;
    case 5: launch_decode<D, 5>(p, stream); return true;
    case 6: launch_decode<D, 6>(p, stream); return true;
    case 7: launch_decode<D, 7>(p, stream); return true;
    case 8: launch_decode<D, 8>(p, stream); return true;
    default: return false;
  }
}

// Every kernel of one call, on `stream`. False when the shapes are outside what the kernels serve (D 64 or 128,
// H a multiple of KVH with at most 8 query heads a KV head); the caller checks them first.
inline bool launch(const Params& p, cudaStream_t stream) {
  const int G = p.KVH > 0 && p.H % p.KVH == 0 ? p.H / p.KVH : 0;
  if ((p.D != 64 && p.D != 128) || G < 1 || G > kMaxGroup) return false;
  if (p.S == 1) return p.D == 64 ? launch_decode_group<64>(p, G, stream) : launch_decode_group<128>(p, G, stream);
  const int threads = p.KVH * p.D / 2 < 256 ? p.KVH * p.D / 2 : 256;
  rope_append<<<p.B * p.S, threads, 0, stream>>>(p);
  const dim3 grid((p.S + kPrefillRows - 1) / kPrefillRows, p.H, p.B);
  if (p.D == 64) prefill_attention<64><<<grid, 128, 0, stream>>>(p);
  else prefill_attention<128><<<grid, 128, 0, stream>>>(p);
  return true;
}

}  // namespace leptonc_attn
