"""Quantization on the CPU, in one run: for an fp32 bundle and quantized bundles of the same model, bundle
size, effective bits per weight, perplexity on each evaluation text, and decode tokens/s at batch 1, with the
bundles' decode loops interleaved round by round so that a busy machine slows all of them alike. Writes JSON.

    .venv/bin/python bench/quant_cpu.py FP32.lepton Q1.lepton [Q2.lepton ...] --eval-tokens 8192 \
        --out /tmp/quant_cpu.json

The texts (--text NAME=PATH[@OFFSET_CHARS], repeatable; the default is the six below) and what each is for:
  wikitext-tuning   leptonc/data/heldout.txt, WikiText-2 valid.txt [400174, 460000)   the tuning splits that
  docs-tuning       leptonc/data/tuning_docs.txt (Rust book, Node.js API docs)         recipe defaults were
  code-tuning       leptonc/data/tuning_code.txt (networkx, pygments, PyYAML, tomlkit) chosen on
  wikitext-heldout  WikiText-2 valid.txt from character 800,000 (../shared/data): never tuned on
  python-docs       leptonc/data/eval_python_docs.txt (Python Language Reference prose): never tuned on
  python-code       leptonc/data/eval_python_code.txt (Python standard library source): never tuned on
Calibration reads leptonc/data/calibration.txt (WikiText-2 valid.txt [0, 41247), other Rust book chapters and
Node.js pages, other Python packages; calibration/data.py), apart from all of them.
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


ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXTS = (f"wikitext-tuning={ROOT / 'leptonc/data/heldout.txt'}",
                 f"docs-tuning={ROOT / 'leptonc/data/tuning_docs.txt'}",
                 f"code-tuning={ROOT / 'leptonc/data/tuning_code.txt'}",
                 f"wikitext-heldout={ROOT.parent / 'shared/data/wikitext-2/valid.txt'}@800000",
                 f"python-docs={ROOT / 'leptonc/data/eval_python_docs.txt'}",
                 f"python-code={ROOT / 'leptonc/data/eval_python_code.txt'}")


def parse_text(spec: str) -> tuple[str, str, int]:
    name, _, rest = spec.partition("=")
    path, _, offset = rest.partition("@")
    return name, path, int(offset or 0)


def effective_bits(bundle) -> dict:
    """Bits per weight of the quantized linear layers (codes, scales, zero points as the bundle stores them,
    and with scales counted at 16 bits as GPU bundles store them), from the ONNX graph."""
    import onnx

    path = next((bundle.path / f for f in bundle.manifest["files"] if f.endswith(".onnx")), None)
    if path is None:
        return {}
    graph = onnx.load(str(path), load_external_data=False).graph
    sizes = {t.name: _elements(t) for t in graph.initializer}
    two_d = {t.name for t in graph.initializer if len(t.dims) == 2}
    weights = stored = scales16 = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in two_d and 1 < sizes[node.input[1]]:
            codes, scales = sizes[node.input[0]], sizes[node.input[1]]  # int8 / fp8 codes, a scale per channel
            if codes <= 20_000_000:
                weights += codes
                stored += codes * 8 + scales * 32
                scales16 += codes * 8 + scales * 16
            continue
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        n, k = attrs["N"], attrs["K"]
        if n * k > 20_000_000:  # the LM head (tied embedding), 8-bit by design: counted apart
            continue
        codes, scales = sizes[node.input[1]], sizes[node.input[2]]
        zeros = sizes[node.input[3]] if len(node.input) > 3 and node.input[3] else 0
        weights += n * k
        stored += codes * 8 + scales * 32 + zeros * 8
        scales16 += codes * 8 + scales * 16 + zeros * 8
    if not weights:
        return {}
    return {"decoder_linears": weights, "stored": round(stored / weights, 3), "scales_16bit": round(scales16 / weights, 3)}


def _elements(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def label(bundle) -> str:
    """The format and the recipe settings that tell bundles of one format apart."""
    m = bundle.manifest
    cal = m.get("calibration") or {}
    st = cal.get("settings") or {}
    fmt = cal.get("format") or m["precision"]
    if fmt in ("int8-w8a8", "fp8"):
        fmt += f" ({st.get('activations') or 'static'} activations)"
    elif fmt == "int8-weight-only":  # on the CPU the kernel rounds the activations unless they are kept fp32
        fmt += " (fp32 activations)" if st.get("activations") == "fp32" else " (activations rounded by the kernel)"
    elif fmt.startswith("int4"):
        mixed = cal.get("mixed_precision")
        fmt += f" block {st.get('int4_block')}" + (f", {len(mixed['eight_bit_groups'])} groups 8-bit" if mixed else "")
        fmt += ", GPTQ act-order" if st.get("gptq_act_order") else ""
    return fmt


def markdown(rows: list[dict]) -> str:
    """The table BENCHMARKS.md shows: format, size, bits per weight, perplexity increase per text, decode ratio."""
    texts = list(rows[0].get("perplexity", {}))
    head = ["format", "size MB", "bits/weight"] + [f"{t} ppl" for t in texts] + ["decode vs fp32"]
    lines = ["| " + " | ".join(head) + " |", "| --- " + "| ---: " * (len(head) - 1) + "|"]
    for i, r in enumerate(rows):
        bits = r.get("bits_per_weight") or {}
        cells = [r["format"], f"{r['bytes'] / 1e6:.1f}",
                 f"{bits['scales_16bit']:.2f} ({bits['stored']:.2f} stored)" if bits else "-"]
        cells += [f"{r['perplexity'][t]:.2f}" if i == 0 else f"{r['ppl_increase_pct'][t]:+.2f}%" for t in texts]
        ratio = r.get("decode_speedup_vs_fp32")
        cells.append("simulated" if r["precision_mode"] == "simulated" else (f"{ratio:.2f}x" if ratio else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", help="the fp32 bundle first, then quantized bundles")
    ap.add_argument("--text", action="append", default=None, help="NAME=PATH[@OFFSET_CHARS] (repeatable)")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="tokens per text; 0 skips perplexity")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=1024)
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
    names = [f"{label(b)}:{Path(p).name}" for b, p in zip(bundles, args.bundles)]
    base = bundle_bytes(bundles[0])
    rows = [{"bundle": p, "format": label(b), "precision_mode": b.manifest["precision_mode"],
             "bytes": bundle_bytes(b), "size_vs_fp32": round(bundle_bytes(b) / base, 4)}
            for b, p in zip(bundles, args.bundles)]

    for row, b in zip(rows, bundles):
        row["bits_per_weight"] = effective_bits(b)
    texts = [parse_text(t) for t in (args.text or DEFAULT_TEXTS)]
    if args.eval_tokens:
        tok = AutoTokenizer.from_pretrained(str(bundles[0].tokenizer_dir))
        cfgs = [(text_name, EvalConfig(path, max_tokens=args.eval_tokens, window=args.window, stride=args.stride,
                                       offset_chars=offset)) for text_name, path, offset in texts]
        tokens = {text_name: load_tokens(tok, cfg) for text_name, cfg in cfgs}
        for row, b, name in zip(rows, bundles, names):
            runner = open_bundle_runner(b)  # one at a time: a window's logits (and so the session's memory arena)
            try:  # are 1 GB at gemma-3-270m's 262,144-token vocabulary
                for text_name, cfg in cfgs:
                    result = perplexity(runner_scorer(runner), tokens[text_name], cfg)
                    ppl, scored = result["perplexity"], result["scored_tokens"]
                    row.setdefault("perplexity", {})[text_name] = round(ppl, 4)
                    row.setdefault("scored_tokens", {})[text_name] = scored
                    print(f"{name} {text_name}: ppl {ppl:.4f} on {len(tokens[text_name])} tokens", file=sys.stderr,
                          flush=True)
            finally:
                runner.release()
        for row in rows:
            row["ppl_increase_pct"] = {n: round(100 * (row["perplexity"][n] / rows[0]["perplexity"][n] - 1), 3)
                                       for n in row["perplexity"]}

    runners = [open_bundle_runner(b) for b in bundles]
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
    out["markdown"] = markdown(rows)
    emit(out, args.out)
    print(out["markdown"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
