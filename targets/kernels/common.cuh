// Device helpers shared by leptonc_cuda.cu and attention.cuh (no ONNX Runtime types).
#pragma once

#include <cstdint>

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
