// The custom-op plumbing every op shares (Shared buffers, errors, ORT_TRY, shape and attribute readers, the op
// record), MatMulNBitsTiled (the int4/int8 products) and SwiGLU.
//
// Part of leptonc_cuda.cu's single translation unit: included once, in the order listed there, after the
// headers and definitions before it.

#pragma once

namespace {

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
// Rows of A up to which decode (kSmallM < M <= kGroupsMaxM: batch 17..64) runs tiled_stream_groups, one pass over the
// weights for all rows; more rows take the prefill path (dequantize, cuBLAS), which writes and reads the weights in
// fp16: at batch 32 and 64 that made int4 decode 0.45x fp16's (H100, BENCHMARKS.md). kSmallM here turns it off.
constexpr int kGroupsMaxM = 8 * kRowGroupsMax;
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
    // smollm2's down: 72), so that more warps an SM stream K (H100, 2026-11-23: llama o
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
  if (m <= kGroupsMaxM) {
    // A's traffic from L2 is M x 256 / (NT x wn) bytes a 512-byte weight fragment at 4 bits (tiled_stream_groups):
    // NT tiles a warp, 4 where that still makes 128 blocks or more, else 2; then wn columns of warps a block, the most
    // of 8, 4, 2, 1 that still makes 128 blocks (llama-1b: gate|up NT 4 x wn 4, the LM head 4 x 8, qkv, o and down
    // 2 x 1). Scale groups of 32 (pb 2) keep NT at 2. NB: 4 groups of 8 rows up to M = 32, else 8.
    constexpr int kMinBlocks = 128;
    const int nt = n_tiles >= 4 * kMinBlocks && pb >= 4 ? 4 : 2;
    int wn = kGroupWarps;
    while (wn > 1 && n_tiles < wn * nt * kMinBlocks) wn /= 2;
    const int warps = wn * std::min(kGroupWarps / wn, steps);
    const int blocks = (n_tiles + wn * nt - 1) / (wn * nt);
#define LEPTONC_GROUPS(NT, PB, NB)                                                                                \
  launch_dependent(tiled_stream_groups<BITS, NT, PB, NB, SYM>, dim3(blocks), dim3(warps * 32), 0, stream, a, int(m), \
                   bw, szw, y, K, N, steps, block, blocks_t, wn, act)
#define LEPTONC_GROUPS_NT(PB, NB) (nt == 4 ? LEPTONC_GROUPS(4, PB, NB) : LEPTONC_GROUPS(2, PB, NB))
#define LEPTONC_GROUPS_PB(NB)                                                         \
  (pb >= Step<BITS>::kProducts ? LEPTONC_GROUPS_NT(Step<BITS>::kProducts, NB)         \
   : pb == 4                   ? LEPTONC_GROUPS_NT(4, NB)                             \
                               : LEPTONC_GROUPS(2, 2, NB))
    const cudaError_t e = m <= 32 ? LEPTONC_GROUPS_PB(4) : LEPTONC_GROUPS_PB(8);
#undef LEPTONC_GROUPS_PB
#undef LEPTONC_GROUPS_NT
#undef LEPTONC_GROUPS
    return cuda_check(e, "tiled_stream_groups launch");
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
      ORT_TRY(cuda_check(launch_swiglu_rows(g_shared.product, r, rows, y + r0 * (N / 2), N / 2, n_first / 2, stream),
                         "swiglu launch"));
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

}  // namespace
