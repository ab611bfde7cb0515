"""Compile a large built-in shape in process and sample host memory (RSS) per compile step.

    .venv/bin/python bench/compile_memory.py llama-1b-shape -o /tmp/llama1b.cpu.lepton [--out out.json]

Prints, per step (load, reference, export, build, verify, bundle), the peak RSS seen while it ran,
the step's time, the weight bytes and peak/weights ratio (the bound leptonc keeps is 2.5x). The sampler
reads /proc/self/status every 0.2 s, so very short peaks can be missed; `peak_host_mb` in the
bundle's report.json (ru_maxrss) is the authoritative peak and is printed too.
Linux only (reads /proc). Not part of CI: the 1B shape needs about 10 GB of RAM and several minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class Sampler(threading.Thread):
    def __init__(self, steps) -> None:
        super().__init__(daemon=True)
        self.steps, self.peaks, self.stop = steps, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            phase = getattr(self.steps, "_current", "") or "start"
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss_mb())
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--out", "--json", dest="json_out", help="write the JSON here (also printed)")
    args = ap.parse_args(argv)

    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig
    from leptonc.progress import Steps

    steps = Steps(enabled=False)
    sampler = Sampler(steps)
    sampler.start()
    t0 = time.perf_counter()
    bundle = compile_model(CompileConfig(source=args.source, target=args.target, output=args.output, force=True),
                           steps)
    total = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    report = json.loads((bundle.path / "report.json").read_text())
    recorded_peak = bundle.manifest.get("build_stats", report).get("peak_host_mb")
    weight_mb = report["export"]["weight_bytes"] / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = {"source": args.source, "target": args.target, "total_s": round(total, 1),
           "weight_mb": round(weight_mb, 1), "peak_host_mb": round(peak, 1),
           "peak_over_weights": round(peak / weight_mb, 2),
           "recorded_peak_host_mb": recorded_peak, "timings_s": bundle.manifest.get("build_stats", {}).get("timings_s"),
           "step_peak_rss_mb": {k: round(v, 1) for k, v in sampler.peaks.items()},
           "verification": {k: report["verification"].get(k) for k in ("status", "max_abs_error", "top1_agreement")}}
    print(json.dumps(out, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
