"""Which MatMulNBits layout runs fastest on this GPU (bench only).

For the llama-1b-shape decode matrices (q/k/v, o, gate+up, down: K x N), times one ONNX Runtime run of R
independent MatMulNBits nodes (distinct weights, so no cache reuse) at M = 1 and M = 16 rows, for:
  fp16      - MatMul on fp16 weights (the baseline the int4 bundle must beat),
  asym128   - 4-bit, block 128, zero points (what `--int4` writes today),
  sym128    - 4-bit, block 128, no zero points (implicit 8),
  sym64     - 4-bit, block 64, no zero points,
  sym32     - 4-bit, block 32, no zero points,
each with ONNX Runtime's CUTLASS weight-only path (fpA_intB, session config `ep.cuda.fpa_intb_gemm`)
off and on. Whether that path exists in this wheel is reported, not assumed: an "on" run whose
time equals "off" within noise means the build ignored the switch.

    python3 bench/device_nbits_probe.py OUT.json [--reps 6] [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048)}
VARIANTS = {"fp16": None, "asym128": (128, True), "sym128": (128, False), "sym64": (64, False), "sym32": (32, False)}


def build(k: int, n: int, reps: int, variant) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["M", k])
    outs, nodes, inits = [], [], []
    for r in range(reps):
        y = f"y{r}"
        outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT16, ["M", n]))
        if variant is None:
            w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float16)
            inits.append(numpy_helper.from_array(w, f"w{r}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{r}"], [y]))
            continue
        block, asym = variant
        blocks = k // block
        codes = rng.integers(0, 256, size=(n, blocks, block // 2), dtype=np.uint8)
        scales = (rng.random(n * blocks, dtype=np.float32) * 0.01 + 0.001).astype(np.float16)
        inputs = ["x", f"b{r}", f"s{r}"]
        inits += [numpy_helper.from_array(codes, f"b{r}"), numpy_helper.from_array(scales, f"s{r}")]
        if asym:
            zp = rng.integers(0, 256, size=(n * ((blocks + 1) // 2),), dtype=np.uint8)
            inits.append(numpy_helper.from_array(zp, f"z{r}"))
            inputs.append(f"z{r}")
        nodes.append(helper.make_node("MatMulNBits", inputs, [y], domain="com.microsoft", K=k, N=n, bits=4,
                                      block_size=block))
    graph = helper.make_graph(nodes, "probe", [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # what onnxruntime 1.31 reads (a newer onnx writes 14 by default)
    return model


def bound_session(ort, path: str, so, cuda_opts: dict, m: int, k: int, n: int, reps: int):
    """(session, binding, outputs) for a probe model with input x [m, k] and outputs y0..y{reps-1}
    [m, n], all fp16 OrtValues on the GPU, bound once."""
    sess = ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", cuda_opts)])
    x = ort.OrtValue.ortvalue_from_numpy((np.random.default_rng(1).standard_normal((m, k)) * 0.5).astype(np.float16),
                                         "cuda", 0)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", x)
    ys = [ort.OrtValue.ortvalue_from_shape_and_type([m, n], np.float16, "cuda", 0) for _ in range(reps)]
    for r, y in enumerate(ys):
        binding.bind_ortvalue_output(f"y{r}", y)
    binding.x = x  # keep the input alive as long as the binding
    return sess, binding, ys


def time_model(ort, path: str, m: int, k: int, n: int, reps: int, fpa: bool, iters: int) -> dict:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if fpa:
        so.add_session_config_entry("ep.cuda.fpa_intb_gemm", "1")
    os.environ["ORT_FPA_INTB_GEMM"] = "1" if fpa else "0"
    sess, binding, ys = bound_session(ort, path, so, {"device_id": "0"}, m, k, n, reps)
    for _ in range(20):
        sess.run_with_iobinding(binding)
    blocks = []
    for _ in range(5):
        s = time.perf_counter()
        for _ in range(iters // 5):
            sess.run_with_iobinding(binding)
        blocks.append((time.perf_counter() - s) / (iters // 5))
    per_matmul_us = statistics.median(blocks) / reps * 1e6
    return {"us_per_matmul": round(per_matmul_us, 2), "sample": ys[0].numpy()[0, :4].astype(float).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    import onnxruntime as ort

    result = {"onnxruntime": ort.__version__, "reps": args.reps, "rows": []}
    try:
        from onnxruntime.capi import onnxruntime_cuda_quant_preprocess  # noqa: F401

        result["cuda_quant_preprocess_module"] = True
    except Exception as exc:  # noqa: BLE001
        result["cuda_quant_preprocess_module"] = f"absent: {type(exc).__name__}: {exc}"
    tmp = "/tmp/nbits_probe.onnx"
    for shape, (k, n) in SHAPES.items():
        for name, variant in VARIANTS.items():
            onnx.save_model(build(k, n, args.reps, variant), tmp)
            for fpa in ((False,) if variant is None else (False, True)):
                for m in (1, 16):
                    row = {"shape": shape, "K": k, "N": n, "variant": name, "fpA_intB": fpa, "M": m}
                    try:
                        row.update(time_model(ort, tmp, m, k, n, args.reps, fpa, args.iters))
                    except Exception as exc:  # noqa: BLE001 - a refused variant is a result
                        row["error"] = f"{type(exc).__name__}: {str(exc)[-300:]}"
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    with open(args.out, "w") as f:
                        json.dump(result, f, indent=1)
    # weight bytes a step reads per variant (all four shapes), for the bandwidth view
    print("\nshape     M  " + "  ".join(f"{v:>10}" + ("" if v == "fp16" else f" {v + '+f':>10}") for v in VARIANTS))
    for shape in SHAPES:
        for m in (1, 16):
            cells = []
            for v in VARIANTS:
                for fpa in ((False,) if v == "fp16" else (False, True)):
                    hit = [r for r in result["rows"] if r["shape"] == shape and r["variant"] == v and r["M"] == m
                           and r["fpA_intB"] == fpa]
                    cells.append(f"{hit[0].get('us_per_matmul', 'err'):>10}" if hit else f"{'-':>10}")
            print(f"{shape:<8} {m:>2}  " + " ".join(cells))


if __name__ == "__main__":
    main()
