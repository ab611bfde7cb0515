"""Per-kernel GPU time of one batch-1 decode step (bench only), for Nsight Compute on the device.

The bundle's runner prefills 128 tokens and decodes 10 steps (the step is captured as a CUDA graph),
then one more step runs between cuProfilerStart and cuProfilerStop. Run under ncu with
`--profile-from-start off`, so only that step's kernels (each node of the graph) are measured:

    ncu --profile-from-start off --clock-control none --print-units base --metrics gpu__time_duration.sum --csv \\
        --log-file OUT.csv python3 bench/device_kernel_times.py BUNDLE
    python3 bench/device_kernel_times.py --summarize OUT.csv OUT.json

`--summarize` groups the rows by kernel name: count, total and share of the step's kernel time.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np


def profile_step(bundle_path: str) -> None:
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner

    cuda = ctypes.CDLL("libcuda.so.1")
    bundle = load_bundle(bundle_path, verify=False)
    runner = open_bundle_runner(bundle)
    ids = np.random.default_rng(0).integers(3, min(1000, bundle.io["vocab_size"]), size=(1, 128), dtype=np.int64)
    token = runner.prefill(ids, np.ones_like(ids), last_only=True).argmax(-1)
    for _ in range(10):
        token = runner.decode_tokens(token)
    cuda.cuProfilerStart()
    token = runner.decode_tokens(token)
    cuda.cuProfilerStop()
    print(json.dumps({"bundle": bundle_path, "runner": runner.describe(), "token": int(token[0])}))


def family(name: str) -> str:
    """A short label for a kernel name (demangled C++ signatures are long)."""
    short = re.sub(r"^void\s+", "", name.replace("(anonymous namespace)::", ""))
    short = re.sub(r"[<(].*$", "", short)
    return short.split("::")[-1].strip() or name[:60]


def summarize(csv_path: Path, out: Path) -> dict:
    rows = []
    with open(csv_path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's log has non-CSV lines before the table
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(str(r["Metric Value"]).replace(",", ""))
        unit = r.get("Metric Unit", "nsecond")
        ns = value * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(unit, 1)
        rows.append((r["Kernel Name"], ns, r.get("Grid Size", "")))
    groups: dict[str, list[float]] = defaultdict(list)
    for name, ns, _ in rows:
        groups[family(name)].append(ns)
    total = sum(ns for _, ns, _ in rows)
    table = sorted(({"kernel": k, "count": len(v), "total_us": round(sum(v) / 1e3, 2),
                     "mean_us": round(sum(v) / len(v) / 1e3, 2), "share": round(sum(v) / total, 3) if total else 0}
                    for k, v in groups.items()), key=lambda d: -d["total_us"])
    result = {"kernels": len(rows), "kernel_time_us": round(total / 1e3, 1), "by_kernel": table,
              "sequence": [{"kernel": family(n), "grid": g, "us": round(ns / 1e3, 2)} for n, ns, g in rows]}
    out.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--summarize", nargs=2, metavar=("CSV", "JSON"))
    args = ap.parse_args()
    if args.summarize:
        result = summarize(Path(args.summarize[0]), Path(args.summarize[1]))
        print(json.dumps({k: result[k] for k in ("kernels", "kernel_time_us")} | {"top": result["by_kernel"][:12]}))
    else:
        profile_step(args.bundle)


if __name__ == "__main__":
    main()
