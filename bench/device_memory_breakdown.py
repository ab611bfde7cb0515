"""Where a CUDA bundle's device memory goes, step by step (bench only, issue 8 line 6).

NVML's device memory in use, relative to this process's start, after each step: the CUDA primary context;
a bare one-node ONNX Runtime session on the CUDA provider, created and run (what one more provider instance
costs: its cuBLAS, cuBLASLt and cuDNN handles, its arena); the bundle's session; then, inside the runner's
first batch-16 prefill, before and after its K/V block allocator session is made and the block allocated, and
after the main session's first run; then 8 decode steps. Run it under different settings (CUBLAS_WORKSPACE_CONFIG,
LEPTONC_PREFILL_TOKENS, LEPTONC_KERNEL_BUFFER_MB, ...) to see what each moves.

    python3 bench/device_memory_breakdown.py BUNDLE OUT.json [--batch 16] [--no-bare]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
from pathlib import Path

import numpy as np

SETTINGS = ("CUBLAS_WORKSPACE_CONFIG", "LEPTONC_PREFILL_TOKENS", "LEPTONC_KERNEL_BUFFER_MB",
            "LEPTONC_CUBLAS_WORKSPACE_MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-bare", action="store_true", help="skip the bare one-node session")
    args = ap.parse_args()
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    base = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    steps: list[tuple[str, float]] = []

    def mark(label: str) -> None:
        steps.append((label, round((pynvml.nvmlDeviceGetMemoryInfo(handle).used - base) / 2**20, 1)))

    mark("start")
    cuda = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    if cuda.cuInit(0) == 0 and cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0:
        mark("cuda context")

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime import ort_cuda
    from leptonc.runtime.bench import bundle_weight_bytes, kv_bytes_per_token

    ort = ort_cuda.load_ort_cuda()
    mark("onnxruntime imported")
    if not args.no_bare:
        from onnx import TensorProto, helper

        model = helper.make_model(helper.make_graph(
            [helper.make_node("Add", ["x", "x"], ["y"])], "bare",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4])]),
            opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        bare = ort.InferenceSession(model.SerializeToString(), providers=[("CUDAExecutionProvider", {})])
        mark("bare session created")
        bare.run(None, {"x": np.ones(4, np.float16)})
        mark("bare session run once")

    # step marks inside the runner's first prefill
    helper_session = ort_cuda.OrtCudaRunner._helper_session

    def traced_helper(self, node, name, *rest):
        mark(f"before helper session {name}")
        out = helper_session(self, node, name, *rest)
        mark(f"helper session {name} created")
        return out

    ort_cuda.OrtCudaRunner._helper_session = traced_helper
    kv_init = ort_cuda._KvBlock.__init__

    def traced_kv(self, runner, batch):
        kv_init(self, runner, batch)
        mark(f"K/V block b{batch} allocated")

    ort_cuda._KvBlock.__init__ = traced_kv

    bundle = load_bundle(args.bundle, verify=False)
    r = open_bundle_runner(bundle)
    mark("bundle session created")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, min(1000, bundle.io["vocab_size"]), size=(args.batch, 128), dtype=np.int64)
    tok = r.prefill(ids, np.ones_like(ids), last_only=True).argmax(-1)
    mark(f"b{args.batch} prefill (128 tokens a row)")
    for _ in range(8):
        tok = r.decode(tok).argmax(-1)
    mark(f"b{args.batch} 8 decode steps")
    weights = bundle_weight_bytes(bundle) / 2**20
    kv = args.batch * kv_bytes_per_token(bundle.io) * r.capacity / 2**20
    peak = max(v for _, v in steps)
    result = {"bundle": str(args.bundle), "runner": r.describe(), "batch": args.batch, "capacity": r.capacity,
              "settings": {k: os.environ.get(k) for k in SETTINGS},
              "steps_mb": dict(steps), "deltas_mb": {b[0]: round(b[1] - a[1], 1) for a, b in zip(steps, steps[1:])},
              "weights_mb": round(weights, 1), "kv_mb": round(kv, 1), "peak_mb": peak,
              "bound_mb": round(1.25 * (weights + kv), 1)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("settings", "deltas_mb", "peak_mb", "bound_mb")}), flush=True)


if __name__ == "__main__":
    main()
