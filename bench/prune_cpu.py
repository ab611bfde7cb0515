"""Pruned vs unpruned: decode tokens/s at batch 1 of two bundles of the same model, in one process,
same inputs, plus the pruned bundle's perplexity before/after (from its report.json).

    .venv/bin/python bench/prune_cpu.py --model smollm2-135m --prune 0.3 --out /tmp/prune_cpu.json

Compiles both bundles (cpu, fp32, default pass pipeline, verification on) into --work unless
--base/--pruned give existing ones. Timing is `leptonc bench`'s own (leptonc.runtime.bench.bench);
the two runners alternate round by round (base, pruned, pruned, base, ...) so that load from other
processes on a shared machine falls on both; each figure is the median over rounds of each round's
median decode rate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

from bench_json import emit


def _compile(model: str, out: Path, options: dict) -> Path:
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    start = time.perf_counter()
    compile_model(CompileConfig(source=model, target="cpu", output=str(out), force=True, options=options))
    print(f"compiled {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prune", type=float, default=0.3, help="--prune RATIO of the pruned bundle")
    ap.add_argument("--prune-heads", type=int, default=None)
    ap.add_argument("--base", default=None, help="existing unpruned bundle (else compiled into --work)")
    ap.add_argument("--pruned", default=None, help="existing pruned bundle (else compiled into --work)")
    ap.add_argument("--work", default="/tmp/leptonc_prune_bench")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--iters", type=int, default=2, help="timed runs per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the JSON here (also printed)")
    args = ap.parse_args(argv)

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.bench import BenchConfig, bench

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    options = {"prune": args.prune} if args.prune else {}
    if args.prune_heads:
        options["prune_heads"] = args.prune_heads
    base = Path(args.base) if args.base else _compile(args.model, work / "base.cpu.lepton", {})
    pruned = Path(args.pruned) if args.pruned else _compile(args.model, work / "pruned.cpu.lepton", options)

    bundles = {"base": load_bundle(base), "pruned": load_bundle(pruned)}
    pr = bundles["pruned"].report().get("pruning") or {}
    result = {
        "date": dt.date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": args.model,
        "bundles": {k: str(b.path) for k, b in bundles.items()},
        "pruning": {"requested": pr.get("requested"), "parameters": pr.get("parameters"),
                    "accuracy": pr.get("accuracy")},
        "verification": {k: {f: b.report()["verification"].get(f) for f in ("status", "max_abs_error", "reference")}
                         for k, b in bundles.items()},
        "weight_bytes": {k: sum(f["bytes"] for n, f in b.manifest["files"].items() if n.endswith(".data"))
                         for k, b in bundles.items()},
    }
    runners = {k: open_bundle_runner(b) for k, b in bundles.items()}
    try:
        cfg = BenchConfig(batches=(1,), prompt_len=args.prompt_len, gen_len=args.gen_len, warmup=1, iters=args.iters)
        rates: dict[str, list[float]] = {"base": [], "pruned": []}
        p50: dict[str, list[float]] = {"base": [], "pruned": []}
        for r in range(args.rounds):
            for name in (("base", "pruned") if r % 2 == 0 else ("pruned", "base")):
                out = bench(runners[name], cfg)
                result.setdefault("device", out["device"])
                rates[name].append(out["results"][0]["decode_tokens_per_s"])
                p50[name].append(out["results"][0]["p50_ms"])
                print(f"round {r} {name}: {rates[name][-1]:.1f} tok/s", file=sys.stderr)
        base_rate, pruned_rate = statistics.median(rates["base"]), statistics.median(rates["pruned"])
        result["results"] = {
            "batch": 1, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
            "base_decode_tokens_per_s": round(base_rate, 2), "pruned_decode_tokens_per_s": round(pruned_rate, 2),
            "speedup": round(pruned_rate / base_rate, 3),
            "base_p50_ms": round(statistics.median(p50["base"]), 3),
            "pruned_p50_ms": round(statistics.median(p50["pruned"]), 3),
            "rounds": rates,
        }
    finally:
        for r in runners.values():
            r.release()
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
