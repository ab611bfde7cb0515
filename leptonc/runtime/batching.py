"""The in-flight batching engine: many requests share one bundle's KV cache, a slot each.

A scheduler thread loops over three things, in this order, one of each per turn:

1. admit: requests waiting in the bounded queue take free slots (first come, first served);
2. prefill: the oldest admitted prompt runs its next chunk (`EngineConfig.prefill_chunk` tokens) into its
   slot; a prompt whose last chunk ran samples its first token and joins the decode batch;
3. decode: every running sequence gets one more token in one batched step.

So a long prompt costs the running streams one chunk's time per step, not the whole prompt. A sequence
that ends (end-of-sequence, a stop string, `max_tokens`) or is cancelled frees its slot in the same
turn. Beyond the slots, requests wait in a queue of `max_queue`; beyond that `submit` raises
`QueueFullError` (HTTP's 429). Each request carries its own sampling parameters and random generator.

The engine is a library: `leptonc serve` (leptonc/server/) and the Triton model put HTTP or Triton in
front of the same object.

    engine = BatchingEngine.from_bundle(path, EngineConfig(max_queue=64))
    engine.start()
    request = engine.submit(engine.encode("The capital of France is"), SamplingParams(max_tokens=16))
    for event in request.events():
        print(event.text, end="")
    engine.shutdown()
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from leptonc.errors import InputError, LeptonError
from leptonc.runtime.generate import SamplingConfig, sample
from leptonc.runtime.slots import KvSlots, open_kv_slots
from leptonc.runtime.tokenizer import eos_ids, load_tokenizer

FINISH_REASONS = ("stop", "length", "eos", "cancelled", "error")

# The engine's own series as `leptonc serve`'s /metrics and the Triton model export them, so one dashboard reads
# both: (key of BatchingEngine.metrics(), Prometheus name (a counter's gains "_total" when exposed), kind, help).
ENGINE_SERIES = (
    ("running", "leptonc_requests_running", "gauge", "Sequences holding a KV slot (prefilling or decoding)."),
    ("queued", "leptonc_requests_queued", "gauge", "Requests waiting for a KV slot."),
    ("slots_used", "leptonc_kv_slots_used", "gauge", "KV cache slots in use."),
    ("slots_total", "leptonc_kv_slots", "gauge", "KV cache slots in all (the bundle's max batch)."),
    ("prompt_tokens_total", "leptonc_prompt_tokens", "counter", "Prompt tokens prefilled."),
    ("generated_tokens_total", "leptonc_generation_tokens", "counter",
     "Tokens generated (end-of-sequence not counted)."),
    ("rejected_queue_full_total", "leptonc_rejected_queue_full", "counter",
     "Requests refused: every slot busy and the queue full."),
)
FINISHED_SERIES = ("finished_total", "leptonc_sequences_finished", "Sequences ended, by reason.")  # label: reason


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
    prefill_chunk: int = 512  # prompt tokens prefilled between two decode steps
    num_slots: int | None = None  # sequences decoded together; None: the bundle's max batch
    tokenizer_dir: str | None = None  # a tokenizer for bundles without one

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise InputError(f"max_queue must be >= 0, not {self.max_queue}")
        if self.prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be >= 1 token, not {self.prefill_chunk}")
        if self.num_slots is not None and self.num_slots < 1:
            raise InputError(f"num_slots must be >= 1, not {self.num_slots}")
        if self.device not in (None, "cpu", "cuda"):
            raise InputError(f"device must be 'cpu' or 'cuda', not {self.device!r}")


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
                 on_event: Callable[[Event], None] | None, tokenizer):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the slot
        self._cancelled = threading.Event()
        self._events: queue.SimpleQueue[Event] | None = None if on_event else queue.SimpleQueue()
        self._on_event = on_event
        self._tokenizer = tokenizer
        self._rng = np.random.default_rng(params.seed)
        self._sampling = params.sampling_config() if not params.greedy else None
        self._prefix_offset = self._read_offset = 0  # incremental detokenization (_detokenize)
        self._pending_ids: list[int] = []  # tokens whose text is not out yet
        self._emitted = 0  # characters of self.text already sent

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
        self._cancelled.set()
        engine_wake = getattr(self, "_wake", None)
        if engine_wake is not None:
            engine_wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # ---- engine side ------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(event)
        else:
            self._events.put(event)

    def _next_token(self, greedy_token: int, logits: np.ndarray | None) -> int:
        if self._sampling is None:
            return int(greedy_token)
        return int(sample(logits.reshape(1, -1), self._sampling, self._rng)[0])

    def _detokenize(self, final: bool = False) -> str:
        """The text the newest tokens add: the last few tokens decoded with the ones before them, so a word's
        leading space and multi-byte characters come out right (held back while they end incomplete, unless
        `final`: the sequence has ended, and its text is what the whole decode gives)."""
        ids = self.token_ids
        decode = self._tokenizer.decode
        before = decode(ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        after = decode(ids[self._prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            return after[len(before):]
        return ""

    def _accept(self, token: int, eos_ids: tuple[int, ...]) -> bool:
        """Take one generated token; emit what it adds. True when the sequence has ended."""
        params = self.params
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if params.stop_at_eos and token in eos_ids:
            self.text += self._detokenize(final=True)
            self._finish("eos")
            return True
        self.token_ids.append(token)
        self._pending_ids.append(token)
        self.text += self._detokenize()
        reason = None
        hold = 0
        if params.stop:
            hits = [self.text.find(s, max(0, self._emitted - len(s))) for s in params.stop if s]
            hits = [h for h in hits if h >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                reason = "stop"
            else:  # hold back a tail that could still become a stop string
                hold = max((k for s in params.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
                           default=0)
        if reason is None and len(self.token_ids) >= params.max_tokens:
            reason = "length"
        if reason is not None:
            if reason == "length":
                self.text += self._detokenize(final=True)
            self._finish(reason)
            return True
        upto = len(self.text) - hold
        if upto > self._emitted or self._pending_ids:
            delta = self.text[self._emitted:upto]
            self._emitted = max(self._emitted, upto)
            self._emit(Event(tuple(self._pending_ids), delta))
            self._pending_ids = []
        return False

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        self.finished_at = time.perf_counter()
        delta = self.text[self._emitted:] if reason != "cancelled" else ""
        self._emitted = len(self.text)
        self._emit(Event(tuple(self._pending_ids), delta, reason, error))
        self._pending_ids = []


@dataclass
class _Counters:
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    finished: dict = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    rejected_queue_full: int = 0


class BatchingEngine:
    """In-flight batching over a `KvSlots` (module doc)."""

    def __init__(self, slots: KvSlots, tokenizer, eos_ids: tuple[int, ...], config: EngineConfig | None = None,
                 *, model_name: str = "model"):
        self.config = config or EngineConfig()
        self.slots = slots
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self.model_name = model_name
        self.num_slots = slots.num_slots
        self.max_sequence = slots.max_sequence
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._running: dict[int, Request] = {}  # slot -> request, in the order they joined the decode batch
        self._free = list(range(self.num_slots))
        self._ids = itertools.count(1)
        self._counters = _Counters()
        self._accepting = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # the scheduler's fatal error, if it died

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def from_bundle(cls, path: str | Path, config: EngineConfig | None = None) -> "BatchingEngine":
        """Load a bundle (checking it unless config.verify is False), its tokenizer and its slots."""
        from leptonc.bundle import engine_load_errors, load_bundle

        config = config or EngineConfig()
        bundle = load_bundle(Path(path), verify=config.verify)
        tokenizer = load_tokenizer(Path(config.tokenizer_dir) if config.tokenizer_dir else bundle.tokenizer_dir)
        eos = eos_ids(tokenizer, bundle.manifest)
        with engine_load_errors(bundle.model_path):  # a corrupt engine is a bad bundle (exit 7), not a crash
            slots = open_kv_slots(bundle, config.device, config.num_slots)
            if config.verify:  # one prompt token and one step through the graph before anyone is told "ready"
                slots.prefill(0, [int(eos[0]) if eos else 0])
                slots.decode([0], np.zeros(1, np.int64))
                slots.free(0)
        name = Path(path).name.removesuffix(".lepton") or "model"
        return cls(slots, tokenizer, eos, config, model_name=name)

    # ---- the tokenizer ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError("this model's tokenizer has no chat template", hint="use the completions endpoint")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
        return list(encoded["input_ids"])

    # ---- life cycle -------------------------------------------------------------------------------

    def start(self) -> "BatchingEngine":
        with self._lock:
            if self._thread is not None:
                return self
            self._accepting, self._stop = True, False
            self._thread = threading.Thread(target=self._loop, name="leptonc-batching", daemon=True)
            self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def shutdown(self, grace_s: float = 30.0) -> bool:
        """Stop taking requests, let those in flight (and queued) finish within `grace_s`, cancel the rest,
        stop the scheduler and free the cache. True when nothing had to be cancelled."""
        deadline = time.monotonic() + max(0.0, grace_s)
        with self._lock:
            self._accepting = False
            while self._outstanding() and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.1))
            clean = not self._outstanding()
            for request in self._all_requests():
                request._cancelled.set()
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = None
        self.slots.release()
        return clean

    # ---- requests ---------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Queue a prompt. Its events go to `request.events()`, or to `on_event` (called on the scheduler's
        thread: it must not block). Raises InputError for a bad prompt, QueueFullError when full."""
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise InputError("the prompt has no tokens", hint="give a non-empty prompt")
        vocab = self.slots.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise InputError(f"prompt token ids must be in 0..{vocab - 1} (this model's vocabulary)")
        if len(ids) >= self.max_sequence:
            raise InputError(f"the prompt is {len(ids)} tokens; this bundle allows at most {self.max_sequence} "
                             "tokens in all (prompt and completion)", hint="shorten the prompt")
        if len(ids) + params.max_tokens > self.max_sequence:
            raise InputError(f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds this "
                             f"bundle's limit of {self.max_sequence} tokens",
                             hint=f"ask for at most {self.max_sequence - len(ids)} tokens")
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the engine is not taking requests (it is shutting down or not started)",
                                         hint="retry against a running server")
            if self._outstanding() >= self.num_slots + self.config.max_queue:
                self._counters.rejected_queue_full += 1
                raise QueueFullError(f"all {self.num_slots} slots are busy and {len(self._waiting)} requests are "
                                     f"waiting (the queue holds {self.config.max_queue})",
                                     hint="retry after a moment, or start the server with a larger --max-queue")
            request = Request(next(self._ids), ids, params, on_event, self.tokenizer)
            request._wake = self._wake
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def metrics(self) -> dict:
        with self._lock:
            c = self._counters
            return {"running": len(self._running) + len(self._prefilling), "queued": len(self._waiting),
                    "slots_total": self.num_slots, "slots_used": self.num_slots - len(self._free),
                    "prompt_tokens_total": c.prompt_tokens_total, "generated_tokens_total": c.generated_tokens_total,
                    "finished_total": dict(c.finished), "rejected_queue_full_total": c.rejected_queue_full}

    # ---- the scheduler ----------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _outstanding(self) -> int:
        return len(self._waiting) + len(self._prefilling) + len(self._running)

    def _all_requests(self) -> list[Request]:
        return [*self._waiting, *self._prefilling, *self._running.values()]

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._outstanding():
                        self._lock.wait()
                    if self._stop and not self._outstanding():
                        return
                    self._drop_cancelled()
                    self._admit()
                    prefilling = self._prefilling[0] if self._prefilling else None
                    running = list(self._running.items())
                if prefilling is not None:
                    self._guarded([prefilling], lambda: self._prefill_chunk(prefilling))
                if running:
                    self._guarded([r for _, r in running], lambda: self._decode_step(running))
                with self._lock:
                    self._lock.notify_all()  # shutdown() waits on the lock for the outstanding count to fall
        except BaseException as exc:  # noqa: BLE001 - the scheduler must not die silently: fail every request
            self.failure = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._accepting = False
                for request in self._all_requests():
                    request._finish("error", f"the engine stopped: {self.failure}")
                self._waiting.clear()
                self._prefilling.clear()
                self._running.clear()
                self._lock.notify_all()
            raise

    def _guarded(self, requests: list[Request], step: Callable[[], None]) -> None:
        """Run one prefill chunk or decode step; a failure ends the requests in it (with an "error" event and
        their slots freed), not the engine."""
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - reported to each request's client, the engine keeps serving
            message = exc.message if isinstance(exc, LeptonError) else f"{type(exc).__name__}: {exc}"
            with self._lock:
                for request in requests:
                    if not request.finished:
                        request._finish("error", message)
                    self._release(request)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            request._finish("cancelled")
            self._counters.finished["cancelled"] += 1
        for request in [r for r in (*self._prefilling, *self._running.values()) if r.cancelled]:
            request._finish("cancelled")
            self._release(request)

    def _admit(self) -> None:
        while self._waiting and self._free:
            request = self._waiting.popleft()
            request.slot = self._free.pop(0)
            self._prefilling.append(request)

    def _release(self, request: Request) -> None:
        """Free a finished request's slot (under the lock) and count how it ended."""
        if request.slot is None:
            return
        slot, request.slot = request.slot, None
        self.slots.free(slot)
        self._running.pop(slot, None)
        if request in self._prefilling:
            self._prefilling.remove(request)
        self._free.append(slot)
        self._free.sort()
        self._counters.finished[request.finish_reason or "cancelled"] += 1

    def _prefill_chunk(self, request: Request) -> None:
        start = request.prefilled
        size = self.config.prefill_chunk if self.slots.prefill_in_chunks else len(request.prompt_ids)
        chunk = request.prompt_ids[start:start + size]
        logits = self.slots.prefill(request.slot, chunk)
        request.prefilled += len(chunk)
        with self._lock:
            self._counters.prompt_tokens_total += len(chunk)
        if request.prefilled < len(request.prompt_ids):
            return
        token = request._next_token(int(logits.argmax()), logits)
        ended = request._accept(token, self.eos_ids)
        with self._lock:
            self._counters.generated_tokens_total += 0 if request.finish_reason == "eos" else 1
            if ended or request.cancelled:
                request._finish("cancelled")  # a no-op when it ended on its own
                self._release(request)
            else:
                self._prefilling.remove(request)
                self._running[request.slot] = request

    def _decode_step(self, running: list[tuple[int, Request]]) -> None:
        slots = [slot for slot, _ in running]
        last = np.asarray([r.token_ids[-1] for _, r in running], np.int64)
        want_logits = any(not r.params.greedy for _, r in running)
        tokens, logits = self.slots.decode(slots, last, logits=want_logits)
        generated = 0
        ended = []
        for row, (_, request) in enumerate(running):
            if request.cancelled:
                continue  # _drop_cancelled ends it next turn
            token = request._next_token(int(tokens[row]), logits[row] if logits is not None else None)
            if request._accept(token, self.eos_ids):
                ended.append(request)
            if request.finish_reason != "eos":
                generated += 1
        with self._lock:
            self._counters.generated_tokens_total += generated
            for request in ended:
                self._release(request)


__all__ = ["BatchingEngine", "ENGINE_SERIES", "EngineConfig", "EngineStoppedError", "Event", "FINISHED_SERIES",
           "QueueFullError", "Request", "SamplingParams"]
