"""Where a CUDA bundle's device memory goes (bench only, issue 8 line 6).

Device memory in use (NVML, whole device, relative to this process's start) after each phase of the
`leptonc bench` sequence: the CUDA context alone; session created; batch 1 prefill (128 tokens) and 8
decode steps; batch 16 the same. Beside it, the bytes the runner itself asked for (K/V buffers) and the bundle's weight bytes,
so the remainder (CUDA context, cuBLAS workspaces, ONNX Runtime's arena, captured graphs) is visible.

    python3 bench/device_memory_probe.py BUNDLE OUT.json [--batches 1,16]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("out")
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    base = pynvml.nvmlDeviceGetMemoryInfo(handle).used

    def used() -> float:
        return round((pynvml.nvmlDeviceGetMemoryInfo(handle).used - base) / 2**20, 1)

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.bench import bundle_weight_bytes, kv_bytes_per_token

    bundle = load_bundle(args.bundle, verify=False)
    phases = [("start", used())]
    # The CUDA primary context alone (driver API; ONNX Runtime's runtime calls share it), so what the session adds
    # on top of the context is visible apart from the context itself.
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    if cuda.cuInit(0) == 0 and cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0:
        phases.append(("cuda context", used()))
    r = open_bundle_runner(bundle)
    phases.append(("session", used()))
    rng = np.random.default_rng(0)
    kv_asked = 0
    for batch in (int(b) for b in args.batches.split(",")):
        ids = rng.integers(3, min(1000, bundle.io["vocab_size"]), size=(batch, 128), dtype=np.int64)
        tok = r.prefill(ids, np.ones_like(ids), last_only=True).argmax(-1)
        phases.append((f"b{batch} prefill", used()))
        for _ in range(8):
            tok = r.decode(tok).argmax(-1)
        phases.append((f"b{batch} decode", used()))
        kv_asked += batch * kv_bytes_per_token(bundle.io) * r.capacity
    result = {"bundle": str(args.bundle), "runner": r.describe(), "capacity": r.capacity,
              "weights_mb": round(bundle_weight_bytes(bundle) / 2**20, 1), "kv_buffers_mb": round(kv_asked / 2**20, 1),
              "phases_mb": dict(phases), "runner_peak_mb": r.peak_device_memory_mb()}
    result["unexplained_mb"] = round(max(v for _, v in phases) - result["weights_mb"] - result["kv_buffers_mb"], 1)
    context = dict(phases).get("cuda context")
    if context is not None:  # the same peak without the context every CUDA process pays
        result["peak_above_context_mb"] = round(max(v for _, v in phases) - context, 1)
    result["settings"] = {k: os.environ.get(k) for k in ("LEPTONC_PREFILL_TOKENS", "LEPTONC_KERNEL_BUFFER_MB",
                                                         "LEPTONC_CUBLAS_WORKSPACE_MB")}
    result["bound_mb"] = round(1.25 * (result["weights_mb"] + result["kv_buffers_mb"]), 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
