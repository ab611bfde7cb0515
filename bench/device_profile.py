"""Where a decode step's time goes: ONNX Runtime's own profiler over prefill + N decode steps of a bundle.

    LEPTONC_ORT_PROFILE is set here; run on the device:  python3 bench/device_profile.py BUNDLE OUT.json [steps]

Writes per-op-type totals (device kernels and host-side node time, per provider), the nodes placed on
the CPU provider, and Memcpy counts, for the decode steps only (the prefill run is left out).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    bundle_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    os.environ["LEPTONC_ORT_PROFILE"] = str(out.with_suffix("")) + "_ort"
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner

    b = load_bundle(bundle_path, verify=False)
    r = open_bundle_runner(b, "cuda")
    ids = np.random.default_rng(0).integers(3, 30000, size=(1, 128), dtype=np.int64)
    logits = r.prefill(ids, np.ones_like(ids), last_only=True)
    t_prefill_end = time.time()
    wall = []
    for _ in range(steps):
        s = time.perf_counter()
        logits = r.decode(logits.argmax(-1))
        wall.append(time.perf_counter() - s)
    trace = r.session.end_profiling()
    events = json.loads(Path(trace).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[1:]  # runs[0] is the prefill
    start = min(e["ts"] for e in decode_runs) if decode_runs else 0
    by_op: dict = defaultdict(lambda: {"count": 0, "us": 0.0})
    cpu_nodes, memcpy = set(), 0
    for e in events:
        if e.get("cat") != "Node" or e.get("ts", 0) < start or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        key = f"{args.get('op_name')}@{args.get('provider', '?').replace('ExecutionProvider', '')}"
        by_op[key]["count"] += 1
        by_op[key]["us"] += e.get("dur", 0)
        if "CPU" in args.get("provider", ""):
            cpu_nodes.add(f"{args.get('op_name')}:{e['name'].removesuffix('_kernel_time')}")
        if "Memcpy" in args.get("op_name", ""):
            memcpy += 1
    n = max(len(decode_runs), 1)
    table = sorted(({"op": k, "per_step_count": v["count"] / n, "per_step_us": round(v["us"] / n, 1)}
                    for k, v in by_op.items()), key=lambda d: -d["per_step_us"])
    summary = {"bundle": str(bundle_path), "decode_steps": len(decode_runs),
               "model_run_us_median": float(np.median([e["dur"] for e in decode_runs])) if decode_runs else None,
               "python_step_ms_median": round(1000 * float(np.median(wall)), 3),
               "node_time_us_per_step": round(sum(d["per_step_us"] for d in table), 1),
               "nodes_per_step": sum(d["per_step_count"] for d in table),
               "memcpy_nodes_per_step": memcpy / n, "cpu_nodes": sorted(cpu_nodes), "ops": table,
               "runner": r.describe()}
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "ops"}, indent=1)[:3000])
    for d in table[:15]:
        print(f"  {d['op']:<45} {d['per_step_count']:>6.1f} nodes {d['per_step_us']:>9.1f} us/step")
    r.release()
    os.unlink(trace)
    del t_prefill_end


if __name__ == "__main__":
    main()
