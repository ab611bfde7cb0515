"""The accuracy gate of a quantized compile: perplexity of the reference (the fp32 export, which
matches PyTorch to ~5e-5) and of the quantized model on held-out text, plus top-1 token agreement
between them. An increase above `--max-ppl-increase` percent fails the compile (exit 6, no bundle).

Its text: `leptonc/data/eval_python_docs.txt` (an evaluation text: nothing was calibrated or chosen on it;
calibration/data.py lists each shipped text's role), unless `check_data` names another file. The record
says which text it read and in which role.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from leptonc.calibration.quantize import CLIPPING_OBSERVERS
from leptonc.errors import VerificationError


def default_heldout_text() -> Path:
    """The tuning split (WikiText-2): recipe defaults were chosen on it; pruning's check reads it."""
    from leptonc.calibration.data import shipped_text

    return shipped_text("heldout.txt")


def default_gate_text() -> Path:
    """The accuracy gate's default text: an evaluation text no recipe was chosen on."""
    from leptonc.calibration.data import GATE_TEXT, shipped_text

    return shipped_text(GATE_TEXT)


def held_out_ids(tokenizer, path: Path, tokens: int) -> np.ndarray:
    text = path.read_text(encoding="utf-8")
    ids = np.asarray(tokenizer(text[: tokens * 12])["input_ids"], dtype=np.int64)[:tokens]
    return ids


def score_windows(open_runner, ids: np.ndarray, window: int) -> tuple[float, int, np.ndarray]:
    """(sum of -log p, scored tokens, greedy token at every position) of one model over non-overlapping windows
    of `ids`. `open_runner()` opens it; it is released before this returns."""
    from leptonc.runtime.evaluate import nll_sum

    runner = open_runner()
    try:
        nll, count, top1 = 0.0, 0, []
        for begin in range(0, len(ids) - 1, window):
            end = min(begin + window, len(ids))
            if end - begin < 2:
                break
            chunk = ids[begin:end][None, :]
            logits = runner.prefill(chunk, np.ones_like(chunk))[0]
            nll += nll_sum(logits, ids, begin, begin + 1, end)
            count += end - begin - 1
            top1.append(logits.argmax(-1))
            del logits
        return nll, count, np.concatenate(top1)
    finally:
        runner.release()


def evaluate_pair(open_reference, open_quantized, ids: np.ndarray, window: int) -> dict:
    """Non-overlapping windows: both models score the same positions, one model open at a time (a session
    keeps a window's logits in its memory arena: 0.5 GB at gemma-3-270m's vocabulary, beside the fp32
    reference's weights)."""
    nll_ref, count, top_ref = score_windows(open_reference, ids, window)
    nll_q, _, top_q = score_windows(open_quantized, ids, window)
    ppl_ref, ppl_q = math.exp(nll_ref / count), math.exp(nll_q / count)
    return {"reference_perplexity": round(ppl_ref, 4), "quantized_perplexity": round(ppl_q, 4),
            "ppl_increase_pct": round(100.0 * (ppl_q / ppl_ref - 1.0), 3),
            "top1_agreement": round(float((top_ref == top_q).mean()), 4), "scored_tokens": count, "window": window}


def text_roles() -> dict:
    """What each shipped text was used for (calibration, tuning, evaluation), for the gate's record."""
    from leptonc.calibration.data import TEXT_ROLES

    return dict(TEXT_ROLES)


def gate_skipped(settings) -> dict | None:
    """The gate's record when --no-check skips it, else None (the compiler then opens the runners to measure)."""
    if settings.check:
        return None
    return {"status": "skipped", "reason": "--no-check: the quantized model's accuracy was not measured"}


def accuracy_gate(open_reference, open_quantized, tokenizer, settings, limits: dict) -> dict:
    """Measure the quantized model against the reference on held-out text and judge it by --max-ppl-increase.
    The caller (leptonc/compiler.py) supplies the two openers (each returns a runner of its backend; the
    runner is released here after scoring); calibration never reaches into a backend. Raises
    VerificationError on failure, with the figures on the error (`.gate`) for the failed report."""
    data = Path(settings.check_data or default_gate_text())
    ids = held_out_ids(tokenizer, data, settings.check_tokens)
    window = int(min(512, limits["max_sequence"], max(2, len(ids))))
    result = evaluate_pair(open_reference, open_quantized, ids, window)
    limit = settings.max_ppl_increase
    bad = not math.isfinite(result["quantized_perplexity"]) or result["ppl_increase_pct"] > limit
    result.update({"status": "failed" if bad else "passed", "rule": f"perplexity increase <= {limit:g}%",
                   "data": str(data), "reference": "fp32 export (ONNX Runtime)",
                   "text_role": "the user's text (--check-data)" if settings.check_data else
                   "evaluation: Python 3.11.7 Language Reference prose; no calibration or recipe choice read it",
                   "texts": text_roles()})
    if bad:
        error = VerificationError(
            f"accuracy gate failed: perplexity {result['reference_perplexity']:.3f} -> "
            f"{result['quantized_perplexity']:.3f} (+{result['ppl_increase_pct']:.2f}%, limit {limit:g}%), "
            f"top-1 agreement {result['top1_agreement']:.3f}; no bundle was written",
            hint=gate_hint(settings),
        )
        error.gate = result  # the compiler keeps it in the failed report
        raise error
    return result


def gate_hint(settings, failed_report: str | None = None) -> str:
    """The next step after a failed gate, for the format that failed it."""
    fmt, steps = settings.format, []
    if fmt == "int4-rtn":
        steps.append("--int4-method awq")
    elif fmt == "int4-awq" and settings.int4_rounding == "nearest":
        steps.append("--int4-rounding gptq")
    if fmt.startswith("int4"):
        steps += ["a smaller --int4-block (64 or 32)", "--int4-8bit for the most sensitive layers"]
    elif fmt == "int8-w8a8":
        steps += (["a smaller --int8-block (16)"] if settings.dynamic_activations else []) + [
            "--int8-mode weight-only --activations fp32 (no activation rounding; slower than fp32 on the CPU)",
            "a fixed --smoothquant-alpha"]
    elif fmt == "int8-weight-only" and settings.activations != "fp32":
        steps += ["a smaller --int8-block (16)",
                  "--activations fp32 (no activation rounding; slower than fp32 on the CPU)"]
    elif fmt == "fp8":
        if settings.calib_method in CLIPPING_OBSERVERS:
            steps.append("--calib-method minmax (percentile and entropy clip outliers that E4M3 could represent)")
        if settings.fp8_lm_head:
            steps.append("leaving out --fp8-lm-head")
    where = f"worst_layers in {failed_report}" if failed_report else "the report's worst_layers"
    steps += [f"--keep-fp for the layers with the lowest SQNR ({where})", "or raise --max-ppl-increase"]
    return "try " + ", ".join(steps)
