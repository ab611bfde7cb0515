// The decode step's two ends: LogitsArgMax (the LM head's rows -> float32 logits and the greedy token) and
// MaskLengths (seqlens_k from the attention mask).
//
// Part of leptonc_cuda.cu's single translation unit: included once, in the order listed there, after the
// headers and definitions before it.

#pragma once

namespace {

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
// reads seqlens_k before its own dependency wait (attention.cuh, the note above launch_decode), which this keeps sound.

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
