"""Fused pipeline vs --no-passes: decode tokens/s at batch 1, both bundles in one process, same
inputs, ONNX Runtime's default session optimizations (the bundles' own settings) for both.

    .venv/bin/leptonc compile smollm2-135m -o /tmp/smol.fused.lepton
    .venv/bin/leptonc compile smollm2-135m --no-passes -o /tmp/smol.plain.lepton
    .venv/bin/python bench/passes_cpu.py /tmp/smol.fused.lepton /tmp/smol.plain.lepton \
        --prompt-len 1024,64 --rounds 3 --out /tmp/passes_cpu.json

The runners are the ones the bundles open, so the same script compares two h100 bundles on the GPU.

Timing is `leptonc bench`'s own (leptonc.runtime.bench.bench). The two runners alternate round by
round (fused, plain, plain, fused, ...) so that load from other processes on a shared machine falls
on both; each figure is the median over rounds of each round's median decode rate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fused", help="bundle compiled with the pass pipeline")
    ap.add_argument("plain", help="bundle compiled with --no-passes")
    ap.add_argument("--prompt-len", default="1024,64", help="comma-separated prompt lengths")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--iters", type=int, default=2, help="timed runs per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the JSON here (also printed)")
    args = ap.parse_args(argv)

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.bench import BenchConfig, bench

    bundles = {"fused": load_bundle(args.fused), "plain": load_bundle(args.plain)}
    runners = {k: open_bundle_runner(b) for k, b in bundles.items()}
    nodes = {k: (b.report().get("graph") or {}).get("nodes") for k, b in bundles.items()}
    result = {"date": dt.date.today().isoformat(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "bundles": {k: str(b.path) for k, b in bundles.items()}, "nodes": nodes,
              "session": {k: b.engine.get("session") for k, b in bundles.items()}, "results": []}
    try:
        for prompt_len in (int(p) for p in args.prompt_len.split(",")):
            cfg = BenchConfig(batches=(1,), prompt_len=prompt_len, gen_len=args.gen_len, warmup=1, iters=args.iters)
            rates: dict[str, list[float]] = {"fused": [], "plain": []}
            p50: dict[str, list[float]] = {"fused": [], "plain": []}
            for r in range(args.rounds):
                order = ("fused", "plain") if r % 2 == 0 else ("plain", "fused")
                for name in order:
                    out = bench(runners[name], cfg)
                    result.setdefault("device", out["device"])
                    rates[name].append(out["results"][0]["decode_tokens_per_s"])
                    p50[name].append(out["results"][0]["p50_ms"])
                    print(f"prompt {prompt_len} round {r} {name}: {rates[name][-1]:.1f} tok/s", file=sys.stderr)
            fused, plain = statistics.median(rates["fused"]), statistics.median(rates["plain"])
            result["results"].append({
                "batch": 1, "prompt_len": prompt_len, "gen_len": args.gen_len,
                "fused_decode_tokens_per_s": round(fused, 2), "plain_decode_tokens_per_s": round(plain, 2),
                "speedup": round(fused / plain, 3),
                "fused_p50_ms": round(statistics.median(p50["fused"]), 3),
                "plain_p50_ms": round(statistics.median(p50["plain"]), 3),
                "rounds": rates,
            })
    finally:
        for r in runners.values():
            r.release()
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
