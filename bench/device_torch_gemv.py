"""How fast cuBLAS itself multiplies the llama-1b-shape decode matrices, outside ONNX Runtime (bench only,
issue 8 lines 1 and 3): PyTorch fp16 products at M = 1 and 16, weights in [N, K] (F.linear) and [K, N]
(x @ W) layouts, R distinct weights per shape so that nothing stays in L2, captured in one CUDA graph and
timed with CUDA events. Compare with bench/device_gemv_probe.py (ONNX Runtime's MatMul on the same
shapes): if cuBLAS reads these at close to the copy bandwidth here, ONNX Runtime's path loses the
difference; if not, only custom kernels can reach issue 8's floor fraction.

    python3 bench/device_torch_gemv.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048),
          "head": (2048, 128256)}
TARGET_BYTES = 1 << 30  # about 1 GiB of distinct weights per timed graph


def time_graph(fn, iters: int = 50) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e-3  # seconds per replay


def main() -> None:
    out = sys.argv[1]
    torch.manual_seed(0)
    rows = []
    for shape, (k, n) in SHAPES.items():
        reps = max(1, TARGET_BYTES // (k * n * 2))
        w_nk = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(reps)]
        w_kn = [w.t().contiguous() for w in w_nk]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            for layout, ws, op in (("linear W[N,K]", w_nk, lambda x, w: F.linear(x, w)),
                                   ("matmul W[K,N]", w_kn, lambda x, w: x @ w)):
                ys = [None] * reps

                def run():
                    for i, w in enumerate(ws):
                        ys[i] = op(x, w)

                sec = time_graph(run) / reps
                row = {"shape": shape, "K": k, "N": n, "M": m, "layout": layout, "reps": reps,
                       "us_per_product": round(sec * 1e6, 2), "weight_tb_s": round(k * n * 2 / sec / 1e12, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del w_nk, w_kn
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "cuda_graph": True,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
