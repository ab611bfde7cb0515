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
  awq-gptq      GPTQ (Frantar et al., 2023) error-compensated rounding in AWQ's scaled space: W' = W * s,
                H' = diag(1/s) H diag(1/s) with H = sum of x x^T over every calibration token of the
                linear's input (float64, fp32 model; --gptq-samples sequences of 256 tokens from the
                compile's calibration text, which holds 119: samples=128 gives 30,464 tokens). The grid is fixed beforehand: each 128-block's scale and
                integer zero point are awq-refine's (static groups); columns are quantized in order
                (or by descending diag H', "act-order") and each column's rounding error is spread over
                the columns not yet quantized through the Cholesky factor of H'^-1 (damping
                --gptq-damp x mean diag H'), lazy batches of 128 columns. Weight = dequant / s.
  gptq          the same with s = 1 (no AWQ scaling; grid from the same clip search and refit)
  METHOD:OPTS   per-variant GPTQ options, comma separated: damp=0.1, samples=64, order=act,
                refit=N (after GPTQ, all of a row's block scales refit jointly by least squares on H'
                with the codes fixed, then GPTQ re-run on the new grid; N rounds), seq=1 (each layer's
                H' collected with the layers before it already quantized, as GPTQ does),
                e.g. "awq-gptq:damp=0.1,order=act"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench_json import emit
from leptonc.calibration.gptq import gptq_fixed_grid, hessians, output_error


# ---- GPTQ pieces the compile does not use ---------------------------------------------------------

def refit_row_scales(w: np.ndarray, h: np.ndarray, codes: np.ndarray, scales: np.ndarray,
                     block: int) -> np.ndarray:
    """Given fixed codes (minus zero point, [N, K]), each row's block scales refit jointly: the least
    squares solution of min_s (w - sum_b s_b q_b) H (w - ...)^T, q_b the row's codes in block b. A row
    keeps its old scales where the solve fails or gives a scale <= 0 or a larger error."""
    k = w.shape[1]
    nb = scales.shape[1]
    spans = [slice(b * block, min((b + 1) * block, k)) for b in range(nb)]
    hq = np.stack([codes[:, sp] @ h[sp, :] for sp in spans], axis=1)  # [N, nb, K]: q_b H
    a = np.stack([np.einsum("nbk,nk->nb", hq[:, :, sp], codes[:, sp]) for sp in spans], axis=2)  # [N, nb, nb]
    rhs = np.einsum("nbk,nk->nb", hq, w)
    a = a + 1e-9 * np.trace(a, axis1=1, axis2=2)[:, None, None] / nb * np.eye(nb)
    try:
        new = np.linalg.solve(a, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return scales

    def loss(sc):
        d = w - codes * np.repeat(sc, block, axis=1)[:, :k]
        return np.einsum("nk,nk->n", d @ h, d)

    keep = (new <= 0).any(1) | ~np.isfinite(new).all(1)
    new = np.where(keep[:, None], scales, new)
    better = loss(new) < loss(scales)
    return np.where(better[:, None], new, scales).astype(np.float32)


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
    ap.add_argument("--gptq-samples", type=int, default=16,
                    help="calibration sequences (x 256 tokens) whose every token enters GPTQ's Hessian")
    ap.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ damping, times mean diag H'")
    ap.add_argument("--gptq-act-order", action="store_true", help="GPTQ columns by descending diag H'")
    ap.add_argument("--gptq-report", default="layers.0.,layers.1.,layers.15.,layers.29.",
                    help="layers whose per-linear output error (awq-refine vs GPTQ) is printed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from leptonc.calibration.collect import find_linears
    from leptonc.calibration.quantize import QuantSettings, calibrate
    from leptonc.calibration.scales import block_quantize
    from leptonc.models.adapters import get_adapter
    from leptonc.models.intake import load_model
    from leptonc.calibration.awq import AWQ_CLIP_RATIOS, awq_grid
    from leptonc.passes.quantize_nbits import HEAD_BITS, HEAD_BLOCK
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
    settings = QuantSettings("int4", int4_block=args.block, calib_samples=args.calib_samples, check=False,
                             int4_rounding="nearest")  # this harness runs its own GPTQ variants
    t = time.perf_counter()
    cal = calibrate(lm.module, lm.tokenizer, weights, settings, lm.source_hash,
                    mlp_activation=spec.activation if gated else None)
    print(f"calibration {time.perf_counter() - t:.1f}s (cache hit: {cal.summary['cache']['hit']})", file=sys.stderr)
    linears = find_linears(lm.module, weights)
    originals = {name: mod.weight.detach().clone() for name, mod in linears.items()}

    cfg = EvalConfig(args.data, max_tokens=args.tokens, window=args.window, stride=args.stride,
                     offset_chars=args.offset_chars)
    ids = load_tokens(lm.tokenizer, cfg)

    grids: dict = {}  # (member, AWQ scaled?) -> (its group, awq-refine's BlockQuantized of W * s): GPTQ's grid

    def refine_grid(name: str, w: np.ndarray, group, scaled: bool = True):
        """awq-refine's quantization of W * s (s = 1 unless `scaled`), kept for the variants after."""
        key = (name, scaled)
        if key not in grids or grids[key][0] is not group:  # awq-seq's groups are new ones
            s = group.prescale if scaled else np.ones(w.shape[1], np.float32)
            q = awq_grid(w * s[None, :], args.block, group.samples / s[None, :])
            grids[key] = (group, q)
        return grids[key][1]

    def quantize_member(w: np.ndarray, group, variant: str, name: str = "") -> np.ndarray:
        if variant == "rtn" or group is None or group.prescale is None:
            return block_quantize(w, 4, args.block).dequantize()
        s = group.prescale
        if variant == "awq-refine":
            return refine_grid(name, w, group).dequantize() / s[None, :]
        kw = {"clip_rows": group.samples / s[None, :], "clip_ratios": AWQ_CLIP_RATIOS}
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
                    wq = quantize_member(w, g, "awq-refine", m)
                    linears[m].weight.data.copy_(torch.from_numpy(np.ascontiguousarray(wq, np.float32)))
            print(f"layer {i} done", file=sys.stderr, flush=True)
        w = originals["lm_head"].numpy()
        linears["lm_head"].weight.data.copy_(torch.from_numpy(
            np.ascontiguousarray(block_quantize(w, HEAD_BITS, HEAD_BLOCK, symmetric=True).dequantize(), np.float32)))

    from leptonc.calibration.data import calibration_batches

    groups = [g for g in cal.stats.groups if g.prescale is not None]  # every input group but the head's
    hessian_cache: dict = {}  # sequences -> ({first member: H}, tokens), from the fp32 model
    report_layers = tuple(filter(None, args.gptq_report.split(",")))

    def gptq_options(text: str) -> dict:
        opts = {"damp": args.gptq_damp, "samples": args.gptq_samples,
                "order": "act" if args.gptq_act_order else "natural", "refit": 0, "seq": 0}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in opts:
                raise SystemExit(f"unknown GPTQ option {key!r}; use {', '.join(opts)}")
            opts[key] = type(opts[key])(value) if key != "order" else value
        return opts

    def gptq(method: str, opts: dict, only: str) -> dict:
        """Write GPTQ's weights (awq-gptq, or gptq with s = 1) into the module; returns a summary."""
        awq = method == "awq-gptq"
        batches = calibration_batches(lm.tokenizer, None, opts["samples"], settings.calib_seq_len)
        t0 = time.perf_counter()
        if not opts["seq"] and len(batches) not in hessian_cache:  # the module holds the fp32 weights here
            hessian_cache[len(batches)] = hessians(lm.module, linears, [g.members[0] for g in groups], batches)
        hs, tokens = hessian_cache.get(len(batches), ({}, 0))
        hessian_s = time.perf_counter() - t0 if not opts["seq"] else 0.0
        ratios, seq_layer = [], None
        for g in groups:
            kinds = [m.split(".")[-2] for m in g.members]
            if only and not set(kinds) & set(only.split(",")):
                continue
            layer = g.members[0].split(".")[1]
            if opts["seq"] and layer != seq_layer:  # this layer's inputs, the layers before it quantized
                t0, seq_layer = time.perf_counter(), layer
                firsts = [x.members[0] for x in groups if x.members[0].split(".")[1] == layer]
                hs, tokens = hessians(lm.module, linears, firsts, batches, stop_at=firsts[-1])
                hessian_s += time.perf_counter() - t0
            h = hs[g.members[0]]
            s = (g.prescale if awq else np.ones(h.shape[0], np.float32)).astype(np.float64)
            hp = h / np.outer(s, s)  # H' = diag(1/s) H diag(1/s): the input of W * s
            for m, kind in zip(g.members, kinds):
                if only and kind not in only.split(","):
                    continue
                w = originals[m].numpy()
                grid = refine_grid(m, w, g, scaled=awq)
                ws, sc = w.astype(np.float64) * s[None, :], grid.scales
                run = lambda sc: gptq_fixed_grid(ws, hp, sc, grid.zero_points, args.block, damp=opts["damp"],  # noqa: E731
                                                 act_order=opts["order"] == "act")
                dq, codes = run(sc)
                for r in range(opts["refit"]):
                    sc = refit_row_scales(ws, hp, codes, sc, args.block)
                    dq = codes * np.repeat(sc, args.block, axis=1)[:, : ws.shape[1]]
                    if r + 1 < opts["refit"]:
                        dq, codes = run(sc)
                wq = dq / s[None, :]
                linears[m].weight.data.copy_(torch.from_numpy(np.ascontiguousarray(wq, np.float32)))
                base = grid.dequantize() / s[None, :]
                e_awq, e_gptq = output_error(w, base, h), output_error(w, wq, h)
                ratios.append(e_gptq / e_awq)
                if m.startswith(report_layers):
                    x = g.samples.astype(np.float64)
                    ref = x @ w.T
                    rows_awq = float(((x @ base.T - ref) ** 2).mean())
                    rows_gptq = float(((x @ wq.T - ref) ** 2).mean())
                    print(f"  {m:26s} output error, all {tokens} calibration tokens (relative): awq-refine "
                          f"{e_awq:.3e} {method} {e_gptq:.3e} | MSE on the {len(x)} sampled rows: "
                          f"{rows_awq:.3e} -> {rows_gptq:.3e}", file=sys.stderr, flush=True)
        return {"hessian_tokens": int(tokens), "hessian_seconds": round(hessian_s, 1),
                "output_error_vs_awq_refine": {"median": round(float(np.median(ratios)), 4),
                                               "mean": round(float(np.mean(ratios)), 4),
                                               "lower": int(sum(r < 1 for r in ratios)), "linears": len(ratios)}}

    rows = []
    for variant in args.variants.split(";"):
        t = time.perf_counter()
        for name, mod in linears.items():
            mod.weight.data.copy_(originals[name])
        extra = {}
        base_name, _, only = variant.partition("@")
        method, _, options = base_name.partition(":")
        if variant == "awq-seq":
            sequential()
        elif method in ("awq-gptq", "gptq"):
            opts = gptq_options(options)
            extra = {"gptq": opts, **gptq(method, opts, only)}
            if not only or "head" in only.split(","):
                w = originals["lm_head"].numpy()
                linears["lm_head"].weight.data.copy_(torch.from_numpy(np.ascontiguousarray(
                    block_quantize(w, HEAD_BITS, HEAD_BLOCK, symmetric=True).dequantize(), np.float32)))
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
                    wq = quantize_member(w, cal.stats.group_of(name), method, name)
                mod.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(wq, np.float32)))
        quant_s = time.perf_counter() - t
        res = perplexity(torch_scorer(lm.module), ids, cfg)
        row = {"variant": variant, "perplexity": round(res["perplexity"], 4), "quantize_seconds": round(quant_s, 1),
               **extra}
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
