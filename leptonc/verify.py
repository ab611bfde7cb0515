"""Verify: compare the built artifact with the reference PyTorch model on the same inputs.

The reference trace is recorded first (prefill logits, then greedy decode steps through the KV
cache), so the PyTorch model can be freed before the graph passes run; the artifact is then run on
exactly the same token sequence and compared: max |logits error| for prefill and each decode step,
and top-1 agreement.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import numpy as np

# Fixed, varied prompts: a fact, code, and a longer sentence (different lengths exercise the cache).
VERIFY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "In 1905, Albert Einstein published four papers that changed how physicists think about space, time and",
)
DECODE_STEPS = 8


@dataclass
class ReferenceTrace:
    prompt_ids: list[np.ndarray]  # one [1, S] array per prompt
    prefill_logits: list[np.ndarray]  # [S, V] per prompt
    decode_tokens: list[np.ndarray]  # [steps] per prompt: the tokens fed to each decode step
    decode_logits: list[np.ndarray]  # [steps, V] per prompt


def cache_of(output):
    """The KV cache of a forward's output, by its transformers 5 name where it has one."""
    return output.cache if "cache" in getattr(output, "keys", lambda: ())() else output.past_key_values


def cache_arg(module) -> str:
    """The name a model's forward takes the KV cache by: transformers 5 names it `cache` (and warns on
    `past_key_values`, to be removed in 5.40); older versions the other way."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def reference_trace(module, tokenizer, prompts=VERIFY_PROMPTS, steps: int = DECODE_STEPS,
                    max_sequence: int | None = None) -> ReferenceTrace:
    """`max_sequence` (the bundle's limit) truncates prompts so prompt + steps fit."""
    import torch

    if max_sequence is not None:
        steps = max(1, min(steps, max_sequence - 1))

    trace = ReferenceTrace([], [], [], [])
    kv_arg = cache_arg(module)
    vocab = module.config.vocab_size
    for text in prompts:
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)[None, :]
        ids = np.clip(ids, 0, vocab - 1)
        if max_sequence is not None:
            ids = ids[:, : max(1, max_sequence - steps)]
        with torch.no_grad(), warnings.catch_warnings():
            # a model wrapper's forward may still name the argument `past_key_values` and warn (FutureWarning)
            warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
            out = module(torch.from_numpy(ids), use_cache=True)
            prefill = out.logits[0].float().numpy()
            past, token = cache_of(out), out.logits[:, -1].argmax(-1)
            tokens, logits = [], []
            for _ in range(steps):
                tokens.append(int(token))
                o = module(token[:, None], **{kv_arg: past}, use_cache=True)
                logits.append(o.logits[0, -1].float().numpy())
                past, token = cache_of(o), o.logits[:, -1].argmax(-1)
        trace.prompt_ids.append(ids)
        trace.prefill_logits.append(prefill)
        trace.decode_tokens.append(np.asarray(tokens, np.int64))
        trace.decode_logits.append(np.stack(logits))
    return trace


def check_parity(runner, trace: ReferenceTrace) -> dict:
    """Run the artifact on the trace's inputs; errors are max |logit difference|."""
    prefill_err = decode_err = 0.0
    agree = total = 0
    for ids, ref_prefill, tokens, ref_decode in zip(trace.prompt_ids, trace.prefill_logits, trace.decode_tokens,
                                                    trace.decode_logits):
        got = runner.prefill(ids, np.ones_like(ids))[0]
        prefill_err = max(prefill_err, float(np.abs(got - ref_prefill).max()))
        agree += int((got.argmax(-1) == ref_prefill.argmax(-1)).sum())
        total += got.shape[0]
        for step, token in enumerate(tokens):
            got = runner.decode(np.asarray([token]))[0]
            decode_err = max(decode_err, float(np.abs(got - ref_decode[step]).max()))
            agree += int(got.argmax() == ref_decode[step].argmax())
            total += 1
    return {
        "prompts": len(trace.prompt_ids),
        "decode_steps": len(trace.decode_tokens[0]) if trace.decode_tokens else 0,
        "prefill_max_abs_error": prefill_err,
        "decode_max_abs_error": decode_err,
        "max_abs_error": max(prefill_err, decode_err),
        "top1_agreement": agree / total if total else None,
        "positions": total,
    }
