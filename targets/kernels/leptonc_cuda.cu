// leptonc's CUDA kernels for ONNX Runtime, registered as custom ops in the domain "ai.leptonc".
//
// MatMulNBitsTiled: Y[M, N] = A[M, K] x dequantize(B)^T for fp16 A on the CUDA provider, weights of 4 or
// 8 bits quantized in blocks along K (ONNX Runtime's com.microsoft.MatMulNBits, whose codes, scales and
// zero points passes/use_kernels.py rearranges ahead of time; targets/kernels/layout.py documents the
// layout). Inputs: A fp16 [..., K]; B uint8 [n_tiles, steps, 32, 16]; SZ fp16 [n_tiles, blocks, 8, 2] =
// (scale, 1024 + zero point). Attributes: K, N, bits, block_size, and optionally activation = 1: the
// SwiGLU epilogue, for merged gate|up weights whose columns come in (gate j, up j) pairs; Y is then
// SiLU(gate) x up, [..., N / 2]; symmetric = 1 (8 bits, every zero point 128): SZ is fp16 [n_tiles, blocks, 8],
// the scales alone (the Sz<true> instances).
//
//   M = 1 (batch-1 decode), weights of 3 MiB and more: tiled_gemv, below; each warp issues every load of
//     its chunk of K at once.
//   Other M <= 16 (decode, batch <= 16): each warp streams 8 output columns x one step of K (128 values at 4
//     bits, 64 at 8) per 16-byte load a lane; the load is exactly the lane's B operands of the step's
//     mma.sync.m16n8k16 products, made in registers as exact fp16 integers q - z (the 0x6400 exponent
//     trick, then one subtraction of 1024 + zero point) and multiplied on the tensor cores with fp32
//     accumulation; each block's partial sums are then scaled in fp32. The products' k order is
//     permuted (the same for A and B) so a lane's A values for two products are one 16-byte load. Rows
//     of A past M are zero registers, so 1 and 16 rows cost the same weight traffic. The block's warps
//     split K; partial sums are added in shared memory.
//   M > 16 (prefill): tiles are dequantized into a scratch buffer in chunks and multiplied by cuBLAS
//     (fp16 in and out, fp32 accumulation); with the SwiGLU epilogue cuBLAS writes the gate|up product
//     into a second scratch and one kernel takes SiLU(gate) x up from it.
//
// MatMulF16: Y = A x W^T for fp16 weights stored [N, K] (rows are outputs); attributes K, N, activation (1: the
// SwiGLU epilogue over (gate j, up j) row pairs). One row of A: f16_gemv; more rows: cuBLAS.
//
// SwiGLU: Y[..., F] = SiLU(gate) x up of X[..., 2F] whose halves are gate and up (attribute gate_first: 1 if
// the gate is the first half). It replaces Split, QuickGelu and Mul behind fp16 products that are not
// MatMulNBitsTiled or MatMulF16; eight values a thread, F a multiple of 8.
//
// CachedAttention: com.microsoft.GroupQueryAttention as passes/fuse_attention.py builds it for GPU targets (packed
// Q/K/V, rotary folded in, past and present one buffer), on leptonc's kernels (attention.cuh documents them).
// Inputs: qkv fp16 [B, S, (H + 2 KVH) D]; past_key, past_value fp16 [B, KVH, C, D]; seqlens_k int32 [B];
// total_sequence_length int32 scalar (host memory); cos_cache, sin_cache fp16 [P, D / 2]. Attributes num_heads,
// kv_num_heads, scale (0: 1 / sqrt(D)). Outputs: output fp16 [B, S, H D], present_key, present_value: the past
// buffers themselves when bound to the same memory (the runner's shared K/V block), else copies of them with the
// new entries.
//
// Everything runs on ONNX Runtime's compute stream (KernelContext_GetGPUComputeStream) with no host
// synchronization and no allocation after the first call, so a decode step that uses it can be
// captured in a CUDA graph. Built by targets/kernels/__init__.py with nvcc against the ONNX Runtime C
// API header (ORT_API_VERSION of the header, which must not be newer than the runtime's).

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <onnxruntime_c_api.h>

#include "attention.cuh"

#include <algorithm>
#include <cmath>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>

namespace {

const OrtApi* g_api = nullptr;

constexpr int kMaxWarps = 16;     // warps per block at most; they split K
constexpr int kSmallM = 16;       // rows of A served by the streaming kernel (the mma tile's M)

// Sizes of the process's shared buffers (Shared below), read once where a bundle runs:
//   LEPTONC_KERNEL_BUFFER_MB: each of the scratch, product and normed-row buffers (default 16 MiB: issue 8 line 6,
//     device memory); the M > 16 paths work through them in row chunks, so a smaller buffer means more, smaller
//     cuBLAS calls, not wrong results. On the H100 (BENCHMARKS.md, session 17), llama-1b-shape fp16's time to first
//     token at 1,024 tokens was 6.03 ms with 32 MiB, 6.07 with 16 and 7.22 with 8;
//   LEPTONC_CUBLAS_WORKSPACE_MB: the cuBLAS workspace (default 32 MiB, cuBLAS's recommendation for Hopper).
size_t env_mib(const char* name, size_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v < '0' || *v > '9') return fallback;  // digits only (runtime/ort_cuda.py's _buffer_mib)
  char* end = nullptr;
  const long mib = std::strtol(v, &end, 10);
  return (end != nullptr && *end == '\0' && mib >= 1 && mib <= 4096) ? size_t(mib) : fallback;
}
size_t scratch_halves() {  // halves in each shared buffer
  static const size_t halves = env_mib("LEPTONC_KERNEL_BUFFER_MB", 16) << 19;
  return halves;
}
size_t cublas_workspace_bytes() {
  static const size_t bytes = env_mib("LEPTONC_CUBLAS_WORKSPACE_MB", 32) << 20;
  return bytes;
}
constexpr uint32_t kExp1024 = 0x64006400u;           // two fp16 1024.0: OR-ing a code below 1024 gives 1024 + code

template <int BITS>
struct Step {
  static constexpr int kK = BITS == 4 ? 128 : 64;  // K values a lane's 16 bytes cover
  static constexpr int kProducts = kK / 16;        // m16n8k16 products per step
};

__device__ __forceinline__ uint32_t as_u32(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 as_h2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

__device__ __forceinline__ uint4 load_a8(const half* row, int k, bool ok) {
  // 8 consecutive fp16 of A (K % 8 == 0, so 16-byte aligned); zero past M or K
  return ok ? __ldg(reinterpret_cast<const uint4*>(row + k)) : make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The B operands (b0, b1) of product c of a step: the exact integers q - z in fp16, from the lane's words.
template <int BITS>
__device__ __forceinline__ void operands(const uint4& w, int c, half2 zz, uint32_t& b0, uint32_t& b1) {
  uint32_t q0, q1;
  if (BITS == 4) {
    const uint32_t word = word_of(w, c >> 1);
    const int shift = (c & 1) * 8;
    q0 = ((word >> shift) & 0x000F000Fu) | kExp1024;
    q1 = ((word >> (shift + 4)) & 0x000F000Fu) | kExp1024;
  } else {
    const uint32_t word = word_of(w, c);
    q0 = __byte_perm(word, 0x64646464u, 0x4140);
    q1 = __byte_perm(word, 0x64646464u, 0x4342);
  }
  b0 = as_u32(__hsub2(as_h2(q0), zz));
  b1 = as_u32(__hsub2(as_h2(q1), zz));
}

// SZ's entry for one (column, block): the (scale, 1024 + zero point) pair, or with SYM (8 bits, attribute symmetric
// = 1) the scale alone and the constant 1152 = 1024 + 128 for the zero half: the same fp16 operands either way.
template <bool SYM>
struct Sz {
  using T = half2;
  static __device__ __forceinline__ T zero() { return __floats2half2_rn(0.f, 0.f); }
  static __device__ __forceinline__ half2 zz_of(T e) { return __high2half2(e); }
  static __device__ __forceinline__ half2 zz_at(const T* p) { return __high2half2(__ldg(p)); }
  static __device__ __forceinline__ float scale_of(T e) { return __low2float(e); }
  static __device__ __forceinline__ float scale_at(const T* p) { return __low2float(__ldg(p)); }
  static __device__ __forceinline__ T shfl(T e, int lane) { return as_h2(__shfl_sync(0xffffffffu, as_u32(e), lane)); }
};
template <>
struct Sz<true> {
  using T = half;
  static __device__ __forceinline__ T zero() { return __float2half(0.f); }
  static __device__ __forceinline__ half2 zz_of(T) { return as_h2(0x64806480u); }
  static __device__ __forceinline__ half2 zz_at(const T*) { return as_h2(0x64806480u); }  // no load
  static __device__ __forceinline__ float scale_of(T e) { return __half2float(e); }
  static __device__ __forceinline__ float scale_at(const T* p) { return __half2float(__ldg(p)); }
  static __device__ __forceinline__ T shfl(T e, int lane) { return __shfl_sync(0xffffffffu, e, lane); }
};

// SwiGLU epilogue (attribute activation = 1): the weights' columns come in (gate j, up j) pairs, so a
// lane's C fragment columns 2t, 2t + 1 are one feature's gate and up; the output has N / 2 columns.
__device__ __forceinline__ float silu_mul(float gate, float up) { return gate / (1.f + __expf(-gate)) * up; }

// NT tiles of 8 columns a block; the block's warps take the steps of K in turn. PB products share a
// scale (PB = block / 16, at most the step's): their partial sums are scaled and added in fp32.
template <int BITS, int NT, int PB, int WARPS, bool ACT, bool SYM>
__global__ void __launch_bounds__(WARPS * 32)
tiled_stream(const half* __restrict__ A, int M, const uint4* __restrict__ B, const typename Sz<SYM>::T* __restrict__ SZ,
             half* __restrict__ Y, int K, int N, int steps, int block, int blocks_t) {
  constexpr int kStepK = Step<BITS>::kK, kProducts = Step<BITS>::kProducts, kPairs = kProducts / 2;
  static_assert(PB % 2 == 0 && kProducts % PB == 0, "a scale group is whole product pairs of one step");
  __shared__ float red[WARPS][NT][32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n_tiles = (N + 7) >> 3;
  const int tile0 = blockIdx.x * NT;
  const half* a_lo = A + size_t(g) * K;      // row g of the mma tile
  const half* a_hi = A + size_t(g + 8) * K;  // row g + 8
  const bool lo = g < M, hi = g + 8 < M;
  pdl_trigger();
  const typename Sz<SYM>::T* sz_tile[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) sz_tile[j] = SZ + size_t(min(tile0 + j, n_tiles - 1)) * blocks_t * 8;

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  uint4 cur[NT], nxt[NT];
  auto load_w = [&](uint4 (&w)[NT], int step) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
      w[j] = (tile0 + j < n_tiles) ? __ldg(B + (size_t(tile0 + j) * steps + step) * 32 + lane) : make_uint4(0, 0, 0, 0);
  };
  load_w(cur, warp);  // warps <= steps
  pdl_wait();  // A comes from the kernels before; the weights above do not (common.cuh)
  for (int step = warp; step < steps; step += warps) {
    if (step + warps < steps) load_w(nxt, step + warps);  // the next step's weights are in flight meanwhile
    const int k_step = step * kStepK;
    uint4 alo[kPairs], ahi[kPairs];  // products 2i, 2i + 1 of rows g and g + 8: k_step + 32 i + 8 t .. + 7
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      const int k = k_step + 32 * i + 8 * t;
      alo[i] = load_a8(a_lo, k, lo && k < K);
      ahi[i] = load_a8(a_hi, k, hi && k < K);
    }
#pragma unroll
    for (int c0 = 0; c0 < kProducts; c0 += PB) {
      const int blk = (k_step + 16 * c0) / block;
      float part[NT][4];
      half2 zz[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.f;
        zz[j] = Sz<SYM>::zz_at(sz_tile[j] + blk * 8 + g);
      }
#pragma unroll
      for (int c = c0; c < c0 + PB; ++c) {
        const int i = c >> 1, h = (c & 1) * 2;
        const uint32_t a0 = word_of(alo[i], h), a2 = word_of(alo[i], h + 1);
        const uint32_t a1 = word_of(ahi[i], h), a3 = word_of(ahi[i], h + 1);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          uint32_t b0, b1;
          operands<BITS>(cur[j], c, zz[j], b0, b1);
          mma16816(part[j], a0, a1, a2, a3, b0, b1);
        }
      }
      // C fragment: c0, c1 = row g, columns 2t, 2t + 1; c2, c3 = row g + 8
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const float s0 = Sz<SYM>::scale_at(sz_tile[j] + blk * 8 + 2 * t);
        const float s1 = Sz<SYM>::scale_at(sz_tile[j] + blk * 8 + 2 * t + 1);
        acc[j][0] = fmaf(s0, part[j][0], acc[j][0]);
        acc[j][1] = fmaf(s1, part[j][1], acc[j][1]);
        acc[j][2] = fmaf(s0, part[j][2], acc[j][2]);
        acc[j][3] = fmaf(s1, part[j][3], acc[j][3]);
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) cur[j] = nxt[j];
  }

  // add the warps' partial sums
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][j][lane][e] = acc[j][e];
  __syncthreads();
  if constexpr (ACT) {  // (gate, up) = C elements (0, 1) of row g and (2, 3) of row g + 8
    for (int i = threadIdx.x; i < NT * 64; i += blockDim.x) {
      const int j = i >> 6, l = (i >> 1) & 31, r = i & 1;
      const int row = (l >> 2) + 8 * r, f = (tile0 + j) * 4 + (l & 3);
      if (row < M && 2 * f < N) {
        float gate = 0.f, up = 0.f;
        for (int w = 0; w < warps; ++w) gate += red[w][j][l][2 * r], up += red[w][j][l][2 * r + 1];
        Y[size_t(row) * (N / 2) + f] = __float2half(silu_mul(gate, up));
      }
    }
  } else {
    for (int i = threadIdx.x; i < NT * 128; i += blockDim.x) {
      const int j = i >> 7, l = (i >> 2) & 31, e = i & 3;
      const int row = (l >> 2) + (e >= 2 ? 8 : 0), n = (tile0 + j) * 8 + 2 * (l & 3) + (e & 1);
      if (row < M && n < N) {
        float sum = 0.f;
        for (int w = 0; w < warps; ++w) sum += red[w][j][l][e];
        Y[size_t(row) * N + n] = __float2half(sum);
      }
    }
  }
}

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
// with the step PD ahead, so PD loads stay in flight while it computes. PD = S: every load first (session 11).
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
// would not cover the SMs twice. Measured at M = 1 (BENCHMARKS.md, session 11), against the streaming
// kernel: llama-1b qkv 4.70 -> 4.33 us, gate/up 14.98 -> 11.40, down 9.31 -> 7.62, the int8 LM head
// 120.7 -> 92.3 (3.0 TB/s); o (2 MiB) ties, and smaller products (smollm2's) are faster streamed
// (2.3-2.7 us against 3.0-3.4), so the plan takes weights of at least kGemvMinBytes.
constexpr size_t kGemvMinBytes = size_t(3) << 20;

// One-row 4-bit gate|up products with the SwiGLU epilogue run the rolling window (S = 8 steps a warp, PD = 4 in
// flight; LEPTONC_GEMV_WINDOW=8:4:TB where the bundle runs sets TB tiles a block, LEPTONC_GEMV_WINDOW=0 turns it off).
// Session 19 on the H100 (BENCHMARKS.md): llama-1b-shape's 9.30 us in the microbench against 10.10 with every load
// first; the bundle 1,354.8 -> 1,368.2 tok/s at batch 1, the same greedy tokens. The window was slower on every
// product without the epilogue (qkv, down, the int8 head), so they keep the session-11 plan.
struct GemvWindow {
  int s = 0, pd = 0, tb = 0;
};
inline GemvWindow gemv_window() {
  static const GemvWindow w = [] {
    GemvWindow g;
    g.s = 8, g.pd = 4;  // the default
    const char* v = std::getenv("LEPTONC_GEMV_WINDOW");
    if (v != nullptr && std::sscanf(v, "%d:%d:%d", &g.s, &g.pd, &g.tb) < 2) g = GemvWindow();  // e.g. 0: off
    return g;
  }();
  return w;
}

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
  // the rolling window: one instance, 4 steps in flight of 8 (session 19 measured 16:4 and 16:8 slower everywhere)
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

// ---- the prefill path (M > 16): dequantize tiles, then cuBLAS -------------------------------------

template <int BITS, bool SYM>
__global__ void tiled_dequantize(const uint32_t* __restrict__ B, const typename Sz<SYM>::T* __restrict__ SZ,
                                 half* __restrict__ W, int tile_first, int tiles, int K, int steps, int block,
                                 int blocks_t) {
  // W[tiles * 8, K] (row-major, ld K) = the dequantized columns of tiles tile_first .. + tiles; one
  // thread a word (two products' four values at 4 bits, one product's at 8; each product's four are
  // consecutive k: layout.py)
  constexpr int kStepK = Step<BITS>::kK;
  const size_t words_per_tile = size_t(steps) * 32 * 4;
  const size_t total = size_t(tiles) * words_per_tile;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const int local = int(i / words_per_tile);
    const int rest = int(i % words_per_tile);
    const int step = rest >> 7, lane = (rest >> 2) & 31, word_i = rest & 3;
    const int g = lane >> 2, t = lane & 3, tile = tile_first + local;
    const uint32_t word = B[(size_t(tile) * steps + step) * 128 + lane * 4 + word_i];
    half* row = W + (size_t(local) * 8 + g) * K;
    for (int p = 0; p < (BITS == 4 ? 2 : 1); ++p) {
      const int c = BITS == 4 ? 2 * word_i + p : word_i;
      uint32_t v[4];
      if (BITS == 4) {
        const int s = p * 8;
        v[0] = (word >> s) & 0xF; v[1] = (word >> (s + 16)) & 0xF; v[2] = (word >> (s + 4)) & 0xF;
        v[3] = (word >> (s + 20)) & 0xF;
      } else {
        v[0] = word & 0xFF; v[1] = (word >> 8) & 0xFF; v[2] = (word >> 16) & 0xFF; v[3] = word >> 24;
      }
      const int pair0 = step * kStepK + 32 * (c >> 1);
      const int k = pair0 + 8 * t + 4 * (c & 1);
      if (k >= K) continue;  // K % 8 == 0: the four are all in or all out
      const typename Sz<SYM>::T sz = SZ[(size_t(tile) * blocks_t + pair0 / block) * 8 + g];
      const float s = Sz<SYM>::scale_of(sz), z = __high2float(Sz<SYM>::zz_of(sz)) - 1024.f;
      half2 out[2] = {__floats2half2_rn((float(v[0]) - z) * s, (float(v[1]) - z) * s),
                      __floats2half2_rn((float(v[2]) - z) * s, (float(v[3]) - z) * s)};
      *reinterpret_cast<uint2*>(row + k) = *reinterpret_cast<uint2*>(out);
    }
  }
}

// SwiGLU on the prefill path: Y[r, f0 + f] = silu(P[r, 2f]) * P[r, 2f + 1] for a product P [rows, cols]
__global__ void swiglu_rows(const half* __restrict__ P, int rows, int cols, half* __restrict__ Y, int ld_y, int f0) {
  const int pairs = cols / 2;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size_t(rows) * pairs;
       i += size_t(gridDim.x) * blockDim.x) {
    const int r = int(i / pairs), f = int(i % pairs);
    const half2 gu = *reinterpret_cast<const half2*>(P + size_t(r) * cols + 2 * f);
    Y[size_t(r) * ld_y + f0 + f] = __float2half(silu_mul(__low2float(gu), __high2float(gu)));
  }
}

// SwiGLU of a product in halves (the SwiGLU op): Y[r, f] = silu(X[r, g0 + f]) * X[r, u0 + f] for f < F,
// X [rows, 2F]; eight values a thread (one 16-byte load of each half), F a multiple of 8.
__global__ void swiglu_halves(const half* __restrict__ X, int64_t rows, int F, int g0, int u0, half* __restrict__ Y) {
  const int vecs = F / 8;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * vecs;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / vecs;
    const int f = int(i % vecs) * 8;
    const half* row = X + r * 2 * F;
    const uint4 g = *reinterpret_cast<const uint4*>(row + g0 + f);
    const uint4 u = *reinterpret_cast<const uint4*>(row + u0 + f);
    const half2* gh = reinterpret_cast<const half2*>(&g);
    const half2* uh = reinterpret_cast<const half2*>(&u);
    uint4 out;
    half2* oh = reinterpret_cast<half2*>(&out);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 gf = __half22float2(gh[j]), uf = __half22float2(uh[j]);
      oh[j] = __floats2half2_rn(silu_mul(gf.x, uf.x), silu_mul(gf.y, uf.y));
    }
    *reinterpret_cast<uint4*>(Y + r * F + f) = out;
  }
}

// fp16 weights, one row of A (the MatMulF16 op at M = 1): Y[n] = sum_k A[k] W[n, k], W [N, K] row-major (rows
// are outputs), K a multiple of 8. A is staged in shared memory; each warp owns R rows and its lanes read
// them in 16-byte loads (R loads a step, unrolled 4 steps, so 4R are in flight), fp32 sums reduced by
// shuffle. The first kPre = 8 / R steps' weights are loaded before A is staged, so HBM's latency overlaps the
// staging. With S > 1, S warps split each group of R rows along K and add their partial sums in shared memory
// (more warps and loads in flight where N is small or K long: f16_plan; bench/kernels_microbench.cu --f16-sweep
// times every choice). With ACT, rows come in (gate j, up j) pairs and Y[j] = SiLU(gate) x up. With NORM
// (NormMatMulF16) the
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

template <int R, bool ACT, bool NORM, int S = 1, bool P = false>
__global__ void __launch_bounds__(kF16Warps * 32)
f16_gemv(const half* __restrict__ A, const half* __restrict__ W, half* __restrict__ Y, int K, int N, RowNorm nm) {
  static_assert(kF16Warps % S == 0, "whole groups of S warps a block");
  extern __shared__ uint4 a_s[];
  constexpr int kPre = 8 / R;  // steps whose weights are loaded before A is staged
  constexpr int kRows = (kF16Warps / S) * R;  // rows a block covers in one pass
  const int kv = K / 8, passes = (N + kRows - 1) / kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int part = warp % S;  // S > 1: warp `part` of its group takes the vectors part * 32 + lane, stepping 32 S
  const int first = part * 32 + lane, stride = 32 * S;
  const uint4* w = reinterpret_cast<const uint4*>(W);
  // P (f16_persistent): a grid smaller than `passes` makes each block take passes blockIdx.x, + gridDim.x, ...: A
  // is staged once a block, and every block is resident when the kernel before it ends. Without P the grid is
  // `passes` and the loop below runs once (the same code as before persistence was written).
  int pass = blockIdx.x;
  int n0 = (pass * (kF16Warps / S) + warp / S) * R;
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
  for (bool preloaded = true;; preloaded = false) {
    if (S == 1 && n0 >= N) return;  // with S > 1 every warp reaches the partial sums' barriers
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    int i0 = first;
    if (preloaded) {
#pragma unroll
      for (int p = 0; p < kPre; ++p)
        if (first + stride * p < kv) dot_step<R>(acc, a_s[first + stride * p], pre[p]);
      i0 = first + stride * kPre;
    }
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
      if (!P && part != 0) return;  // with P every warp reaches the next pass's barriers
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
    if constexpr (!P) return;
    pass += gridDim.x;
    if (pass >= passes) return;
    n0 = (pass * (kF16Warps / S) + warp / S) * R;
    if constexpr (S > 1) __syncthreads();  // `partial` is written again in the next pass
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

struct Shared {  // one per process: the cuBLAS handle, the dequantization scratch, SwiGLU's product rows
  std::mutex lock;
  cublasHandle_t cublas = nullptr;
  half* scratch = nullptr;
  half* product = nullptr;  // scratch_halves() too; made only for a node with the SwiGLU epilogue
  void* workspace = nullptr;  // cuBLAS's, set explicitly: no allocation inside a captured decode step
  half* normed = nullptr;  // scratch_halves(): NormMatMulNBitsTiled's normalized rows where the norm is not a prologue
};
Shared g_shared;

// ---- the custom op (ONNX Runtime C API) ----------------------------------------------------------

struct NBitsKernel {
  int64_t K = 0, N = 0, bits = 0, block = 0;
  int64_t activation = 0;  // 1: SwiGLU epilogue, output N / 2 columns
  int64_t symmetric = 0;   // 1 (8 bits only): every zero point is 128 and SZ holds the scales alone (layout.py)
  bool norm = false;       // NormMatMulNBitsTiled: the SkipSimplifiedLayerNormalization in front folded in
  float eps = 0.f;
};

OrtStatus* make_error(const std::string& what) {
  return g_api->CreateStatus(ORT_EP_FAIL, ("leptonc MatMulNBitsTiled: " + what).c_str());
}

OrtStatus* cuda_check(cudaError_t err, const char* where) {
  if (err == cudaSuccess) return nullptr;
  return make_error(std::string(where) + ": " + cudaGetErrorString(err));
}

#define ORT_TRY(expr)              \
  do {                             \
    OrtStatus* _st = (expr);       \
    if (_st != nullptr) return _st; \
  } while (0)

// A tensor's dimensions (rank 1 to 8) into dims and the product of all but the last into *rows; `op` names the
// custom op and `what` the input in the error.
OrtStatus* row_shape(const OrtValue* value, const char* op, const char* what, int64_t (&dims)[8], size_t* rank,
                     int64_t* rows) {
  OrtTensorTypeAndShapeInfo* shape_info = nullptr;
  ORT_TRY(g_api->GetTensorTypeAndShape(value, &shape_info));
  OrtStatus* st = g_api->GetDimensionsCount(shape_info, rank);
  if (st == nullptr && (*rank < 1 || *rank > 8))
    st = g_api->CreateStatus(ORT_EP_FAIL, (std::string("leptonc ") + op + ": " + what + " must have rank 1 to 8").c_str());
  if (st == nullptr) st = g_api->GetDimensions(shape_info, dims, *rank);
  g_api->ReleaseTensorTypeAndShapeInfo(shape_info);
  if (st != nullptr) return st;
  *rows = 1;
  for (size_t i = 0; i + 1 < *rank; ++i) *rows *= dims[i];
  return nullptr;
}

// A folded norm's inputs skip (in[1], A's shape) and gamma (in[2], K values), and its output 1, the sum (A's shape,
// dims/rank), into *nm; `op` names the op in errors.
OrtStatus* read_row_norm(OrtKernelContext* ctx, const OrtValue* const* in, const char* op, int64_t m, int64_t K,
                         float eps, const int64_t* dims, size_t rank, RowNorm* nm) {
  int64_t sdims[8] = {0}, gdims[8] = {0}, sm = 1, gm = 1;
  size_t srank = 0, grank = 0;
  ORT_TRY(row_shape(in[1], op, "skip", sdims, &srank, &sm));
  ORT_TRY(row_shape(in[2], op, "gamma", gdims, &grank, &gm));
  const char* bad = sm != m || sdims[srank - 1] != K ? "skip must have A's shape"
                    : gm * gdims[grank - 1] != K   ? "gamma must have K elements"
                                                   : nullptr;
  if (bad != nullptr) return g_api->CreateStatus(ORT_EP_FAIL, (std::string("leptonc ") + op + ": " + bad).c_str());
  OrtValue* sum = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 1, dims, rank, &sum));
  if (m == 0) return nullptr;
  void *ps = nullptr, *pg = nullptr, *psum = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[1]), &ps));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[2]), &pg));
  ORT_TRY(g_api->GetTensorMutableData(sum, &psum));
  nm->skip = static_cast<const half*>(ps);
  nm->gamma = static_cast<const half*>(pg);
  nm->sum = static_cast<half*>(psum);
  nm->eps = eps;
  return nullptr;
}

OrtStatus* ensure_shared(bool product = false, bool scratch = true, bool normed = false) {
  std::lock_guard<std::mutex> guard(g_shared.lock);
  if (g_shared.cublas == nullptr) {
    if (cublasCreate(&g_shared.cublas) != CUBLAS_STATUS_SUCCESS) return make_error("cublasCreate failed");
  }
  if (scratch && g_shared.scratch == nullptr) {  // dequantized rows; NormMatMulF16's normalized rows
    ORT_TRY(cuda_check(cudaMalloc(&g_shared.scratch, scratch_halves() * sizeof(half)), "cudaMalloc(scratch)"));
  }
  if (g_shared.workspace == nullptr) {
    ORT_TRY(cuda_check(cudaMalloc(&g_shared.workspace, cublas_workspace_bytes()), "cudaMalloc(cuBLAS workspace)"));
  }
  if (product && g_shared.product == nullptr) {
    ORT_TRY(cuda_check(cudaMalloc(&g_shared.product, scratch_halves() * sizeof(half)), "cudaMalloc(product)"));
  }
  if (normed && g_shared.normed == nullptr) {
    ORT_TRY(cuda_check(cudaMalloc(&g_shared.normed, scratch_halves() * sizeof(half)), "cudaMalloc(normed rows)"));
  }
  return nullptr;
}

// Which decode kernel serves M <= kGemvMaxM rows: the plan (auto), or the benchmark's choice.
constexpr int kGemvMaxM = 1;
enum class Path { kAuto, kStream, kGemv };

// MatMulNBitsTiled's product with SZ as pairs or, SYM, the scales alone (launch below picks by the attribute).
template <int BITS, bool SYM>
OrtStatus* launch_sz(const NBitsKernel& kn, const half* a, int64_t m, const uint8_t* b, const half* sz, half* y,
                     cudaStream_t stream, Path path, int force_s, int force_tb, int force_pd) {
  const int K = int(kn.K), N = int(kn.N), block = int(kn.block);
  const int step_k = Step<BITS>::kK;
  const int steps = (K + step_k - 1) / step_k;
  const int blocks_t = (steps * step_k + block - 1) / block;
  const int n_tiles = (N + 7) / 8;
  const bool act = kn.activation == 1;
  const auto* bw = reinterpret_cast<const uint4*>(b);
  const auto* szw = reinterpret_cast<const typename Sz<SYM>::T*>(sz);
  const int pb = std::min(block, step_k) / 16;  // products that share a scale
  if (path != Path::kStream && (path == Path::kGemv || m <= kGemvMaxM)) {
    const GemvWindow win = BITS == 4 && act && m == 1 && force_s == 0 && force_tb == 0 && force_pd == 0
                               ? gemv_window() : GemvWindow();
    GemvPlan plan = win.pd > 0 ? gemv_plan(1, K, N, BITS, win.s, win.tb, false, win.pd) : GemvPlan();
    if (plan.s == 0) plan = gemv_plan(int(m), K, N, BITS, force_s, force_tb, path == Path::kGemv, force_pd);
    if (plan.s > 0)
      return cuda_check(launch_gemv<BITS, false, SYM>(plan, act, pb, a, int(m), bw, szw, y, K, N, steps, block,
                                                      blocks_t, stream),
                        "tiled_gemv launch");
    if (path == Path::kGemv) return make_error("the few-rows kernel does not apply to this shape");
  }
  if (m <= kSmallM) {
    // 8 warps a block; up to 16 where the blocks are few and K is long (llama-1b's o and down: 256 tiles;
    // smollm2's down: 72), so that more warps an SM stream K (v3e/v3f, BENCHMARKS.md session 10: llama o
    // 4.30 -> 3.73 us, down 13.05 -> 9.33, smollm2 down 3.41 -> 2.60; the 16-warp instance everywhere
    // slowed llama gate/up, 15.0 -> 17.2, and qkv)
    const bool wide = n_tiles >= 2 * 4 * 132;  // gate/up, LM head: two tiles a block share A's loads
    const bool deep = !wide && n_tiles <= 2 * 132 && steps > 8;
    const int warps = std::min(deep ? kMaxWarps : 8, steps);
#define LEPTONC_STREAM(NT, PB)                                                                               \
  do {                                                                                                       \
    const dim3 grid((n_tiles + NT - 1) / NT), threads(warps * 32);                                           \
    const cudaError_t e =                                                                                    \
        deep && act ? launch_dependent(tiled_stream<BITS, NT, PB, kMaxWarps, true, SYM>, grid, threads, 0,    \
                                       stream, a, int(m), bw, szw, y, K, N, steps, block, blocks_t)          \
        : deep      ? launch_dependent(tiled_stream<BITS, NT, PB, kMaxWarps, false, SYM>, grid, threads, 0,   \
                                       stream, a, int(m), bw, szw, y, K, N, steps, block, blocks_t)          \
        : act       ? launch_dependent(tiled_stream<BITS, NT, PB, 8, true, SYM>, grid, threads, 0, stream, a, \
                                       int(m), bw, szw, y, K, N, steps, block, blocks_t)                     \
                    : launch_dependent(tiled_stream<BITS, NT, PB, 8, false, SYM>, grid, threads, 0, stream, a,\
                                       int(m), bw, szw, y, K, N, steps, block, blocks_t);                    \
    if (e != cudaSuccess) return cuda_check(e, "tiled_stream launch");                                       \
  } while (0)
    if (pb >= Step<BITS>::kProducts) {
      if (wide) LEPTONC_STREAM(2, Step<BITS>::kProducts); else LEPTONC_STREAM(1, Step<BITS>::kProducts);
    } else if (pb == 4) {
      if (wide) LEPTONC_STREAM(2, 4); else LEPTONC_STREAM(1, 4);
    } else {
      if (wide) LEPTONC_STREAM(2, 2); else LEPTONC_STREAM(1, 2);
    }
#undef LEPTONC_STREAM
    return cuda_check(cudaGetLastError(), "tiled_stream launch");
  }
  if (g_shared.scratch == nullptr || g_shared.cublas == nullptr || (act && g_shared.product == nullptr))
    ORT_TRY(ensure_shared(act));
  if (cublasSetStream(g_shared.cublas, stream) != CUBLAS_STATUS_SUCCESS) return make_error("cublasSetStream failed");
  if (cublasSetWorkspace(g_shared.cublas, g_shared.workspace, cublas_workspace_bytes()) != CUBLAS_STATUS_SUCCESS)
    return make_error("cublasSetWorkspace failed");
  const int64_t chunk_tiles = std::max<int64_t>(1, std::min<int64_t>(n_tiles, int64_t(scratch_halves()) / (8 * int64_t(K))));
  const float alpha = 1.f, beta = 0.f;
  for (int64_t tile_first = 0; tile_first < n_tiles; tile_first += chunk_tiles) {
    const int tiles = int(std::min<int64_t>(chunk_tiles, n_tiles - tile_first));
    const int n_first = int(tile_first * 8), rows = std::min(tiles * 8, N - n_first);
    const int threads = 256;
    const int64_t words = int64_t(tiles) * steps * 128;
    const int grid = int(std::min<int64_t>((words + threads - 1) / threads, 65535));
    tiled_dequantize<BITS, SYM><<<grid, threads, 0, stream>>>(reinterpret_cast<const uint32_t*>(b), szw,
                                                              g_shared.scratch, int(tile_first), tiles, K, steps,
                                                              block, blocks_t);
    ORT_TRY(cuda_check(cudaGetLastError(), "dequantize launch"));
    // column-major view: Y^T[N, M] (ld N) = W[rows, K]^T-as-stored (op T, ld K) x A^T[K, M] (ld K)
    if (!act) {
      const cublasStatus_t st = cublasGemmEx(g_shared.cublas, CUBLAS_OP_T, CUBLAS_OP_N, rows, int(m), K, &alpha,
                                             g_shared.scratch, CUDA_R_16F, K, a, CUDA_R_16F, K, &beta, y + n_first,
                                             CUDA_R_16F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      if (st != CUBLAS_STATUS_SUCCESS) return make_error("cublasGemmEx failed with status " + std::to_string(int(st)));
      continue;
    }
    // SwiGLU: the product's rows in chunks through g_shared.product, then the epilogue (rows is even)
    const int64_t chunk_rows = std::max<int64_t>(1, int64_t(scratch_halves()) / rows);
    for (int64_t r0 = 0; r0 < m; r0 += chunk_rows) {
      const int r = int(std::min<int64_t>(chunk_rows, m - r0));
      const cublasStatus_t st = cublasGemmEx(g_shared.cublas, CUBLAS_OP_T, CUBLAS_OP_N, rows, r, K, &alpha,
                                             g_shared.scratch, CUDA_R_16F, K, a + r0 * K, CUDA_R_16F, K, &beta,
                                             g_shared.product, CUDA_R_16F, rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      if (st != CUBLAS_STATUS_SUCCESS) return make_error("cublasGemmEx failed with status " + std::to_string(int(st)));
      const int64_t pairs = int64_t(r) * (rows / 2);
      const int g2 = int(std::min<int64_t>((pairs + 255) / 256, 65535));
      swiglu_rows<<<g2, 256, 0, stream>>>(g_shared.product, r, rows, y + r0 * (N / 2), N / 2, n_first / 2);
      ORT_TRY(cuda_check(cudaGetLastError(), "swiglu launch"));
    }
  }
  return nullptr;
}

// MatMulNBitsTiled's product; the scales-only instances (symmetric) exist for 8 bits alone.
template <int BITS>
OrtStatus* launch(const NBitsKernel& kn, const half* a, int64_t m, const uint8_t* b, const half* sz, half* y,
                  cudaStream_t stream, Path path = Path::kAuto, int force_s = 0, int force_tb = 0, int force_pd = 0) {
  if constexpr (BITS == 8) {
    if (kn.symmetric == 1) return launch_sz<8, true>(kn, a, m, b, sz, y, stream, path, force_s, force_tb, force_pd);
  }
  return launch_sz<BITS, false>(kn, a, m, b, sz, y, stream, path, force_s, force_tb, force_pd);
}

// The folded norm where it is not a product kernel's prologue: m rows of RMSNorm(A + skip) x gamma (and the sum
// nm.sum) into `rows` (scratch_halves() halves) in chunks, each followed by product(first row, rows in the chunk).
// `fail` makes the op's error.
template <class Product>
OrtStatus* norm_rows_then(const half* a, int64_t m, int K, const RowNorm& nm, half* rows, cudaStream_t stream,
                          OrtStatus* (*fail)(const std::string&), Product product) {
  const int64_t chunk_rows = std::max<int64_t>(1, int64_t(scratch_halves()) / K);
  for (int64_t r0 = 0; r0 < m; r0 += chunk_rows) {
    const int r = int(std::min<int64_t>(chunk_rows, m - r0));
    RowNorm chunk = nm;
    chunk.skip += r0 * K;
    chunk.sum += r0 * K;
    const cudaError_t err = launch_dependent(skip_rms_norm_rows, dim3(r), dim3(kF16Warps * 32),
                                             size_t(K / 8) * sizeof(uint4), stream, a + r0 * K, chunk, rows, K);
    if (err != cudaSuccess) return fail(std::string("skip_rms_norm_rows launch: ") + cudaGetErrorString(err));
    ORT_TRY(product(r0, r));
  }
  return nullptr;
}

// NormMatMulNBitsTiled: Y = RMSNorm(A + skip) x gamma x W^T and S = A + skip. One row where the few-rows kernel
// serves the shape: the norm is its prologue (one kernel). Otherwise the rows are normalized into g_shared.normed
// (skip_rms_norm_rows, in chunks of scratch_halves()), then launch() as for MatMulNBitsTiled.
template <int BITS, bool SYM>
OrtStatus* launch_norm_sz(const NBitsKernel& kn, const half* a, int64_t m, const RowNorm& nm, const uint8_t* b,
                          const half* sz, half* y, cudaStream_t stream) {
  const int K = int(kn.K), N = int(kn.N), block = int(kn.block);
  const int step_k = Step<BITS>::kK;
  const int steps = (K + step_k - 1) / step_k;
  const int blocks_t = (steps * step_k + block - 1) / block;
  if (m == 1) {
    const GemvWindow win = BITS == 4 && kn.activation == 1 ? gemv_window() : GemvWindow();
    GemvPlan plan = win.pd > 0 ? gemv_plan(1, K, N, BITS, win.s, win.tb, false, win.pd) : GemvPlan();
    if (plan.s == 0) plan = gemv_plan(1, K, N, BITS);
    if (plan.s > 0)
      return cuda_check(launch_gemv<BITS, true, SYM>(plan, kn.activation == 1, std::min(block, step_k) / 16, a, 1,
                                                     reinterpret_cast<const uint4*>(b),
                                                     reinterpret_cast<const typename Sz<SYM>::T*>(sz), y, K, N, steps,
                                                     block, blocks_t, stream, nm),
                        "tiled_gemv (norm prologue) launch");
  }
  if (g_shared.normed == nullptr) ORT_TRY(ensure_shared(kn.activation == 1, true, true));
  const int64_t out_n = kn.activation == 1 ? N / 2 : N;
  return norm_rows_then(a, m, K, nm, g_shared.normed, stream, make_error, [&](int64_t r0, int r) {
    return launch_sz<BITS, SYM>(kn, g_shared.normed, r, b, sz, y + r0 * out_n, stream, Path::kAuto, 0, 0, 0);
  });
}

template <int BITS>
OrtStatus* launch_norm(const NBitsKernel& kn, const half* a, int64_t m, const RowNorm& nm, const uint8_t* b,
                       const half* sz, half* y, cudaStream_t stream) {
  if constexpr (BITS == 8) {
    if (kn.symmetric == 1) return launch_norm_sz<8, true>(kn, a, m, nm, b, sz, y, stream);
  }
  return launch_norm_sz<BITS, false>(kn, a, m, nm, b, sz, y, stream);
}

OrtStatus* read_int_attr(const OrtKernelInfo* info, const char* name, int64_t* out) {
  return g_api->KernelInfoGetAttribute_int64(info, name, out);
}

// MatMulNBitsTiled (norm false) or NormMatMulNBitsTiled (norm true: also epsilon, and K within the norm's staging)
OrtStatus* create_nbits_kernel(const OrtApi* api, const OrtKernelInfo* info, bool norm, void** kernel) {
  const char* op = norm ? "leptonc NormMatMulNBitsTiled: " : "leptonc MatMulNBitsTiled: ";
  auto* kn = new NBitsKernel();
  kn->norm = norm;
  OrtStatus* st = nullptr;
  if ((st = read_int_attr(info, "K", &kn->K)) || (st = read_int_attr(info, "N", &kn->N)) ||
      (st = read_int_attr(info, "bits", &kn->bits)) || (st = read_int_attr(info, "block_size", &kn->block))) {
    delete kn;
    return st;
  }
  if ((kn->bits != 4 && kn->bits != 8) || kn->block < 32 || kn->block % 32 != 0 || kn->K <= 0 || kn->K % 8 != 0 ||
      kn->N <= 0) {
    const std::string msg = "unsupported attributes bits=" + std::to_string(kn->bits) + " block_size=" +
                            std::to_string(kn->block) + " K=" + std::to_string(kn->K) +
                            " (needs bits 4 or 8, block a multiple of 32, K a multiple of 8)";
    delete kn;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, (op + msg).c_str());
  }
  if ((st = read_int_attr(info, "activation", &kn->activation)) != nullptr) {  // absent: no epilogue
    api->ReleaseStatus(st);
    kn->activation = 0;
  }
  if (kn->activation != 0 && (kn->activation != 1 || kn->N % 8 != 0)) {
    const std::string msg = "unsupported activation " + std::to_string(kn->activation) + " with N=" +
                            std::to_string(kn->N) + " (1 = SwiGLU over (gate, up) column pairs, N a multiple of 8)";
    delete kn;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, (op + msg).c_str());
  }
  if ((st = read_int_attr(info, "symmetric", &kn->symmetric)) != nullptr) {  // absent: SZ holds (scale, zero) pairs
    api->ReleaseStatus(st);
    kn->symmetric = 0;
  }
  if (kn->symmetric != 0 && (kn->symmetric != 1 || kn->bits != 8)) {
    const std::string msg = "unsupported symmetric=" + std::to_string(kn->symmetric) + " with bits=" +
                            std::to_string(kn->bits) + " (1 = SZ holds the scales alone, zero points all 128: 8 bits "
                            "only; 0 or absent for (scale, zero) pairs)";
    delete kn;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, (op + msg).c_str());
  }
  if (norm && (st = api->KernelInfoGetAttribute_float(info, "epsilon", &kn->eps)) != nullptr) {
    delete kn;
    return st;
  }
  if (norm && (kn->K > kF16GemvMaxK || !(kn->eps >= 0.f))) {
    const std::string msg = "unsupported K=" + std::to_string(kn->K) + " or epsilon (the norm needs K <= " +
                            std::to_string(kF16GemvMaxK) + " and epsilon >= 0)";
    delete kn;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, (op + msg).c_str());
  }
  // The prefill path's cuBLAS handle and scratch (and the norm's row buffer) are made here, before any graph
  // capture can begin.
  if ((st = ensure_shared(kn->activation == 1, true, norm)) != nullptr) {
    delete kn;
    return st;
  }
  *kernel = kn;
  return nullptr;
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  return create_nbits_kernel(api, info, false, kernel);
}

OrtStatus* ORT_API_CALL create_norm_nbits(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                                          void** kernel) {
  return create_nbits_kernel(api, info, true, kernel);
}

// Inputs A, B, SZ (MatMulNBitsTiled) or A, skip, gamma, B, SZ (NormMatMulNBitsTiled); outputs Y (and S = A + skip).
OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  const auto& kn = *static_cast<NBitsKernel*>(kernel);
  const char* op = kn.norm ? "NormMatMulNBitsTiled" : "MatMulNBitsTiled";
  const size_t n_in = kn.norm ? 5 : 3, ib = n_in - 2;  // ib: B's index
  const OrtValue* in[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  for (size_t i = 0; i < n_in; ++i) ORT_TRY(g_api->KernelContext_GetInput(ctx, i, &in[i]));
  for (size_t i = 0; i < n_in; ++i)
    if (in[i] == nullptr) return make_error(kn.norm ? "A, skip, gamma, B and SZ are required" : "A, B and SZ are required");

  int64_t dims[8] = {0}, m = 1;
  size_t rank = 0;
  ORT_TRY(row_shape(in[0], op, "A", dims, &rank, &m));
  if (dims[rank - 1] != kn.K) return make_error("A's last dimension is " + std::to_string(dims[rank - 1]) +
                                                ", the node's K is " + std::to_string(kn.K));
  RowNorm nm;
  if (kn.norm) ORT_TRY(read_row_norm(ctx, in, op, m, kn.K, kn.eps, dims, rank, &nm));
  int64_t out_dims[8];
  for (size_t i = 0; i + 1 < rank; ++i) out_dims[i] = dims[i];
  out_dims[rank - 1] = kn.activation == 1 ? kn.N / 2 : kn.N;
  OrtValue* out = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, out_dims, rank, &out));
  if (m == 0) return nullptr;

  void *pa = nullptr, *pb = nullptr, *ps = nullptr, *py = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[0]), &pa));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[ib]), &pb));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[ib + 1]), &ps));
  ORT_TRY(g_api->GetTensorMutableData(out, &py));
  void* stream = nullptr;
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  const auto s = static_cast<cudaStream_t>(stream);
  const auto* a = static_cast<const half*>(pa);
  const auto* b = static_cast<const uint8_t*>(pb);
  const auto* sc = static_cast<const half*>(ps);
  auto* y = static_cast<half*>(py);
  if (kn.norm) return kn.bits == 4 ? launch_norm<4>(kn, a, m, nm, b, sc, y, s) : launch_norm<8>(kn, a, m, nm, b, sc, y, s);
  return kn.bits == 4 ? launch<4>(kn, a, m, b, sc, y, s) : launch<8>(kn, a, m, b, sc, y, s);
}

template <class Kernel>
void ORT_API_CALL destroy_of(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "MatMulNBitsTiled"; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CUDAExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t index) {
  return (index == 0 || index == 2) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 3; }
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL input_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL variadic_min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL variadic_homogeneous(const OrtCustomOp*) { return 1; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return INT_MAX; }
size_t ORT_API_CALL no_pairs(int** in, int** out) {
  *in = nullptr;
  *out = nullptr;
  return 0;
}
void ORT_API_CALL release_pairs(int*, int*) {}

OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = ORT_API_VERSION;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = destroy_of<NBitsKernel>;
  op.GetInputCharacteristic = input_kind;
  op.GetOutputCharacteristic = output_kind;
  op.GetInputMemoryType = input_memory;
  op.GetVariadicInputMinArity = variadic_min_arity;
  op.GetVariadicInputHomogeneity = variadic_homogeneous;
  op.GetVariadicOutputMinArity = variadic_min_arity;
  op.GetVariadicOutputHomogeneity = variadic_homogeneous;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.InferOutputShapeFn = nullptr;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  op.GetMayInplace = no_pairs;
  op.ReleaseMayInplace = release_pairs;
  op.GetAliasMap = no_pairs;
  op.ReleaseAliasMap = release_pairs;
  return op;
}

OrtCustomOp g_matmul_tiled = make_op();

// The library's other ops: make_op()'s provider, characteristics and versions, their own name, inputs and kernel.
OrtCustomOp derived_op(decltype(OrtCustomOp::GetName) name, decltype(OrtCustomOp::GetInputType) input_type,
                       decltype(OrtCustomOp::GetInputTypeCount) input_count, decltype(OrtCustomOp::CreateKernelV2) create,
                       decltype(OrtCustomOp::KernelComputeV2) compute, decltype(OrtCustomOp::KernelDestroy) destroy) {
  OrtCustomOp op = make_op();
  op.GetName = name;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute;
  op.KernelDestroy = destroy;
  return op;
}

// ---- SwiGLU: SiLU(gate) x up of a gate|up product in halves, one kernel for Split, QuickGelu and Mul ----
// Input X fp16 [..., 2F]; attribute gate_first (1: gate is the first half, 0: the second); Y fp16 [..., F].

struct SwiGluKernel {
  int64_t gate_first = 1;
};

OrtStatus* swiglu_error(const std::string& what) {
  return g_api->CreateStatus(ORT_EP_FAIL, ("leptonc SwiGLU: " + what).c_str());
}

OrtStatus* ORT_API_CALL create_swiglu(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  auto* kn = new SwiGluKernel();
  OrtStatus* st = read_int_attr(info, "gate_first", &kn->gate_first);
  if (st != nullptr) {  // absent: gate first
    api->ReleaseStatus(st);
    kn->gate_first = 1;
  }
  *kernel = kn;
  return nullptr;
}

OrtStatus* ORT_API_CALL compute_swiglu(void* kernel, OrtKernelContext* ctx) {
  const auto& kn = *static_cast<SwiGluKernel*>(kernel);
  const OrtValue* x = nullptr;
  ORT_TRY(g_api->KernelContext_GetInput(ctx, 0, &x));
  if (x == nullptr) return swiglu_error("X is required");
  int64_t dims[8] = {0}, rows = 1;
  size_t rank = 0;
  ORT_TRY(row_shape(x, "SwiGLU", "X", dims, &rank, &rows));
  const int64_t width = dims[rank - 1];
  if (width % 16 != 0) return swiglu_error("X's last dimension is " + std::to_string(width) +
                                           "; it must be 2F with F a multiple of 8");
  dims[rank - 1] = width / 2;
  OrtValue* out = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, dims, rank, &out));
  if (rows == 0) return nullptr;
  void *px = nullptr, *py = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(x), &px));
  ORT_TRY(g_api->GetTensorMutableData(out, &py));
  void* stream = nullptr;
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  const int F = int(width / 2);
  const int64_t work = rows * (F / 8);
  const int blocks = int(std::min<int64_t>((work + 255) / 256, 132 * 16));
  swiglu_halves<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const half*>(px), rows, F, kn.gate_first ? 0 : F, kn.gate_first ? F : 0, static_cast<half*>(py));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : swiglu_error(std::string("launch: ") + cudaGetErrorString(err));
}

const char* ORT_API_CALL swiglu_name(const OrtCustomOp*) { return "SwiGLU"; }
ONNXTensorElementDataType ORT_API_CALL swiglu_input_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
size_t ORT_API_CALL swiglu_input_count(const OrtCustomOp*) { return 1; }

OrtCustomOp g_swiglu = derived_op(swiglu_name, swiglu_input_type, swiglu_input_count, create_swiglu, compute_swiglu,
                                  destroy_of<SwiGluKernel>);

// ---- MatMulF16: Y = A x W^T for fp16 weights stored [N, K] (rows are outputs) ---------------------------
// One row of A (batch-1 decode, K <= kF16GemvMaxK): f16_gemv. More rows: cuBLAS (fp32 accumulation). With
// activation 1, W's rows come in (gate j, up j) pairs and Y is SiLU(gate) x up, [..., N / 2].
//
// NormMatMulF16: the same product of RMSNorm(A + skip) x gamma, the SkipSimplifiedLayerNormalization in front of
// it folded in. Inputs A, skip (A's shape), gamma [K], W; attributes K, N, activation, epsilon; outputs Y and
// S = A + skip (the residual stream the next norm reads). One row: the norm is f16_gemv's prologue (one kernel
// instead of two); more rows: skip_rms_norm_rows into the scratch, then cuBLAS.

struct F16Kernel {
  int64_t K = 0, N = 0, activation = 0;
  bool norm = false;
  float eps = 0.f;
};

OrtStatus* f16_error(const std::string& what) {
  return g_api->CreateStatus(ORT_EP_FAIL, ("leptonc MatMulF16: " + what).c_str());
}

OrtStatus* create_f16_kernel(const OrtApi* api, const OrtKernelInfo* info, bool norm, void** kernel) {
  auto* kn = new F16Kernel();
  kn->norm = norm;
  OrtStatus* st = nullptr;
  if ((st = read_int_attr(info, "K", &kn->K)) || (st = read_int_attr(info, "N", &kn->N))) {
    delete kn;
    return st;
  }
  if ((st = read_int_attr(info, "activation", &kn->activation)) != nullptr) {
    api->ReleaseStatus(st);
    kn->activation = 0;
  }
  if (norm && (st = api->KernelInfoGetAttribute_float(info, "epsilon", &kn->eps)) != nullptr) {
    delete kn;
    return st;
  }
  if (kn->K <= 0 || kn->K % 8 != 0 || kn->N <= 0 || (kn->activation != 0 && (kn->activation != 1 || kn->N % 2)) ||
      (norm && (kn->K > kF16GemvMaxK || !(kn->eps >= 0.f)))) {
    const std::string msg = "unsupported attributes K=" + std::to_string(kn->K) + " N=" + std::to_string(kn->N) +
                            " activation=" + std::to_string(kn->activation) +
                            " (needs K a multiple of 8; activation 1 needs N even; the norm needs K <= " +
                            std::to_string(kF16GemvMaxK) + " and epsilon >= 0)";
    delete kn;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, ((norm ? "leptonc NormMatMulF16: " : "leptonc MatMulF16: ") + msg).c_str());
  }
  // cuBLAS and its workspace (and the norm's row scratch) before any capture
  if ((st = ensure_shared(kn->activation == 1, norm)) != nullptr) {
    delete kn;
    return st;
  }
  *kernel = kn;
  return nullptr;
}

OrtStatus* ORT_API_CALL create_f16(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  return create_f16_kernel(api, info, false, kernel);
}

OrtStatus* ORT_API_CALL create_norm_f16(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  return create_f16_kernel(api, info, true, kernel);
}

// Persistent one-row fp16 products (LEPTONC_F16_PERSISTENT=1 where the bundle runs; off until measured): the grid
// is at most the blocks that fit on the GPU at once, each block looping over passes (f16_gemv).
inline bool f16_persistent() {
  static const bool on = env_is("LEPTONC_F16_PERSISTENT", "1");
  return on;
}

// At most the blocks of `kernel` (kF16Warps warps, smem bytes) resident on the current GPU at once; 0 if unknown.
template <typename Kernel>
int resident_blocks(Kernel kernel, size_t smem) {
  static const int sms = [] {
    int device = 0, n = 0;
    return cudaGetDevice(&device) == cudaSuccess &&
                   cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess
               ? n
               : 0;
  }();
  int per_sm = 0;
  if (sms == 0 || cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kF16Warps * 32, smem) != cudaSuccess)
    return 0;
  return per_sm * sms;
}

template <int R, int S, bool NORM>
void launch_f16_gemv(bool act, const half* a, const half* w, half* y, int K, int N, const RowNorm& nm,
                     cudaStream_t stream, bool persistent = f16_persistent()) {
  int grid = (N + (kF16Warps / S) * R - 1) / ((kF16Warps / S) * R);
  const size_t smem = size_t(K / 8) * sizeof(uint4);
  if (persistent) {
    auto kernel = act ? f16_gemv<R, true, NORM, S, true> : f16_gemv<R, false, NORM, S, true>;
    const int resident = resident_blocks(kernel, smem);
    if (resident > 0) grid = std::min(grid, resident);
    launch_dependent(kernel, dim3(grid), dim3(kF16Warps * 32), smem, stream, a, w, y, K, N, nm);
    return;
  }
  auto kernel = act ? f16_gemv<R, true, NORM, S> : f16_gemv<R, false, NORM, S>;
  launch_dependent(kernel, dim3(grid), dim3(kF16Warps * 32), smem, stream, a, w, y, K, N, nm);
}

// r rows a warp group (1, 2 or 4) and s warps along K (1, 2 or 4; s <= 2r: f16_plan).
template <bool NORM>
void launch_f16_gemv_rows(int r, int s, bool act, const half* a, const half* w, half* y, int K, int N,
                          const RowNorm& nm, cudaStream_t stream, bool persistent = f16_persistent()) {
  const bool p = persistent;
  if (r == 4) launch_f16_gemv<4, 1, NORM>(act, a, w, y, K, N, nm, stream, p);
  else if (r == 2 && s == 4) launch_f16_gemv<2, 4, NORM>(act, a, w, y, K, N, nm, stream, p);
  else if (r == 2 && s == 2) launch_f16_gemv<2, 2, NORM>(act, a, w, y, K, N, nm, stream, p);
  else if (r == 2) launch_f16_gemv<2, 1, NORM>(act, a, w, y, K, N, nm, stream, p);
  else if (s == 2) launch_f16_gemv<1, 2, NORM>(act, a, w, y, K, N, nm, stream, p);
  else launch_f16_gemv<1, 1, NORM>(act, a, w, y, K, N, nm, stream, p);
}

struct F16Plan {
  int rows;   // rows a warp group
  int split;  // warps a group (along K)
};

// The launch of one row of A. Tuned (the default): 2 rows a group where N fills 132 SMs at two blocks each (always
// with the SwiGLU epilogue, whose rows come in pairs), else 1; the group's warps split K while every lane keeps
// at least one 16-byte vector a row and a block still covers 4 rows (each block stages all of A, so fewer rows a
// block means more staging for the same weights). Session 16's sweep on the H100 (bench/kernels_microbench.cu
// --f16-sweep, BENCHMARKS.md) put this within 0.1 us of the best of 9 choices on every llama-1b-shape product and
// within 0.33 us on smollm2's. Untuned (LEPTONC_F16_SPLIT=0, the launch before session 16): one warp a row group,
// 4 rows where N fills two blocks an SM at 4, 2 where it does at 2.
inline F16Plan f16_plan(int K, int N, bool act, bool tuned) {
  if (!tuned) return {N >= 2 * 132 * kF16Warps * 4 ? 4 : (N >= 132 * kF16Warps * 2 || act) ? 2 : 1, 1};
  const int rows = (N >= 132 * kF16Warps * 2 || act) ? 2 : 1, kv = K / 8;
  int split = 1;
  while (split < 4 && split < 2 * rows && 32 * 2 * split <= kv) split *= 2;
  return {rows, split};
}

inline bool f16_tuned() {
  static const bool on = !env_is("LEPTONC_F16_SPLIT", "0");
  return on;
}

// cuBLAS for m rows of (already normalized) A: Y = A W^T, or SiLU(gate) x up through the product scratch.
OrtStatus* f16_gemm_rows(const F16Kernel& kn, const half* a, int64_t m, const half* w, half* y, cudaStream_t stream) {
  const int K = int(kn.K), N = int(kn.N);
  const float alpha = 1.f, beta = 0.f;
  // column-major view: Y^T[N, M] (ld N) = W[N, K] (op T, ld K) x A^T[K, M] (ld K)
  if (kn.activation != 1) {
    const cublasStatus_t st = cublasGemmEx(g_shared.cublas, CUBLAS_OP_T, CUBLAS_OP_N, N, int(m), K, &alpha, w,
                                           CUDA_R_16F, K, a, CUDA_R_16F, K, &beta, y, CUDA_R_16F, N,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return st == CUBLAS_STATUS_SUCCESS ? nullptr : f16_error("cublasGemmEx failed with status " + std::to_string(int(st)));
  }
  const int64_t chunk_rows = std::max<int64_t>(1, int64_t(scratch_halves()) / N);
  for (int64_t r0 = 0; r0 < m; r0 += chunk_rows) {
    const int r = int(std::min<int64_t>(chunk_rows, m - r0));
    const cublasStatus_t st = cublasGemmEx(g_shared.cublas, CUBLAS_OP_T, CUBLAS_OP_N, N, r, K, &alpha, w, CUDA_R_16F,
                                           K, a + r0 * K, CUDA_R_16F, K, &beta, g_shared.product, CUDA_R_16F, N,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) return f16_error("cublasGemmEx failed with status " + std::to_string(int(st)));
    const int64_t pairs = int64_t(r) * (N / 2);
    const int g2 = int(std::min<int64_t>((pairs + 255) / 256, 65535));
    swiglu_rows<<<g2, 256, 0, stream>>>(g_shared.product, r, N, y + r0 * (N / 2), N / 2, 0);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return f16_error(std::string("swiglu launch: ") + cudaGetErrorString(err));
  }
  return nullptr;
}

OrtStatus* launch_f16(const F16Kernel& kn, const half* a, int64_t m, const half* w, half* y, const RowNorm& nm,
                      cudaStream_t stream) {
  const int K = int(kn.K), N = int(kn.N);
  const bool act = kn.activation == 1;
  if (m == 1 && K <= kF16GemvMaxK) {
    const F16Plan plan = f16_plan(K, N, act, f16_tuned());
    if (kn.norm) launch_f16_gemv_rows<true>(plan.rows, plan.split, act, a, w, y, K, N, nm, stream);
    else launch_f16_gemv_rows<false>(plan.rows, plan.split, act, a, w, y, K, N, nm, stream);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : f16_error(std::string("f16_gemv launch: ") + cudaGetErrorString(err));
  }
  if (g_shared.cublas == nullptr || (act && g_shared.product == nullptr) || (kn.norm && g_shared.scratch == nullptr))
    ORT_TRY(ensure_shared(act, kn.norm));
  if (cublasSetStream(g_shared.cublas, stream) != CUBLAS_STATUS_SUCCESS) return f16_error("cublasSetStream failed");
  if (cublasSetWorkspace(g_shared.cublas, g_shared.workspace, cublas_workspace_bytes()) != CUBLAS_STATUS_SUCCESS)
    return f16_error("cublasSetWorkspace failed");
  if (!kn.norm) return f16_gemm_rows(kn, a, m, w, y, stream);
  const int64_t out_n = act ? N / 2 : N;
  return norm_rows_then(a, m, K, nm, g_shared.scratch, stream, f16_error, [&](int64_t r0, int r) {
    return f16_gemm_rows(kn, g_shared.scratch, r, w, y + r0 * out_n, stream);
  });
}

OrtStatus* ORT_API_CALL compute_f16(void* kernel, OrtKernelContext* ctx) {
  const auto& kn = *static_cast<F16Kernel*>(kernel);
  const size_t n_in = kn.norm ? 4 : 2;
  const OrtValue* in[4] = {nullptr, nullptr, nullptr, nullptr};
  for (size_t i = 0; i < n_in; ++i) ORT_TRY(g_api->KernelContext_GetInput(ctx, i, &in[i]));
  for (size_t i = 0; i < n_in; ++i)
    if (in[i] == nullptr) return f16_error(kn.norm ? "A, skip, gamma and W are required" : "A and W are required");
  int64_t dims[8] = {0};
  size_t rank = 0;
  int64_t m = 1;
  ORT_TRY(row_shape(in[0], kn.norm ? "NormMatMulF16" : "MatMulF16", "A", dims, &rank, &m));
  if (dims[rank - 1] != kn.K)
    return f16_error("A's last dimension is " + std::to_string(dims[rank - 1]) + ", the node's K is " + std::to_string(kn.K));
  RowNorm nm;
  if (kn.norm) ORT_TRY(read_row_norm(ctx, in, "NormMatMulF16", m, kn.K, kn.eps, dims, rank, &nm));
  dims[rank - 1] = kn.activation == 1 ? kn.N / 2 : kn.N;
  OrtValue* out = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, dims, rank, &out));
  if (m == 0) return nullptr;
  void *pa = nullptr, *pw = nullptr, *py = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[0]), &pa));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[n_in - 1]), &pw));
  ORT_TRY(g_api->GetTensorMutableData(out, &py));
  void* stream = nullptr;
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  return launch_f16(kn, static_cast<const half*>(pa), m, static_cast<const half*>(pw), static_cast<half*>(py), nm,
                    static_cast<cudaStream_t>(stream));
}

const char* ORT_API_CALL f16_name(const OrtCustomOp*) { return "MatMulF16"; }
size_t ORT_API_CALL f16_input_count(const OrtCustomOp*) { return 2; }

OrtCustomOp g_matmul_f16 = derived_op(f16_name, swiglu_input_type /* every input fp16 */, f16_input_count, create_f16,
                                      compute_f16, destroy_of<F16Kernel>);

const char* ORT_API_CALL norm_f16_name(const OrtCustomOp*) { return "NormMatMulF16"; }
size_t ORT_API_CALL norm_f16_input_count(const OrtCustomOp*) { return 4; }
size_t ORT_API_CALL norm_f16_output_count(const OrtCustomOp*) { return 2; }

OrtCustomOp make_norm_f16_op() {
  OrtCustomOp op = derived_op(norm_f16_name, swiglu_input_type, norm_f16_input_count, create_norm_f16, compute_f16,
                              destroy_of<F16Kernel>);
  op.GetOutputTypeCount = norm_f16_output_count;
  return op;
}

OrtCustomOp g_norm_matmul_f16 = make_norm_f16_op();

// ---- NormMatMulNBitsTiled: MatMulNBitsTiled with the SkipSimplifiedLayerNormalization in front folded in -------
// Inputs A, skip (A's shape), gamma [K] (fp16), B (uint8), SZ (fp16); attributes as MatMulNBitsTiled's plus
// epsilon; outputs Y and S = A + skip (launch_norm).

const char* ORT_API_CALL norm_nbits_name(const OrtCustomOp*) { return "NormMatMulNBitsTiled"; }
ONNXTensorElementDataType ORT_API_CALL norm_nbits_input_type(const OrtCustomOp*, size_t index) {
  return index == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
size_t ORT_API_CALL norm_nbits_input_count(const OrtCustomOp*) { return 5; }

OrtCustomOp make_norm_nbits_op() {
  OrtCustomOp op = derived_op(norm_nbits_name, norm_nbits_input_type, norm_nbits_input_count, create_norm_nbits,
                              compute, destroy_of<NBitsKernel>);
  op.GetOutputTypeCount = norm_f16_output_count;
  return op;
}

OrtCustomOp g_norm_matmul_nbits = make_norm_nbits_op();

// ---- CachedAttention ------------------------------------------------------------------------------------------

struct AttnKernel {
  int64_t num_heads = 0, kv_num_heads = 0;
  float scale = 0.f;  // 0: 1 / sqrt(head size)
  int sms = 132;
};

constexpr size_t kAttnPartialFloats = size_t(1) << 20;  // decode splits' partial outputs (4 MiB), made once
constexpr size_t kAttnPartialSlots = size_t(1) << 15;   // and their (max, sum) pairs

struct AttnScratch {
  std::mutex lock;
  float* partial_o = nullptr;
  float2* partial_ml = nullptr;
  unsigned* counters = nullptr;  // per (row, KV head): splits finished; zero between calls
};
AttnScratch g_attn;

OrtStatus* attn_error(const std::string& what, OrtErrorCode code = ORT_EP_FAIL) {
  return g_api->CreateStatus(code, ("leptonc CachedAttention: " + what).c_str());
}

OrtStatus* ORT_API_CALL create_attn(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  auto* kn = new AttnKernel();
  OrtStatus* st = nullptr;
  if ((st = read_int_attr(info, "num_heads", &kn->num_heads)) || (st = read_int_attr(info, "kv_num_heads", &kn->kv_num_heads))) {
    delete kn;
    return st;
  }
  if ((st = api->KernelInfoGetAttribute_float(info, "scale", &kn->scale)) != nullptr) {  // absent: 1 / sqrt(D)
    api->ReleaseStatus(st);
    kn->scale = 0.f;
  }
  const int64_t h = kn->num_heads, kvh = kn->kv_num_heads;
  if (h <= 0 || kvh <= 0 || h % kvh != 0 || h / kvh > leptonc_attn::kMaxGroup) {
    const std::string msg = "unsupported attributes num_heads=" + std::to_string(h) + " kv_num_heads=" +
                            std::to_string(kvh) + " (num_heads must be a multiple of kv_num_heads, at most " +
                            std::to_string(leptonc_attn::kMaxGroup) + " times it)";
    delete kn;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, ("leptonc CachedAttention: " + msg).c_str());
  }
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) == cudaSuccess && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && sms > 0)
    kn->sms = sms;
  {  // the splits' scratch, before any capture; shared by every node (they run one after another on one stream)
    std::lock_guard<std::mutex> guard(g_attn.lock);
    if (g_attn.partial_o == nullptr) {
      cudaError_t err = cudaMalloc(&g_attn.partial_o, kAttnPartialFloats * sizeof(float));
      if (err == cudaSuccess) err = cudaMalloc(&g_attn.partial_ml, kAttnPartialSlots * sizeof(float2));
      if (err == cudaSuccess) err = cudaMalloc(&g_attn.counters, kAttnPartialSlots * sizeof(unsigned));
      if (err == cudaSuccess) err = cudaMemset(g_attn.counters, 0, kAttnPartialSlots * sizeof(unsigned));
      if (err == cudaSuccess) err = cudaDeviceSynchronize();  // zero before any stream of ONNX Runtime's uses them
      if (err != cudaSuccess) {
        delete kn;
        return attn_error(std::string("cudaMalloc(split scratch): ") + cudaGetErrorString(err));
      }
    }
  }
  *kernel = kn;
  return nullptr;
}

// The dimensions of input `index` into dims (rank `rank` required).
OrtStatus* attn_dims(OrtKernelContext* ctx, size_t index, size_t rank, const char* what, int64_t* dims,
                     const OrtValue** value) {
  ORT_TRY(g_api->KernelContext_GetInput(ctx, index, value));
  if (*value == nullptr) return attn_error(std::string(what) + " is required");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ORT_TRY(g_api->GetTensorTypeAndShape(*value, &info));
  size_t got = 0;
  OrtStatus* st = g_api->GetDimensionsCount(info, &got);
  if (st == nullptr && got != rank)
    st = attn_error(std::string(what) + " must have rank " + std::to_string(rank) + ", not " + std::to_string(got));
  if (st == nullptr && rank > 0) st = g_api->GetDimensions(info, dims, rank);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

OrtStatus* ORT_API_CALL compute_attn(void* kernel, OrtKernelContext* ctx) {
  const auto& kn = *static_cast<AttnKernel*>(kernel);
  const OrtValue *qkv = nullptr, *past_k = nullptr, *past_v = nullptr, *seqlens = nullptr, *total = nullptr,
                 *cos = nullptr, *sin = nullptr;
  int64_t q_dims[3], k_dims[4], v_dims[4], s_dims[1], c_dims[2], n_dims[2];
  ORT_TRY(attn_dims(ctx, 0, 3, "qkv", q_dims, &qkv));
  ORT_TRY(attn_dims(ctx, 1, 4, "past_key", k_dims, &past_k));
  ORT_TRY(attn_dims(ctx, 2, 4, "past_value", v_dims, &past_v));
  ORT_TRY(attn_dims(ctx, 3, 1, "seqlens_k", s_dims, &seqlens));
  ORT_TRY(g_api->KernelContext_GetInput(ctx, 4, &total));
  if (total == nullptr) return attn_error("total_sequence_length is required");
  ORT_TRY(attn_dims(ctx, 5, 2, "cos_cache", c_dims, &cos));
  ORT_TRY(attn_dims(ctx, 6, 2, "sin_cache", n_dims, &sin));
  const int64_t B = q_dims[0], S = q_dims[1], H = kn.num_heads, KVH = kn.kv_num_heads, D = k_dims[3], C = k_dims[2];
  if (k_dims[0] != B || k_dims[1] != KVH || std::memcmp(k_dims, v_dims, sizeof(k_dims)) != 0 || s_dims[0] != B)
    return attn_error("past_key and past_value must both be [B, kv_num_heads, C, D] and seqlens_k [B], with B = qkv's");
  if (D != 64 && D != 128) return attn_error("head size " + std::to_string(D) + " (the kernels serve 64 and 128)");
  if (q_dims[2] != (H + 2 * KVH) * D)
    return attn_error("qkv's last dimension is " + std::to_string(q_dims[2]) + ", not (num_heads + 2 kv_num_heads) x " +
                      std::to_string(D));
  if (c_dims[0] < 1 || c_dims[1] != D / 2 || n_dims[0] != c_dims[0] || n_dims[1] != c_dims[1])
    return attn_error("cos_cache and sin_cache must both be [positions >= 1, head size / 2]");
  void* total_data = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(total), &total_data));
  const int64_t total_len = *static_cast<const int32_t*>(total_data);  // host memory (input_memory below)
  const int64_t present_len = std::max(C, total_len);
  if (S < 1 || S > present_len)
    return attn_error(std::to_string(S) + " new tokens do not fit a cache of " + std::to_string(present_len));

  int64_t out_dims[3] = {B, S, H * D}, present_dims[4] = {B, KVH, present_len, D};
  OrtValue *out = nullptr, *present_k = nullptr, *present_v = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, out_dims, 3, &out));
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 1, present_dims, 4, &present_k));
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 2, present_dims, 4, &present_v));
  if (B == 0) return nullptr;
  void *p_qkv, *p_pk, *p_pv, *p_seq, *p_cos, *p_sin, *p_out, *p_k, *p_v;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(qkv), &p_qkv));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(past_k), &p_pk));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(past_v), &p_pv));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(seqlens), &p_seq));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(cos), &p_cos));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(sin), &p_sin));
  ORT_TRY(g_api->GetTensorMutableData(out, &p_out));
  ORT_TRY(g_api->GetTensorMutableData(present_k, &p_k));
  ORT_TRY(g_api->GetTensorMutableData(present_v, &p_v));
  void* stream_ptr = nullptr;
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream_ptr));
  const auto stream = static_cast<cudaStream_t>(stream_ptr);

  // present is past (one buffer, appended in place), or a copy of it with room for the new entries
  if ((p_k == p_pk) != (p_v == p_pv) || ((p_k == p_pk) && present_len != C))
    return attn_error("present_key/present_value share memory with past_key/past_value inconsistently");
  if (p_k != p_pk && C > 0) {
    const size_t row = size_t(C) * D * sizeof(half), pitch = size_t(present_len) * D * sizeof(half);
    for (auto [dst, src] : {std::pair<void*, void*>{p_k, p_pk}, std::pair<void*, void*>{p_v, p_pv}}) {
      const cudaError_t err = cudaMemcpy2DAsync(dst, pitch, src, row, row, size_t(B * KVH), cudaMemcpyDeviceToDevice, stream);
      if (err != cudaSuccess) return attn_error(std::string("copying past into present: ") + cudaGetErrorString(err));
    }
  }

  leptonc_attn::Params p{};
  p.qkv = static_cast<const half*>(p_qkv);
  p.k_cache = static_cast<half*>(p_k);
  p.v_cache = static_cast<half*>(p_v);
  p.seqlens = static_cast<const int32_t*>(p_seq);
  p.cos = static_cast<const half*>(p_cos);
  p.sin = static_cast<const half*>(p_sin);
  p.out = static_cast<half*>(p_out);
  p.partial_o = g_attn.partial_o;
  p.partial_ml = g_attn.partial_ml;
  p.counters = g_attn.counters;  // B * KVH <= B * H * splits <= kAttnPartialSlots (checked below)
  p.B = int(B), p.S = int(S), p.H = int(H), p.KVH = int(KVH), p.D = int(D), p.C = int(present_len), p.P = int(c_dims[0]);
  p.first_prompt = total_len == S ? 1 : 0;
  p.splits = 1;
  if (S == 1) {
    p.splits = leptonc_attn::decode_splits(p.B, p.KVH, p.C, kn.sms);
    while (p.splits > 1 && (size_t(B * H) * p.splits * D > kAttnPartialFloats || size_t(B * H) * p.splits > kAttnPartialSlots))
      --p.splits;
  }
  const float scale = kn.scale > 0.f ? kn.scale : 1.f / std::sqrt(float(D));
  p.scale_log2 = scale * 1.4426950408889634f;
  p.kv_prefetch = leptonc_attn::attn_kv_prefetch();
  if (!leptonc_attn::launch(p, stream)) return attn_error("shapes outside what the kernels serve");
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : attn_error(std::string("launch: ") + cudaGetErrorString(err));
}

const char* ORT_API_CALL attn_name(const OrtCustomOp*) { return "CachedAttention"; }
size_t ORT_API_CALL attn_input_count(const OrtCustomOp*) { return 7; }
size_t ORT_API_CALL attn_output_count(const OrtCustomOp*) { return 3; }
ONNXTensorElementDataType ORT_API_CALL attn_input_type(const OrtCustomOp*, size_t index) {
  return (index == 3 || index == 4) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
// total_sequence_length is read on the host (as GroupQueryAttention reads it): a captured step keeps its value.
OrtMemType ORT_API_CALL attn_input_memory(const OrtCustomOp*, size_t index) {
  return index == 4 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
}

OrtCustomOp make_attn_op() {
  OrtCustomOp op = derived_op(attn_name, attn_input_type, attn_input_count, create_attn, compute_attn, destroy_of<AttnKernel>);
  op.GetOutputTypeCount = attn_output_count;
  op.GetInputMemoryType = attn_input_memory;
  return op;
}

OrtCustomOp g_cached_attention = make_attn_op();

// ---- LogitsArgMax: the LM head's fp16 rows -> the float32 logits output and the greedy token, one kernel --------
// Inputs X fp16 [R, V] (the head's product), logits_positions int64 [B, K] (read for its shape only: R = B K).
// Outputs logits float32 [B, K, V] (X converted) and next_token int64 [B, K] (the first index of each row's
// maximum; a NaN counts as the maximum, as in numpy). It replaces the graph's Cast, Reshape and ArgMax
// (passes/use_kernels.py), which ran three ONNX Runtime kernels and a copy at the end of every decode step. A row
// is read in chunks of kArgmaxChunk values by one block each; the last block of a row to finish (an atomic count)
// reduces the chunks' (max, index) pairs. Launched with PDL: it waits for the head before reading X.

constexpr int kArgmaxThreads = 256;
constexpr int kArgmaxChunk = kArgmaxThreads * 8;  // values a block: one 16-byte load a thread
constexpr int kArgmaxMaxChunks = kArgmaxThreads;  // the last block reduces one pair a thread
constexpr int kArgmaxRows = 1 << 12;              // rows split into chunks at most (counters)
constexpr int kArgmaxSlots = 1 << 16;             // chunks' (max, index) pairs

struct ArgmaxScratch {
  std::mutex lock;
  float* max = nullptr;
  int* index = nullptr;
  unsigned* counters = nullptr;  // per row: chunks finished; zero between calls (the last chunk resets it)
};
ArgmaxScratch g_argmax;

// (m, i) <- the better of (m, i) and (m2, i2): larger value, NaN above everything, the lower index on ties; i < 0
// is empty.
__device__ __forceinline__ void argmax_merge(float& m, int& i, float m2, int i2) {
  if (i2 < 0) return;
  bool take;
  if (i < 0) take = true;
  else if (isnan(m2)) take = !isnan(m) || i2 < i;
  else take = !isnan(m) && (m2 > m || (m2 == m && i2 < i));
  if (take) m = m2, i = i2;
}

// The block's best (m, i), valid in thread 0.
__device__ __forceinline__ void argmax_block(float& m, int& i) {
  __shared__ float sm[kArgmaxThreads / 32];
  __shared__ int si[kArgmaxThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off /= 2)
    argmax_merge(m, i, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, i, off));
  if (threadIdx.x % 32 == 0) sm[threadIdx.x / 32] = m, si[threadIdx.x / 32] = i;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < kArgmaxThreads / 32; ++w) argmax_merge(m, i, sm[w], si[w]);
  // read before any later write of sm/si by the caller's next use: the callers call this at most once between syncs
}

__global__ void __launch_bounds__(kArgmaxThreads)
logits_argmax(const half* __restrict__ X, int rows, int V, int chunks, float* __restrict__ logits,
              int64_t* __restrict__ token, float* part_max, int* part_index, unsigned* counters) {
  pdl_trigger();
  pdl_wait();  // X is the head's output
  const int span = ((V + chunks - 1) / chunks + 7) / 8 * 8;
  const bool vec = V % 8 == 0;  // rows start 16-byte aligned
  for (int row = blockIdx.y; row < rows; row += gridDim.y) {
    const int begin = blockIdx.x * span, end = min(V, begin + span);
    const half* x = X + size_t(row) * V;
    float* out = logits + size_t(row) * V;
    float m = 0.f;
    int idx = -1;
    if (vec) {
      for (int k = begin + threadIdx.x * 8; k < end; k += kArgmaxThreads * 8) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + k));
        const half2* h = reinterpret_cast<const half2*>(&raw);
        float f[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 v = __half22float2(h[j]);
          f[2 * j] = v.x, f[2 * j + 1] = v.y;
        }
        reinterpret_cast<float4*>(out + k)[0] = make_float4(f[0], f[1], f[2], f[3]);
        reinterpret_cast<float4*>(out + k)[1] = make_float4(f[4], f[5], f[6], f[7]);
#pragma unroll
        for (int j = 0; j < 8; ++j) argmax_merge(m, idx, f[j], k + j);
      }
    } else {
      for (int k = begin + threadIdx.x; k < end; k += kArgmaxThreads) {
        const float f = __half2float(x[k]);
        out[k] = f;
        argmax_merge(m, idx, f, k);
      }
    }
    argmax_block(m, idx);
    if (chunks == 1) {
      if (threadIdx.x == 0) token[row] = idx;
      __syncthreads();
      continue;
    }
    __shared__ bool is_last;
    if (threadIdx.x == 0) {
      part_max[size_t(row) * chunks + blockIdx.x] = m;
      part_index[size_t(row) * chunks + blockIdx.x] = idx;
      __threadfence();  // the pair is visible before the count
      is_last = atomicAdd(counters + row, 1u) == unsigned(chunks - 1);
      if (is_last) counters[row] = 0u;
    }
    __syncthreads();
    if (!is_last) continue;
    __threadfence();
    m = 0.f, idx = -1;
    if (threadIdx.x < chunks) {
      m = __ldcg(part_max + size_t(row) * chunks + threadIdx.x);
      idx = __ldcg(part_index + size_t(row) * chunks + threadIdx.x);
    }
    __syncthreads();  // argmax_block's shared pairs are free again
    argmax_block(m, idx);
    if (threadIdx.x == 0) token[row] = idx;
    __syncthreads();
  }
}

OrtStatus* argmax_error(const std::string& what, OrtErrorCode code = ORT_EP_FAIL) {
  return g_api->CreateStatus(code, ("leptonc LogitsArgMax: " + what).c_str());
}

struct ArgmaxKernel {};

OrtStatus* ORT_API_CALL create_argmax(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** kernel) {
  std::lock_guard<std::mutex> guard(g_argmax.lock);  // the scratch, before any capture; shared by every node
  if (g_argmax.max == nullptr) {
    cudaError_t err = cudaMalloc(&g_argmax.max, kArgmaxSlots * sizeof(float));
    if (err == cudaSuccess) err = cudaMalloc(&g_argmax.index, kArgmaxSlots * sizeof(int));
    if (err == cudaSuccess) err = cudaMalloc(&g_argmax.counters, kArgmaxRows * sizeof(unsigned));
    if (err == cudaSuccess) err = cudaMemset(g_argmax.counters, 0, kArgmaxRows * sizeof(unsigned));
    if (err == cudaSuccess) err = cudaDeviceSynchronize();  // zero before any stream of ONNX Runtime's uses them
    if (err != cudaSuccess) return argmax_error(std::string("cudaMalloc(scratch): ") + cudaGetErrorString(err));
  }
  *kernel = new ArgmaxKernel();
  return nullptr;
}

// Chunks a row for `rows` rows of V values: enough blocks to read a decode step's rows in parallel, one block a row
// where the rows alone fill the GPU or the scratch would not hold the pairs.
inline int argmax_chunks(int64_t rows, int64_t V) {
  int64_t chunks = std::min<int64_t>((V + kArgmaxChunk - 1) / kArgmaxChunk, kArgmaxMaxChunks);
  if (chunks < 2 || rows > kArgmaxRows || rows * chunks > kArgmaxSlots || rows >= 2 * 132) chunks = 1;
  return int(chunks);
}

OrtStatus* ORT_API_CALL compute_argmax(void*, OrtKernelContext* ctx) {
  const OrtValue *x = nullptr, *pos = nullptr;
  int64_t x_dims[2], p_dims[2];
  ORT_TRY(attn_dims(ctx, 0, 2, "X", x_dims, &x));
  ORT_TRY(attn_dims(ctx, 1, 2, "logits_positions", p_dims, &pos));
  const int64_t R = x_dims[0], V = x_dims[1], B = p_dims[0], K = p_dims[1];
  if (R != B * K)
    return argmax_error("X has " + std::to_string(R) + " rows; logits_positions [" + std::to_string(B) + ", " +
                        std::to_string(K) + "] asks for " + std::to_string(B * K), ORT_INVALID_ARGUMENT);
  if (V < 1 || V > INT_MAX / 2 || R > INT_MAX) return argmax_error("shapes outside what the kernel serves", ORT_INVALID_ARGUMENT);
  int64_t l_dims[3] = {B, K, V};
  OrtValue *logits = nullptr, *token = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, l_dims, 3, &logits));
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 1, p_dims, 2, &token));
  if (R == 0) return nullptr;
  void *px = nullptr, *pl = nullptr, *pt = nullptr, *stream = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(x), &px));
  ORT_TRY(g_api->GetTensorMutableData(logits, &pl));
  ORT_TRY(g_api->GetTensorMutableData(token, &pt));
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  const int chunks = argmax_chunks(R, V);
  const dim3 grid(chunks, unsigned(std::min<int64_t>(R, 65535)));
  const cudaError_t err = launch_dependent(logits_argmax, grid, dim3(kArgmaxThreads), 0, static_cast<cudaStream_t>(stream),
                                           static_cast<const half*>(px), int(R), int(V), chunks, static_cast<float*>(pl),
                                           static_cast<int64_t*>(pt), g_argmax.max, g_argmax.index, g_argmax.counters);
  return err == cudaSuccess ? nullptr : argmax_error(std::string("launch: ") + cudaGetErrorString(err));
}

const char* ORT_API_CALL argmax_name(const OrtCustomOp*) { return "LogitsArgMax"; }
size_t ORT_API_CALL two(const OrtCustomOp*) { return 2; }
ONNXTensorElementDataType ORT_API_CALL argmax_input_type(const OrtCustomOp*, size_t index) {
  return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}
ONNXTensorElementDataType ORT_API_CALL argmax_output_type(const OrtCustomOp*, size_t index) {
  return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}

OrtCustomOp make_argmax_op() {
  OrtCustomOp op = derived_op(argmax_name, argmax_input_type, two, create_argmax, compute_argmax, destroy_of<ArgmaxKernel>);
  op.GetOutputTypeCount = two;
  op.GetOutputType = argmax_output_type;
  return op;
}

OrtCustomOp g_logits_argmax = make_argmax_op();

// ---- MaskLengths: seqlens_k = ReduceSum(attention_mask, axis 1) - 1 as int32, one kernel for three ----------------
// Input attention_mask int64 [B, T]; output int32 [B]. passes/use_kernels.py puts it where the graph computes
// CachedAttention's seqlens_k from the mask. It is launched WITHOUT programmatic dependent launch and never
// triggers its dependents early, so the kernel after it starts only once it has finished: the decode attention
// reads seqlens_k before its own dependency wait (attention.cuh, attn_kv_prefetch), which this keeps sound.

__global__ void __launch_bounds__(256) mask_lengths(const int64_t* __restrict__ mask, int64_t T, int32_t* __restrict__ out) {
  __shared__ long long partial[8];
  const int64_t* row = mask + size_t(blockIdx.x) * T;
  long long sum = 0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) sum += row[t];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long total = 0;
    for (int w = 0; w < int(blockDim.x / 32); ++w) total += partial[w];
    out[blockIdx.x] = int32_t(total - 1);  // ONNX Cast int64 -> int32 keeps the low 32 bits, as this does
  }
}

struct MaskLengthsKernel {};

OrtStatus* ORT_API_CALL create_mask_lengths(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** kernel) {
  *kernel = new MaskLengthsKernel();
  return nullptr;
}

OrtStatus* ORT_API_CALL compute_mask_lengths(void*, OrtKernelContext* ctx) {
  const OrtValue* mask = nullptr;
  int64_t dims[2];
  ORT_TRY(attn_dims(ctx, 0, 2, "attention_mask", dims, &mask));
  OrtValue* out = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, dims, 1, &out));
  if (dims[0] == 0) return nullptr;
  if (dims[0] > INT_MAX)
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, "leptonc MaskLengths: more rows than the kernel serves");
  void *pm = nullptr, *po = nullptr, *stream = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(mask), &pm));
  ORT_TRY(g_api->GetTensorMutableData(out, &po));
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  mask_lengths<<<unsigned(dims[0]), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const int64_t*>(pm), dims[1], static_cast<int32_t*>(po));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr
                            : g_api->CreateStatus(ORT_EP_FAIL, (std::string("leptonc MaskLengths: launch: ") +
                                                                cudaGetErrorString(err)).c_str());
}

const char* ORT_API_CALL mask_lengths_name(const OrtCustomOp*) { return "MaskLengths"; }
size_t ORT_API_CALL one(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL int64_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64; }
ONNXTensorElementDataType ORT_API_CALL int32_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32; }

OrtCustomOp make_mask_lengths_op() {
  OrtCustomOp op = derived_op(mask_lengths_name, int64_type, one, create_mask_lengths, compute_mask_lengths,
                              destroy_of<MaskLengthsKernel>);
  op.GetOutputType = int32_type;
  return op;
}

OrtCustomOp g_mask_lengths = make_mask_lengths_op();

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (g_api == nullptr) {
    std::fprintf(stderr, "leptonc kernels: this ONNX Runtime (%s) is older than the API version %d they were built for\n",
                 api_base->GetVersionString(), ORT_API_VERSION);
    return nullptr;  // no OrtApi to make a status with; ONNX Runtime then fails on the unknown op
  }
  OrtCustomOpDomain* domain = nullptr;
  ORT_TRY(g_api->CreateCustomOpDomain("ai.leptonc", &domain));
  ORT_TRY(g_api->CustomOpDomain_Add(domain, &g_matmul_tiled));
  ORT_TRY(g_api->CustomOpDomain_Add(domain, &g_swiglu));
  ORT_TRY(g_api->CustomOpDomain_Add(domain, &g_matmul_f16));
  ORT_TRY(g_api->CustomOpDomain_Add(domain, &g_norm_matmul_f16));
  ORT_TRY(g_api->CustomOpDomain_Add(domain, &g_norm_matmul_nbits));
  ORT_TRY(g_api->CustomOpDomain_Add(domain, &g_cached_attention));
  ORT_TRY(g_api->CustomOpDomain_Add(domain, &g_logits_argmax));
  ORT_TRY(g_api->CustomOpDomain_Add(domain, &g_mask_lengths));
  return g_api->AddCustomOpDomain(options, domain);
}
