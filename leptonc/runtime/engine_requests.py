"""What a caller hands the batching engine (batching.py) and gets back: sampling parameters, requests, events.

A `Request` has two sides. The scheduler thread owns its slot, its last token and how many tokens it has made;
the engine's writer thread (engine_output.py) owns its output: `token_ids`, `text`, `finish_reason` and the events,
which it delivers in order to `events()` or to the caller's `on_event` callback.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from leptonc.errors import InputError
from leptonc.runtime.generate import SamplingConfig, sample

FINISH_REASONS = ("stop", "length", "eos", "cancelled", "error")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be a whole number >= 1, not {self.max_tokens!r}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 is greedy), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 turns it off), not {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed, stop=self.stop, stop_at_eos=self.stop_at_eos)


@dataclass(frozen=True)
class Event:
    """What a request produced since its last event. `finish_reason` is None until the last one."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    error: str | None = None  # set when finish_reason is "error": what failed, for the log and the client


class Request:
    """One submitted sequence: its prompt, parameters, output so far, and its events."""

    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams,
                 on_event: Callable[[Event], None] | None, wake: Callable[[], None] | None = None):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.submitted_at = time.perf_counter()
        self.cancelled = False  # set by cancel() (any thread); a plain flag, read by the scheduler every step
        self._wake = wake
        # the scheduler's side
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the slot
        self.last_token = 0  # the newest token, the next decode step's input
        self.made = 0  # tokens generated so far (end-of-sequence not counted)
        self._rng = np.random.default_rng(params.seed)
        self._sampling = params.sampling_config() if not params.greedy else None
        # the writer's side (engine_output.py)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._prefix_offset = self._read_offset = 0  # incremental detokenization
        self._pending_ids: list[int] = []  # tokens whose text is not out yet
        self._emitted = 0  # characters of self.text already sent
        self._events: queue.SimpleQueue[Event] | None = None if on_event else queue.SimpleQueue()
        self._on_event = on_event

    # ---- caller side ------------------------------------------------------------------------------

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until the last one (whose finish_reason is set). Blocks between them."""
        if self._events is None:
            raise RuntimeError("this request delivers its events to the on_event callback given to submit")
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Stop generating; the slot is freed on the scheduler's next turn and a last event says "cancelled"."""
        self.cancelled = True
        if self._wake is not None:
            self._wake()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # ---- scheduler side ---------------------------------------------------------------------------

    def next_token(self, greedy_token: int, logits: np.ndarray | None) -> int:
        if self._sampling is None:
            return int(greedy_token)
        return int(sample(logits.reshape(1, -1), self._sampling, self._rng)[0])

    def take(self, token: int, eos_ids: tuple[int, ...]) -> str | None:
        """Count a generated token; how the sequence ends with it ("eos", "length"), or None while it goes on.
        Stop strings need the text, so the writer finds those."""
        self.last_token = token
        if self.params.stop_at_eos and token in eos_ids:
            return "eos"
        self.made += 1
        return "length" if self.made >= self.params.max_tokens else None


__all__ = ["Event", "FINISH_REASONS", "Request", "SamplingParams"]
