// leptonc's own declarations of the four cuBLAS functions leptonc_cuda.cu calls (written for this project; it
// carries the public header's file name so that the library builds unchanged against it). They let the kernel
// library build where no cuBLAS is installed (a CPU-only CI runner): the build then links against a stub
// library carrying only cuBLAS's soname, and the GPU machine's libcublas (ONNX Runtime's CUDA provider
// loads it) resolves the symbols at load time. Names and enum values are cuBLAS's documented C API (v2).
#ifndef LEPTONC_CUBLAS_ABI_H
#define LEPTONC_CUBLAS_ABI_H

#include <stddef.h>

#include <cuda_runtime_api.h>  // cudaStream_t
#include <library_types.h>     // cudaDataType (CUDA_R_16F)

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cublasContext* cublasHandle_t;

typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;  // any other value is a failure
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum { CUBLAS_COMPUTE_16F = 64, CUBLAS_COMPUTE_32F = 68 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle);
cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream);
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace, size_t workspace_bytes);
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t compute_type, cublasGemmAlgo_t algo);

#ifdef __cplusplus
}  // extern "C"
#endif

#define cublasCreate cublasCreate_v2
#define cublasSetStream cublasSetStream_v2
#define cublasSetWorkspace cublasSetWorkspace_v2

#endif  // LEPTONC_CUBLAS_ABI_H
