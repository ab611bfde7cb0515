// Time leptonc's MatMulNBitsTiled decode kernel alone (no ONNX Runtime), against cuBLAS on the same
// products in fp16, on the GPU; at M = 1 also MatMulF16's one-row kernel (f16_gemv) on the fp16 weights. Each measurement replays a CUDA graph of R launches over R distinct
// weight copies (more bytes than the L2 cache holds, so every launch reads from HBM); time per product
// = graph time / R. Prints one JSON object per (matrix, M) and writes them all to the file given.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -I$LEPTONC_ORT_INCLUDE bench/kernels_microbench.cu -lcublas -o /tmp/mb
//   /tmp/mb OUT.json
//   /tmp/mb --f16-sweep OUT.json    # MatMulF16's one-row kernels: rows a warp group x warps along K (f16_sweep)
//   /tmp/mb --check K N BITS BLOCK M DIR [auto|stream|gemv[:S] [ACTIVATION [SYMMETRIC]]]   # Y = A x W^T for DIR/{a,b,sz}.bin -> DIR/y.bin (bench/kernels_check.py; SYMMETRIC 1: sz.bin holds the scales alone)
//
// The kernel source is included as built for the bundle (targets/kernels/leptonc_cuda.cu).

#include "../targets/kernels/leptonc_cuda.cu"

#include <cstdlib>
#include <vector>

namespace {

struct Matrix {
  const char* name;
  int K, N, bits, block;
  int activation = 0;  // 1: the SwiGLU epilogue (gate/up products)
  int symmetric = 0;   // 1: 8 bits, SZ the scales alone (what the pass writes for weights without zero points)
};

// One row of A through f16_gemv with r rows a warp group (1, 2 or 4; even with the
// SwiGLU epilogue) and `split` warps along K (1, 2 or 4): the microbenchmark's sweep. False for other choices.
template <int R, bool ACT>
bool launch_f16_split_r(int split, const half* a, const half* w, half* y, int K, int N, cudaStream_t stream) {
  if (split == 1) launch_f16_gemv<R, 1, false>(ACT, a, w, y, K, N, RowNorm{}, stream);
  else if (split == 2) launch_f16_gemv<R, 2, false>(ACT, a, w, y, K, N, RowNorm{}, stream);
  else if (split == 4) launch_f16_gemv<R, 4, false>(ACT, a, w, y, K, N, RowNorm{}, stream);
  else return false;
  return true;
}

bool launch_f16_variant(bool act, int r, int split, const half* a, const half* w, half* y, int K, int N,
                        cudaStream_t stream) {
  if (K > kF16GemvMaxK || K % 8) return false;
  if (act) {
    if (r == 2) return launch_f16_split_r<2, true>(split, a, w, y, K, N, stream);
    if (r == 4) return launch_f16_split_r<4, true>(split, a, w, y, K, N, stream);
    return false;
  }
  if (r == 1) return launch_f16_split_r<1, false>(split, a, w, y, K, N, stream);
  if (r == 2) return launch_f16_split_r<2, false>(split, a, w, y, K, N, stream);
  if (r == 4) return launch_f16_split_r<4, false>(split, a, w, y, K, N, stream);
  return false;
}

const Matrix kMatrices[] = {
    {"llama qkv", 2048, 3072, 4, 128},      {"llama o", 2048, 2048, 4, 128},
    {"llama gate_up", 2048, 16384, 4, 128}, {"llama down", 8192, 2048, 4, 128},
    {"llama head int8", 2048, 128256, 8, 64}, {"llama head int8 symmetric", 2048, 128256, 8, 64, 0, 1},
    {"smollm2 qkv", 576, 960, 4, 128},
    {"smollm2 gate_up", 576, 3072, 4, 128}, {"smollm2 down", 1536, 576, 4, 128},
    {"llama gate_up swiglu", 2048, 16384, 4, 128, 1}, {"smollm2 gate_up swiglu", 576, 3072, 4, 128, 1},
};

__global__ void fill_bytes(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    p[i] = uint8_t(x >> 24);
  }
}

__global__ void fill_half(half* p, size_t n, float base, float spread, uint32_t seed) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2246822519u ^ seed;
    x ^= x >> 15;
    x *= 0x27d4eb2du;
    p[i] = __float2half(base + spread * (float(x >> 8) / float(1u << 24) - 0.5f));
  }
}

void check(cudaError_t e, const char* where) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", where, cudaGetErrorString(e));
    std::exit(1);
  }
}

constexpr size_t kPastL2Bytes = size_t(320) << 20;  // well past the H100's 50 MB L2

// Distinct copies of fp16 weights (n halves each, ~0.01 in size), enough to hold more bytes than the L2 (at least 2, at
// most max_copies), so each timed launch reads its weights from HBM.
std::vector<half*> weight_copies(cudaStream_t s, size_t n, size_t max_copies) {
  const size_t bytes = n * sizeof(half);
  std::vector<half*> ws(std::max<size_t>(2, std::min<size_t>(max_copies, kPastL2Bytes / bytes)));
  for (size_t r = 0; r < ws.size(); ++r) {
    check(cudaMalloc(&ws[r], bytes), "malloc W");
    fill_half<<<1024, 256, 0, s>>>(ws[r], n, 0.f, 0.02f, 11u + uint32_t(r));
  }
  return ws;
}

template <typename F>
float graph_ms(cudaStream_t s, int reps, F&& body) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  check(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), "capture");
  for (int r = 0; r < reps; ++r) body(r);
  check(cudaStreamEndCapture(s, &graph), "end capture");
  check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  for (int i = 0; i < 3; ++i) cudaGraphLaunch(exec, s);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const int iters = 20;
  cudaEventRecord(a, s);
  for (int i = 0; i < iters; ++i) cudaGraphLaunch(exec, s);
  cudaEventRecord(b, s);
  check(cudaEventSynchronize(b), "sync");
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return ms / iters;
}

}  // namespace

std::vector<char> read_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) std::fprintf(stderr, "cannot read %s\n", path.c_str()), std::exit(1);
  std::fseek(f, 0, SEEK_END);
  std::vector<char> data(std::ftell(f));
  std::fseek(f, 0, SEEK_SET);
  if (std::fread(data.data(), 1, data.size(), f) != data.size()) std::exit(1);
  std::fclose(f);
  return data;
}

template <typename T>
T* to_device(const std::vector<char>& host) {
  T* p = nullptr;
  check(cudaMalloc(&p, host.size()), "malloc");
  check(cudaMemcpy(p, host.data(), host.size(), cudaMemcpyHostToDevice), "copy");
  return p;
}

int check_mode(int argc, char** argv) {
  NBitsKernel kn;
  kn.K = std::atoi(argv[2]), kn.N = std::atoi(argv[3]), kn.bits = std::atoi(argv[4]), kn.block = std::atoi(argv[5]);
  kn.activation = argc > 9 ? std::atoi(argv[9]) : 0;  // 1: SwiGLU epilogue, Y has N / 2 columns
  kn.symmetric = argc > 10 ? std::atoi(argv[10]) : 0;  // 1: sz.bin holds the scales alone (8 bits)
  if (kn.symmetric != 0 && (kn.symmetric != 1 || kn.bits != 8)) std::fprintf(stderr, "symmetric: 8 bits only\n"), std::exit(2);
  const int64_t n_out = kn.activation == 1 ? kn.N / 2 : kn.N;
  const int m = std::atoi(argv[6]);
  const std::string dir = argv[7];
  check(ensure_shared() == nullptr ? cudaSuccess : cudaErrorUnknown, "ensure_shared");
  auto* a = to_device<half>(read_file(dir + "/a.bin"));
  auto* b = to_device<uint8_t>(read_file(dir + "/b.bin"));
  auto* sz = to_device<half>(read_file(dir + "/sz.bin"));
  half* y = nullptr;
  check(cudaMalloc(&y, size_t(m) * n_out * sizeof(half)), "malloc Y");
  cudaStream_t s;
  check(cudaStreamCreate(&s), "stream");
  // argv[8], optional: "stream" or "gemv[:S]" forces a decode kernel (bench/kernels_check.py checks each)
  Path path = Path::kAuto;
  int force_s = 0, force_pd = 0;
  if (argc > 8) {
    const std::string v = argv[8];
    if (v == "stream") path = Path::kStream;
    if (v.rfind("gemv", 0) == 0) path = Path::kGemv, force_s = v.size() > 5 ? std::atoi(v.c_str() + 5) : 0;
    const size_t colon = v.find(':', 5);  // gemv:8:4, the rolling window
    if (path == Path::kGemv && colon != std::string::npos) force_pd = std::atoi(v.c_str() + colon + 1);
  }
  if (path == Path::kGemv && gemv_plan(m, int(kn.K), int(kn.N), int(kn.bits), force_s, 0, true, force_pd).s == 0)
    return 3;  // n/a
  OrtStatus* st = kn.bits == 4 ? launch<4>(kn, a, m, b, sz, y, s, path, force_s, 0, force_pd)
                               : launch<8>(kn, a, m, b, sz, y, s, path, force_s, 0, force_pd);
  if (st != nullptr) std::fprintf(stderr, "launch failed\n"), std::exit(2);
  check(cudaStreamSynchronize(s), "run");
  std::vector<char> out(size_t(m) * n_out * sizeof(half));
  check(cudaMemcpy(out.data(), y, out.size(), cudaMemcpyDeviceToHost), "copy back");
  FILE* f = std::fopen((dir + "/y.bin").c_str(), "wb");
  std::fwrite(out.data(), 1, out.size(), f);
  std::fclose(f);
  return 0;
}

// --f16-sweep OUT.json: f16_gemv with 1, 2 and 4 warps along K at r rows a warp group, one
// row of A, on the fp16 products of llama-1b-shape and smollm2 (distinct weight copies past the L2, CUDA graph as
// above). Each variant's output is compared with the shipped choice's (launch_f16, whose kernel the device check
// holds to float64): max |y - y_shipped| / max |y_shipped|.
int f16_sweep(const char* out_path) {
  cudaStream_t s;
  check(cudaStreamCreate(&s), "stream");
  check(ensure_shared(true, false) == nullptr ? cudaSuccess : cudaErrorUnknown, "ensure_shared");
  struct F16Matrix {
    const char* name;
    int K, N, activation;
  };
  const F16Matrix mats[] = {{"llama qkv", 2048, 3072, 0},      {"llama o", 2048, 2048, 0},
                            {"llama gate_up swiglu", 2048, 16384, 1}, {"llama down", 8192, 2048, 0},
                            {"llama head", 2048, 128256, 0},   {"smollm2 qkv", 576, 960, 0},
                            {"smollm2 o", 576, 576, 0},        {"smollm2 gate_up swiglu", 576, 3072, 1},
                            {"smollm2 down", 1536, 576, 0},    {"smollm2 head", 576, 49152, 0}};
  std::string all = "[";
  for (const F16Matrix& mx : mats) {
    const size_t w_bytes = size_t(mx.N) * mx.K * sizeof(half);
    const std::vector<half*> ws = weight_copies(s, size_t(mx.N) * mx.K, 64);
    const int reps = int(ws.size());
    half *a, *y, *y_ref;
    const int n_out = mx.activation ? mx.N / 2 : mx.N;
    check(cudaMalloc(&a, size_t(mx.K) * sizeof(half)), "malloc A");
    check(cudaMalloc(&y, size_t(n_out) * sizeof(half)), "malloc Y");
    check(cudaMalloc(&y_ref, size_t(n_out) * sizeof(half)), "malloc Y ref");
    fill_half<<<256, 256, 0, s>>>(a, mx.K, 0.f, 1.f, 3u);
    F16Kernel fk;
    fk.K = mx.K, fk.N = mx.N, fk.activation = mx.activation;
    if (launch_f16(fk, a, 1, ws[0], y_ref, RowNorm{}, s) != nullptr) std::exit(2);
    std::vector<half> ref(n_out), got(n_out);
    check(cudaMemcpyAsync(ref.data(), y_ref, n_out * sizeof(half), cudaMemcpyDeviceToHost, s), "copy ref");
    check(cudaStreamSynchronize(s), "ref");
    float ref_max = 0.f;
    for (half v : ref) ref_max = std::max(ref_max, std::fabs(__half2float(v)));
    const F16Plan shipped = f16_plan(mx.K, mx.N, mx.activation == 1, f16_tuned());  // what launch_f16 runs
    const float shipped_ms = graph_ms(s, reps, [&](int r) {
      if (launch_f16(fk, a, 1, ws[r], y, RowNorm{}, s) != nullptr) std::exit(2);
    });
    {  // the shipped plan with the persistent grid (LEPTONC_F16_PERSISTENT=1): time and agreement
      const bool act = mx.activation == 1;
      launch_f16_gemv_rows<false>(shipped.rows, shipped.split, act, a, ws[0], y, mx.K, mx.N, RowNorm{}, s, true);
      check(cudaMemcpyAsync(got.data(), y, n_out * sizeof(half), cudaMemcpyDeviceToHost, s), "copy persistent");
      check(cudaStreamSynchronize(s), "persistent");
      float err = 0.f;
      for (int i = 0; i < n_out; ++i) err = std::max(err, std::fabs(__half2float(got[i]) - __half2float(ref[i])));
      const float ms = graph_ms(s, reps, [&](int r) {
        launch_f16_gemv_rows<false>(shipped.rows, shipped.split, act, a, ws[r], y, mx.K, mx.N, RowNorm{}, s, true);
      });
      char line[512];
      std::snprintf(line, sizeof(line),
                    "{\"matrix\": \"%s\", \"K\": %d, \"N\": %d, \"activation\": %d, \"persistent\": 1, "
                    "\"rows_a_group\": %d, \"split\": %d, \"R\": %d, \"us\": %.2f, \"TBps\": %.2f, "
                    "\"shipped_us\": %.2f, \"rel_diff_vs_shipped\": %.2e}",
                    mx.name, mx.K, mx.N, mx.activation, shipped.rows, shipped.split, reps, 1e3 * ms / reps,
                    double(w_bytes) / (1e3 * ms / reps) / 1e6, 1e3 * shipped_ms / reps,
                    double(err) / std::max(ref_max, 1e-9f));
      std::printf("%s\n", line);
      all += (all.size() > 1 ? ",\n " : "") + std::string(line);
    }
    for (int rows : {1, 2, 4})
    for (int split : {1, 2, 4}) {
      if (!launch_f16_variant(mx.activation == 1, rows, split, a, ws[0], y, mx.K, mx.N, s)) continue;
      check(cudaMemcpyAsync(got.data(), y, n_out * sizeof(half), cudaMemcpyDeviceToHost, s), "copy");
      check(cudaStreamSynchronize(s), "variant");
      float err = 0.f;
      for (int i = 0; i < n_out; ++i) err = std::max(err, std::fabs(__half2float(got[i]) - __half2float(ref[i])));
      const float ms = graph_ms(s, reps, [&](int r) {
        if (!launch_f16_variant(mx.activation == 1, rows, split, a, ws[r], y, mx.K, mx.N, s)) std::exit(2);
      });
      const double us = 1e3 * ms / reps, us_shipped = 1e3 * shipped_ms / reps;
      char line[512];
      std::snprintf(line, sizeof(line),
                    "{\"matrix\": \"%s\", \"K\": %d, \"N\": %d, \"activation\": %d, \"rows_a_group\": %d, \"split\": %d, "
                    "\"R\": %d, \"us\": %.2f, \"TBps\": %.2f, \"shipped_us\": %.2f, \"rel_diff_vs_shipped\": %.2e, "
                    "\"shipped_rows\": %d, \"shipped_split\": %d}",
                    mx.name, mx.K, mx.N, mx.activation, rows, split, reps, us, double(w_bytes) / us / 1e6, us_shipped,
                    double(err) / std::max(ref_max, 1e-9f), shipped.rows, shipped.split);
      std::printf("%s\n", line);
      std::fflush(stdout);
      all += (all.size() > 1 ? ",\n " : "") + std::string(line);
    }
    for (half* w : ws) cudaFree(w);
    cudaFree(a), cudaFree(y), cudaFree(y_ref);
  }
  all += "]\n";
  FILE* f = std::fopen(out_path, "w");
  if (f) std::fputs(all.c_str(), f), std::fclose(f);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--f16-sweep") return f16_sweep(argv[2]);
  if (argc >= 8 && std::string(argv[1]) == "--check") return check_mode(argc, argv);
  cudaStream_t s;
  check(cudaStreamCreate(&s), "stream");
  cublasHandle_t blas;
  cublasCreate(&blas);
  cublasSetStream(blas, s);
  check(ensure_shared() == nullptr ? cudaSuccess : cudaErrorUnknown, "ensure_shared");
  std::string all = "[";
  for (const Matrix& mx : kMatrices) {
    const int step_k = mx.bits == 4 ? 128 : 64;
    const int steps = (mx.K + step_k - 1) / step_k, n_tiles = (mx.N + 7) / 8;
    const int blocks_t = (steps * step_k + mx.block - 1) / mx.block;
    const size_t b_bytes = size_t(n_tiles) * steps * 512,
                 sz_count = size_t(n_tiles) * blocks_t * 8 * (mx.symmetric ? 1 : 2);  // scales alone, or pairs
    const int reps = int(std::max<size_t>(2, std::min<size_t>(64, kPastL2Bytes / b_bytes)));
    std::vector<uint8_t*> bs(reps);
    std::vector<half*> szs(reps);
    for (int r = 0; r < reps; ++r) {
      check(cudaMalloc(&bs[r], b_bytes), "malloc B");
      check(cudaMalloc(&szs[r], sz_count * sizeof(half)), "malloc SZ");
      fill_bytes<<<1024, 256, 0, s>>>(bs[r], b_bytes, 17u + r);
      fill_half<<<256, 256, 0, s>>>(szs[r], sz_count, 0.01f, 0.005f, 5u + r);  // scale ~0.01 (z lanes: any)
    }
    half *a, *y;
    check(cudaMalloc(&a, size_t(16) * mx.K * sizeof(half)), "malloc A");
    check(cudaMalloc(&y, size_t(16) * mx.N * sizeof(half)), "malloc Y");
    fill_half<<<256, 256, 0, s>>>(a, size_t(16) * mx.K, 0.f, 1.f, 3u);
    // fp16 weights for cuBLAS, enough distinct copies to miss L2 as well
    const size_t w_bytes = size_t(mx.N) * mx.K * sizeof(half);
    const std::vector<half*> ws = weight_copies(s, size_t(mx.N) * mx.K, 16);
    const int w_reps = int(ws.size());
    check(cudaStreamSynchronize(s), "fill");
    NBitsKernel kn;
    kn.K = mx.K, kn.N = mx.N, kn.bits = mx.bits, kn.block = mx.block, kn.activation = mx.activation;
    kn.symmetric = mx.symmetric;
    // (path, S, tiles a block): the shipped choice first, then the alternatives at M <= 4
    struct Variant {
      const char* name;
      Path path;
      int s, tb, pd;  // pd > 0: the rolling window (pd steps in flight a warp), M = 1 only
    };
    const Variant variants[] = {{"auto", Path::kAuto, 0, 0, 0},     {"stream", Path::kStream, 0, 0, 0},
                                {"gemv", Path::kGemv, 0, 0, 0},     {"gemv s4", Path::kGemv, 4, 0, 0},
                                {"gemv s8 tb1", Path::kGemv, 8, 1, 0}, {"gemv s16", Path::kGemv, 16, 0, 0},
                                {"gemv s8 pd4", Path::kGemv, 8, 0, 4}, {"gemv s8 pd4 tb2", Path::kGemv, 8, 2, 4}};
    for (int m : {1, 4, 16})
    for (const Variant& v : variants) {
      if (v.path != Path::kAuto && m > 4) continue;
      if (v.pd > 0 && m > 1) continue;
      if (v.path == Path::kGemv && gemv_plan(m, mx.K, mx.N, mx.bits, v.s, v.tb, true, v.pd).s == 0) continue;
      const float ms = graph_ms(s, reps, [&](int r) {
        OrtStatus* st = mx.bits == 4 ? launch<4>(kn, a, m, bs[r], szs[r], y, s, v.path, v.s, v.tb, v.pd)
                                     : launch<8>(kn, a, m, bs[r], szs[r], y, s, v.path, v.s, v.tb, v.pd);
        if (st != nullptr) std::exit(2);
      });
      static float ms_fp16 = 0.f, ms_f16 = 0.f, ms_norm = 0.f;  // once per M (the auto row), reused below
      if (v.path == Path::kAuto) {
        ms_fp16 = graph_ms(s, w_reps, [&](int r) {
          const float alpha = 1.f, beta = 0.f;
          cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, mx.N, m, mx.K, &alpha, ws[r], CUDA_R_16F, mx.K, a, CUDA_R_16F,
                       mx.K, &beta, y, CUDA_R_16F, mx.N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        });
        F16Kernel fk;  // the fp16 graphs' op on the same [N, K] weights (one row: f16_gemv)
        fk.K = mx.K, fk.N = mx.N, fk.activation = mx.activation;
        ms_f16 = m == 1 ? graph_ms(s, w_reps, [&](int r) {
          if (launch_f16(fk, a, 1, ws[r], y, RowNorm{}, s) != nullptr) std::exit(2);
        }) : 0.f;
        // NormMatMulF16: the same with RMSNorm(A + skip) x gamma as f16_gemv's prologue (skip, gamma: A's rows 1, 2)
        F16Kernel nk = fk;
        nk.norm = true;
        nk.eps = 1e-5f;
        const RowNorm nm{a + mx.K, a + 2 * mx.K, a + 3 * mx.K, 1e-5f};
        ms_norm = m == 1 ? graph_ms(s, w_reps, [&](int r) {
          if (launch_f16(nk, a, 1, ws[r], y, nm, s) != nullptr) std::exit(2);
        }) : 0.f;
      }
      const double us = 1e3 * ms / reps, us16 = 1e3 * ms_fp16 / w_reps, usf = 1e3 * ms_f16 / w_reps,
                   usn = 1e3 * ms_norm / w_reps;
      const double bytes = double(b_bytes) + double(sz_count) * 2;
      char line[640];
      std::snprintf(line, sizeof(line),
                    "{\"matrix\": \"%s\", \"variant\": \"%s\", \"K\": %d, \"N\": %d, \"bits\": %d, \"block\": %d, "
                    "\"symmetric\": %d, \"M\": %d, \"R\": %d, "
                    "\"us\": %.2f, \"TBps\": %.2f, \"cublas_fp16_us\": %.2f, \"cublas_TBps\": %.2f, \"speedup\": %.2f, "
                    "\"f16_gemv_us\": %.2f, \"f16_gemv_TBps\": %.2f, \"norm_f16_gemv_us\": %.2f}",
                    mx.name, v.name, mx.K, mx.N, mx.bits, mx.block, mx.symmetric, m, reps, us, bytes / us / 1e6, us16,
                    double(w_bytes) / us16 / 1e6, us16 / us, usf, usf > 0 ? double(w_bytes) / usf / 1e6 : 0.0, usn);
      std::printf("%s\n", line);
      std::fflush(stdout);
      all += (all.size() > 1 ? ",\n " : "") + std::string(line);
    }
    for (int r = 0; r < reps; ++r) cudaFree(bs[r]), cudaFree(szs[r]);
    for (int r = 0; r < w_reps; ++r) cudaFree(ws[r]);
    cudaFree(a);
    cudaFree(y);
  }
  all += "]\n";
  if (argc > 1) {
    FILE* f = std::fopen(argv[1], "w");
    if (f) std::fputs(all.c_str(), f), std::fclose(f);
  }
  return 0;
}
