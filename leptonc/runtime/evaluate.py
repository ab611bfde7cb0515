"""`leptonc eval`: perplexity over a text file with a sliding window (HF's strided method: each
window scores only the tokens the previous window did not), for a bundle or a PyTorch model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leptonc.errors import InputError


@dataclass(frozen=True)
class EvalConfig:
    data: str
    max_tokens: int = 4096
    window: int = 1024
    stride: int = 512
    offset_chars: int = 0  # start reading the file here (keeps evaluation text apart from calibration text)

    def __post_init__(self) -> None:
        if self.window < 2 or self.stride < 1 or self.stride > self.window:
            raise InputError("need --window >= 2 and 1 <= --stride <= --window")
        if self.max_tokens < 2:
            raise InputError("--max-tokens must be at least 2")


def load_tokens(tokenizer, cfg: EvalConfig) -> np.ndarray:
    path = Path(cfg.data)
    if not path.is_file():
        raise InputError(f"--data {path} does not exist", hint="give a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")[cfg.offset_chars:]
    except UnicodeDecodeError:
        raise InputError(f"--data {path} is not UTF-8 text") from None
    # Tokenize a generous prefix only: ~8 characters per token is more than enough.
    ids = tokenizer(text[: cfg.max_tokens * 12])["input_ids"]
    ids = np.asarray(ids[: cfg.max_tokens], dtype=np.int64)
    if len(ids) < 2:
        raise InputError(f"--data {path} has fewer than 2 tokens")
    return ids


def windows(n: int, window: int, stride: int):
    """Yield (begin, end, first_scored): positions [begin, end) run, targets from first_scored on."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n:
            break


NLL_ROWS = 64  # positions scored at a time: a window's float64 log-softmax is rows x vocabulary (at gemma-3-270m's
# 262,144 tokens, 512 positions would be 1 GB a copy)


def nll_sum(logits: np.ndarray, ids: np.ndarray, begin: int, first: int, end: int) -> float:
    """Sum of -log p(ids[t] | ids[:t]) for t in [first, end), with logits for positions begin..end-1; NLL_ROWS
    targets at a time, so its float64 temporaries stay small whatever the vocabulary."""
    total = 0.0
    for f in range(first, end, NLL_ROWS):
        e = min(f + NLL_ROWS, end)
        pred = logits[f - 1 - begin: e - 1 - begin].astype(np.float64)
        m = pred.max(-1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(pred - m).sum(-1))
        total += float((logz - pred[np.arange(e - f), ids[f:e]]).sum())
    return total


def perplexity(score_window, ids: np.ndarray, cfg: EvalConfig, on_progress=None) -> dict:
    """score_window(ids[begin:end]) -> logits [len, vocab]."""
    total_nll, count = 0.0, 0
    spans = list(windows(len(ids), cfg.window, cfg.stride))
    for i, (begin, end, first) in enumerate(spans):
        if on_progress:
            on_progress(i, len(spans))
        logits = score_window(ids[begin:end])
        total_nll += nll_sum(logits, ids, begin, first, end)
        count += end - first
    return {"perplexity": math.exp(total_nll / count), "tokens": int(len(ids)), "scored_tokens": count,
            "window": cfg.window, "stride": cfg.stride, "nll": total_nll / count}


def runner_scorer(runner):
    if runner.max_sequence < 2:
        raise InputError("bundle's maximum sequence is too short to evaluate")

    def score(window_ids: np.ndarray) -> np.ndarray:
        ids = window_ids[None, :]
        return runner.prefill(ids, np.ones_like(ids))[0]

    return score


def torch_scorer(module):
    import torch

    def score(window_ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(window_ids[None, :])).logits[0].float().numpy()

    return score
