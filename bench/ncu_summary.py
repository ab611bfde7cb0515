"""Where a run's GPU time goes, from Nsight Compute's kernel timer: the kernels of an ncu CSV grouped by name, with
their count, total µs and share, largest first. Used for the prefill profiles in BENCHMARKS.md:

    ncu --metrics gpu__time_duration.sum --csv --page raw python3 -m leptonc bench B.lepton --batch 32 \\
        --prompt-len 128 --gen-len 1 --warmup 0 --iters 1 --no-verify > prefill.csv
    python3 bench/ncu_summary.py prefill.csv --out prefill.json

ncu runs one kernel at a time (its caches flushed, its clocks at base), so the sum is the device's work without
overlap, not a wall time; read the shares.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_json import emit  # noqa: E402


def ncu_rows(text: str) -> list[dict]:
    """The kernels of an ncu `--csv --page raw` output (lines before its table skipped), in launch order, each row with
    its time in µs under "us" (the units row under the header says what gpu__time_duration.sum is in)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit('no ncu CSV table ("ID", ...) in the input: run the command under '
                         "`ncu --metrics gpu__time_duration.sum --csv --page raw`")
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    unit = next((r.get("gpu__time_duration.sum", "") for r in rows if not r.get("ID", "").strip().isdigit()), "")
    scale = {"usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit.strip(), 1e-3)  # default: ns
    kernels = [r for r in rows if r.get("ID", "").strip().isdigit()]
    for r in kernels:
        r["us"] = float(r["gpu__time_duration.sum"].replace(",", "")) * scale
    return kernels


def summarize(kernels: list[dict], top: int) -> dict:
    groups: dict[str, dict] = {}
    for name, us in ((k.get("Kernel Name", "?"), k["us"]) for k in kernels):
        short = name.split("(")[0] if not name.startswith("void ") else name[5:].split("(")[0]
        entry = groups.setdefault(short, {"kernel": short, "count": 0, "us": 0.0})
        entry["count"] += 1
        entry["us"] += us
    total = sum(e["us"] for e in groups.values())
    ranked = sorted(groups.values(), key=lambda e: -e["us"])
    for entry in ranked:
        entry["us"] = round(entry["us"], 1)
        entry["share"] = round(entry["us"] / total, 4) if total else None
    return {"kernels": len(kernels), "total_us": round(total, 1), "by_kernel": ranked[:top],
            "others_us": round(sum(e["us"] for e in ranked[top:]), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="ncu --csv --page raw output (other lines before the table are skipped)")
    parser.add_argument("--top", type=int, default=25, help="kernels listed (the rest are summed)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if not args.csv.is_file():
        raise SystemExit(f"{args.csv}: no such file")
    emit(summarize(ncu_rows(args.csv.read_text(errors="replace")), args.top), args.out)


if __name__ == "__main__":
    main()
