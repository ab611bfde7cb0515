"""Quantization on the CPU, in one run: for an fp32 bundle and quantized bundles of the same model,
bundle size, perplexity on held-out WikiText-2 text (apart from the calibration text), and decode
tokens/s at batch 1, with the bundles' decode loops interleaved round by round so that a busy
machine slows all of them alike. Writes JSON.

    .venv/bin/python bench/quant_cpu.py FP32.lepton Q1.lepton [Q2.lepton ...] \
        --data ../shared/data/wikitext-2/valid.txt --offset-chars 400000 --eval-tokens 8192 \
        --out /tmp/quant_cpu.json

Calibration reads characters [0, 119655) of valid.txt (the shipped leptonc/data/calibration.txt);
evaluation starts at --offset-chars (default 400000), so the two never overlap.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench_json import emit


def bundle_bytes(bundle) -> int:
    return sum(f["bytes"] for f in bundle.manifest["files"].values())


def label(bundle) -> str:
    m = bundle.manifest
    cal = m.get("calibration") or {}
    return cal.get("format") or m["precision"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", help="the fp32 bundle first, then quantized bundles")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"))
    ap.add_argument("--offset-chars", type=int, default=400_000)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="0 skips perplexity")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (0 skips speed)")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.bench import device_name, run_once
    from leptonc.runtime.evaluate import EvalConfig, load_tokens, perplexity, runner_scorer
    from transformers import AutoTokenizer

    bundles = [load_bundle(Path(p)) for p in args.bundles]
    if args.threads:
        for b in bundles:
            b.engine.setdefault("session", {})["intra_op_num_threads"] = args.threads
    runners = [open_bundle_runner(b) for b in bundles]
    names = [f"{label(b)}:{Path(p).name}" for b, p in zip(bundles, args.bundles)]
    base = bundle_bytes(bundles[0])
    rows = [{"bundle": p, "format": label(b), "precision_mode": b.manifest["precision_mode"],
             "bytes": bundle_bytes(b), "size_vs_fp32": round(bundle_bytes(b) / base, 4)}
            for b, p in zip(bundles, args.bundles)]

    if args.eval_tokens:
        tok = AutoTokenizer.from_pretrained(str(bundles[0].tokenizer_dir))
        cfg = EvalConfig(args.data, max_tokens=args.eval_tokens, window=args.window, stride=args.stride,
                         offset_chars=args.offset_chars)
        ids = load_tokens(tok, cfg)
        for row, runner, name in zip(rows, runners, names):
            t = time.perf_counter()
            res = perplexity(runner_scorer(runner), ids, cfg)
            row.update({"perplexity": round(res["perplexity"], 4), "eval_tokens": res["tokens"],
                        "scored_tokens": res["scored_tokens"], "eval_seconds": round(time.perf_counter() - t, 1)})
            print(f"{name}: ppl {res['perplexity']:.4f} on {res['tokens']} tokens", file=sys.stderr, flush=True)
        ref = rows[0]["perplexity"]
        for row in rows:
            row["ppl_increase_pct"] = round(100 * (row["perplexity"] / ref - 1), 3)

    if args.rounds:
        rng = np.random.default_rng(0)
        prompt = rng.integers(3, 32000, size=(1, args.prompt_len), dtype=np.int64)
        for r in runners:  # warm-up
            run_once(r, prompt, 8)
        rates = [[] for _ in runners]
        for rnd in range(args.rounds):
            for i, r in enumerate(runners):
                _, steps = run_once(r, prompt, args.decode_steps + 1)
                rates[i].append(len(steps) / sum(steps))
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{n} {x[-1]:.1f} tok/s" for n, x in zip(names, rates)),
                  file=sys.stderr, flush=True)
        base_rate = statistics.median(rates[0])
        for row, x in zip(rows, rates):
            med = statistics.median(x)
            row.update({"decode_tok_s": round(med, 2), "decode_speedup_vs_fp32": round(med / base_rate, 3),
                        "slower_than_fp32": med < base_rate, "decode_tok_s_rounds": [round(v, 2) for v in x]})

    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": device_name(runners[0]), "python": platform.python_version(),
        "command": "bench/quant_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "bundles"}, "results": rows,
    }
    for r in runners:
        r.release()
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
