// MatMulF16 and NormMatMulF16 (fp16 weights), and NormMatMulNBitsTiled's op record (the int4/int8 products with
// the norm folded in).
//
// Part of leptonc_cuda.cu's single translation unit: included once, in the order listed there, after the
// headers and definitions before it.

#pragma once

namespace {

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

template <int R, int S, bool NORM>
void launch_f16_gemv(bool act, const half* a, const half* w, half* y, int K, int N, const RowNorm& nm,
                     cudaStream_t stream) {
  const int grid = (N + (kF16Warps / S) * R - 1) / ((kF16Warps / S) * R);
  const size_t smem = size_t(K / 8) * sizeof(uint4);
  auto kernel = act ? f16_gemv<R, true, NORM, S> : f16_gemv<R, false, NORM, S>;
  launch_dependent(kernel, dim3(grid), dim3(kF16Warps * 32), smem, stream, a, w, y, K, N, nm);
}

// r rows a warp group (1, 2 or 4) and s warps along K (1, 2 or 4; s <= 2r: f16_plan).
template <bool NORM>
void launch_f16_gemv_rows(int r, int s, bool act, const half* a, const half* w, half* y, int K, int N,
                          const RowNorm& nm, cudaStream_t stream) {
  if (r == 4) launch_f16_gemv<4, 1, NORM>(act, a, w, y, K, N, nm, stream);
  else if (r == 2 && s == 4) launch_f16_gemv<2, 4, NORM>(act, a, w, y, K, N, nm, stream);
  else if (r == 2 && s == 2) launch_f16_gemv<2, 2, NORM>(act, a, w, y, K, N, nm, stream);
  else if (r == 2) launch_f16_gemv<2, 1, NORM>(act, a, w, y, K, N, nm, stream);
  else if (s == 2) launch_f16_gemv<1, 2, NORM>(act, a, w, y, K, N, nm, stream);
  else launch_f16_gemv<1, 1, NORM>(act, a, w, y, K, N, nm, stream);
}

struct F16Plan {
  int rows;   // rows a warp group
  int split;  // warps a group (along K)
};

// The launch of one row of A. Tuned (the default): 2 rows a group where N fills 132 SMs at two blocks each (always
// with the SwiGLU epilogue, whose rows come in pairs), else 1; the group's warps split K while every lane keeps
// at least one 16-byte vector a row and a block still covers 4 rows (each block stages all of A, so fewer rows a
// block means more staging for the same weights). A sweep on the H100 (2026-11-23, a microbench now in git
// history) put this within 0.1 us of the best of 9 choices on every llama-1b-shape product and
// within 0.33 us on smollm2's.
inline F16Plan f16_plan(int K, int N, bool act) {
  const int rows = (N >= 132 * kF16Warps * 2 || act) ? 2 : 1, kv = K / 8;
  int split = 1;
  while (split < 4 && split < 2 * rows && 32 * 2 * split <= kv) split *= 2;
  return {rows, split};
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
    const cudaError_t err = launch_swiglu_rows(g_shared.product, r, N, y + r0 * (N / 2), N / 2, 0, stream);
    if (err != cudaSuccess) return f16_error(std::string("swiglu launch: ") + cudaGetErrorString(err));
  }
  return nullptr;
}

OrtStatus* launch_f16(const F16Kernel& kn, const half* a, int64_t m, const half* w, half* y, const RowNorm& nm,
                      cudaStream_t stream) {
  const int K = int(kn.K), N = int(kn.N);
  const bool act = kn.activation == 1;
  if (m == 1 && K <= kF16GemvMaxK) {
    const F16Plan plan = f16_plan(K, N, act);
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

}  // namespace
