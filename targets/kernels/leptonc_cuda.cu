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
//   17 <= M <= 64 (decode, batch 17..64): tiled_stream_groups, the same streaming with the operands' roles swapped
//     (two tiles' columns the A operand, 8 rows of A the B operand) so that each weight fragment meets every 8-row
//     group of A and the weights are still read once; a warp takes 2 or 4 tiles and a block up to 8 columns of
//     warps, which share A's loads.
//   M > 64 (prefill): tiles are dequantized into a scratch buffer in chunks and multiplied by cuBLAS
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

// Sizes of the process's shared buffers (Shared below), set by leptonc_set_buffer_sizes (the runner calls it with the
// bundle's engine settings, leptonc/runtime/engine_settings.py) before the first step allocates them:
//   kernel_buffer_mb: each of the scratch, product and normed-row buffers (default 16 MiB); the M > 16 paths work
//     through them in row chunks, so a smaller buffer means more, smaller cuBLAS calls, not wrong results. On the
//     H100 (BENCHMARKS.md), llama-1b-shape fp16's time to first token at 1,024 tokens was 6.03 ms with 32 MiB, 6.07
//     with 16 and 7.22 with 8;
//   kernel_cublas_workspace_mb: the cuBLAS workspace (default 32 MiB, cuBLAS's recommendation for Hopper).
size_t g_buffer_mib = 16, g_cublas_workspace_mib = 32;
size_t scratch_halves() { return g_buffer_mib << 19; }  // halves in each shared buffer
size_t cublas_workspace_bytes() { return g_cublas_workspace_mib << 20; }
constexpr uint32_t kExp1024 = 0x64006400u;           // two fp16 1024.0: OR-ing a code below 1024 gives 1024 + code

}  // namespace

// The kernel families, in dependency order (each opens the same anonymous namespace).
#include "nbits_kernels.cuh"
#include "nbits_gemv.cuh"
#include "f16_kernels.cuh"
#include "ops_nbits.cuh"
#include "ops_f16.cuh"
#include "ops_attention.cuh"
#include "step_ends.cuh"

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

// The shared buffers' sizes in MiB (each 1-4096; others are ignored), from the bundle's engine settings
// (leptonc/runtime/ort_cuda_session.py calls this once the session has loaded the library). Process-wide: buffers
// already allocated by an earlier step keep their size.
extern "C" __attribute__((visibility("default"))) void leptonc_set_buffer_sizes(int kernel_buffer_mib,
                                                                                int cublas_workspace_mib) {
  if (kernel_buffer_mib >= 1 && kernel_buffer_mib <= 4096) g_buffer_mib = size_t(kernel_buffer_mib);
  if (cublas_workspace_mib >= 1 && cublas_workspace_mib <= 4096) g_cublas_workspace_mib = size_t(cublas_workspace_mib);
}
