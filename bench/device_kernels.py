"""leptonc's CUDA MatMulNBitsTiled (targets/kernels/) against ONNX Runtime's MatMulNBits, on the GPU.

1. Correctness: for each case (K, N, bits, block, zero points) and M rows, one node of each op on the
   same random inputs (leptonc's node takes them through targets/kernels/layout.py's tiling, as the
   lowering pass does); both compared with a numpy float64 reference of the dequantized product
   (relative max error = max |y - ref| / max |ref|).
2. Speed: per product, in CUDA graphs (ONNX Runtime's enable_cuda_graph, I/O bound once). A run's fixed
   cost is cancelled by timing models of R and 2R independent products (distinct weights, so nothing
   is reused from cache): time per product = (t(2R) - t(R)) / R. Weight bytes / time = read rate.

3. The fp16 ops, always (and alone with `--fp16-only`): SwiGLU (fp16 graphs' SiLU(gate) x up) against a
   numpy float64 reference for each half order, beside ONNX Runtime's Split + QuickGelu + Mul on the same
   input; MatMulF16 (fp16 weights as [N, K], with and without the SwiGLU epilogue) against float64, beside
   ONNX Runtime's MatMul on the same weights; NormMatMulF16 (the same with RMSNorm(A + skip) x gamma in front:
   the product against float64, the sum output exactly) beside SkipSimplifiedLayerNormalization + MatMul;
   NormMatMulNBitsTiled (the same norm in front of int4/int8 weights) beside SkipSimplifiedLayerNormalization +
   MatMulNBits.

    LEPTONC_ORT_INCLUDE=.ort-include python3 bench/device_kernels.py OUT.json [--fp16-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from device_nbits_probe import bound_session

# (name, K, N, bits, block, zero points): the llama-1b-shape and smollm2 decode matrices, plus edge cases
CASES = [
    ("llama qkv", 2048, 3072, 4, 128, True),
    ("llama o", 2048, 2048, 4, 128, True),
    ("llama gate_up", 2048, 16384, 4, 128, True),
    ("llama down", 8192, 2048, 4, 128, True),
    ("llama head int8", 2048, 128256, 8, 64, False),
    ("smollm2 qkv (K 576: padded block)", 576, 960, 4, 128, True),
    ("smollm2 down", 1536, 576, 4, 128, True),
    ("block 32, odd blocks", 608, 200, 4, 32, True),
    ("block 64, no zero points", 576, 1536, 4, 64, False),
    ("int8 with zero points", 1024, 520, 8, 128, True),
]
CHECK_M = (1, 3, 9, 16, 17, 128)
SPEED_CASES = ("llama qkv", "llama o", "llama gate_up", "llama down", "llama head int8", "smollm2 qkv (K 576: padded block)")


def quantized(rng, k: int, n: int, bits: int, block: int, zp: bool):
    blocks = -(-k // block)
    codes = rng.integers(0, 2 ** bits, size=(n, blocks * block), dtype=np.uint8)
    if bits == 4:
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).reshape(n, blocks, block // 2)
    else:
        packed = codes.reshape(n, blocks, block)
    scales = (rng.random((n, blocks), dtype=np.float32) * 0.02 + 0.002).astype(np.float16)
    zeros = rng.integers(0, 2 ** bits, size=(n, blocks), dtype=np.uint8) if zp else None
    z = zeros.astype(np.float64) if zp else np.full((n, blocks), 2 ** (bits - 1), np.float64)
    w = (codes.reshape(n, blocks, block) - z[..., None]) * scales.astype(np.float64)[..., None]
    w = w.reshape(n, -1)[:, :k]
    if zp and bits == 4:
        zz = zeros if blocks % 2 == 0 else np.concatenate([zeros, np.full((n, 1), 8, np.uint8)], axis=1)
        zeros = (zz[:, 0::2] | (zz[:, 1::2] << 4)).astype(np.uint8)
    return packed, scales.reshape(-1), (zeros.reshape(-1) if zp else None), w


def tiled_inputs(packed, scales, zeros, k: int, n: int, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(B tiled, SZ, extra attributes) as passes/use_kernels.py lowers MatMulNBits: 8 bits without zero points keep
    the scales alone in SZ, with symmetric = 1."""
    from leptonc.targets.kernels.layout import tile_nbits

    symmetric = bits == 8 and zeros is None
    tiled, sz = tile_nbits(packed, scales, zeros, k, n, bits, block, scales_only=symmetric)
    return tiled, sz, ({"symmetric": 1} if symmetric else {})


def model(domain: str, k: int, n: int, bits: int, block: int, weights: list) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["M", k])
    outs, nodes, inits = [], [], []
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    for r, (packed, scales, zeros, _) in enumerate(weights):
        if domain == "ai.leptonc":
            tiled, sz, extra = tiled_inputs(packed, scales, zeros, k, n, bits, block)
            inits += [numpy_helper.from_array(tiled, f"b{r}"), numpy_helper.from_array(sz, f"s{r}")]
            nodes.append(helper.make_node("MatMulNBitsTiled", ["x", f"b{r}", f"s{r}"], [f"y{r}"], domain=domain,
                                          **attrs, **extra))
            outs.append(helper.make_tensor_value_info(f"y{r}", TensorProto.FLOAT16, ["M", n]))
            continue
        inputs = ["x", f"b{r}", f"s{r}"]
        inits += [numpy_helper.from_array(packed, f"b{r}"), numpy_helper.from_array(scales, f"s{r}")]
        if zeros is not None:
            inits.append(numpy_helper.from_array(zeros, f"z{r}"))
            inputs.append(f"z{r}")
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"y{r}"], domain=domain, **attrs))
        outs.append(helper.make_tensor_value_info(f"y{r}", TensorProto.FLOAT16, ["M", n]))
    graph = helper.make_graph(nodes, "kernels", [x], outs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    m.ir_version = 10
    return m


CUDA_OPTS = {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}


def options(ort, lib: str | None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if lib:
        so.register_custom_ops_library(lib)
    return so


def session(ort, proto: onnx.ModelProto, lib: str | None):
    return ort.InferenceSession(proto.SerializeToString(), options(ort, lib), providers=[("CUDAExecutionProvider", CUDA_OPTS)])


def run_once(ort, sess, x: np.ndarray) -> np.ndarray:
    return sess.run(["y0"], {"x": x})[0]


def timed(ort, proto, lib, m: int, k: int, n: int, reps: int, iters: int) -> float:
    sess, binding, _ = bound_session(ort, proto.SerializeToString(), options(ort, lib),
                                     {**CUDA_OPTS, "enable_cuda_graph": "1"}, m, k, n, reps)
    for _ in range(10):
        sess.run_with_iobinding(binding)
    blocks = []
    for _ in range(5):
        s = time.perf_counter()
        for _ in range(iters):
            sess.run_with_iobinding(binding)
        blocks.append((time.perf_counter() - s) / iters)
    return statistics.median(blocks)


SWIGLU_CASES = ((1, 8192), (16, 8192), (128, 1536), (3, 8), (0, 64))  # (rows, F)


def fp16_proto(graph) -> onnx.ModelProto:
    """The fp16 checks' model: the standard, com.microsoft and ai.leptonc opsets, IR 8 (what ONNX Runtime 1.31 reads)."""
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                   helper.make_opsetid("ai.leptonc", 1)], ir_version=8)


def swiglu_reference(full: np.ndarray, act: int) -> np.ndarray:
    """SiLU(gate) x up over (gate, up) column pairs of a float64 product when act, else the product."""
    return full[:, 0::2] / (1 + np.exp(-full[:, 0::2])) * full[:, 1::2] if act else full


def swiglu_model(f: int, gate_first: bool, fused: bool) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["rows", 2 * f])
    y = helper.make_tensor_value_info("y0", TensorProto.FLOAT16, ["rows", f])
    if fused:
        nodes = [helper.make_node("SwiGLU", ["x"], ["y0"], domain="ai.leptonc", gate_first=int(gate_first))]
    else:
        gate, up = ("h0", "h1") if gate_first else ("h1", "h0")
        nodes = [helper.make_node("Split", ["x", "sizes"], ["h0", "h1"], axis=-1),
                 helper.make_node("QuickGelu", [gate], ["silu"], domain="com.microsoft", alpha=1.0),
                 helper.make_node("Mul", ["silu", up], ["y0"])]
    graph = helper.make_graph(nodes, "swiglu", [x], [y], [numpy_helper.from_array(np.array([f, f], np.int64), "sizes")])
    return fp16_proto(graph)


def swiglu_check(ort, lib: str, result: dict) -> None:
    rng = np.random.default_rng(1)
    for rows, f in SWIGLU_CASES:
        for gate_first in (True, False):
            x = (rng.standard_normal((rows, 2 * f)) * 2).astype(np.float16)
            g, u = (x[:, :f], x[:, f:]) if gate_first else (x[:, f:], x[:, :f])
            g, u = g.astype(np.float64), u.astype(np.float64)
            ref = g / (1 + np.exp(-g)) * u
            row = {"case": "SwiGLU", "rows": rows, "F": f, "gate_first": gate_first}
            for who, fused, path in (("leptonc", True, lib), ("onnxruntime", False, None)):
                try:
                    y = run_once(ort, session(ort, swiglu_model(f, gate_first, fused), path), x).astype(np.float64)
                    assert y.shape == ref.shape, (y.shape, ref.shape)
                    row[f"{who}_rel_err"] = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-9)) if rows else 0.0
                except Exception as exc:  # noqa: BLE001 - a failure is a result
                    row[f"{who}_error"] = f"{type(exc).__name__}: {str(exc)[-400:]}"
            result["check"].append(row)
            print(json.dumps(row), flush=True)


# (M, K, N, activation): llama-1b-shape and smollm2 products, the LM head, K past the one-row kernel's limit
F16_CASES = ((1, 2048, 3072, 0), (1, 2048, 2048, 0), (1, 2048, 16384, 1), (1, 8192, 2048, 0), (16, 2048, 3072, 0),
             (16, 2048, 16384, 1), (128, 2048, 16384, 1), (1, 576, 960, 0), (1, 576, 3072, 1), (3, 1536, 576, 0),
             (1, 2048, 128256, 0), (1, 24, 40, 0), (1, 20480, 64, 0), (2, 20480, 64, 1))


def ort_product(x: str, n: int, act: int, w_nk: np.ndarray) -> tuple[list, list]:
    """ONNX Runtime's nodes for y0 = x W^T: MatMul on [K, N] (pairs de-interleaved), then Split / QuickGelu / Mul."""
    w = w_nk if not act else np.concatenate([w_nk[0::2], w_nk[1::2]])
    nodes = [helper.make_node("MatMul", [x, "w"], ["p" if act else "y0"])]
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")]
    if act:
        inits.append(numpy_helper.from_array(np.array([n // 2, n // 2], np.int64), "sizes"))
        nodes += [helper.make_node("Split", ["p", "sizes"], ["g", "u"], axis=-1),
                  helper.make_node("QuickGelu", ["g"], ["s"], domain="com.microsoft", alpha=1.0),
                  helper.make_node("Mul", ["s", "u"], ["y0"])]
    return nodes, inits


def f16_model(k: int, n: int, act: int, w_nk: np.ndarray, fused: bool) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["rows", k])
    y = helper.make_tensor_value_info("y0", TensorProto.FLOAT16, ["rows", n // 2 if act else n])
    if fused:
        nodes = [helper.make_node("MatMulF16", ["x", "w"], ["y0"], domain="ai.leptonc", K=k, N=n, activation=act)]
        inits = [numpy_helper.from_array(w_nk, "w")]
    else:
        nodes, inits = ort_product("x", n, act, w_nk)
    graph = helper.make_graph(nodes, "f16", [x], [y], inits)
    return fp16_proto(graph)


def f16_check(ort, lib: str, result: dict) -> None:
    rng = np.random.default_rng(2)
    for m, k, n, act in F16_CASES:
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
        x = rng.standard_normal((m, k)).astype(np.float16)
        ref = swiglu_reference(x.astype(np.float64) @ w.astype(np.float64).T, act)
        row = {"case": "MatMulF16", "M": m, "K": k, "N": n, "activation": act}
        for who, fused, path in (("leptonc", True, lib), ("onnxruntime", False, None)):
            try:
                y = run_once(ort, session(ort, f16_model(k, n, act, w, fused), path), x).astype(np.float64)
                assert y.shape == ref.shape, (y.shape, ref.shape)
                row[f"{who}_rel_err"] = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-9))
            except Exception as exc:  # noqa: BLE001 - a failure is a result
                row[f"{who}_error"] = f"{type(exc).__name__}: {str(exc)[-400:]}"
        result["check"].append(row)
        print(json.dumps(row), flush=True)


# (M, K, N, activation): NormMatMulF16 (the SkipSimplifiedLayerNormalization in front folded in) on the same shapes
NORM_CASES = ((1, 2048, 3072, 0), (1, 2048, 16384, 1), (1, 576, 960, 0), (1, 576, 3072, 1), (1, 2048, 128256, 0),
              (16, 2048, 3072, 0), (16, 2048, 16384, 1), (128, 2048, 16384, 1), (3, 576, 960, 0), (1, 24, 40, 0))


def norm_model(k: int, n: int, act: int, w_nk: np.ndarray, gamma: np.ndarray, fused: bool) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["rows", k])
    skip = helper.make_tensor_value_info("skip", TensorProto.FLOAT16, ["rows", k])
    y = helper.make_tensor_value_info("y0", TensorProto.FLOAT16, ["rows", n // 2 if act else n])
    total = helper.make_tensor_value_info("sum", TensorProto.FLOAT16, ["rows", k])
    inits = [numpy_helper.from_array(gamma, "gamma")]
    if fused:
        nodes = [helper.make_node("NormMatMulF16", ["x", "skip", "gamma", "w"], ["y0", "sum"], domain="ai.leptonc",
                                  K=k, N=n, activation=act, epsilon=1e-5)]
        inits.append(numpy_helper.from_array(w_nk, "w"))
    else:  # ONNX Runtime: SkipSimplifiedLayerNormalization, then the product as in f16_model
        product, more = ort_product("xn", n, act, w_nk)
        nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["xn", "", "", "sum"],
                                  domain="com.microsoft", epsilon=1e-5), *product]
        inits += more
    graph = helper.make_graph(nodes, "norm_f16", [x, skip], [y, total], inits)
    return fp16_proto(graph)


def norm_row(row: dict, who: str, make_session, x: np.ndarray, skip: np.ndarray, ref: np.ndarray,
             total: np.ndarray) -> None:
    """One folded-norm model's outputs (y0, sum) on (x, skip) against the float64 product and the fp16 sum, into
    row as {who}_rel_err and {who}_sum_max_abs_err, or {who}_error."""
    try:
        sess = make_session()
        y, s = (v.astype(np.float64) for v in sess.run(["y0", "sum"], {"x": x, "skip": skip}))
        assert y.shape == ref.shape and s.shape == total.shape, (y.shape, ref.shape, s.shape)
        row[f"{who}_rel_err"] = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-9))
        row[f"{who}_sum_max_abs_err"] = float(np.abs(s - total).max())
    except Exception as exc:  # noqa: BLE001 - a failure is a result
        row[f"{who}_error"] = f"{type(exc).__name__}: {str(exc)[-400:]}"


def norm_check(ort, lib: str, result: dict) -> None:
    """NormMatMulF16 against float64 (the sum rounded to fp16 as the op stores it) and ONNX Runtime's ops beside it."""
    rng = np.random.default_rng(3)
    for m, k, n, act in NORM_CASES:
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
        gamma = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
        x = rng.standard_normal((m, k)).astype(np.float16)
        skip = (3 * rng.standard_normal((m, k))).astype(np.float16)
        total = (x.astype(np.float32) + skip.astype(np.float32)).astype(np.float16).astype(np.float64)
        xn = total / np.sqrt((total ** 2).mean(axis=-1, keepdims=True) + 1e-5) * gamma.astype(np.float64)
        ref = swiglu_reference(xn @ w.astype(np.float64).T, act)
        row = {"case": "NormMatMulF16", "M": m, "K": k, "N": n, "activation": act}
        for who, fused, path in (("leptonc", True, lib), ("onnxruntime", False, None)):
            norm_row(row, who, lambda: session(ort, norm_model(k, n, act, w, gamma, fused), path), x, skip, ref, total)
        result["check"].append(row)
        print(json.dumps(row), flush=True)


# (M, K, N, bits, block, zero points, activation): the few-rows kernel with the norm as its prologue (M 1 on llama's
# qkv and gate|up, the int8 head, K 576 padded to 640), and the norm kernel + product elsewhere (small products
# streamed, M 3 and 16, the prefill's dequantize + cuBLAS at M 128). 8 bits without zero points are symmetric (SZ the
# scales alone, tiled_inputs): the int8 head at M 1, and a small product at M 3 (streamed) and 128 (dequantized).
NORM_NBITS_CASES = ((1, 2048, 3072, 4, 128, True, 0), (1, 2048, 16384, 4, 128, True, 1), (1, 2048, 128256, 8, 64, False, 0),
                    (1, 576, 16384, 4, 128, True, 0), (1, 576, 960, 4, 128, True, 0), (1, 576, 3072, 4, 128, True, 1),
                    (3, 576, 960, 4, 128, False, 0), (16, 2048, 3072, 4, 128, True, 0), (128, 2048, 16384, 4, 128, True, 1),
                    (3, 576, 1536, 8, 64, False, 0), (128, 576, 1536, 8, 64, False, 0))


def norm_nbits_model(k: int, n: int, bits: int, block: int, act: int, w, gamma: np.ndarray, fused: bool) -> onnx.ModelProto:
    packed, scales, zeros, _ = w
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["rows", k])
    skip = helper.make_tensor_value_info("skip", TensorProto.FLOAT16, ["rows", k])
    y = helper.make_tensor_value_info("y0", TensorProto.FLOAT16, ["rows", n // 2 if act else n])
    total = helper.make_tensor_value_info("sum", TensorProto.FLOAT16, ["rows", k])
    inits = [numpy_helper.from_array(gamma, "gamma")]
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    if fused:  # the rows of W are taken as (gate j, up j) pairs where act, as the pass leaves them
        tiled, sz, extra = tiled_inputs(packed, scales, zeros, k, n, bits, block)  # the int8 head: symmetric
        inits += [numpy_helper.from_array(tiled, "b"), numpy_helper.from_array(sz, "s")]
        nodes = [helper.make_node("NormMatMulNBitsTiled", ["x", "skip", "gamma", "b", "s"], ["y0", "sum"],
                                  domain="ai.leptonc", activation=act, epsilon=1e-5, **attrs, **extra)]
    else:  # ONNX Runtime: SkipSimplifiedLayerNormalization, then MatMulNBits (act 0 only)
        inits += [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")]
        inputs = ["xn", "b", "s"]
        if zeros is not None:
            inits.append(numpy_helper.from_array(zeros, "z"))
            inputs.append("z")
        nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["xn", "", "", "sum"],
                                  domain="com.microsoft", epsilon=1e-5),
                 helper.make_node("MatMulNBits", inputs, ["y0"], domain="com.microsoft", **attrs)]
    graph = helper.make_graph(nodes, "norm_nbits", [x, skip], [y, total], inits)
    return fp16_proto(graph)


def norm_nbits_check(ort, lib: str, result: dict) -> None:
    """NormMatMulNBitsTiled against float64 (the sum rounded to fp16 as the op stores it), with ONNX Runtime's
    SkipSimplifiedLayerNormalization + MatMulNBits beside it where there is no SwiGLU epilogue."""
    rng = np.random.default_rng(4)
    for m, k, n, bits, block, zp, act in NORM_NBITS_CASES:
        w = quantized(rng, k, n, bits, block, zp)
        gamma = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
        x = rng.standard_normal((m, k)).astype(np.float16)
        skip = (3 * rng.standard_normal((m, k))).astype(np.float16)
        total = (x.astype(np.float32) + skip.astype(np.float32)).astype(np.float16).astype(np.float64)
        xn = total / np.sqrt((total ** 2).mean(axis=-1, keepdims=True) + 1e-5) * gamma.astype(np.float64)
        ref = swiglu_reference(xn @ w[3].T, act)
        row = {"case": "NormMatMulNBitsTiled", "M": m, "K": k, "N": n, "bits": bits, "block": block,
               "zero_points": zp, "activation": act}
        for who, fused, path in (("leptonc", True, lib), ("onnxruntime", False, None)):
            if fused or not act:
                norm_row(row, who, lambda: session(ort, norm_nbits_model(k, n, bits, block, act, w, gamma, fused), path),
                         x, skip, ref, total)
        result["check"].append(row)
        print(json.dumps(row), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--fp16-only", action="store_true", help="check the fp16 ops (SwiGLU, MatMulF16) only")
    ap.add_argument("--norm-nbits-only", action="store_true",
                    help="NormMatMulNBitsTiled's check alone")
    args = ap.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    from leptonc.targets.kernels import build_library

    t = time.perf_counter()
    lib = build_library((9, 0))
    result = {"onnxruntime": ort.__version__, "library": {**lib.manifest(), "build_seconds": round(time.perf_counter() - t, 1)},
              "check": [], "speed": []}
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(result, indent=1))

    if not args.norm_nbits_only:
        swiglu_check(ort, str(lib.path), result)
        f16_check(ort, str(lib.path), result)
        norm_check(ort, str(lib.path), result)
        save()
    norm_nbits_check(ort, str(lib.path), result)
    save()
    if args.norm_nbits_only:
        return 0
    rng = np.random.default_rng(0)
    for name, k, n, bits, block, zp in CASES if not args.fp16_only else ():
        w = quantized(rng, k, n, bits, block, zp)
        sessions = {}
        for who, domain, path in (("leptonc", "ai.leptonc", str(lib.path)), ("onnxruntime", "com.microsoft", None)):
            try:
                sessions[who] = session(ort, model(domain, k, n, bits, block, [w]), path)
            except Exception as exc:  # noqa: BLE001 - a refused case is a result
                result["check"].append({"case": name, "who": who, "error": f"{type(exc).__name__}: {str(exc)[-400:]}"})
        for m in CHECK_M:
            x = (rng.standard_normal((m, k)) * 0.5).astype(np.float16)
            ref = x.astype(np.float64) @ w[3].T
            row = {"case": name, "K": k, "N": n, "bits": bits, "block": block, "zero_points": zp, "M": m}
            for who, sess in sessions.items():
                try:
                    y = run_once(ort, sess, x).astype(np.float64)
                    row[f"{who}_rel_err"] = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-9))
                except Exception as exc:  # noqa: BLE001
                    row[f"{who}_error"] = f"{type(exc).__name__}: {str(exc)[-400:]}"
            result["check"].append(row)
            print(json.dumps(row), flush=True)
        save()

    for name, k, n, bits, block, zp in CASES if not args.fp16_only else ():
        if name not in SPEED_CASES:
            continue
        first = quantized(rng, k, n, bits, block, zp)
        wbytes = first[0].nbytes + first[1].nbytes + (first[2].nbytes if zp else 0)
        reps = max(1, min(args.reps, (400 << 20) // wbytes))  # 2R copies must fit one protobuf (2 GB)
        weights = [first] + [quantized(rng, k, n, bits, block, zp) for _ in range(2 * reps - 1)]
        for who, domain, path in (("leptonc", "ai.leptonc", str(lib.path)), ("onnxruntime", "com.microsoft", None)):
            small = model(domain, k, n, bits, block, weights[:reps])
            big = model(domain, k, n, bits, block, weights)
            for m in (1, 16):
                row = {"case": name, "who": who, "M": m, "weight_bytes": wbytes, "R": reps}
                try:
                    t1 = timed(ort, small, path, m, k, n, reps, args.iters)
                    t2 = timed(ort, big, path, m, k, n, 2 * reps, args.iters)
                    per = (t2 - t1) / reps
                    row.update({"us_per_product": round(per * 1e6, 2), "read_TBps": round(wbytes / per / 1e12, 2),
                                "run_us_R": round(t1 * 1e6, 1), "run_us_2R": round(t2 * 1e6, 1)})
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[-400:]}"
                result["speed"].append(row)
                print(json.dumps(row), flush=True)
                save()
    bad = [r for r in result["check"] if "leptonc_rel_err" in r and r["leptonc_rel_err"] > 5e-3]
    result["check_ok"] = not bad and all("leptonc_rel_err" in r for r in result["check"] if "M" in r or r.get("case") == "SwiGLU")
    result["check_ok"] = result["check_ok"] and all("leptonc_rel_err" in r for r in result["check"]
                                                    if r.get("case") in ("MatMulF16", "NormMatMulF16"))
    result["check_ok"] = result["check_ok"] and all(r.get("leptonc_sum_max_abs_err", 1.0) == 0.0 for r in result["check"]
                                                    if r.get("case") == "NormMatMulF16")
    save()
    print(f"check ok: {result['check_ok']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
