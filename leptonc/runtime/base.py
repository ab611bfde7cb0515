"""The runner interface every backend implements: load, prefill, decode step, release.

A runner owns its KV cache between calls. `prefill` starts a new sequence batch (left-padded
prompts with their attention mask) and returns logits for every prompt position; `decode` appends
one token per row and returns that step's logits. Logits come back as float32 numpy arrays.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np


class Runner(ABC):
    device: str = "cpu"
    vocab_size: int
    max_sequence: int
    max_batch: int

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        """input_ids/attention_mask [batch, seq] int64 -> logits [batch, seq, vocab] (or [batch, vocab])."""

    @abstractmethod
    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """token_ids [batch] int64 -> logits [batch, vocab] for the new position."""

    def decode_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        """token_ids [batch] int64 -> the greedy next token per row [batch] (argmax of this step's logits).
        Runners whose graph computes the argmax on the device (passes/greedy_token.py) copy only the tokens."""
        return self.decode(token_ids).argmax(-1)

    def greedy_tokens(self, token_ids: np.ndarray, steps: int) -> Iterator[np.ndarray]:
        """Yield the greedy next tokens of `steps` decode steps, [batch] each, every step fed the tokens before it.
        Runners that can queue steps ahead on the device (ort_cuda) override this; stopping early is allowed."""
        token = token_ids
        for _ in range(steps):
            token = self.decode_tokens(token)
            yield token

    @property
    @abstractmethod
    def sequence_length(self) -> int:
        """Tokens (past + new) held in the cache now, padding included."""

    def release(self) -> None:  # noqa: B027 - optional for backends with nothing to free
        """Free device memory and sessions."""

    def peak_device_memory_mb(self) -> float | None:
        return None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids for left-padded rows: 0.. over real tokens, 0 on padding."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
