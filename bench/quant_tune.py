"""Choose a quantization recipe without looking at the evaluation text: perplexity of bundles on a
*tuning* slice of WikiText-2 (`valid.txt` from character 150,000: after the calibration text
[0, 119,655) and before the evaluation text (400,000 on) and the gate's held-out text
[400,174, 460,000)). Writes JSON.

    .venv/bin/python bench/quant_tune.py FP32.lepton Q.lepton [Q2.lepton ...] [--accuracy-level 0] \
        --out bench/results/quant_tune.json

`--accuracy-level N` also scores each quantized bundle with its MatMulNBits nodes' `accuracy_level`
set to N (a copy of the graph in a temporary folder; the bundle itself is not touched), to separate
the weights' rounding error from the int8 activation rounding that level 4 adds on ONNX Runtime's CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_json import emit

TUNE_OFFSET = 150_000
EVAL_OFFSET = 400_000


def patched_model(model_path: Path, level: int, into: Path) -> Path:
    import onnx

    model = onnx.load(str(model_path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
    out = into / "model.onnx"
    onnx.save_model(model, str(out), save_as_external_data=True, location="model.onnx.data")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", help="the fp32 bundle first, then quantized bundles")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"))
    ap.add_argument("--offset-chars", type=int, default=TUNE_OFFSET)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--accuracy-level", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.evaluate import EvalConfig, load_tokens, perplexity, runner_scorer
    from leptonc.targets.backends.onnxruntime import open_runner

    cfg = EvalConfig(args.data, max_tokens=args.tokens, window=args.window, stride=args.stride,
                     offset_chars=args.offset_chars)
    bundles = [load_bundle(Path(p)) for p in args.bundles]
    tok = AutoTokenizer.from_pretrained(str(bundles[0].tokenizer_dir))
    ids = load_tokens(tok, cfg)
    end_chars = args.offset_chars + len(tok.decode(ids))
    if args.offset_chars < 119_655 or end_chars > EVAL_OFFSET:
        print(f"warning: characters [{args.offset_chars}, {end_chars}) overlap the calibration or evaluation text",
              file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (b, p) in enumerate(zip(bundles, args.bundles)):
            variants = [(None, open_bundle_runner(b))]
            if i and args.accuracy_level is not None:
                d = Path(tmp) / str(i)
                d.mkdir()
                variants.append((args.accuracy_level,
                                 open_runner(patched_model(b.model_path, args.accuracy_level, d), b.engine,
                                             b.manifest["limits"])))
            for level, runner in variants:
                t = time.perf_counter()
                res = perplexity(runner_scorer(runner), ids, cfg)
                runner.release()
                row = {"bundle": p, "accuracy_level": level, "perplexity": round(res["perplexity"], 4),
                       "seconds": round(time.perf_counter() - t, 1)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    ref = rows[0]["perplexity"]
    for row in rows:
        row["ppl_increase_pct"] = round(100 * (row["perplexity"] / ref - 1), 3)
    out = {"date": time.strftime("%Y-%m-%d"), "command": "bench/quant_tune.py " + " ".join(argv or sys.argv[1:]),
           "text": f"{args.data} characters [{args.offset_chars}, {end_chars})", "tokens": int(len(ids)),
           "results": rows}
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
