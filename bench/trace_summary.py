"""What a scheduler timeline (`leptonc serve --trace FILE`) says, in numbers: per span kind (prefill launches, step
launches, waits, token handling) the count, total and median milliseconds; and the prefill launches' median by row
count, with the correlation of their duration with their rows (near 0: the launch costs the host the same whatever
the prompts, so it is the host's launch, not the device's work, that takes the time).

    python3 bench/trace_summary.py TRACE.json [TRACE.json ...] [--out r.json]

gpu_suite's serve part writes one trace per server (OUT/trace_*.json) and records this summary beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_json import emit  # noqa: E402


def summarize(path: Path) -> dict:
    """The summary of one trace file (module doc)."""
    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X" and e.get("name") != "idle"]
    kinds: dict[str, list[float]] = {}
    for span in spans:
        kinds.setdefault(span["name"], []).append(span["dur"] / 1e3)
    out = {"file": path.name, "spans": {name: {"count": len(ms), "total_ms": round(sum(ms), 1),
                                               "median_ms": round(statistics.median(ms), 3)}
                                        for name, ms in sorted(kinds.items())}}
    prefills = [(s["args"]["rows"], s["dur"] / 1e3) for s in spans if s["name"] == "prefill" and "rows" in s["args"]]
    if len(prefills) >= 2:
        rows, ms = (np.asarray(v, float) for v in zip(*prefills))
        by_rows = {int(r): round(float(np.median(ms[rows == r])), 3) for r in sorted(set(rows.tolist()))}
        spread = rows.std() > 0 and ms.std() > 0
        out["prefill_launch"] = {"median_ms": round(float(np.median(ms)), 3), "median_ms_by_rows": by_rows,
                                 "rows_correlation": round(float(np.corrcoef(rows, ms)[0, 1]), 2) if spread else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("traces", type=Path, nargs="+")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    missing = [str(p) for p in args.traces if not p.is_file()]
    if missing:
        parser.error(f"no such trace file: {', '.join(missing)} (leptonc serve --trace FILE writes one)")
    try:
        emit({"traces": [summarize(p) for p in args.traces]}, args.out)
    except (ValueError, KeyError) as exc:
        parser.error(f"not a leptonc serve --trace file: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
