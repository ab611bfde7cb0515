"""The real timeline of decode steps on the GPU (bench only): every kernel's start, duration and the gap before it.

Nsight Compute (bench/device_kernel_times.py) runs each kernel alone with its caches flushed, which inflates small
kernels and hides the gaps between them and the overlap that programmatic dependent launch gives. This script
records the kernels as they actually ran, through CUPTI (PyTorch's profiler, which sees every kernel of the process,
including those ONNX Runtime launches inside the runner's CUDA graph):

    python3 bench/device_timeline.py BUNDLE OUT.json [--batch 1] [--steps 20]

The runner prefills 128 tokens and decodes a few steps untimed; then `--steps` decode steps run under the profiler.
The kernels are split into steps at host gaps (longer than --split-us) and every step must have the same kernel
sequence. For each position of the step the median duration and the median gap since the kernel before it ends
(negative where the two overlap) are reported, grouped by kernel family, with the step's wall time (first start to
last end), its kernel time, and the sums of the gaps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_kernel_times import family  # noqa: E402 - the same short kernel labels as the Nsight Compute table


def record(bundle_path: str, batch: int, steps: int) -> tuple[list[dict], dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner

    bundle = load_bundle(bundle_path, verify=False)
    runner = open_bundle_runner(bundle)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, min(1000, bundle.io["vocab_size"]), size=(batch, 128), dtype=np.int64)
    token = runner.prefill(ids, np.ones_like(ids), last_only=True).argmax(-1)
    for _ in range(10):
        token = runner.decode_tokens(token)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = runner.decode_tokens(token)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    kernels = [{"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"]),
                "grid": e.get("args", {}).get("grid")}
               for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    kernels.sort(key=lambda k: k["ts"])
    return kernels, runner.describe()


def split_steps(kernels: list[dict], split_us: float) -> list[list[dict]]:
    steps: list[list[dict]] = []
    end = None
    for k in kernels:
        if end is None or k["ts"] - end > split_us:
            steps.append([])
        steps[-1].append(k)
        end = k["ts"] + k["dur"] if end is None else max(end, k["ts"] + k["dur"])
    return steps


def summarize(steps: list[list[dict]]) -> dict:
    counts = [len(s) for s in steps]
    n = statistics.mode(counts)
    same = [s for s in steps if len(s) == n and [family(k["name"]) for k in s] == [family(k["name"]) for k in steps[
        counts.index(n)]]]
    positions = []
    for i in range(n):
        durs = [s[i]["dur"] for s in same]
        gaps = [s[i]["ts"] - (s[i - 1]["ts"] + s[i - 1]["dur"]) for s in same] if i else [0.0]
        positions.append({"kernel": family(same[0][i]["name"]), "grid": same[0][i]["grid"],
                          "us": round(statistics.median(durs), 2), "gap_us": round(statistics.median(gaps), 2)})
    walls = [s[-1]["ts"] + s[-1]["dur"] - s[0]["ts"] for s in same]
    by: dict[str, dict] = defaultdict(lambda: {"count": 0, "us": 0.0, "gap_us": 0.0})
    for p in positions:
        b = by[p["kernel"]]
        b["count"] += 1
        b["us"] += p["us"]
        b["gap_us"] += p["gap_us"]
    table = sorted(({"kernel": k, "count": v["count"], "us": round(v["us"], 1), "gap_us": round(v["gap_us"], 1)}
                    for k, v in by.items()), key=lambda d: -d["us"])
    gaps = [p["gap_us"] for p in positions[1:]]
    return {"steps_recorded": len(steps), "steps_used": len(same), "kernels_per_step": n,
            "step_wall_us": round(statistics.median(walls), 1),
            "kernel_us": round(sum(p["us"] for p in positions), 1),
            "gap_us_positive": round(sum(g for g in gaps if g > 0), 1),
            "gap_us_overlap": round(sum(g for g in gaps if g < 0), 1),
            "by_kernel": table, "sequence": positions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--split-us", type=float, default=25.0)
    args = ap.parse_args()
    kernels, runner = record(args.bundle, args.batch, args.steps)
    result = {"bundle": args.bundle, "batch": args.batch, "runner": runner,
              **summarize(split_steps(kernels, args.split_us))}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("batch", "steps_used", "kernels_per_step", "step_wall_us", "kernel_us",
                                             "gap_us_positive", "gap_us_overlap")} | {"top": result["by_kernel"][:10]}))


if __name__ == "__main__":
    main()
