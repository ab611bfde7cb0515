// leptonc's CUDA kernels for ONNX Runtime, registered as custom ops in the domain "ai.leptonc".
//
// MatMulNBits: the same inputs, attributes and meaning as ONNX Runtime's com.microsoft.MatMulNBits
// (Y[M, N] = A[M, K] x dequantize(B)^T; B uint8 [N, blocks, block * bits / 8], low nibble first for
// 4 bits; scales [N * blocks]; optional zero points, packed two a byte for 4 bits, default 2^(bits-1)),
// for fp16 A on the CUDA provider, bits 4 or 8, block sizes that are multiples of 16.
//
//   M <= 16 (decode, batch <= 16): one kernel streams the weights once. Each warp takes 16 output rows
//     and a slice of K; per 128 values of K it dequantizes a 16 x 128 tile into shared memory and
//     multiplies it with the activations on the tensor cores (WMMA 16x16x16, fp32 accumulation). The
//     block's warps split K and their partial sums are added in shared memory. The tensor cores make
//     the cost the same for 1 and 16 rows of A, so batch 16 reads the weights at the speed batch 1 does.
//   M > 16 (prefill): rows of B are dequantized into a scratch buffer in chunks and multiplied by
//     cuBLAS (fp16 in and out, fp32 accumulation).
//
// Everything runs on ONNX Runtime's compute stream (KernelContext_GetGPUComputeStream) with no host
// synchronization and no allocation after the first call, so a decode step that uses it can be
// captured in a CUDA graph. Built by targets/kernels/__init__.py with nvcc against the ONNX Runtime C
// API header (ORT_API_VERSION of the header, which must not be newer than the runtime's).

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <onnxruntime_c_api.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

namespace {

const OrtApi* g_api = nullptr;

constexpr int kWarps = 8;        // warps per block; they split K
constexpr int kRows = 16;        // output rows (columns of Y) per warp: the WMMA tile's N
constexpr int kStep = 128;       // K values per warp iteration
constexpr int kPad = 8;          // shared-memory row padding (halves) against bank conflicts
constexpr int kLd = kStep + kPad;
constexpr int kSmallM = 16;      // rows of A served by the streaming kernel (the WMMA tile's M)
constexpr size_t kScratchHalves = size_t(16) << 20;  // 32 MiB of dequantized rows for the M > 16 path

// ---- the streaming kernel (M <= 16) --------------------------------------------------------------

template <int BITS>
__device__ __forceinline__ void dequantize_lane(const uint4* words, int k_first, int k_pad, int row,
                                                const half* __restrict__ scales, const uint8_t* __restrict__ zps,
                                                int blocks, int block, half* dst) {
  // words: this lane's 64 consecutive weights of one row (2 uint4 for 4 bits, 4 for 8 bits), starting
  // at k_first; dst: where the 64 dequantized halves go in the shared tile.
  constexpr int per_word = 32 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  const uint32_t* w32 = reinterpret_cast<const uint32_t*>(words);
#pragma unroll
  for (int g = 0; g < 4; ++g) {  // 4 groups of 16 weights; a group never straddles a block (block % 16 == 0)
    if (k_first + g * 16 >= k_pad) {  // past the last block: zeros (no scale to read)
#pragma unroll
      for (int e = 0; e < 16; e += 2) *reinterpret_cast<half2*>(dst + g * 16 + e) = __floats2half2_rn(0.f, 0.f);
      continue;
    }
    const int blk = (k_first + g * 16) / block;
    float z;
    if (zps == nullptr) {
      z = float(1 << (BITS - 1));
    } else if (BITS == 4) {
      const uint8_t packed = zps[row * ((blocks + 1) / 2) + blk / 2];
      z = float((packed >> ((blk & 1) * 4)) & 0xF);
    } else {
      z = float(zps[row * blocks + blk]);
    }
    const float s = __half2float(scales[row * blocks + blk]);
#pragma unroll
    for (int e = 0; e < 16; e += 2) {
      const int idx = g * 16 + e;
      const uint32_t word = w32[idx / per_word];
      const int shift0 = (idx % per_word) * BITS, shift1 = ((idx + 1) % per_word) * BITS;
      const float q0 = float((word >> shift0) & mask), q1 = float((w32[(idx + 1) / per_word] >> shift1) & mask);
      *reinterpret_cast<half2*>(dst + idx) = __floats2half2_rn((q0 - z) * s, (q1 - z) * s);
    }
  }
}

template <int BITS>
__global__ void __launch_bounds__(kWarps * 32)
nbits_stream(const half* __restrict__ A, int M, const uint8_t* __restrict__ B, const half* __restrict__ scales,
             const uint8_t* __restrict__ zps, half* __restrict__ Y, int K, int N, int block, int blocks) {
  using namespace nvcuda;
  constexpr int kVecs = 64 * BITS / 8 / 16;  // uint4 per lane per iteration: 2 (4-bit) or 4 (8-bit)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  half* smem = reinterpret_cast<half*>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  half* a_tile = smem + warp * 2 * kRows * kLd;  // [16 m][kLd]
  half* w_tile = a_tile + kRows * kLd;           // [16 n][kLd]

  const int n0 = blockIdx.x * kRows;
  const int row_bytes = blocks * block * BITS / 8;
  const int k_pad = blocks * block;
  const int steps = (k_pad + kStep - 1) / kStep;
  const int r = lane >> 1, half_id = lane & 1;  // this lane's row of the tile and its half of the 128 values
  const int n = n0 + r;

  // rows of A past M stay zero for the whole kernel
  for (int i = lane; i < kRows * kLd; i += 32) a_tile[i] = __float2half(0.f);
  __syncwarp();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);

  for (int step = warp; step < steps; step += kWarps) {
    const int k0 = step * kStep;
    // the weights: 64 values of row n from k0 + 64 * half_id
    const int k_first = k0 + half_id * 64;
    uint4 words[kVecs];
    const int byte0 = k_first * BITS / 8;
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      words[v] = make_uint4(0, 0, 0, 0);
      if (n < N && byte0 + v * 16 < row_bytes)
        words[v] = __ldg(reinterpret_cast<const uint4*>(B + size_t(n) * row_bytes + byte0) + v);
    }
    // the activations: A[m, k0:k0+128] for m < M (zero past K)
    for (int i = lane; i < M * (kStep / 8); i += 32) {
      const int m = i / (kStep / 8), c = (i % (kStep / 8)) * 8;
      const int k = k0 + c;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (k + 8 <= K && (K % 8) == 0) {
        v = __ldg(reinterpret_cast<const uint4*>(A + size_t(m) * K + k));
        *reinterpret_cast<uint4*>(a_tile + m * kLd + c) = v;
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) a_tile[m * kLd + c + j] = (k + j < K) ? A[size_t(m) * K + k + j] : __float2half(0.f);
      }
    }
    if (n < N && k_first < k_pad) {
      dequantize_lane<BITS>(words, k_first, k_pad, n, scales, zps, blocks, block, w_tile + r * kLd + half_id * 64);
    } else {
      for (int j = 0; j < 64; ++j) w_tile[r * kLd + half_id * 64 + j] = __float2half(0.f);
    }
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < kStep; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a_frag;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> b_frag;
      wmma::load_matrix_sync(a_frag, a_tile + kk, kLd);   // (m, k) at a_tile[m * kLd + k]
      wmma::load_matrix_sync(b_frag, w_tile + kk, kLd);   // (k, n) at w_tile[n * kLd + k]
      wmma::mma_sync(acc, a_frag, b_frag, acc);
    }
    __syncwarp();
  }

  // add the warps' partial sums: reuse shared memory as [warps][16 m][16 n] floats
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem_raw);
  wmma::store_matrix_sync(red + warp * kRows * kRows, acc, kRows, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < kRows * kRows; i += blockDim.x) {
    const int m = i / kRows, j = i % kRows;
    if (m < M && n0 + j < N) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[w * kRows * kRows + i];
      Y[size_t(m) * N + n0 + j] = __float2half(sum);
    }
  }
}

constexpr size_t kStreamSmem = size_t(kWarps) * 2 * kRows * kLd * sizeof(half);
static_assert(kStreamSmem >= size_t(kWarps) * kRows * kRows * sizeof(float), "the reduction reuses the tiles");

// ---- the prefill path (M > 16): dequantize rows, then cuBLAS -------------------------------------

template <int BITS>
__global__ void nbits_dequantize_rows(const uint8_t* __restrict__ B, const half* __restrict__ scales,
                                      const uint8_t* __restrict__ zps, half* __restrict__ W, int n_first, int rows,
                                      int K, int block, int blocks) {
  // W[rows, K] (row-major, ld K) = dequantized rows n_first .. n_first + rows of B
  const size_t total = size_t(rows) * K;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const int rr = int(i / K), k = int(i % K), n = n_first + rr;
    const int row_bytes = blocks * block * BITS / 8;
    const int blk = k / block;
    uint32_t q;
    if (BITS == 4) {
      const uint8_t byte = B[size_t(n) * row_bytes + k / 2];
      q = (k & 1) ? (byte >> 4) : (byte & 0xF);
    } else {
      q = B[size_t(n) * row_bytes + k];
    }
    float z;
    if (zps == nullptr) {
      z = float(1 << (BITS - 1));
    } else if (BITS == 4) {
      z = float((zps[size_t(n) * ((blocks + 1) / 2) + blk / 2] >> ((blk & 1) * 4)) & 0xF);
    } else {
      z = float(zps[size_t(n) * blocks + blk]);
    }
    W[i] = __float2half((float(q) - z) * __half2float(scales[size_t(n) * blocks + blk]));
  }
}

struct Shared {  // one per process: the cuBLAS handle and the dequantization scratch
  std::mutex lock;
  cublasHandle_t cublas = nullptr;
  half* scratch = nullptr;
};
Shared g_shared;

// ---- the custom op (ONNX Runtime C API) ----------------------------------------------------------

struct NBitsKernel {
  int64_t K = 0, N = 0, bits = 0, block = 0;
};

OrtStatus* make_error(const std::string& what) {
  return g_api->CreateStatus(ORT_EP_FAIL, ("leptonc MatMulNBits: " + what).c_str());
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

OrtStatus* ensure_shared() {
  std::lock_guard<std::mutex> guard(g_shared.lock);
  if (g_shared.cublas == nullptr) {
    if (cublasCreate(&g_shared.cublas) != CUBLAS_STATUS_SUCCESS) return make_error("cublasCreate failed");
  }
  if (g_shared.scratch == nullptr) {
    ORT_TRY(cuda_check(cudaMalloc(&g_shared.scratch, kScratchHalves * sizeof(half)), "cudaMalloc(scratch)"));
  }
  return nullptr;
}

template <int BITS>
OrtStatus* launch(const NBitsKernel& kn, const half* a, int64_t m, const uint8_t* b, const half* scales,
                  const uint8_t* zps, half* y, cudaStream_t stream) {
  const int K = int(kn.K), N = int(kn.N), block = int(kn.block);
  const int blocks = int((kn.K + kn.block - 1) / kn.block);
  if (m <= kSmallM) {
    static bool configured = false;  // opt in to more than 48 KiB of dynamic shared memory, once
    if (!configured) {
      ORT_TRY(cuda_check(cudaFuncSetAttribute(nbits_stream<BITS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              int(kStreamSmem)), "cudaFuncSetAttribute"));
      configured = true;
    }
    const dim3 grid((N + kRows - 1) / kRows);
    nbits_stream<BITS><<<grid, kWarps * 32, kStreamSmem, stream>>>(a, int(m), b, scales, zps, y, K, N, block, blocks);
    return cuda_check(cudaGetLastError(), "nbits_stream launch");
  }
  if (g_shared.scratch == nullptr || g_shared.cublas == nullptr) ORT_TRY(ensure_shared());
  if (cublasSetStream(g_shared.cublas, stream) != CUBLAS_STATUS_SUCCESS) return make_error("cublasSetStream failed");
  const int64_t chunk_rows = std::max<int64_t>(1, std::min<int64_t>(N, int64_t(kScratchHalves) / K));
  const float alpha = 1.f, beta = 0.f;
  for (int64_t n_first = 0; n_first < N; n_first += chunk_rows) {
    const int rows = int(std::min<int64_t>(chunk_rows, N - n_first));
    const int threads = 256;
    const int grid = int(std::min<int64_t>((int64_t(rows) * K + threads - 1) / threads, 65535));
    nbits_dequantize_rows<BITS><<<grid, threads, 0, stream>>>(b, scales, zps, g_shared.scratch, int(n_first), rows, K,
                                                              block, blocks);
    ORT_TRY(cuda_check(cudaGetLastError(), "dequantize launch"));
    // column-major view: Y^T[N, M] (ld N) = W[rows, K]^T-as-stored (op T, ld K) x A^T[K, M] (ld K)
    const cublasStatus_t st = cublasGemmEx(g_shared.cublas, CUBLAS_OP_T, CUBLAS_OP_N, rows, int(m), K, &alpha,
                                           g_shared.scratch, CUDA_R_16F, K, a, CUDA_R_16F, K, &beta, y + n_first,
                                           CUDA_R_16F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) return make_error("cublasGemmEx failed with status " + std::to_string(int(st)));
  }
  return nullptr;
}

OrtStatus* read_int_attr(const OrtKernelInfo* info, const char* name, int64_t* out) {
  return g_api->KernelInfoGetAttribute_int64(info, name, out);
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  auto* kn = new NBitsKernel();
  OrtStatus* st = nullptr;
  if ((st = read_int_attr(info, "K", &kn->K)) || (st = read_int_attr(info, "N", &kn->N)) ||
      (st = read_int_attr(info, "bits", &kn->bits)) || (st = read_int_attr(info, "block_size", &kn->block))) {
    delete kn;
    return st;
  }
  if ((kn->bits != 4 && kn->bits != 8) || kn->block < 16 || kn->block % 16 != 0 || kn->K <= 0 || kn->N <= 0) {
    const std::string msg = "unsupported attributes bits=" + std::to_string(kn->bits) +
                            " block_size=" + std::to_string(kn->block) + " (needs bits 4 or 8, block a multiple of 16)";
    delete kn;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, ("leptonc MatMulNBits: " + msg).c_str());
  }
  // The prefill path's cuBLAS handle and scratch are made here, before any graph capture can begin.
  if ((st = ensure_shared()) != nullptr) {
    delete kn;
    return st;
  }
  *kernel = kn;
  return nullptr;
}

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  const auto& kn = *static_cast<NBitsKernel*>(kernel);
  size_t n_inputs = 0;
  ORT_TRY(g_api->KernelContext_GetInputCount(ctx, &n_inputs));
  const OrtValue* in[4] = {nullptr, nullptr, nullptr, nullptr};
  for (size_t i = 0; i < n_inputs && i < 4; ++i) ORT_TRY(g_api->KernelContext_GetInput(ctx, i, &in[i]));
  if (in[0] == nullptr || in[1] == nullptr || in[2] == nullptr) return make_error("A, B and scales are required");

  OrtTensorTypeAndShapeInfo* shape_info = nullptr;
  ORT_TRY(g_api->GetTensorTypeAndShape(in[0], &shape_info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetDimensionsCount(shape_info, &rank);
  int64_t dims[8] = {0};
  if (st == nullptr && (rank < 1 || rank > 8)) st = make_error("A must have rank 1 to 8");
  if (st == nullptr) st = g_api->GetDimensions(shape_info, dims, rank);
  g_api->ReleaseTensorTypeAndShapeInfo(shape_info);
  if (st != nullptr) return st;
  if (dims[rank - 1] != kn.K) return make_error("A's last dimension is " + std::to_string(dims[rank - 1]) +
                                                ", the node's K is " + std::to_string(kn.K));
  int64_t m = 1;
  for (size_t i = 0; i + 1 < rank; ++i) m *= dims[i];
  int64_t out_dims[8];
  for (size_t i = 0; i + 1 < rank; ++i) out_dims[i] = dims[i];
  out_dims[rank - 1] = kn.N;
  OrtValue* out = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, out_dims, rank, &out));
  if (m == 0) return nullptr;

  void *pa = nullptr, *pb = nullptr, *ps = nullptr, *pz = nullptr, *py = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[0]), &pa));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[1]), &pb));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[2]), &ps));
  if (in[3] != nullptr) ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[3]), &pz));
  ORT_TRY(g_api->GetTensorMutableData(out, &py));
  void* stream = nullptr;
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  const auto s = static_cast<cudaStream_t>(stream);
  const auto* a = static_cast<const half*>(pa);
  const auto* b = static_cast<const uint8_t*>(pb);
  const auto* sc = static_cast<const half*>(ps);
  const auto* z = static_cast<const uint8_t*>(pz);
  auto* y = static_cast<half*>(py);
  return kn.bits == 4 ? launch<4>(kn, a, m, b, sc, z, y, s) : launch<8>(kn, a, m, b, sc, z, y, s);
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<NBitsKernel*>(kernel); }

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "MatMulNBits"; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CUDAExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t index) {
  return (index == 0 || index == 2) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 4; }
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp*, size_t index) {
  return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
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
  op.KernelDestroy = destroy_kernel;
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

OrtCustomOp g_matmul_nbits = make_op();

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
  ORT_TRY(g_api->CustomOpDomain_Add(domain, &g_matmul_nbits));
  return g_api->AddCustomOpDomain(options, domain);
}
