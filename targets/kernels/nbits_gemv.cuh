// The int4/int8 (MatMulNBits layout) few-rows kernel, `tiled_gemv` (batch-1 decode, with the rolling window
// and the folded norm), and how a launch is planned for a shape. It uses the operand helpers of
// nbits_kernels.cuh.
//
// Part of leptonc_cuda.cu's single translation unit: included once, in the order listed there, after the
// headers and definitions before it.

#pragma once

namespace {

// ---- few rows (batch-1 decode): every load of a warp's K chunk in flight at once ---------------------
//
// For M rows with A small enough to stage in shared memory (M x K fp16 <= kGemvSmemBytes), a tile's steps
// of K are split into chunks of S steps, one warp a chunk (wpt warps a tile, tb tiles a block). A warp
// issues all S of its 16-byte weight loads and its scale loads before anything else, so one HBM latency
// covers the whole chunk; the block meanwhile copies A into shared memory. mma rows past M read a real
// row of A and their results are dropped (rows of an mma product never mix). Each lane loads only its own
// column's SZ entry (Sz); the C fragment's columns 2t, 2t + 1 take their scales by shuffle.

struct RowNorm {  // the norm folded into a product (NormMatMulF16, NormMatMulNBitsTiled): skip, gamma, the sum's
                 // output and epsilon
  const half* skip = nullptr;
  const half* gamma = nullptr;
  half* sum = nullptr;
  float eps = 0.f;
};

// One row of RMSNorm(A + skip) x gamma into shared memory `out` ([kpad] halves, zeros past K; K and kpad multiples
// of 8), as com.microsoft.SkipSimplifiedLayerNormalization computes it: the sum rounded to fp16, its mean square in
// fp32. Where write_sum, the fp16 sum A + skip also goes to nm.sum. Any block size up to 1,024 threads. Ends
// synchronized.
__device__ __forceinline__ void stage_norm_row(half* out, const half* __restrict__ A, const RowNorm& nm, int K,
                                               int kpad, bool write_sum) {
  __shared__ float partial[32];
  const int kv = K / 8;
  uint4* o4 = reinterpret_cast<uint4*>(out);
  const uint4* a4 = reinterpret_cast<const uint4*>(A);
  const uint4* s4 = reinterpret_cast<const uint4*>(nm.skip);
  float ss = 0.f;
  for (int i = threadIdx.x; i < kv; i += blockDim.x) {
    uint4 x = __ldg(a4 + i);
    const uint4 y = __ldg(s4 + i);
    half2* xh = reinterpret_cast<half2*>(&x);
    const half2* yh = reinterpret_cast<const half2*>(&y);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      xh[j] = __hadd2(xh[j], yh[j]);
      const float2 f = __half22float2(xh[j]);
      ss = fmaf(f.x, f.x, fmaf(f.y, f.y, ss));
    }
    o4[i] = x;
    if (write_sum) reinterpret_cast<uint4*>(nm.sum)[i] = x;
  }
  for (int i = kv + threadIdx.x; i < kpad / 8; i += blockDim.x) o4[i] = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < int(blockDim.x + 31) / 32; ++w) total += partial[w];
  const float inv = rsqrtf(total / float(K) + nm.eps);
  const uint4* g4 = reinterpret_cast<const uint4*>(nm.gamma);
  for (int i = threadIdx.x; i < kv; i += blockDim.x) {  // the same i as above: this thread's own entries
    uint4 x = o4[i];
    const uint4 g = __ldg(g4 + i);
    half2* xh = reinterpret_cast<half2*>(&x);
    const half2* gh = reinterpret_cast<const half2*>(&g);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(xh[j]), gf = __half22float2(gh[j]);
      xh[j] = __floats2half2_rn(f.x * inv * gf.x, f.y * inv * gf.y);
    }
    o4[i] = x;
  }
  __syncthreads();
}

constexpr int kGemvSmemBytes = 32 << 10;

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// PD < S (the rolling window): a warp holds only PD steps' weights in registers; each step it uses refills its slot
// with the step PD ahead, so PD loads stay in flight while it computes. PD = S: every load first.
template <int BITS, int PB, int S, bool ACT, bool NORM, bool SYM, int PD = S>
__global__ void __launch_bounds__(512)
tiled_gemv(const half* __restrict__ A, int M, const uint4* __restrict__ B, const typename Sz<SYM>::T* __restrict__ SZ,
           half* __restrict__ Y, int K, int N, int steps, int block, int blocks_t, int wpt, int tb, RowNorm nm) {
  constexpr int kStepK = Step<BITS>::kK, kProducts = Step<BITS>::kProducts, kPairs = kProducts / 2;
  constexpr int G = kProducts / PB;  // scale groups a step
  constexpr int kD = PD < S ? PD : S;  // steps in registers at a time
  extern __shared__ uint4 gemv_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n_tiles = (N + 7) >> 3;
  const int tile = blockIdx.x * tb + warp / wpt, part = warp % wpt;
  const bool live = tile < n_tiles;
  const int step0 = part * S;
  const int n_steps = live ? min(S, steps - step0) : 0;

  pdl_trigger();
  uint4 w[kD];
  using E = typename Sz<SYM>::T;
  E sz[kD][G];
  const uint4* bt = B + size_t(live ? tile : 0) * steps * 32 + lane;
  const E* st = SZ + size_t(live ? tile : 0) * blocks_t * 8 + g;
  auto load_step = [&](int j, uint4& wj, E (&szj)[G]) {  // the warp's step j (zeros past its steps)
    wj = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int q = 0; q < G; ++q) szj[q] = Sz<SYM>::zero();
    if (j < n_steps) {
      const int step = step0 + j;
      wj = ld_stream(bt + size_t(step) * 32);
#pragma unroll
      for (int q = 0; q < G; ++q) szj[q] = __ldg(st + ((step * kStepK + 16 * PB * q) / block) * 8);
    }
  };
#pragma unroll
  for (int j = 0; j < kD; ++j) load_step(j, w[j], sz[j]);

  pdl_wait();  // A (and the norm's inputs) come from the kernels before
  // A [M, steps * kStepK] in shared memory (zeros past K), rows ks apart (+8 halves: rows in other banks). With
  // NORM (NormMatMulNBitsTiled, M = 1) the row is RMSNorm(A + skip) x gamma and block 0 writes the sum.
  const int kfull = steps * kStepK, ks = kfull + 8;
  half* as = reinterpret_cast<half*>(gemv_smem);
  if constexpr (NORM) {
    stage_norm_row(as, A, nm, K, kfull, blockIdx.x == 0);
  } else {
    for (int i = threadIdx.x; i < M * (kfull >> 3); i += blockDim.x) {
      const int row = i / (kfull >> 3), k = (i % (kfull >> 3)) * 8;
      *reinterpret_cast<uint4*>(as + row * ks + k) = load_a8(A + size_t(row) * K, k, k < K);
    }
    __syncthreads();
  }

  float acc0 = 0.f, acc1 = 0.f;  // row g, columns 2t and 2t + 1 (the C fragment's c0, c1)
  const half* arow = as + min(g, M - 1) * ks;
#pragma unroll
  for (int j = 0; j < S; ++j) {
    if (j < n_steps) {
      const int k_step = (step0 + j) * kStepK;
      const uint4 wj = w[j % kD];
      E szj[G];
#pragma unroll
      for (int q = 0; q < G; ++q) szj[q] = sz[j % kD][q];
      if (kD < S && j + kD < S) load_step(j + kD, w[j % kD], sz[j % kD]);  // the rolling window's refill
      uint4 a[kPairs];
#pragma unroll
      for (int i = 0; i < kPairs; ++i) a[i] = *reinterpret_cast<const uint4*>(arow + k_step + 32 * i + 8 * t);
#pragma unroll
      for (int q = 0; q < G; ++q) {
        const half2 zz = Sz<SYM>::zz_of(szj[q]);
        float part4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int c = q * PB; c < q * PB + PB; ++c) {
          const int i = c >> 1, h = (c & 1) * 2;
          uint32_t b0, b1;
          operands<BITS>(wj, c, zz, b0, b1);
          mma16816(part4, word_of(a[i], h), 0u, word_of(a[i], h + 1), 0u, b0, b1);
        }
        const float s0 = Sz<SYM>::scale_of(Sz<SYM>::shfl(szj[q], 8 * t));
        const float s1 = Sz<SYM>::scale_of(Sz<SYM>::shfl(szj[q], 8 * t + 4));
        acc0 = fmaf(s0, part4[0], acc0);
        acc1 = fmaf(s1, part4[1], acc1);
      }
    }
  }

  const int n = tile * 8 + 2 * t;
  if (wpt > 1) {  // add the chunks of K: the tile's first warp sums its wpt warps' partial sums
    float2* red = reinterpret_cast<float2*>(as + M * ks);
    red[warp * 32 + lane] = make_float2(acc0, acc1);
    __syncthreads();
    if (part != 0) return;
    for (int p = 1; p < wpt; ++p) {
      const float2 v = red[(warp + p) * 32 + lane];
      acc0 += v.x;
      acc1 += v.y;
    }
  }
  if (!live || g >= M) return;
  if constexpr (ACT) {
    const int f = tile * 4 + t;
    if (2 * f < N) Y[size_t(g) * (N / 2) + f] = __float2half(silu_mul(acc0, acc1));
    return;
  }
  half* yr = Y + size_t(g) * N;
  if (n + 1 < N) {
    *reinterpret_cast<half2*>(yr + n) = __floats2half2_rn(acc0, acc1);  // N even here: n is even
  } else if (n < N) {
    yr[n] = __float2half(acc0);
  }
}

struct GemvPlan {
  int s = 0, wpt = 0, tb = 0, blocks = 0, smem = 0;
  int pd = 0;  // steps in flight a warp (the rolling window; 0: all s at once)
};

// The few-rows plan for M rows (s = 0 when the kernel does not apply): 512 values of K a warp (S = 4
// steps at 4 bits, 8 at 8 bits) unless forced, up to 8 warps a block, fewer tiles a block while blocks
// would not cover the SMs twice. Measured at M = 1 (H100, 2026-11-23), against the streaming
// kernel: llama-1b qkv 4.70 -> 4.33 us, gate/up 14.98 -> 11.40, down 9.31 -> 7.62, the int8 LM head
// 120.7 -> 92.3 (3.0 TB/s); o (2 MiB) ties, and smaller products (smollm2's) are faster streamed
// (2.3-2.7 us against 3.0-3.4), so the plan takes weights of at least kGemvMinBytes.
constexpr size_t kGemvMinBytes = size_t(3) << 20;

// One-row 4-bit gate|up products with the SwiGLU epilogue run the rolling window (S = 8 steps a warp, PD = 4 in
// flight).
// On the H100 (2026-11-24): llama-1b-shape's 9.30 us in the microbench against 10.10 with every load
// first; the bundle 1,354.8 -> 1,368.2 tok/s at batch 1, the same greedy tokens. The window was slower on every
// product without the epilogue (qkv, down, the int8 head), so they keep the plan above.
struct GemvWindow {
  int s = 0, pd = 0, tb = 0;
};
inline GemvWindow gemv_window() { return GemvWindow{8, 4, 0}; }

inline GemvPlan gemv_plan(int m, int K, int N, int bits, int force_s = 0, int force_tb = 0, bool any_size = false,
                          int force_pd = 0) {
  GemvPlan p;
  const int step_k = bits == 4 ? 128 : 64;
  const int steps = (K + step_k - 1) / step_k, kfull = steps * step_k;
  const int a_bytes = m * (kfull + 8) * 2;
  if (m < 1 || m > 8 || a_bytes > kGemvSmemBytes || N % 2 != 0) return p;
  if (!any_size && size_t((N + 7) / 8) * steps * 512 < kGemvMinBytes) return p;
  p.s = force_s > 0 ? force_s : 512 / step_k;
  p.wpt = (steps + p.s - 1) / p.s;
  if (p.wpt > 16) p.s = 16, p.wpt = (steps + 15) / 16;
  if (p.wpt > 16) return GemvPlan();
  const int n_tiles = (N + 7) / 8;
  p.tb = force_tb > 0 ? force_tb : std::max(1, 8 / p.wpt);
  while (force_tb <= 0 && p.tb > 1 && (n_tiles + p.tb - 1) / p.tb < 2 * 132) p.tb /= 2;
  if (p.tb * p.wpt > 16) p.tb = std::max(1, 16 / p.wpt);
  p.blocks = (n_tiles + p.tb - 1) / p.tb;
  p.smem = a_bytes + p.tb * p.wpt * 32 * 8;
  // the rolling window: one instance, 4 steps in flight of 8 (16:4 and 16:8 measured slower everywhere)
  if (force_pd > 0 && force_pd < p.s) {
    if (p.s != 8 || force_pd != 4) return GemvPlan();
    p.pd = force_pd;
  }
  return p;
}

template <int BITS, int PB, bool ACT, bool NORM, bool SYM>
cudaError_t launch_gemv_act(const GemvPlan& p, const half* a, int m, const uint4* b, const typename Sz<SYM>::T* sz,
                            half* y, int K, int N, int steps, int block, int blocks_t, const RowNorm& nm,
                            cudaStream_t stream) {
  const dim3 grid(p.blocks), threads(p.tb * p.wpt * 32);
  // the rolling window: launch plans it for one-row 4-bit gate|up (the microbench and the check force it anywhere);
  // launch_norm plans it for the same product with the norm as its prologue
  if constexpr (!NORM || (BITS == 4 && ACT)) {
    if (p.pd > 0)
      return launch_dependent(tiled_gemv<BITS, PB, 8, ACT, NORM, SYM, 4>, grid, threads, p.smem, stream, a, m, b, sz,
                              y, K, N, steps, block, blocks_t, p.wpt, p.tb, nm);
  }
  switch (p.s) {
    case 4:
      return launch_dependent(tiled_gemv<BITS, PB, 4, ACT, NORM, SYM>, grid, threads, p.smem, stream, a, m, b, sz, y, K,
                              N, steps, block, blocks_t, p.wpt, p.tb, nm);
    case 16:
      return launch_dependent(tiled_gemv<BITS, PB, 16, ACT, NORM, SYM>, grid, threads, p.smem, stream, a, m, b, sz, y,
                              K, N, steps, block, blocks_t, p.wpt, p.tb, nm);
    default:
      return launch_dependent(tiled_gemv<BITS, PB, 8, ACT, NORM, SYM>, grid, threads, p.smem, stream, a, m, b, sz, y, K,
                              N, steps, block, blocks_t, p.wpt, p.tb, nm);
  }
}

template <int BITS, int PB, bool NORM, bool SYM>
cudaError_t launch_gemv_pb(const GemvPlan& p, bool act, const half* a, int m, const uint4* b,
                           const typename Sz<SYM>::T* sz, half* y, int K, int N, int steps, int block, int blocks_t,
                           const RowNorm& nm, cudaStream_t stream) {
  return act ? launch_gemv_act<BITS, PB, true, NORM, SYM>(p, a, m, b, sz, y, K, N, steps, block, blocks_t, nm, stream)
             : launch_gemv_act<BITS, PB, false, NORM, SYM>(p, a, m, b, sz, y, K, N, steps, block, blocks_t, nm, stream);
}

// The few-rows kernel; with NORM (m = 1 only) the norm nm is its prologue; SYM: SZ holds the scales alone (Sz).
template <int BITS, bool NORM, bool SYM>
cudaError_t launch_gemv(const GemvPlan& p, bool act, int pb, const half* a, int m, const uint4* bw,
                        const typename Sz<SYM>::T* szw, half* y, int K, int N, int steps, int block, int blocks_t,
                        cudaStream_t stream, const RowNorm& nm = RowNorm{}) {
  if (pb >= Step<BITS>::kProducts)
    return launch_gemv_pb<BITS, Step<BITS>::kProducts, NORM, SYM>(p, act, a, m, bw, szw, y, K, N, steps, block,
                                                                  blocks_t, nm, stream);
  if (pb == 4)
    return launch_gemv_pb<BITS, 4, NORM, SYM>(p, act, a, m, bw, szw, y, K, N, steps, block, blocks_t, nm, stream);
  return launch_gemv_pb<BITS, 2, NORM, SYM>(p, act, a, m, bw, szw, y, K, N, steps, block, blocks_t, nm, stream);
}

}  // namespace
