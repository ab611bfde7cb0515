"""The in-flight batching engine: many requests share one bundle's KV cache, a slot each.

A scheduler thread loops over three things, in this order, one of each per turn:

1. admit: requests waiting in the bounded queue take free slots (first come, first served, lowest slot first);
2. prefill: admitted prompts run into their slots. Slots that prefill in chunks (host K/V, the CPU) run the oldest
   prompt's next chunk (`EngineConfig.prefill_chunk` tokens); slots that prefill whole prompts (the GPU's K/V
   block) run as many waiting prompts as fit their budget of padded tokens, neighbours batched in one run. A
   prompt whose last chunk ran samples its first token and joins the decode batch. On the GPU's pipelined slots
   greedy prompts do not wait for their run: it is queued behind the steps in flight, they join the decode batch
   at once (the next step takes their first tokens on the device), and their first tokens are read when it is
   collected, in launch order with the steps;
3. decode: every running sequence gets one more token in one batched step.

So a long prompt costs the running streams one chunk's time per step, not the whole prompt. A sequence
that ends (end-of-sequence, `max_tokens`) or is cancelled frees its slot in the same turn; one that hits a
stop string, on the next. Beyond the slots, requests wait in a queue of `max_queue`; beyond that `submit`
raises `QueueFullError` (HTTP's 429). Each request carries its own sampling parameters and random generator.

The scheduler only steps the model and decides who runs: text, stop strings and events are made by the
engine's writer thread (engine_output.py) while the next step runs on the device.

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
import logging
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import numpy as np

from leptonc.errors import LeptonError
from leptonc.runtime.device_thread import DeviceThread
from leptonc.runtime.engine_counters import ENGINE_SERIES, FINISHED_SERIES, EngineCounters
from leptonc.runtime.engine_output import EngineWriter
from leptonc.runtime.engine_requests import (EngineConfig, EngineStoppedError, Event, QueueFullError, Request,
                                             SamplingParams, checked_prompt, queue_full_error, stopped_error)
from leptonc.runtime.engine_trace import SchedulerTrace
from leptonc.runtime.slots import KvSlots, open_kv_slots
from leptonc.runtime.tokenizer import chat_ids, encode, eos_ids, load_tokenizer

log = logging.getLogger("leptonc.serve.engine")


class BatchingEngine:
    """In-flight batching over a `KvSlots` (module doc)."""

    def __init__(self, slots: KvSlots, tokenizer, eos_ids: tuple[int, ...], config: EngineConfig | None = None,
                 *, model_name: str = "model", device: DeviceThread | None = None):
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
        self._closing: set[Request] = set()  # slot freed, last event not yet delivered by the writer
        self._free = list(range(self.num_slots))
        self._ids = itertools.count(1)
        self._counters = EngineCounters()
        self._accepting = False
        self._stop = False
        self._device = device  # the thread the model runs on (device_thread.py): the warm-up's, then the scheduler's
        self._scheduler: Future | None = None  # the scheduler loop, running on the device thread
        self._writer: EngineWriter | None = None
        # runs queued on the device, not yet collected, oldest first: ("step" or "prefill", handle, [(slot, request)])
        self._in_flight: deque = deque()
        self._joined = True  # a sequence joined the decode batch since the last step was launched (its id is on the host)
        self._sampled = 0  # running sequences that sample (their steps are not pipelined)
        self._ended_elsewhere = False  # a request was cancelled, or the writer ended one at a stop string
        self._switch_interval: float | None = None  # Python's own, while the engine has set its own
        self.failure: str | None = None  # the scheduler's fatal error, if it died
        self.trace = SchedulerTrace() if self.config.trace else None

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def from_bundle(cls, path: str | Path, config: EngineConfig | None = None) -> "BatchingEngine":
        """Load a bundle (checking it unless config.verify is False), its tokenizer and its slots."""
        from leptonc.bundle import engine_load_errors, load_bundle

        config = config or EngineConfig()
        bundle = load_bundle(Path(path), verify=config.verify)
        tokenizer = load_tokenizer(Path(config.tokenizer_dir) if config.tokenizer_dir else bundle.tokenizer_dir)
        eos = eos_ids(tokenizer, bundle.manifest)
        device = DeviceThread("leptonc-batching")  # the warm-up's thread is the one that serves (device_thread.py)
        try:
            with engine_load_errors(bundle.model_path):  # a corrupt engine is a bad bundle (exit 7), not a crash
                slots = open_kv_slots(bundle, config.device, config.num_slots)
                device.call(cls._ready_slots, slots, int(eos[0]) if eos else 0, config)
        except BaseException:
            device.stop()
            raise
        name = Path(path).name.removesuffix(".lepton") or "model"
        return cls(slots, tokenizer, eos, config, model_name=name, device=device)

    @staticmethod
    def _ready_slots(slots: KvSlots, token: int, config: EngineConfig) -> None:
        """The warm-up, or (without one) one prompt token and one step before anyone is told "ready"."""
        warmed = config.warmup and slots.warm_up(token)
        if config.verify and not warmed:
            slots.prefill(0, [token])
            slots.decode([0], np.zeros(1, np.int64))
            slots.free(0)

    # ---- the tokenizer ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return chat_ids(self.tokenizer, messages)

    # ---- life cycle -------------------------------------------------------------------------------

    def start(self, writer_factory: Callable | None = None) -> "BatchingEngine":
        """Start the scheduler. `writer_factory(count, finished, on_stop)`: where tokens and ends go instead of an
        EngineWriter (engine_output.py) given those callbacks: its tokens(step), finish(request, reason, error) and
        close() (server/engine_process.py forwards them to another process)."""
        with self._lock:
            if self._scheduler is not None:
                return self
            self._accepting, self._stop = True, False
            if self.config.switch_interval_s is not None:
                self._switch_interval = sys.getswitchinterval()
                sys.setswitchinterval(self.config.switch_interval_s)
            make = writer_factory or (lambda count, finished, on_stop: EngineWriter(
                self.tokenizer, count, finished, on_stop, self.config.stream_interval))
            self._writer = make(self._count_generated, self._finished, self._end_noted)
            if self.trace is not None:
                self.trace.watch_gc()
            if self._device is None or not self._device.alive:
                self._device = DeviceThread("leptonc-batching")
            self._scheduler = self._device.submit(self._loop)
        return self

    @property
    def ready(self) -> bool:
        return self._accepting and self._scheduling()

    def _scheduling(self) -> bool:
        return self._scheduler is not None and not self._scheduler.done()

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def shutdown(self, grace_s: float = 30.0) -> bool:
        """Stop taking requests, let those in flight (and queued) finish within `grace_s`, cancel the rest,
        stop the scheduler and free the cache. True when nothing had to be cancelled."""
        deadline = time.monotonic() + max(0.0, grace_s)
        with self._lock:
            self._accepting = False
            while self._outstanding() and self._scheduling():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.1))
            clean = not self._outstanding()
            for request in self._all_requests():
                request.cancelled = True
            self._ended_elsewhere = True
            self._stop = True
            self._lock.notify_all()
        if self._scheduler is not None:
            try:
                self._scheduler.exception(timeout=10)  # the loop's end (its failure is self.failure)
            except TimeoutError:
                pass
        self._scheduler = None
        if self._device is not None:
            self._device.stop()
            self._device = None
        if self._writer is not None:  # the last events (the cancellations) reach their clients
            self._writer.close()
            self._writer = None
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        if self.trace is not None:
            self.trace.unwatch_gc()
        self.slots.release()
        return clean

    # ---- requests ---------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
               on_event: Callable[[Event], None] | None = None, tag=None) -> Request:
        """Queue a prompt. Its events go to `request.events()`, or to `on_event` (called on the engine's writer
        thread: it must not block). `tag`: the caller's own name for it (request.tag). Raises InputError for a bad
        prompt, QueueFullError when full."""
        params = params or SamplingParams()
        ids = checked_prompt(prompt_ids, params, self.slots.vocab_size, self.max_sequence)
        with self._lock:
            if not self._accepting:
                raise stopped_error()
            if self._outstanding() >= self.num_slots + self.config.max_queue:
                self._counters.rejected_queue_full += 1
                raise queue_full_error(self.num_slots, len(self._waiting), self.config.max_queue)
            request = Request(next(self._ids), ids, params, on_event, self._end_noted)
            request.tag = tag
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def metrics(self) -> dict:
        with self._lock:
            c = self._counters
            running = len(self._running) + len(self._prefilling) + len(self._closing)
            return {"running": running, "queued": len(self._waiting),
                    "slots_total": self.num_slots, "slots_used": self.num_slots - len(self._free),
                    "prompt_tokens_total": c.prompt_tokens_total, "generated_tokens_total": c.generated_tokens_total,
                    "prefill_runs_total": c.prefill_runs_total, "decode_steps_total": c.decode_steps_total,
                    "finished_total": dict(c.finished), "rejected_queue_full_total": c.rejected_queue_full,
                    "prefill_seconds_total": round(c.prefill_seconds_total, 6),
                    "decode_wait_seconds_total": round(c.decode_wait_seconds_total, 6),
                    "idle_seconds_total": round(c.idle_seconds_total, 6)}

    def end(self, request: Request, reason: str = "stop") -> None:
        """End a request from outside the engine (a stop string that a writer in another process found:
        server/engine_process.py); its slot is freed on the scheduler's next turn."""
        with self._lock:
            if not request.finished:
                request.finish_reason = reason
            self._ended_elsewhere = True
            self._lock.notify_all()

    def write_trace(self, path: Path) -> int:
        """Write the scheduler's timeline (EngineConfig.trace); the spans written."""
        self.trace.write(path)
        return len(self.trace.spans)

    def _count_generated(self, n: int) -> None:
        with self._lock:
            self._counters.generated_tokens_total += n

    def _finished(self, request: Request, reason: str) -> None:
        """The writer ends a request (just before its last event): its reason, counted; it no longer counts as
        running (see _release)."""
        with self._lock:
            request.finish_reason = reason
            self._counters.finished[reason] += 1
            self._closing.discard(request)

    # ---- the scheduler ----------------------------------------------------------------------------

    def _end_noted(self) -> None:
        """A request was cancelled, or the writer ended one: the scheduler looks for who left on its next turn."""
        with self._lock:
            self._ended_elsewhere = True
            self._lock.notify_all()

    def _outstanding(self) -> int:
        return len(self._waiting) + len(self._prefilling) + len(self._running)

    def _all_requests(self) -> list[Request]:
        return [*self._waiting, *self._prefilling, *self._running.values()]

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._stop and not self._outstanding():
                        idle_from = time.perf_counter()
                        while not self._stop and not self._outstanding():
                            self._lock.wait()
                        self._spent("idle", idle_from, "idle_seconds_total")
                    if self._stop and not self._outstanding():
                        return
                    self._drop_ended()
                    self._admit()
                    prefill = self._next_prefill()
                    running = list(self._running.items())
                if prefill:
                    # Pipelined slots run every model run on one device stream, so the prefill is queued behind the
                    # steps in flight (its rows are free: no step in flight reads what it writes) and its launch
                    # overlaps their work; its run returns once they and it are done. The steps are collected next.
                    if not self.slots.pipelined:
                        self._collect_all()
                    # A queued prefill's launch takes the host longer than a step (2.6-5 ms against 1.6 at 64 rows
                    # on the H100), so one more step is queued first: pipeline_depth steps in flight, not one fewer,
                    # keep the device busy meanwhile, and the prompts join the step after (a sampled sequence runs
                    # its steps at once: nothing is queued)
                    ahead = bool(running) and not self._sampled and self._queues_prefill(prefill)
                    if ahead:
                        self._decode(running, keep=self.slots.pipeline_depth)
                    started = time.perf_counter()
                    self._guarded(prefill, lambda: self._prefill(prefill))
                    self._spent("prefill", started, "prefill_seconds_total", rows=len(prefill),
                                tokens=sum(len(r.prompt_ids) for r in prefill),
                                runs=getattr(self.slots, "last_prefill_runs", 1))
                    if ahead:  # the prompts join the next turn's step
                        running = []
                        self._collect_steps_above(self.slots.pipeline_depth - 1)
                    else:
                        running = self._still_running()
                if running:
                    self._decode(running)
                if self._in_flight and not self._running:  # the last sequences ended: nothing waits on the device
                    self._collect_all()
                with self._lock:
                    self._lock.notify_all()  # shutdown() waits on the lock for the outstanding count to fall
        except BaseException as exc:  # noqa: BLE001 - the scheduler must not die silently: fail every request
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("the batching engine's scheduler stopped")  # its traceback, for the server's log
            with self._lock:
                self._accepting = False
                for request in self._all_requests():
                    self._writer.finish(request, "error", f"the engine stopped: {self.failure}")
                self._waiting.clear()
                self._prefilling.clear()
                self._running.clear()
                self._lock.notify_all()
            raise

    def _spent(self, name: str, started: float, counter: str | None, **args) -> None:
        """The scheduler's time since `started` (a perf_counter) on its seconds counter, and as a span of the trace."""
        if counter is not None:
            setattr(self._counters, counter, getattr(self._counters, counter) + time.perf_counter() - started)
        if self.trace is not None:
            self.trace.span(name, started, **args)

    def _guarded(self, requests: list[Request], step: Callable[[], None]) -> None:
        """Run one prefill or decode step; a failure ends the requests in it (with an "error" event and their
        slots freed), not the engine."""
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - reported to each request's client, the engine keeps serving
            message = exc.message if isinstance(exc, LeptonError) else f"{type(exc).__name__}: {exc}"
            self._joined = True  # the next step's ids come from the host
            # steps still in flight are dropped, so their sequences (whose caches ran ahead) end too
            requests = requests + [r for _, _, queued in self._in_flight for _, r in queued]
            self._in_flight.clear()
            try:
                self.slots.drain()
            except Exception:  # noqa: BLE001 - the device is already failing; the requests get the first error
                pass
            with self._lock:
                for request in requests:
                    self._writer.finish(request, "error", message)  # a no-op for one that had ended already
                    self._release(request)

    def _drop_ended(self) -> None:
        """Requests cancelled by their caller, and sequences the writer ended at a stop string, leave."""
        if not self._ended_elsewhere:
            return
        self._ended_elsewhere = False
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._closing.add(request)
            self._writer.finish(request, "cancelled")
        for request in [r for r in (*self._prefilling, *self._running.values()) if r.cancelled or r.finished]:
            if not request.finished:
                self._writer.finish(request, "cancelled")
            self._release(request)

    def _admit(self) -> None:
        while self._waiting and self._free:
            request = self._waiting.popleft()
            request.slot = self._free.pop(0)
            self._prefilling.append(request)

    def _next_prefill(self) -> list[Request]:
        """The prompts this turn prefills: the oldest one's next chunk, or (slots that take whole prompts) the
        oldest ones while their tokens fit the slots' budget per run."""
        if not self._prefilling:
            return []
        if self._running and any(kind == "prefill" for kind, _, _ in self._in_flight):
            # a queued prefill is in flight: the next one waits for it to be collected (its stage is reused), which
            # takes a few steps; launching it now would wait on the device for the steps ahead (the pipeline runs
            # dry), while the prompts arriving meanwhile join it, so there are fewer, larger prefill runs
            return []
        if self.slots.prefill_in_chunks:
            return self._prefilling[:1]
        chosen, tokens = [], 0
        for request in self._prefilling:
            tokens += len(request.prompt_ids)
            if chosen and tokens > self.slots.prefill_budget:
                break
            chosen.append(request)
        return chosen

    def _release(self, request: Request) -> None:
        """Free a request's slot (under the lock). Until the writer delivers its last event, it still counts as
        running, so a client that sees its stream end finds it counted as finished and no longer running."""
        if request in self._prefilling:
            self._prefilling.remove(request)
        if request.slot is None:
            return
        if not request.finished:
            self._closing.add(request)
        slot, request.slot = request.slot, None
        self.slots.free(slot)
        if self._running.pop(slot, None) is not None and not request.params.greedy:
            self._sampled -= 1
        self._free.append(slot)
        self._free.sort()

    def _queues_prefill(self, requests: list[Request]) -> bool:
        """Whether these prompts' prefill is queued on the device behind the steps in flight (_launch_prefill)."""
        return self.slots.async_prefill and all(r.params.greedy for r in requests)

    def _prefill(self, requests: list[Request]) -> None:
        if self._queues_prefill(requests):
            self._launch_prefill(requests)
            return
        if self.slots.prefill_in_chunks:
            request = requests[0]
            chunk = request.prompt_ids[request.prefilled:request.prefilled + self.config.prefill_chunk]
            logits = [self.slots.prefill(request.slot, chunk)]
            chunks, firsts = [chunk], [None]
        else:
            chunks = [r.prompt_ids for r in requests]
            if all(r.params.greedy for r in requests):  # first tokens only: no logits to the host
                firsts = self.slots.prefill_tokens([r.slot for r in requests], chunks)
                logits = [None] * len(requests)
            else:
                logits = self.slots.prefill_many([r.slot for r in requests], chunks)
                firsts = [None] * len(requests)
        step, cancelled = [], []
        with self._lock:
            self._counters.prompt_tokens_total += sum(len(c) for c in chunks)
            self._counters.prefill_runs_total += 1
            for request, chunk, row, first in zip(requests, chunks, logits, firsts):
                request.prefilled += len(chunk)
                if request.prefilled < len(request.prompt_ids):
                    continue
                token = request.next_token(first if row is None else int(row.argmax()), row)
                end = request.take(token, self.eos_ids)
                step.append((request, token, end))
                if end is not None or request.cancelled:
                    self._release(request)
                    if end is None:
                        cancelled.append(request)
                else:
                    self._prefilling.remove(request)
                    self._running[request.slot] = request
                    self._joined = True
                    self._sampled += not request.params.greedy
            self._writer.tokens(step)
            for request in cancelled:  # after its first token, as a cancellation mid-stream would be
                self._writer.finish(request, "cancelled")

    def _launch_prefill(self, requests: list[Request]) -> None:
        """Greedy prompts on pipelined slots: their prefill is queued behind the steps in flight and they join the
        decode batch at once (the next step takes their first tokens on the device); the first tokens reach them
        when the prefill is collected, in launch order like a step's. One prefill is in flight at a time."""
        while any(kind == "prefill" for kind, _, _ in self._in_flight):
            self._collect_oldest()
        handle = self.slots.prefill_launch([r.slot for r in requests], [r.prompt_ids for r in requests])
        with self._lock:
            self._counters.prompt_tokens_total += sum(len(r.prompt_ids) for r in requests)
            self._counters.prefill_runs_total += 1
            for request in requests:
                request.prefilled = len(request.prompt_ids)
                request.in_flight += 1
                self._prefilling.remove(request)
                self._running[request.slot] = request
        self._in_flight.append(("prefill", handle, [(r.slot, r) for r in requests]))

    def _still_running(self) -> list[tuple[int, Request]]:
        """The decode batch now: after steps were collected (some ended) or prompts prefilled (some joined)."""
        with self._lock:
            return list(self._running.items())

    def _decode(self, running: list[tuple[int, Request]], keep: int | None = None) -> None:
        """One decode step for the running sequences: queued ahead of its tokens where the slots allow it and every
        sequence is greedy, else run and taken at once. Queued, it leaves at most `keep` steps in flight (default
        PIPELINE_DEPTH - 1: the next turn's step makes PIPELINE_DEPTH)."""
        if not self.slots.pipelined or self._sampled:
            self._collect_all()
            running = self._still_running()
            if running:
                self._guarded([r for _, r in running], lambda: self._decode_step(running))
            return
        fresh = self._joined
        if fresh and self._in_flight:  # a sequence joined: its id is on the host, so every id comes from there
            self._collect_all()
            running = self._still_running()
            if not running:
                return
        # where the runs in flight already make each running sequence's last token (max_tokens), another step would
        # be thrown away
        if self._in_flight and all(r.made + r.in_flight >= r.params.max_tokens for _, r in running):
            self._collect_oldest()
            return
        slots = [slot for slot, _ in running]
        ids = np.asarray([r.last_token for _, r in running], np.int64) if fresh else None

        def launch() -> None:
            started = time.perf_counter()
            self._in_flight.append(("step", self.slots.decode_launch(slots, ids), running))
            for _, request in running:
                request.in_flight += 1
            self._spent("launch", started, None, rows=len(slots), fresh=fresh)
            self._joined = False
            with self._lock:
                self._counters.decode_steps_total += 1

        self._guarded([r for _, r in running], launch)
        self._collect_steps_above(self.slots.pipeline_depth - 1 if keep is None else keep)

    def _collect_steps_above(self, keep: int) -> None:
        """Collect the oldest runs until at most `keep` steps are in flight."""
        while sum(kind == "step" for kind, _, _ in self._in_flight) > keep:
            self._collect_oldest()

    def _collect_oldest(self) -> None:
        kind, handle, running = self._in_flight.popleft()
        for _, request in running:
            request.in_flight -= 1

        def collect() -> None:
            started = time.perf_counter()
            if kind == "prefill":  # the prompts' first tokens, as a step's tokens
                tokens = np.asarray(self.slots.prefill_collect(handle), np.int64)
                self._spent("prefill_wait", started, "prefill_seconds_total", rows=len(running))
            else:
                tokens = self.slots.decode_collect(handle)
                self._spent("wait", started, "decode_wait_seconds_total", rows=len(running))
            started = time.perf_counter()
            self._take_step(running, tokens, None)
            self._spent("take", started, None, rows=len(running))

        self._guarded([r for _, r in running], collect)

    def _collect_all(self) -> None:
        while self._in_flight:
            self._collect_oldest()

    def _decode_step(self, running: list[tuple[int, Request]]) -> None:
        slots = [slot for slot, _ in running]
        last = np.asarray([r.last_token for _, r in running], np.int64)
        want_logits = any(not r.params.greedy for _, r in running)
        started = time.perf_counter()
        tokens, logits = self.slots.decode(slots, last, logits=want_logits)
        self._spent("decode", started, "decode_wait_seconds_total", rows=len(slots), logits=want_logits)
        self._joined = True  # the step ran at once: the next one's ids come from the host too
        with self._lock:
            self._counters.decode_steps_total += 1
        self._take_step(running, tokens, logits)

    def _take_step(self, running: list[tuple[int, Request]], tokens: np.ndarray, logits: np.ndarray | None) -> None:
        """A step's tokens to their sequences (those still in their slot), ended ones freed, the rest to the writer."""
        step, ended = [], []
        for row, (slot, request) in enumerate(running):
            if request.cancelled or request.finished or request.slot != slot:
                continue  # ended since the step was launched, or cancelled (_drop_ended takes it out next turn)
            token = request.next_token(int(tokens[row]), logits[row] if logits is not None else None)
            end = request.take(token, self.eos_ids)
            step.append((request, token, end))
            if end is not None:
                ended.append(request)
        with self._lock:
            for request in ended:
                self._release(request)
            self._writer.tokens(step)


__all__ = ["BatchingEngine", "ENGINE_SERIES", "EngineConfig", "EngineStoppedError", "Event", "FINISHED_SERIES",
           "QueueFullError", "Request", "SamplingParams"]
