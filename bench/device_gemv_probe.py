"""Which fp16 weight layout ONNX Runtime's CUDA provider multiplies fastest at decode sizes (bench only,
issue 8 lines 1 and 3).

For the llama-1b-shape matrices (q/k/v, o, gate+up, down and the LM head: K x N) at M = 1 and 16 rows,
times R independent products (distinct weights, so nothing stays in L2) replayed in a CUDA graph, so
kernel launches do not count, for:
  matmul    - MatMul(x, W[K, N])                         (what the exported graph has)
  fused_tb  - com.microsoft FusedMatMul(x, W[N, K], transB=1)
  gemm_tb   - Gemm(x, W[N, K], transB=1)
and reports microseconds per product and the weight read rate (TB/s).

    python3 bench/device_gemv_probe.py OUT.json [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from device_nbits_probe import bound_session

SHAPES = {"qkv": (2048, 3072, 8), "o": (2048, 2048, 8), "gate_up": (2048, 16384, 4), "down": (8192, 2048, 8),
          "head": (2048, 128256, 2)}
LAYOUTS = ("matmul", "fused_tb", "gemm_tb")


def build(k: int, n: int, m: int, reps: int, layout: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [m, k])
    outs, nodes, inits = [], [], []
    for r in range(reps):
        y = f"y{r}"
        outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT16, [m, n]))
        w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float16)  # [N, K]
        if layout == "matmul":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{r}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{r}"], [y]))
        elif layout == "fused_tb":
            inits.append(numpy_helper.from_array(w, f"w{r}"))
            nodes.append(helper.make_node("FusedMatMul", ["x", f"w{r}"], [y], domain="com.microsoft", transB=1))
        else:
            inits.append(numpy_helper.from_array(w, f"w{r}"))
            nodes.append(helper.make_node("Gemm", ["x", f"w{r}"], [y], transB=1))
    graph = helper.make_graph(nodes, "probe", [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # what onnxruntime 1.31 reads
    return model


def time_model(ort, path: str, m: int, k: int, n: int, reps: int, iters: int) -> dict:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess, binding, ys = bound_session(ort, path, so, {"device_id": "0", "enable_cuda_graph": "1"}, m, k, n, reps)
    ro = ort.RunOptions()
    for _ in range(10):
        sess.run_with_iobinding(binding, ro)
    blocks = []
    for _ in range(5):
        binding.synchronize_outputs()
        s = time.perf_counter()
        for _ in range(iters // 5):
            sess.run_with_iobinding(binding, ro)
        binding.synchronize_outputs()
        blocks.append((time.perf_counter() - s) / (iters // 5))
    us = statistics.median(blocks) / reps * 1e6
    return {"us_per_product": round(us, 2), "weight_tb_s": round(k * n * 2 / (us * 1e-6) / 1e12, 3),
            "sample": ys[0].numpy()[0, :3].astype(float).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    import onnxruntime as ort

    ort.preload_dlls()
    result = {"onnxruntime": ort.__version__, "cuda_graph": True, "rows": []}
    tmp = "/tmp/gemv_probe.onnx"
    for shape, (k, n, reps) in SHAPES.items():
        for m in (1, 16):
            for layout in LAYOUTS:
                row = {"shape": shape, "K": k, "N": n, "M": m, "layout": layout, "reps": reps}
                try:
                    onnx.save_model(build(k, n, m, reps, layout), tmp)
                    row.update(time_model(ort, tmp, m, k, n, reps, args.iters))
                except Exception as exc:  # noqa: BLE001 - a refused layout is a result
                    row["error"] = f"{type(exc).__name__}: {str(exc)[-300:]}"
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
