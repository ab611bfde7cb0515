// Device helpers shared by leptonc_cuda.cu and attention.cuh (no ONNX Runtime types).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

// D += A x B on the tensor cores: mma.sync.m16n8k16, fp16 operands, fp32 accumulators. Fragments (g = lane / 4,
// t = lane % 4): A registers (row g, cols 2t..2t+1), (row g + 8, same), (row g, cols 2t + 8..), (row g + 8,
// cols 2t + 8..); B registers (k 2t..2t+1, col g), (k 2t + 8.., col g); C (row g, cols 2t, 2t + 1), (row g + 8,
// same). The lower index of a pair is the register's low 16 bits.
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (Hopper and later): a kernel launched by launch_dependent may start while the kernel before it on the stream is
// still running. Such a kernel calls pdl_trigger first (its own successor may then launch), loads only what no
// earlier kernel writes (the weights), and calls pdl_wait, which returns once the kernel before it has completed
// and its writes are visible, before it reads activations or writes anything. Both are no-ops in a kernel launched
// without the attribute, and before sm_90. Measured on the H100 (2026-11-23): with the norms folded into the
// fp16 products, every kernel boundary of a decode layer is between leptonc's kernels and overlaps.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

inline bool pdl_enabled() {
  static const bool on = [] {
    int device = 0, major = 0;
    return cudaGetDevice(&device) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9;
  }();
  return on;
}

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialization when pdl_enabled().
template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             Args... args) {
  if (!pdl_enabled()) {
    kernel<<<grid, block, smem, stream>>>(args...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}
