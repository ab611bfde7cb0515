// The int4/int8 (MatMulNBits layout) product kernels: the streaming tiled kernel (mma, M <= 16) and its
// 16-row-groups form (M <= 64), the prefill path's tile dequantization for cuBLAS, and the SwiGLU kernels over
// gate|up rows. The few-rows kernel (batch-1 decode) is in nbits_gemv.cuh.
//
// Part of leptonc_cuda.cu's single translation unit: included once, in the order listed there, after the
// headers and definitions before it.

#pragma once

namespace {

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
  static __device__ __forceinline__ half2 scale2_of(T e) { return __low2half2(e); }
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
  static __device__ __forceinline__ half2 scale2_of(T e) { return __half2half2(e); }
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

// ---- 17 to 64 rows (decode at batch 17..64): one pass over the weights for every 8-row group ----------------
//
// tiled_stream's layout and tiles with the operands' roles swapped: two tiles' dequantized columns are the A operand
// (16 output columns x 16 k) and 8 rows of A are the B operand (16 k x 8 rows), so that each weight fragment a warp
// loads meets every 8-row group of A and the weights are read once for M <= 64 rows. Swapped, a lane's 16-byte load
// of one row of A is the B operands of two products as they stand (register pairs, no moves), and the A operand is
// made in place from the weight words. The unswapped form (16 rows a product) spent four register moves and a warp
// sync on each mma, and 64-bit address arithmetic on each load of A: its loop ran 12.6 instructions an mma in the
// 8-bit LM head's instance and 17.7 in qkv's (cuobjdump), issue-bound at 12.5% occupancy (H100, ncu, 2026-12-07: the
// LM head at M = 64 took 290 us, above fp16's 196 us); this loop runs 5.6 and 7.3. NB, the 8-row groups, is a
// template argument so that no mma is predicated.
// A warp takes NT tiles (NT / 2 operands), so each load of A serves NT x 8 columns; a block's warps form wn columns of
// NT tiles each and split K among the warps of a column, so the wn warps on one step load the same A, which L1 then
// serves (wn = 1: tiled_stream's split of K). The scale is folded into the A operands, fp16((q - z) x s), the value
// the prefill path's dequantization gives, so the accumulators (NT / 2 x NB x 4 fp32) are the only state kept per
// group.
constexpr int kRowGroupsMax = 8;  // 8-row groups of A one launch serves: M <= 64
constexpr int kGroupWarps = 8;    // warps a block at most (wn columns x the warps that split K)
constexpr int kEpilogueGroups = 2;  // 8-row groups the epilogue adds up at a time (shared memory: NT x 8 KiB)

template <int BITS, int NT, int PB, int NB, bool SYM>
__global__ void __launch_bounds__(kGroupWarps * 32, 1)
tiled_stream_groups(const half* __restrict__ A, int M, const uint4* __restrict__ B,
                    const typename Sz<SYM>::T* __restrict__ SZ, half* __restrict__ Y, int K, int N, int steps,
                    int block, int blocks_t, int wn, bool act) {
  constexpr int kStepK = Step<BITS>::kK, kProducts = Step<BITS>::kProducts, kPairs = kProducts / 2;
  constexpr int G = kProducts / PB;  // scale groups a step
  constexpr int NP = NT / 2;         // 16-column A operands a warp
  static_assert(PB % 2 == 0 && kProducts % PB == 0, "a scale group is whole product pairs of one step");
  static_assert(NT % 2 == 0 && NB % kEpilogueGroups == 0, "tiles in pairs, groups in the epilogue's steps");
  using E = typename Sz<SYM>::T;
  // a column's partial sums, kEpilogueGroups groups at a time: [warp][operand][group][C element][lane]
  __shared__ float red[kGroupWarps][NP][kEpilogueGroups][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n_tiles = (N + 7) >> 3;
  const int wk = warp / wn, k_warps = warps / wn;  // this warp's place in its column, and the column's warps
  const int tile0 = (blockIdx.x * wn + warp % wn) * NT;  // this warp's tiles
  pdl_trigger();
  const E* sz_tile[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) sz_tile[j] = SZ + size_t(min(tile0 + j, n_tiles - 1)) * blocks_t * 8 + g;

  float acc[NP][NB][4];
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) acc[p][nb][0] = acc[p][nb][1] = acc[p][nb][2] = acc[p][nb][3] = 0.f;

  // Addresses are made once, as 32-bit offsets: in the loop a load is the step's pointer, a row's offset and a
  // constant. Rows past M and tiles past N read row M - 1 and the last tile instead of zeros (no predicate, no
  // zeroing): a row of A is a column of the products and a tile its own columns, so they only make outputs never
  // written.
  const uint4* b_tile[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) b_tile[j] = B + size_t(min(tile0 + j, n_tiles - 1)) * steps * 32 + lane;
  int row_off[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) row_off[nb] = min(8 * nb + g, M - 1) * K + 8 * t;
  uint4 cur[NT], nxt[NT];
  auto load_w = [&](uint4 (&w)[NT], int step) {
#pragma unroll
    for (int j = 0; j < NT; ++j) w[j] = __ldg(b_tile[j] + step * 32);
  };
  // One step of K; FULL: the whole step is within K (every step but a last partial one, where K % kStepK != 0)
  auto run_step = [&](int k_step, auto full) {
    constexpr bool FULL = decltype(full)::value;
    half2 zz[NT][G], s2[NT][G];  // column g's (1024 + zero point, scale) for each scale group of the step
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < G; ++q) {
        const E e = __ldg(sz_tile[j] + ((k_step + 16 * PB * q) / block) * 8);
        zz[j][q] = Sz<SYM>::zz_of(e);
        s2[j][q] = Sz<SYM>::scale2_of(e);
      }
    const half* a_step = A + k_step;
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      // products 2i, 2i + 1 of row 8 nb + g: k .. k + 7, words (0, 1) and (2, 3) their B operands
      uint4 x[NB];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
        x[nb] = FULL || k_step + 32 * i + 8 * t < K
                    ? __ldg(reinterpret_cast<const uint4*>(a_step + row_off[nb] + 32 * i))
                    : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int c = 2 * i + hh, h = 2 * hh, q = c / PB;
#pragma unroll
        for (int p = 0; p < NP; ++p) {
          // A: (column g of tile 2p, k 2t..), (column g of tile 2p + 1, k 2t..), then the same at k 2t + 8..
          uint32_t a0, a1, a2, a3;
          operands<BITS>(cur[2 * p], c, zz[2 * p][q], a0, a2);
          operands<BITS>(cur[2 * p + 1], c, zz[2 * p + 1][q], a1, a3);
          a0 = as_u32(__hmul2(as_h2(a0), s2[2 * p][q]));
          a2 = as_u32(__hmul2(as_h2(a2), s2[2 * p][q]));
          a1 = as_u32(__hmul2(as_h2(a1), s2[2 * p + 1][q]));
          a3 = as_u32(__hmul2(as_h2(a3), s2[2 * p + 1][q]));
#pragma unroll
          for (int nb = 0; nb < NB; ++nb)
            mma16816(acc[p][nb], a0, a1, a2, a3, word_of(x[nb], h), word_of(x[nb], h + 1));
        }
      }
    }
  };
  if (wk < steps) load_w(cur, wk);
  pdl_wait();  // A comes from the kernels before; the weights above do not (common.cuh)
  for (int step = wk; step < steps; step += k_warps) {
    if (step + k_warps < steps) load_w(nxt, step + k_warps);  // the next step's weights are in flight meanwhile
    const int k_step = step * kStepK;
    if (k_step + kStepK <= K)
      run_step(k_step, std::true_type());
    else
      run_step(k_step, std::false_type());
#pragma unroll
    for (int j = 0; j < NT; ++j) cur[j] = nxt[j];
  }

  // Add the partial sums of each column's warps, kEpilogueGroups groups at a time. C fragment of operand p, group nb:
  // c0, c1 = column g of tile 2p, rows 8 nb + 2t, + 1; c2, c3 = column g of tile 2p + 1, the same rows. The block's
  // outputs are taken with consecutive threads on consecutive columns: i = ((row x wn + column) x NT + tile) x 8 + cg.
#pragma unroll
  for (int nb0 = 0; nb0 < NB; nb0 += kEpilogueGroups) {
    if (8 * nb0 >= M) break;
#pragma unroll
    for (int p = 0; p < NP; ++p)
#pragma unroll
      for (int gg = 0; gg < kEpilogueGroups; ++gg)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[warp][p][gg][e][lane] = acc[p][nb0 + gg][e];
    __syncthreads();
    constexpr int kRows = 8 * kEpilogueGroups;
    if (act) {  // columns 2f, 2f + 1 of a tile are feature f's (gate, up): 4 features a tile
      for (int i = threadIdx.x; i < kRows * wn * NT * 4; i += blockDim.x) {
        const int f4 = i & 3, j = (i >> 2) % NT, c = (i >> 2) / NT % wn, rr = (i >> 2) / NT / wn;
        const int row = 8 * nb0 + rr, f = ((blockIdx.x * wn + c) * NT + j) * 4 + f4;
        if (row < M && 2 * f < N) {
          const int gg = rr >> 3, e = (j & 1) * 2 + (rr & 1), l = 4 * (2 * f4) + ((rr & 7) >> 1);
          float gate = 0.f, up = 0.f;
          for (int w = c; w < warps; w += wn) gate += red[w][j >> 1][gg][e][l], up += red[w][j >> 1][gg][e][l + 4];
          Y[size_t(row) * (N / 2) + f] = __float2half(silu_mul(gate, up));
        }
      }
    } else {
      for (int i = threadIdx.x; i < kRows * wn * NT * 8; i += blockDim.x) {
        const int cg = i & 7, j = (i >> 3) % NT, c = (i >> 3) / NT % wn, rr = (i >> 3) / NT / wn;
        const int row = 8 * nb0 + rr, n = ((blockIdx.x * wn + c) * NT + j) * 8 + cg;
        if (row < M && n < N) {
          const int gg = rr >> 3, e = (j & 1) * 2 + (rr & 1), l = 4 * cg + ((rr & 7) >> 1);
          float sum = 0.f;
          for (int w = c; w < warps; w += wn) sum += red[w][j >> 1][gg][e][l];
          Y[size_t(row) * N + n] = __float2half(sum);
        }
      }
    }
    __syncthreads();  // red is written again for the next groups
  }
}

// ---- the prefill path (M > 64): dequantize tiles, then cuBLAS -------------------------------------

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

// The same, eight features a thread: two 16-byte loads of P, one 16-byte store (swiglu_rows did 4-byte loads and 2-byte
// stores: 22.7 us for 512 rows x 16384 columns, 37% of the copy bandwidth, 16% of an fp16 prefill's GPU time on the
// H100). Needs cols % 16 == 0, and Y + f0 and ld_y on 8 halves; launch_swiglu_rows picks.
__global__ void swiglu_rows8(const half* __restrict__ P, int rows, int cols, half* __restrict__ Y, int ld_y, int f0) {
  const int vecs = cols / 16;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size_t(rows) * vecs;
       i += size_t(gridDim.x) * blockDim.x) {
    const int r = int(i / vecs), v = int(i % vecs);
    const uint4* src = reinterpret_cast<const uint4*>(P + size_t(r) * cols) + 2 * v;
    const uint4 in[2] = {src[0], src[1]};
    uint4 out;
    half* o = reinterpret_cast<half*>(&out);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 gu = __half22float2(reinterpret_cast<const half2*>(in)[j]);
      o[j] = __float2half(silu_mul(gu.x, gu.y));
    }
    *reinterpret_cast<uint4*>(Y + size_t(r) * ld_y + f0 + 8 * v) = out;
  }
}

cudaError_t launch_swiglu_rows(const half* P, int rows, int cols, half* Y, int ld_y, int f0, cudaStream_t stream) {
  const bool vec = cols % 16 == 0 && ld_y % 8 == 0 && f0 % 8 == 0 && reinterpret_cast<uintptr_t>(P) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(Y) % 16 == 0;
  const int64_t work = int64_t(rows) * (vec ? cols / 16 : cols / 2);
  const int grid = int(std::min<int64_t>((work + 255) / 256, 65535));
  if (vec)
    swiglu_rows8<<<grid, 256, 0, stream>>>(P, rows, cols, Y, ld_y, f0);
  else
    swiglu_rows<<<grid, 256, 0, stream>>>(P, rows, cols, Y, ld_y, f0);
  return cudaGetLastError();
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

}  // namespace
