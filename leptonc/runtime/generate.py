"""Generation on a `Runner`: batched prompts (left-padded), greedy or sampled (temperature, top-k,
top-p, seeded), stop strings and end-of-sequence, token streaming through a callback."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from leptonc.errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise InputError("--temperature must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise InputError("--top-k must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise InputError("--top-p must be in (0, 1]")


@dataclass
class Generation:
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"


@dataclass
class GenerationResult:
    outputs: list[Generation]
    timings: dict


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """logits [batch, vocab] -> next token per row."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    out = np.empty(logits.shape[0], dtype=np.int64)
    for i, row in enumerate(logits.astype(np.float64) / cfg.temperature):
        if cfg.top_k:
            kth = np.partition(row, -cfg.top_k)[-cfg.top_k]
            row = np.where(row < kth, -np.inf, row)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        if cfg.top_p < 1:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, cfg.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        out[i] = rng.choice(len(probs), p=probs)
    return out


def generate(runner, tokenizer, prompts: list[str], cfg: SamplingConfig, *, eos_ids: tuple[int, ...] = (),
             on_text: Callable[[int, str], None] | None = None, prompt_ids: list[list[int]] | None = None,
             ) -> GenerationResult:
    """Generate for a batch of prompts. `on_text(row, new_text)` streams decoded text as it grows."""
    if prompt_ids is None:
        prompt_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    for p, ids in zip(prompts, prompt_ids):
        if not ids:
            raise InputError(f"prompt {p!r} encodes to no tokens; give a non-empty prompt")
    longest = max(len(r) for r in prompt_ids)
    if longest + cfg.max_new_tokens > runner.max_sequence:
        raise InputError(
            f"prompt of {longest} tokens + {cfg.max_new_tokens} new tokens exceeds this bundle's maximum sequence "
            f"of {runner.max_sequence} tokens; shorten the prompt, lower --max-new-tokens, or recompile with a larger --max-seq")
    if len(prompts) > runner.max_batch:
        raise InputError(f"{len(prompts)} prompts exceed this bundle's maximum batch of {runner.max_batch}; "
                         "split them, or recompile with a larger --max-batch")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    rng = np.random.default_rng(cfg.seed)
    outs = [Generation(p, list(ids)) for p, ids in zip(prompts, prompt_ids)]
    streamed = [""] * len(outs)
    ids, mask = left_pad(prompt_ids, pad)
    t0 = time.perf_counter()
    logits = runner.prefill(ids, mask, last_only=True)
    t_first = time.perf_counter()
    active = np.ones(len(prompts), dtype=bool)
    step_times: list[float] = []
    # Greedy steps ask the runner for tokens only (Runner.decode_tokens): where the graph computes the
    # argmax, the logits never leave the device.
    greedy = cfg.temperature == 0
    tokens = sample(logits, cfg, rng)
    # Greedy rows feed back their own token (a finished row's are read by nobody), so the runner may queue
    # steps ahead on the device (Runner.greedy_tokens).
    stream = runner.greedy_tokens(tokens, cfg.max_new_tokens - 1) if greedy else None
    s = time.perf_counter()
    for step in range(cfg.max_new_tokens):
        for row, g in enumerate(outs):
            if not active[row]:
                continue
            tok = int(tokens[row])
            if cfg.stop_at_eos and tok in eos_ids:
                active[row] = False
                g.finish_reason = "eos"
                continue
            g.token_ids.append(tok)
            text = tokenizer.decode(g.token_ids, skip_special_tokens=True)
            stop_at = _first_stop(text, cfg.stop)
            if stop_at is not None:
                text = text[:stop_at]
                active[row] = False
                g.finish_reason = "stop"
            g.text = text
            # Hold back text that ends inside a multi-byte character until it is complete.
            if on_text and not text.endswith("\ufffd") and text.startswith(streamed[row]) and text != streamed[row]:
                on_text(row, text[len(streamed[row]):])
                streamed[row] = text
        if not active.any() or step == cfg.max_new_tokens - 1:
            break
        if greedy:
            tokens = next(stream)
        else:
            logits = runner.decode(np.where(active, tokens, pad))
            tokens = sample(logits, cfg, rng)
        now = time.perf_counter()
        step_times.append(now - s)
        s = now
    if stream is not None:
        stream.close()
    total = time.perf_counter() - t0
    decoded = sum(len(g.token_ids) for g in outs)
    timings = {
        "prompt_tokens": int(mask.sum()),
        "new_tokens": decoded,
        "ttft_ms": round((t_first - t0) * 1000, 3),
        "decode_ms_per_step": round(1000 * float(np.mean(step_times)), 3) if step_times else None,
        "total_ms": round(total * 1000, 3),
        "decode_tokens_per_s": round(len(prompts) * len(step_times) / sum(step_times), 2) if step_times else None,
    }
    return GenerationResult(outs, timings)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
