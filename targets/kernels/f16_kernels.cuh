// The fp16-weight product kernels: one row of A (f16_gemv, with the norm as its prologue and the SwiGLU epilogue),
// and the norm over more rows ahead of cuBLAS (skip_rms_norm_rows).
//
// Part of leptonc_cuda.cu's single translation unit: included once, in the order listed there, after the
// headers and definitions before it.

#pragma once

namespace {

// fp16 weights, one row of A (the MatMulF16 op at M = 1): Y[n] = sum_k A[k] W[n, k], W [N, K] row-major (rows
// are outputs), K a multiple of 8. A is staged in shared memory; each warp owns R rows and its lanes read
// them in 16-byte loads (R loads a step, unrolled 4 steps, so 4R are in flight), fp32 sums reduced by
// shuffle. The first kPre = 8 / R steps' weights are loaded before A is staged, so HBM's latency overlaps the
// staging. With S > 1, S warps split each group of R rows along K and add their partial sums in shared memory
// (more warps and loads in flight where N is small or K long: f16_plan, chosen from a sweep
// that timed every choice on the H100). With ACT, rows come in (gate j, up j) pairs and Y[j] = SiLU(gate) x up.
// With NORM (NormMatMulF16) the
// row staged is RMSNorm(A + skip) x gamma, as com.microsoft.SkipSimplifiedLayerNormalization computes it (the
// sum rounded to fp16, its mean square in fp32); block 0 also writes the fp16 sum A + skip to S.
constexpr int kF16Warps = 8;
constexpr int kF16GemvMaxK = 16384;  // A's 32 KiB of shared memory

// Stages one row of A (kv 16-byte vectors) in shared memory, RMS-normalized with NORM (stage_norm_row), writing
// the sum A + skip to nm.sum where write_sum. Ends synchronized.
template <bool NORM>
__device__ __forceinline__ void stage_row(uint4* a_s, const half* __restrict__ A, const RowNorm& nm, int kv,
                                          bool write_sum) {
  if (NORM) {
    stage_norm_row(reinterpret_cast<half*>(a_s), A, nm, kv * 8, kv * 8, write_sum);
    return;
  }
  const uint4* a4 = reinterpret_cast<const uint4*>(A);
  for (int i = threadIdx.x; i < kv; i += blockDim.x) a_s[i] = __ldg(a4 + i);
  __syncthreads();
}

template <int R>
__device__ __forceinline__ void dot_step(float (&acc)[R], const uint4& av, const uint4 (&wv)[R]) {
  const half2* ah = reinterpret_cast<const half2*>(&av);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const half2* wh = reinterpret_cast<const half2*>(&wv[r]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 x = __half22float2(ah[j]), y = __half22float2(wh[j]);
      acc[r] = fmaf(x.x, y.x, fmaf(x.y, y.y, acc[r]));
    }
  }
}

template <int R, bool ACT, bool NORM, int S = 1>
__global__ void __launch_bounds__(kF16Warps * 32)
f16_gemv(const half* __restrict__ A, const half* __restrict__ W, half* __restrict__ Y, int K, int N, RowNorm nm) {
  static_assert(kF16Warps % S == 0, "whole groups of S warps a block");
  extern __shared__ uint4 a_s[];
  constexpr int kPre = 8 / R;  // steps whose weights are loaded before A is staged
  const int kv = K / 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int part = warp % S;  // S > 1: warp `part` of its group takes the vectors part * 32 + lane, stepping 32 S
  const int first = part * 32 + lane, stride = 32 * S;
  const uint4* w = reinterpret_cast<const uint4*>(W);
  const int n0 = (blockIdx.x * (kF16Warps / S) + warp / S) * R;
  pdl_trigger();
  uint4 pre[kPre][R];
#pragma unroll
  for (int p = 0; p < kPre; ++p)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = first + stride * p;
      pre[p][r] = n0 + r < N && i < kv ? __ldg(w + size_t(n0 + r) * kv + i) : make_uint4(0, 0, 0, 0);
    }
  pdl_wait();  // A (and the norm's inputs) come from the kernels before
  stage_row<NORM>(a_s, A, nm, kv, blockIdx.x == 0);
  if (S == 1 && n0 >= N) return;  // with S > 1 every warp reaches the partial sums' barriers
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
#pragma unroll
  for (int p = 0; p < kPre; ++p)
    if (first + stride * p < kv) dot_step<R>(acc, a_s[first + stride * p], pre[p]);
  const int i0 = first + stride * kPre;
#pragma unroll 4
  for (int i = i0; i < kv; i += stride) {
    uint4 wv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wv[r] = n0 + r < N ? __ldg(w + size_t(n0 + r) * kv + i) : make_uint4(0, 0, 0, 0);
    dot_step<R>(acc, a_s[i], wv);
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  if constexpr (S > 1) {  // the group's S partial sums, added by its first warp
    __shared__ float partial[kF16Warps][R];
    if (lane == 0)
#pragma unroll
      for (int r = 0; r < R; ++r) partial[warp][r] = acc[r];
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 1; j < S; ++j) acc[r] += part == 0 ? partial[warp + j][r] : 0.f;
  }
  if (part == 0 && lane == 0 && n0 < N) {
    if (ACT) {
#pragma unroll
      for (int r = 0; r + 1 < R; r += 2)
        if (n0 + r + 1 < N) Y[(n0 + r) / 2] = __float2half(silu_mul(acc[r], acc[r + 1]));
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (n0 + r < N) Y[n0 + r] = __float2half(acc[r]);
    }
  }
}

// NormMatMulF16 for more rows (before cuBLAS): Xn[r] = RMSNorm(A[r] + skip[r]) x gamma and S[r] = A[r] + skip[r],
// one block of kF16Warps warps a row, K a multiple of 8 and at most kF16GemvMaxK.
__global__ void __launch_bounds__(kF16Warps * 32)
skip_rms_norm_rows(const half* __restrict__ A, RowNorm nm, half* __restrict__ Xn, int K) {
  extern __shared__ uint4 a_s[];
  pdl_trigger();
  pdl_wait();  // A and the skip come from the kernels before (common.cuh)
  const size_t off = size_t(blockIdx.x) * K;
  const int kv = K / 8;
  RowNorm row = nm;
  row.skip += off;
  row.sum += off;
  stage_row<true>(a_s, A + off, row, kv, true);
  uint4* out = reinterpret_cast<uint4*>(Xn + off);
  for (int i = threadIdx.x; i < kv; i += blockDim.x) out[i] = a_s[i];
}

}  // namespace
