"""INT4 recipe variants compared quickly in PyTorch: each variant's dequantized weights are written into
the fp32 module (fake quantization: the same numbers MatMulNBits would compute with, up to its fp32
accumulation order) and perplexity is scored on the *tuning* slice of WikiText-2 (bench/quant_tune.py's:
valid.txt from character 150,000, apart from the calibration, gate and evaluation texts). The
calibration statistics are the compile's own (`calibrate`, from its cache when present). Writes JSON.

    LEPTONC_CACHE=/tmp/cache .venv/bin/python bench/int4_fakequant.py smollm2-135m \
        --variants "fp32;rtn;awq;awq-refine" --out bench/results/int4_fakequant.json

Variants (block 128, asymmetric 4-bit with integer zero points as MatMulNBits stores them; the LM head
and tied embedding 8-bit symmetric block 64 in every variant, as the compile does):
  fp32          no quantization (the reference)
  rtn           round to nearest, min/max range
  awq           AWQ scales + AWQ's clip search (the compile's int4 default until session 7)
  VARIANT@TYPES that variant on the listed layer types only (q,k,v,o,gate,up,down,head), the rest fp32
  awq-seq       awq-refine layer by layer, each layer calibrated on the outputs of the already
                quantized layers before it
  awq-refine    awq, then each block's scale refit by least squares on the calibration rows' block
                covariance, codes re-rounded, a few rounds (calibration/scales.py, `refine`; the compile's
                default from session 7)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench_json import emit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--variants", default="fp32;rtn;awq;awq-refine", help="separated by ;")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"))
    ap.add_argument("--offset-chars", type=int, default=150_000)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (the compile's default 16)")
    ap.add_argument("--awq-rows", type=int, default=None,
                    help="rows AWQ's search keeps per input group (default: the compile's AWQ_SAMPLE_ROWS)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from leptonc.calibration.collect import find_linears
    from leptonc.calibration.quantize import QuantSettings, calibrate
    from leptonc.calibration.scales import block_quantize
    from leptonc.models.adapters import get_adapter
    from leptonc.models.intake import load_model
    from leptonc.passes.quantize_nbits import AWQ_CLIP_RATIOS, AWQ_REFINE_ROUNDS, HEAD_BITS, HEAD_BLOCK
    from leptonc.runtime.evaluate import EvalConfig, load_tokens, perplexity, torch_scorer

    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    adapter = get_adapter(lm.model_type)
    spec = adapter.spec(lm.module)
    weights = adapter.weights(lm.module, spec)
    gated = getattr(spec, "mlp", None) == "gated" and not getattr(spec, "mlp_bias", False)
    if args.awq_rows:  # an experiment: the compile's constant, replaced for this process only
        import leptonc.calibration.quantize as quantize_module

        quantize_module.AWQ_SAMPLE_ROWS = args.awq_rows
    settings = QuantSettings("int4", int4_block=args.block, calib_samples=args.calib_samples, check=False)
    t = time.perf_counter()
    cal = calibrate(lm.module, lm.tokenizer, weights, settings, lm.source_hash,
                    mlp_activation=spec.activation if gated else None)
    print(f"calibration {time.perf_counter() - t:.1f}s (cache hit: {cal.summary['cache']['hit']})", file=sys.stderr)
    linears = find_linears(lm.module, weights)
    originals = {name: mod.weight.detach().clone() for name, mod in linears.items()}

    cfg = EvalConfig(args.data, max_tokens=args.tokens, window=args.window, stride=args.stride,
                     offset_chars=args.offset_chars)
    ids = load_tokens(lm.tokenizer, cfg)

    def quantize_member(w: np.ndarray, group, variant: str) -> np.ndarray:
        if variant == "rtn" or group is None or group.prescale is None:
            return block_quantize(w, 4, args.block).dequantize()
        s = group.prescale
        kw = {"clip_rows": group.samples / s[None, :], "clip_ratios": AWQ_CLIP_RATIOS}
        if variant == "awq-refine":
            kw["refine"] = AWQ_REFINE_ROUNDS
        return block_quantize(w * s[None, :], 4, args.block, **kw).dequantize() / s[None, :]

    def sequential() -> None:
        """AWQ (+ clip search and scale refit) layer by layer, each layer's statistics collected with
        the layers before it already quantized (its inputs carry their rounding error)."""
        from leptonc.calibration.awq import awq_search, gated_output
        from leptonc.calibration.collect import collect
        from leptonc.calibration.data import calibration_batches

        import leptonc.calibration.quantize as quantize_module

        batches = calibration_batches(lm.tokenizer, None, settings.calib_samples, settings.calib_seq_len)
        layers = sorted({int(n.split(".")[1]) for n in linears if n.startswith("layers.")})
        for i in layers:
            st = collect(lm.module, weights, batches, "minmax", need_ranges=False,
                         sample_rows=quantize_module.AWQ_SAMPLE_ROWS)
            for g in st.groups:
                if not g.members[0].startswith(f"layers.{i}."):
                    continue
                ws = [originals[m].numpy() for m in g.members]
                output = None
                if gated and [m.split(".")[-2] for m in g.members] == ["gate", "up"]:
                    output = gated_output(spec.activation, ws[0].shape[0])
                g.prescale, _ = awq_search(g.samples, g.absmean, ws, 4, args.block, output=output)
                for m, w in zip(g.members, ws):
                    wq = quantize_member(w, g, "awq-refine")
                    linears[m].weight.data.copy_(torch.from_numpy(np.ascontiguousarray(wq, np.float32)))
            print(f"layer {i} done", file=sys.stderr, flush=True)
        w = originals["lm_head"].numpy()
        linears["lm_head"].weight.data.copy_(torch.from_numpy(
            np.ascontiguousarray(block_quantize(w, HEAD_BITS, HEAD_BLOCK, symmetric=True).dequantize(), np.float32)))

    rows = []
    for variant in args.variants.split(";"):
        t = time.perf_counter()
        for name, mod in linears.items():
            mod.weight.data.copy_(originals[name])
        if variant == "awq-seq":
            sequential()
        elif variant != "fp32":
            method, _, only = variant.partition("@")  # "awq@down,o": only those layer types (head stays fp32)
            for name, mod in linears.items():
                kind = "head" if name == "lm_head" else name.split(".")[-2]
                if only and kind not in only.split(","):
                    continue
                w = originals[name].numpy()
                if name == "lm_head":
                    wq = block_quantize(w, HEAD_BITS, HEAD_BLOCK, symmetric=True).dequantize()
                else:
                    wq = quantize_member(w, cal.stats.group_of(name), method)
                mod.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(wq, np.float32)))
        quant_s = time.perf_counter() - t
        res = perplexity(torch_scorer(lm.module), ids, cfg)
        row = {"variant": variant, "perplexity": round(res["perplexity"], 4), "quantize_seconds": round(quant_s, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    ref = next((r["perplexity"] for r in rows if r["variant"] == "fp32"), None)
    for row in rows:
        if ref:
            row["ppl_increase_pct"] = round(100 * (row["perplexity"] / ref - 1), 3)
    out = {"date": time.strftime("%Y-%m-%d"), "command": "bench/int4_fakequant.py " + " ".join(argv or sys.argv[1:]),
           "text": f"{args.data} from character {args.offset_chars}, {len(ids)} tokens", "block": args.block,
           "results": rows}
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
