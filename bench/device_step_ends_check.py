"""ai.leptonc.LogitsArgMax and ai.leptonc.MaskLengths on the GPU, before any bundle uses them: the ops at the two
ends of a decode step (passes/use_kernels.py), each as one node against numpy and against the ONNX Runtime ops they
replace, on the CUDA provider.

    LEPTONC_ORT_INCLUDE=$PWD/.ort-include python3 bench/device_step_ends_check.py OUT.json

LogitsArgMax: fp16 rows [R, V] -> float32 logits [B, K, V] (must equal the fp16 values exactly) and the first index
of each row's maximum (must equal numpy's argmax of the float32 values: ties go to the lower index, a NaN counts as
the maximum). Shapes: llama's and smollm2's vocabularies at one row (the decode step) and 16 rows, a vocabulary
that is not a multiple of 8 (the kernel's scalar path), many rows (one block a row), and rows whose maximum is tied
across chunks, repeated, or NaN. Each is also run through ONNX Runtime's Cast + Reshape + ArgMax.
MaskLengths: int64 masks [B, T] -> int32 sum - 1 per row, against ReduceSum, Sub and Cast.

Exit status 1 when any comparison differs; the JSON says which.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CUDA = [("CUDAExecutionProvider", {"device_id": "0"})]
# (B, K, V, what the rows hold)
ARGMAX_CASES = ((1, 1, 128256, "random"), (16, 1, 128256, "random"), (1, 1, 49152, "random"), (4, 1, 1001, "random"),
                (2, 300, 49152, "random"), (1, 1, 128256, "tie across chunks"), (3, 1, 128256, "all equal"),
                (2, 1, 128256, "nan"), (1, 1, 8, "random"), (0, 1, 1000, "random"))
MASK_CASES = ((1, 256, "prefix"), (16, 1280, "prefix"), (3, 7, "ragged"), (2, 100000, "prefix"))


def opsets() -> list:
    return [helper.make_opsetid("", 17), helper.make_opsetid("ai.leptonc", 1)]


def argmax_model(v: int, ours: bool) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["rows", v])
    pos = helper.make_tensor_value_info("logits_positions", TensorProto.INT64, ["batch", "k"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "k", v])
    token = helper.make_tensor_value_info("next_token", TensorProto.INT64, ["batch", "k"])
    if ours:
        nodes, inits = [helper.make_node("LogitsArgMax", ["x", "logits_positions"], ["logits", "next_token"],
                                         domain="ai.leptonc")], []
    else:  # what passes/select_logits.py and passes/greedy_token.py leave
        inits = [numpy_helper.from_array(np.array([v], np.int64), "vocab")]
        nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                 helper.make_node("Shape", ["logits_positions"], ["bk"]),
                 helper.make_node("Concat", ["bk", "vocab"], ["shape"], axis=0),
                 helper.make_node("Reshape", ["xf", "shape"], ["logits"]),
                 helper.make_node("ArgMax", ["logits"], ["next_token"], axis=-1, keepdims=0)]
    graph = helper.make_graph(nodes, "logits_argmax", [x, pos], [logits, token], inits)
    return helper.make_model(graph, opset_imports=opsets(), ir_version=8)


def mask_model(ours: bool) -> onnx.ModelProto:
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])
    out = helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"])
    if ours:
        nodes, inits = [helper.make_node("MaskLengths", ["attention_mask"], ["seqlens_k"], domain="ai.leptonc")], []
    else:  # passes/fuse_attention.py's mask-sum contract
        inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1"), numpy_helper.from_array(np.array(1, np.int64), "one")]
        nodes = [helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["count"], keepdims=0),
                 helper.make_node("Sub", ["count", "one"], ["last"]),
                 helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32)]
    graph = helper.make_graph(nodes, "mask_lengths", [mask], [out], inits)
    return helper.make_model(graph, opset_imports=opsets(), ir_version=8)


def session(ort, proto: onnx.ModelProto, lib: str | None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if lib:
        so.register_custom_ops_library(lib)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=CUDA)


def argmax_rows(rng, r: int, v: int, what: str) -> np.ndarray:
    x = (rng.standard_normal((r, v)) * 3).astype(np.float16)
    for i in range(r):
        if what == "tie across chunks":  # the same maximum in two chunks and twice within the later one
            x[i, [5000, 70001, 70002]] = np.float16(60.0)
        elif what == "all equal":
            x[i, :] = np.float16(-1.5)
        elif what == "nan":
            x[i, [10, 90000]] = np.float16(np.nan)
            x[i, 5] = np.float16(65000.0)
    return x


def numpy_argmax(xf: np.ndarray) -> np.ndarray:
    """numpy's argmax (the first NaN where a row has one, else the first maximum)."""
    return np.argmax(xf, axis=-1) if xf.size else np.zeros(xf.shape[:-1], np.int64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    args = ap.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    from leptonc.targets.kernels import build_library

    t = time.perf_counter()
    lib = str(build_library((9, 0)).path)
    result: dict = {"onnxruntime": ort.__version__, "build_seconds": round(time.perf_counter() - t, 1),
                    "logits_argmax": [], "mask_lengths": []}
    ok = True
    rng = np.random.default_rng(20)
    sessions = {}
    for b, k, v, what in ARGMAX_CASES:
        x = argmax_rows(rng, b * k, v, what)
        pos = np.zeros((b, k), np.int64)
        xf = x.astype(np.float32)
        expected = numpy_argmax(xf).reshape(b, k)
        row = {"B": b, "K": k, "V": v, "rows": what}
        for who, ours in (("leptonc", True), ("onnxruntime", False)):
            key = (v, ours)
            if key not in sessions:
                sessions[key] = session(ort, argmax_model(v, ours), lib if ours else None)
            try:
                logits, token = sessions[key].run(None, {"x": x, "logits_positions": pos})
            except Exception as exc:  # noqa: BLE001 - recorded as a failed case
                row[f"{who}_error"] = str(exc)[:300]
                if ours:
                    ok = False
                continue
            row[f"{who}_logits_exact"] = bool(logits.shape == (b, k, v) and np.array_equal(
                logits.reshape(-1, v), xf, equal_nan=True))
            row[f"{who}_token_equal"] = bool(token.shape == (b, k) and np.array_equal(token, expected))
            if not row[f"{who}_token_equal"] and token.size:
                row[f"{who}_token_first_bad"] = {"got": token.reshape(-1)[:4].tolist(),
                                                 "numpy": expected.reshape(-1)[:4].tolist()}
            if ours:
                ok &= row["leptonc_logits_exact"] and row["leptonc_token_equal"]
        result["logits_argmax"].append(row)
        print(json.dumps(row), flush=True)
    for b, t_len, what in MASK_CASES:
        if what == "prefix":
            lengths = rng.integers(1, t_len + 1, size=b)
            mask = (np.arange(t_len)[None, :] < lengths[:, None]).astype(np.int64)
        else:
            mask = rng.integers(0, 2, size=(b, t_len)).astype(np.int64)
        expected = (mask.sum(axis=1) - 1).astype(np.int32)
        row = {"B": b, "T": t_len, "mask": what}
        for who, ours in (("leptonc", True), ("onnxruntime", False)):
            got = session(ort, mask_model(ours), lib if ours else None).run(None, {"attention_mask": mask})[0]
            row[f"{who}_equal"] = bool(got.dtype == np.int32 and np.array_equal(got, expected))
            if ours:
                ok &= row["leptonc_equal"]
        result["mask_lengths"].append(row)
        print(json.dumps(row), flush=True)
    result["all_pass"] = bool(ok)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("all pass" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
