// CachedAttention: the op around attention.cuh's kernels.
//
// Part of leptonc_cuda.cu's single translation unit: included once, in the order listed there, after the
// headers and definitions before it.

#pragma once

namespace {

// ---- CachedAttention ------------------------------------------------------------------------------------------

struct AttnKernel {
  int64_t num_heads = 0, kv_num_heads = 0;
  float scale = 0.f;  // 0: 1 / sqrt(head size)
  int sms = 132;
};

constexpr size_t kAttnPartialFloats = size_t(1) << 20;  // decode splits' partial outputs (4 MiB), made once
constexpr size_t kAttnPartialSlots = size_t(1) << 15;   // and their (max, sum) pairs

struct AttnScratch {
  std::mutex lock;
  float* partial_o = nullptr;
  float2* partial_ml = nullptr;
  unsigned* counters = nullptr;  // per (row, KV head): splits finished; zero between calls
};
AttnScratch g_attn;

OrtStatus* attn_error(const std::string& what, OrtErrorCode code = ORT_EP_FAIL) {
  return g_api->CreateStatus(code, ("leptonc CachedAttention: " + what).c_str());
}

OrtStatus* ORT_API_CALL create_attn(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  auto* kn = new AttnKernel();
  OrtStatus* st = nullptr;
  if ((st = read_int_attr(info, "num_heads", &kn->num_heads)) || (st = read_int_attr(info, "kv_num_heads", &kn->kv_num_heads))) {
    delete kn;
    return st;
  }
  if ((st = api->KernelInfoGetAttribute_float(info, "scale", &kn->scale)) != nullptr) {  // absent: 1 / sqrt(D)
    api->ReleaseStatus(st);
    kn->scale = 0.f;
  }
  const int64_t h = kn->num_heads, kvh = kn->kv_num_heads;
  if (h <= 0 || kvh <= 0 || h % kvh != 0 || h / kvh > leptonc_attn::kMaxGroup) {
    const std::string msg = "unsupported attributes num_heads=" + std::to_string(h) + " kv_num_heads=" +
                            std::to_string(kvh) + " (num_heads must be a multiple of kv_num_heads, at most " +
                            std::to_string(leptonc_attn::kMaxGroup) + " times it)";
    delete kn;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, ("leptonc CachedAttention: " + msg).c_str());
  }
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) == cudaSuccess && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && sms > 0)
    kn->sms = sms;
  {  // the splits' scratch, before any capture; shared by every node (they run one after another on one stream)
    std::lock_guard<std::mutex> guard(g_attn.lock);
    if (g_attn.partial_o == nullptr) {
      cudaError_t err = cudaMalloc(&g_attn.partial_o, kAttnPartialFloats * sizeof(float));
      if (err == cudaSuccess) err = cudaMalloc(&g_attn.partial_ml, kAttnPartialSlots * sizeof(float2));
      if (err == cudaSuccess) err = cudaMalloc(&g_attn.counters, kAttnPartialSlots * sizeof(unsigned));
      if (err == cudaSuccess) err = cudaMemset(g_attn.counters, 0, kAttnPartialSlots * sizeof(unsigned));
      if (err == cudaSuccess) err = cudaDeviceSynchronize();  // zero before any stream of ONNX Runtime's uses them
      if (err != cudaSuccess) {
        delete kn;
        return attn_error(std::string("cudaMalloc(split scratch): ") + cudaGetErrorString(err));
      }
    }
  }
  *kernel = kn;
  return nullptr;
}

// The dimensions of input `index` into dims (rank `rank` required).
OrtStatus* attn_dims(OrtKernelContext* ctx, size_t index, size_t rank, const char* what, int64_t* dims,
                     const OrtValue** value) {
  ORT_TRY(g_api->KernelContext_GetInput(ctx, index, value));
  if (*value == nullptr) return attn_error(std::string(what) + " is required");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ORT_TRY(g_api->GetTensorTypeAndShape(*value, &info));
  size_t got = 0;
  OrtStatus* st = g_api->GetDimensionsCount(info, &got);
  if (st == nullptr && got != rank)
    st = attn_error(std::string(what) + " must have rank " + std::to_string(rank) + ", not " + std::to_string(got));
  if (st == nullptr && rank > 0) st = g_api->GetDimensions(info, dims, rank);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

OrtStatus* ORT_API_CALL compute_attn(void* kernel, OrtKernelContext* ctx) {
  const auto& kn = *static_cast<AttnKernel*>(kernel);
  const OrtValue *qkv = nullptr, *past_k = nullptr, *past_v = nullptr, *seqlens = nullptr, *total = nullptr,
                 *cos = nullptr, *sin = nullptr;
  int64_t q_dims[3], k_dims[4], v_dims[4], s_dims[1], c_dims[2], n_dims[2];
  ORT_TRY(attn_dims(ctx, 0, 3, "qkv", q_dims, &qkv));
  ORT_TRY(attn_dims(ctx, 1, 4, "past_key", k_dims, &past_k));
  ORT_TRY(attn_dims(ctx, 2, 4, "past_value", v_dims, &past_v));
  ORT_TRY(attn_dims(ctx, 3, 1, "seqlens_k", s_dims, &seqlens));
  ORT_TRY(g_api->KernelContext_GetInput(ctx, 4, &total));
  if (total == nullptr) return attn_error("total_sequence_length is required");
  ORT_TRY(attn_dims(ctx, 5, 2, "cos_cache", c_dims, &cos));
  ORT_TRY(attn_dims(ctx, 6, 2, "sin_cache", n_dims, &sin));
  const int64_t B = q_dims[0], S = q_dims[1], H = kn.num_heads, KVH = kn.kv_num_heads, D = k_dims[3], C = k_dims[2];
  if (k_dims[0] != B || k_dims[1] != KVH || std::memcmp(k_dims, v_dims, sizeof(k_dims)) != 0 || s_dims[0] != B)
    return attn_error("past_key and past_value must both be [B, kv_num_heads, C, D] and seqlens_k [B], with B = qkv's");
  if (D != 64 && D != 128) return attn_error("head size " + std::to_string(D) + " (the kernels serve 64 and 128)");
  if (q_dims[2] != (H + 2 * KVH) * D)
    return attn_error("qkv's last dimension is " + std::to_string(q_dims[2]) + ", not (num_heads + 2 kv_num_heads) x " +
                      std::to_string(D));
  if (c_dims[0] < 1 || c_dims[1] != D / 2 || n_dims[0] != c_dims[0] || n_dims[1] != c_dims[1])
    return attn_error("cos_cache and sin_cache must both be [positions >= 1, head size / 2]");
  void* total_data = nullptr;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(total), &total_data));
  const int64_t total_len = *static_cast<const int32_t*>(total_data);  // host memory (input_memory below)
  const int64_t present_len = std::max(C, total_len);
  if (S < 1 || S > present_len)
    return attn_error(std::to_string(S) + " new tokens do not fit a cache of " + std::to_string(present_len));

  int64_t out_dims[3] = {B, S, H * D}, present_dims[4] = {B, KVH, present_len, D};
  OrtValue *out = nullptr, *present_k = nullptr, *present_v = nullptr;
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 0, out_dims, 3, &out));
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 1, present_dims, 4, &present_k));
  ORT_TRY(g_api->KernelContext_GetOutput(ctx, 2, present_dims, 4, &present_v));
  if (B == 0) return nullptr;
  void *p_qkv, *p_pk, *p_pv, *p_seq, *p_cos, *p_sin, *p_out, *p_k, *p_v;
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(qkv), &p_qkv));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(past_k), &p_pk));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(past_v), &p_pv));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(seqlens), &p_seq));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(cos), &p_cos));
  ORT_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(sin), &p_sin));
  ORT_TRY(g_api->GetTensorMutableData(out, &p_out));
  ORT_TRY(g_api->GetTensorMutableData(present_k, &p_k));
  ORT_TRY(g_api->GetTensorMutableData(present_v, &p_v));
  void* stream_ptr = nullptr;
  ORT_TRY(g_api->KernelContext_GetGPUComputeStream(ctx, &stream_ptr));
  const auto stream = static_cast<cudaStream_t>(stream_ptr);

  // present is past (one buffer, appended in place), or a copy of it with room for the new entries
  if ((p_k == p_pk) != (p_v == p_pv) || ((p_k == p_pk) && present_len != C))
    return attn_error("present_key/present_value share memory with past_key/past_value inconsistently");
  if (p_k != p_pk && C > 0) {
    const size_t row = size_t(C) * D * sizeof(half), pitch = size_t(present_len) * D * sizeof(half);
    for (auto [dst, src] : {std::pair<void*, void*>{p_k, p_pk}, std::pair<void*, void*>{p_v, p_pv}}) {
      const cudaError_t err = cudaMemcpy2DAsync(dst, pitch, src, row, row, size_t(B * KVH), cudaMemcpyDeviceToDevice, stream);
      if (err != cudaSuccess) return attn_error(std::string("copying past into present: ") + cudaGetErrorString(err));
    }
  }

  leptonc_attn::Params p{};
  p.qkv = static_cast<const half*>(p_qkv);
  p.k_cache = static_cast<half*>(p_k);
  p.v_cache = static_cast<half*>(p_v);
  p.seqlens = static_cast<const int32_t*>(p_seq);
  p.cos = static_cast<const half*>(p_cos);
  p.sin = static_cast<const half*>(p_sin);
  p.out = static_cast<half*>(p_out);
  p.partial_o = g_attn.partial_o;
  p.partial_ml = g_attn.partial_ml;
  p.counters = g_attn.counters;  // B * KVH <= B * H * splits <= kAttnPartialSlots (checked below)
  p.B = int(B), p.S = int(S), p.H = int(H), p.KVH = int(KVH), p.D = int(D), p.C = int(present_len), p.P = int(c_dims[0]);
  p.first_prompt = total_len == S ? 1 : 0;
  p.splits = 1;
  if (S == 1) {
    p.splits = leptonc_attn::decode_splits(p.B, p.KVH, p.C, kn.sms);
    while (p.splits > 1 && (size_t(B * H) * p.splits * D > kAttnPartialFloats || size_t(B * H) * p.splits > kAttnPartialSlots))
      --p.splits;
  }
  const float scale = kn.scale > 0.f ? kn.scale : 1.f / std::sqrt(float(D));
  p.scale_log2 = scale * 1.4426950408889634f;
  if (!leptonc_attn::launch(p, stream)) return attn_error("shapes outside what the kernels serve");
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : attn_error(std::string("launch: ") + cudaGetErrorString(err));
}

const char* ORT_API_CALL attn_name(const OrtCustomOp*) { return "CachedAttention"; }
size_t ORT_API_CALL attn_input_count(const OrtCustomOp*) { return 7; }
size_t ORT_API_CALL attn_output_count(const OrtCustomOp*) { return 3; }
ONNXTensorElementDataType ORT_API_CALL attn_input_type(const OrtCustomOp*, size_t index) {
  return (index == 3 || index == 4) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
// total_sequence_length is read on the host (as GroupQueryAttention reads it): a captured step keeps its value.
OrtMemType ORT_API_CALL attn_input_memory(const OrtCustomOp*, size_t index) {
  return index == 4 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
}

OrtCustomOp make_attn_op() {
  OrtCustomOp op = derived_op(attn_name, attn_input_type, attn_input_count, create_attn, compute_attn, destroy_of<AttnKernel>);
  op.GetOutputTypeCount = attn_output_count;
  op.GetInputMemoryType = attn_input_memory;
  return op;
}

OrtCustomOp g_cached_attention = make_attn_op();

}  // namespace
