"""What a caller hands the batching engine (batching.py) and gets back: its configuration, sampling parameters,
requests, events, and the errors `submit` raises.

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

from leptonc.errors import InputError, LeptonError
from leptonc.runtime.generate import SamplingConfig, sample

FINISH_REASONS = ("stop", "length", "eos", "cancelled", "error")


class QueueFullError(LeptonError):
    """Every slot is busy and the waiting queue is full: try again later (HTTP 429). Exit 8."""

    exit_code = 8

    def __init__(self, message: str, hint: str | None = None, retry_after_s: float = 1.0):
        super().__init__(message, hint)
        self.retry_after_s = retry_after_s


class EngineStoppedError(LeptonError):
    """The engine is shutting down (or was never started) and takes no new requests (HTTP 503). Exit 8."""

    exit_code = 8


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int = 64  # requests waiting beyond the slots; past it, submit raises QueueFullError
    device: str | None = None  # None: the bundle's own device; "cpu" or "cuda" to override
    verify: bool = True  # check the bundle's hashes and toolchain, and run one step, before serving
    # run the shapes serving runs before the first request (GPU bundles: capture every decode bucket's CUDA graph, and
    # prefill every multiple of 64 tokens within the budget), so that the first requests do not wait for it; a few
    # seconds at start
    warmup: bool = True
    prefill_chunk: int = 512  # chunked slots (the CPU's): prompt tokens prefilled between two decode steps
    num_slots: int | None = None  # sequences decoded together; None: the bundle's max batch
    tokenizer_dir: str | None = None  # a tokenizer for bundles without one
    # Tokens a sequence gathers before its next event; its first and last tokens (and every token of a request with
    # stop strings) go out at once. 1 streams every token; more cut the host's work per token when many stream.
    # "auto": 1 while at most AUTO_EVENTS_PER_STEP sequences run, then enough that a step makes about that many events
    # (64 sequences: every 4th token), each sequence on its own phase so the events of a step are spread evenly.
    stream_interval: int | str = "auto"
    # Python's thread switch interval while the engine runs (process-wide, put back at shutdown): the longest the
    # scheduler waits for Python's lock after a step while the HTTP server's threads hold it. None: Python's 5 ms.
    switch_interval_s: float | None = 0.0005
    # record the scheduler's timeline (engine.trace, a SchedulerTrace: `leptonc serve --trace FILE` writes it)
    trace: bool = False

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise InputError(f"max_queue must be >= 0, not {self.max_queue}")
        if self.prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be >= 1 token, not {self.prefill_chunk}")
        if self.num_slots is not None and self.num_slots < 1:
            raise InputError(f"num_slots must be >= 1, not {self.num_slots}")
        if self.device not in (None, "cpu", "cuda"):
            raise InputError(f"device must be 'cpu' or 'cuda', not {self.device!r}")
        if self.stream_interval != "auto" and (isinstance(self.stream_interval, str) or self.stream_interval < 1):
            raise InputError(f"stream_interval must be 'auto' or a whole number >= 1 token, not {self.stream_interval!r}")
        if self.switch_interval_s is not None and not 1e-5 <= self.switch_interval_s <= 1.0:
            raise InputError(f"switch_interval_s must be between 1e-05 and 1 second, not {self.switch_interval_s}")


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


def checked_prompt(prompt_ids: list[int], params: "SamplingParams", vocab: int, max_sequence: int) -> list[int]:
    """The prompt's ids as ints, or an InputError (HTTP 400) for an empty one, an id outside the vocabulary, or a
    prompt that with max_tokens does not fit the bundle's sequence."""
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise InputError("the prompt has no tokens", hint="give a non-empty prompt")
    if any(t < 0 or t >= vocab for t in ids):
        raise InputError(f"prompt token ids must be in 0..{vocab - 1} (this model's vocabulary)")
    if len(ids) >= max_sequence:
        raise InputError(f"the prompt is {len(ids)} tokens; this bundle allows at most {max_sequence} "
                         "tokens in all (prompt and completion)", hint="shorten the prompt")
    if len(ids) + params.max_tokens > max_sequence:
        raise InputError(f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds this "
                         f"bundle's limit of {max_sequence} tokens", hint=f"ask for at most {max_sequence - len(ids)} tokens")
    return ids


def queue_full_error(slots: int, waiting: int, max_queue: int) -> QueueFullError:
    return QueueFullError(f"all {slots} slots are busy and {waiting} requests are waiting (the queue holds "
                          f"{max_queue})", hint="retry after a moment, or start the server with a larger --max-queue")


def stopped_error() -> EngineStoppedError:
    return EngineStoppedError("the engine is not taking requests (it is shutting down or not started)",
                              hint="retry against a running server")


class Request:
    """One submitted sequence: its prompt, parameters, output so far, and its events."""

    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams,
                 on_event: Callable[[Event], None] | None, wake: Callable[[], None] | None = None):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.submitted_at = time.perf_counter()
        self.cancelled = False  # set by cancel() (any thread); a plain flag, read by the scheduler every step
        self.tag = None  # the submitter's own name for it (BatchingEngine.submit's tag)
        self._wake = wake
        # the scheduler's side
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the slot
        self.last_token = 0  # the newest token, the next decode step's input
        self.made = 0  # tokens generated so far (end-of-sequence not counted)
        self.in_flight = 0  # runs queued on the device (pipelined slots) whose token for it is not taken yet
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


__all__ = ["EngineConfig", "EngineStoppedError", "Event", "FINISH_REASONS", "QueueFullError", "Request", "SamplingParams"]
