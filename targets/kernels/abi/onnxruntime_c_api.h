// leptonc's own declarations of the part of ONNX Runtime's C ABI that leptonc_cuda.cu uses. Written for this
// project (not taken from ONNX Runtime's sources); it carries the public header's file name so that the kernel
// library builds unchanged against it or, with LEPTONC_ORT_INCLUDE, against a release's header.
//
// The ABI facts it relies on, all stable by ONNX Runtime's rules:
//   - a custom-op library exports `RegisterCustomOps(OrtSessionOptions*, const OrtApiBase*)`;
//   - OrtApiBase is { GetApi(version), GetVersionString() };
//   - OrtApi is a table of function pointers that only ever grows at its end: a function keeps its slot in
//     every later version. Only the slots used here are named; the others are placeholders of the same size.
//     The slot numbers below were read from the public header of API versions 20 and 29 (identical for these
//     slots) and are checked at compile time (static_assert on offsetof);
//   - OrtCustomOp's members up to ReleaseAliasMap, in order (complete as of API 18; ONNX Runtime reads the
//     members a custom op's `version` admits, so a library that says 20 is never read past its end);
//   - the enum values of OrtErrorCode, ONNXTensorElementDataType (ONNX's TensorProto data types),
//     OrtMemType and OrtCustomOpInputOutputCharacteristic.
// ORT_API_VERSION 20 is the oldest runtime the project supports (onnxruntime>=1.20): GetApi(20) succeeds on
// 1.20 and every later runtime.
#ifndef LEPTONC_ORT_ABI_H
#define LEPTONC_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#define ORT_API_VERSION 20
#define ORT_API_CALL
#ifdef __cplusplus
#define LEPTONC_ORT_NOEXCEPT noexcept
extern "C" {
#else
#define LEPTONC_ORT_NOEXCEPT
#endif

typedef struct OrtStatus OrtStatus;
typedef OrtStatus* OrtStatusPtr;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtShapeInferContext OrtShapeInferContext;

typedef enum OrtErrorCode {
  ORT_OK = 0,
  ORT_FAIL = 1,
  ORT_INVALID_ARGUMENT = 2,
  ORT_NO_SUCHFILE = 3,
  ORT_NO_MODEL = 4,
  ORT_ENGINE_ERROR = 5,
  ORT_RUNTIME_EXCEPTION = 6,
  ORT_INVALID_PROTOBUF = 7,
  ORT_MODEL_LOADED = 8,
  ORT_NOT_IMPLEMENTED = 9,
  ORT_INVALID_GRAPH = 10,
  ORT_EP_FAIL = 11,
} OrtErrorCode;

// ONNX's TensorProto.DataType numbering.
typedef enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 = 4,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16 = 5,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING = 8,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL = 9,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE = 11,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32 = 12,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64 = 13,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_COMPLEX64 = 14,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_COMPLEX128 = 15,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 = 16,
} ONNXTensorElementDataType;

typedef enum OrtMemType {
  OrtMemTypeCPUInput = -2,   // a CPU input of an op that runs on another device
  OrtMemTypeCPUOutput = -1,
  OrtMemTypeDefault = 0,     // the op's own device
} OrtMemType;

typedef enum OrtCustomOpInputOutputCharacteristic {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
} OrtCustomOpInputOutputCharacteristic;

typedef struct OrtApi OrtApi;

typedef struct OrtApiBase {
  const OrtApi*(ORT_API_CALL* GetApi)(uint32_t version)LEPTONC_ORT_NOEXCEPT;
  const char*(ORT_API_CALL* GetVersionString)(void)LEPTONC_ORT_NOEXCEPT;
} OrtApiBase;

// A slot of OrtApi this library does not call.
typedef void (*LeptoncOrtUnusedSlot)(void);

struct OrtApi {
  OrtStatus*(ORT_API_CALL* CreateStatus)(OrtErrorCode code, const char* msg)LEPTONC_ORT_NOEXCEPT;  // slot 0
  LeptoncOrtUnusedSlot unused_1_25[25];
  OrtStatusPtr(ORT_API_CALL* CreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out)
      LEPTONC_ORT_NOEXCEPT;                                                                              // 26
  OrtStatusPtr(ORT_API_CALL* CustomOpDomain_Add)(OrtCustomOpDomain* domain, const struct OrtCustomOp* op)
      LEPTONC_ORT_NOEXCEPT;                                                                              // 27
  OrtStatusPtr(ORT_API_CALL* AddCustomOpDomain)(OrtSessionOptions* options, OrtCustomOpDomain* domain)
      LEPTONC_ORT_NOEXCEPT;                                                                              // 28
  LeptoncOrtUnusedSlot unused_29_50[22];
  OrtStatusPtr(ORT_API_CALL* GetTensorMutableData)(OrtValue* value, void** out)LEPTONC_ORT_NOEXCEPT;   // 51
  LeptoncOrtUnusedSlot unused_52_60[9];
  OrtStatusPtr(ORT_API_CALL* GetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out)
      LEPTONC_ORT_NOEXCEPT;                                                                              // 61
  OrtStatusPtr(ORT_API_CALL* GetDimensions)(const OrtTensorTypeAndShapeInfo* info, int64_t* dim_values,
                                            size_t dim_values_length)LEPTONC_ORT_NOEXCEPT;              // 62
  LeptoncOrtUnusedSlot unused_63_64[2];
  OrtStatusPtr(ORT_API_CALL* GetTensorTypeAndShape)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out)
      LEPTONC_ORT_NOEXCEPT;                                                                              // 65
  LeptoncOrtUnusedSlot unused_66_84[19];
  OrtStatusPtr(ORT_API_CALL* KernelInfoGetAttribute_float)(const OrtKernelInfo* info, const char* name, float* out)
      LEPTONC_ORT_NOEXCEPT;                                                                              // 85
  OrtStatusPtr(ORT_API_CALL* KernelInfoGetAttribute_int64)(const OrtKernelInfo* info, const char* name, int64_t* out)
      LEPTONC_ORT_NOEXCEPT;                                                                              // 86
  LeptoncOrtUnusedSlot unused_87_89[3];
  OrtStatusPtr(ORT_API_CALL* KernelContext_GetInput)(const OrtKernelContext* context, size_t index,
                                                     const OrtValue** out)LEPTONC_ORT_NOEXCEPT;         // 90
  OrtStatusPtr(ORT_API_CALL* KernelContext_GetOutput)(OrtKernelContext* context, size_t index,
                                                      const int64_t* dim_values, size_t dim_count,
                                                      OrtValue** out)LEPTONC_ORT_NOEXCEPT;              // 91
  LeptoncOrtUnusedSlot unused_92;
  void(ORT_API_CALL* ReleaseStatus)(OrtStatus* input)LEPTONC_ORT_NOEXCEPT;                              // 93
  LeptoncOrtUnusedSlot unused_94_98[5];
  void(ORT_API_CALL* ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* input)LEPTONC_ORT_NOEXCEPT;  // 99
  LeptoncOrtUnusedSlot unused_100_192[93];
  OrtStatusPtr(ORT_API_CALL* KernelContext_GetGPUComputeStream)(const OrtKernelContext* context, void** out)
      LEPTONC_ORT_NOEXCEPT;                                                                              // 193
};

typedef struct OrtCustomOp {
  uint32_t version;  // the API version the op was written for: ONNX Runtime reads the members it admits
  void*(ORT_API_CALL* CreateKernel)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char*(ORT_API_CALL* GetName)(const struct OrtCustomOp* op);
  const char*(ORT_API_CALL* GetExecutionProviderType)(const struct OrtCustomOp* op);
  ONNXTensorElementDataType(ORT_API_CALL* GetInputType)(const struct OrtCustomOp* op, size_t index);
  size_t(ORT_API_CALL* GetInputTypeCount)(const struct OrtCustomOp* op);
  ONNXTensorElementDataType(ORT_API_CALL* GetOutputType)(const struct OrtCustomOp* op, size_t index);
  size_t(ORT_API_CALL* GetOutputTypeCount)(const struct OrtCustomOp* op);
  void(ORT_API_CALL* KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void(ORT_API_CALL* KernelDestroy)(void* op_kernel);
  OrtCustomOpInputOutputCharacteristic(ORT_API_CALL* GetInputCharacteristic)(const struct OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic(ORT_API_CALL* GetOutputCharacteristic)(const struct OrtCustomOp* op,
                                                                             size_t index);
  OrtMemType(ORT_API_CALL* GetInputMemoryType)(const struct OrtCustomOp* op, size_t index);
  int(ORT_API_CALL* GetVariadicInputMinArity)(const struct OrtCustomOp* op);
  int(ORT_API_CALL* GetVariadicInputHomogeneity)(const struct OrtCustomOp* op);
  int(ORT_API_CALL* GetVariadicOutputMinArity)(const struct OrtCustomOp* op);
  int(ORT_API_CALL* GetVariadicOutputHomogeneity)(const struct OrtCustomOp* op);
  OrtStatusPtr(ORT_API_CALL* CreateKernelV2)(const struct OrtCustomOp* op, const OrtApi* api,
                                             const OrtKernelInfo* info, void** kernel);
  OrtStatusPtr(ORT_API_CALL* KernelComputeV2)(void* op_kernel, OrtKernelContext* context);
  OrtStatusPtr(ORT_API_CALL* InferOutputShapeFn)(const struct OrtCustomOp* op, OrtShapeInferContext* context);
  int(ORT_API_CALL* GetStartVersion)(const struct OrtCustomOp* op);
  int(ORT_API_CALL* GetEndVersion)(const struct OrtCustomOp* op);
  size_t(ORT_API_CALL* GetMayInplace)(int** input_index, int** output_index);
  void(ORT_API_CALL* ReleaseMayInplace)(int* input_index, int* output_index);
  size_t(ORT_API_CALL* GetAliasMap)(int** input_index, int** output_index);
  void(ORT_API_CALL* ReleaseAliasMap)(int* input_index, int* output_index);
} OrtCustomOp;

#ifdef __cplusplus
}  // extern "C"

#define LEPTONC_ORT_SLOT(member, slot) \
  static_assert(offsetof(OrtApi, member) == (slot) * sizeof(void*), "OrtApi::" #member " must be slot " #slot)
LEPTONC_ORT_SLOT(CreateStatus, 0);
LEPTONC_ORT_SLOT(CreateCustomOpDomain, 26);
LEPTONC_ORT_SLOT(CustomOpDomain_Add, 27);
LEPTONC_ORT_SLOT(AddCustomOpDomain, 28);
LEPTONC_ORT_SLOT(GetTensorMutableData, 51);
LEPTONC_ORT_SLOT(GetDimensionsCount, 61);
LEPTONC_ORT_SLOT(GetDimensions, 62);
LEPTONC_ORT_SLOT(GetTensorTypeAndShape, 65);
LEPTONC_ORT_SLOT(KernelInfoGetAttribute_float, 85);
LEPTONC_ORT_SLOT(KernelInfoGetAttribute_int64, 86);
LEPTONC_ORT_SLOT(KernelContext_GetInput, 90);
LEPTONC_ORT_SLOT(KernelContext_GetOutput, 91);
LEPTONC_ORT_SLOT(ReleaseStatus, 93);
LEPTONC_ORT_SLOT(ReleaseTensorTypeAndShapeInfo, 99);
LEPTONC_ORT_SLOT(KernelContext_GetGPUComputeStream, 193);
#undef LEPTONC_ORT_SLOT
static_assert(sizeof(OrtCustomOp) == 8 + 25 * sizeof(void*), "OrtCustomOp: version and 25 function pointers");
#endif

#endif  // LEPTONC_ORT_ABI_H
