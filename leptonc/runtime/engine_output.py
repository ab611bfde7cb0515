"""The batching engine's writer thread: tokens become text and events here, not on the scheduler's thread.

The scheduler (batching.py) hands over each step's tokens in one item and goes on to the next step; while the
GPU runs it (ONNX Runtime lets go of Python's lock during a run), this thread detokenizes the step's sequences in
one call of the tokenizer, looks for stop strings and delivers the events, in order, to each request. Every event
of every request passes through here, so a request's last event always comes after its tokens.

A stop string is found here, after the scheduler may already have run a step or two more for that sequence: those
tokens are dropped (the output ends at the stop), `finish_reason` is set, and the scheduler frees the slot on its
next turn (`Request.finished`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from leptonc.runtime.engine_requests import Event, Request

log = logging.getLogger("leptonc.engine")
_STOP = object()
AUTO_EVENTS_PER_STEP = 16  # stream_interval "auto": about this many events a step, however many sequences run


def auto_interval(sequences: int) -> int:
    """Tokens each of `sequences` streams gathers per event so that a step makes about AUTO_EVENTS_PER_STEP events."""
    return max(1, -(-sequences // AUTO_EVENTS_PER_STEP))


def batch_decoder(tokenizer) -> Callable[[list[list[int]]], list[str]]:
    """Decode many id lists in one call: the Rust tokenizer's decode_batch where it gives what `tokenizer.decode`
    gives (no clean-up of tokenization spaces), else one decode per list."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda seqs: backend.decode_batch(seqs, skip_special_tokens=True) if seqs else []
    return lambda seqs: [tokenizer.decode(s, skip_special_tokens=True) for s in seqs]


class EngineWriter:
    """The writer thread (module doc). The engine's callbacks, each called before the event it belongs to is
    delivered: `count(n)` adds generated tokens, `finished(request, reason)` sets a request's finish_reason and
    counts it (under the engine's lock, so the engine's gauges and counters agree)."""

    def __init__(self, tokenizer, count: Callable[[int], None], finished: Callable[[Request, str], None],
                 on_stop: Callable[[], None], stream_interval: int | str = 1):
        self._decode = batch_decoder(tokenizer)
        self._interval = stream_interval  # tokens a sequence gathers between events (its first and last go at once), or "auto"
        self._count = count
        self._finished = finished
        self._on_stop = on_stop  # wakes the scheduler to free a slot whose sequence hit a stop string
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="leptonc-engine-writer", daemon=True)
        self._thread.start()

    # ---- the scheduler's side ---------------------------------------------------------------------

    def tokens(self, step: list[tuple[Request, int, str | None]]) -> None:
        """One step's new tokens: (request, token, how it ends or None), in any order of requests."""
        if step:
            self._queue.put(step)

    def finish(self, request: Request, reason: str, error: str | None = None) -> None:
        self._queue.put((request, reason, error))

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued, then stop."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # ---- the thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if isinstance(item, list):
                    self._step(item)
                else:
                    self._finish(*item)
            except Exception:  # noqa: BLE001 - one bad callback must not silence every other request
                log.exception("delivering engine events failed")

    def _step(self, step: list[tuple[Request, int, str | None]]) -> None:
        now = time.perf_counter()
        live = []
        generated = 0
        interval = auto_interval(len(step)) if self._interval == "auto" else self._interval
        for request, token, end in step:
            if request.finished:
                continue  # a stop string ended it; the scheduler ran on
            first = request.first_token_at is None
            if first:
                request.first_token_at = now
            if end != "eos":
                request.token_ids.append(token)
                request._pending_ids.append(token)
                generated += 1
            # Due for an event: every token at interval 1; else its first, its last, every one of a request with stop
            # strings (so it stops where a one-token interval would), and every interval-th, on a phase of its own
            # (its id), so that sequences which started together do not all send on the same step.
            if interval == 1 or end is not None or first or request.params.stop or \
                    len(request._pending_ids) >= interval or (len(request.token_ids) + request.id) % interval == 0:
                live.append((request, end))
        if generated:
            self._count(generated)
        texted = [r for r, end in live if end != "eos"]  # an end-of-sequence token adds no text
        for request, delta in zip(texted, self._detokenize(texted, final=False)):
            request.text += delta
        done = [r for r, end in live if end is not None]
        for request, delta in zip(done, self._detokenize(done, final=True)):
            request.text += delta
        for request, end in live:
            self._deliver(request, end)

    def _detokenize(self, requests: list[Request], final: bool) -> list[str]:
        """The text each request's newest tokens add: its last few tokens decoded with the ones before them, so a
        word's leading space and multi-byte characters come out right (held back while they end incomplete, unless
        `final`: the sequence has ended, and its text is what the whole decode gives). One tokenizer call."""
        if not requests:
            return []
        seqs = []
        for r in requests:
            seqs.append(r.token_ids[r._prefix_offset:r._read_offset])
            seqs.append(r.token_ids[r._prefix_offset:])
        decoded = self._decode(seqs)
        out = []
        for i, r in enumerate(requests):
            before, after = decoded[2 * i], decoded[2 * i + 1]
            if len(after) > len(before) and (final or not after.endswith("\ufffd")):
                r._prefix_offset, r._read_offset = r._read_offset, len(r.token_ids)
                out.append(after[len(before):])
            else:
                out.append("")
        return out

    def _deliver(self, request: Request, end: str | None) -> None:
        """Stop strings, then the event: the request's new text, or its last event when it ended."""
        stop = request.params.stop
        hold = 0
        if stop and end != "eos":
            hits = [request.text.find(s, max(0, request._emitted - len(s))) for s in stop if s]
            hits = [h for h in hits if h >= 0]
            if hits:
                request.text = request.text[:min(hits)]
                self._finish(request, "stop")
                self._on_stop()
                return
            hold = max((k for s in stop for k in range(1, len(s)) if request.text.endswith(s[:k])), default=0)
        if end is not None:
            self._finish(request, end)
            return
        upto = len(request.text) - hold
        if upto > request._emitted or request._pending_ids:
            delta = request.text[request._emitted:upto]
            request._emitted = max(request._emitted, upto)
            self._emit(request, Event(tuple(request._pending_ids), delta))
            request._pending_ids = []

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.finish_reason is not None:
            return
        request.finished_at = time.perf_counter()
        self._finished(request, reason)
        delta = request.text[request._emitted:] if reason != "cancelled" else ""
        request._emitted = len(request.text)
        self._emit(request, Event(tuple(request._pending_ids), delta, reason, error))
        request._pending_ids = []

    @staticmethod
    def _emit(request: Request, event: Event) -> None:
        if request._on_event is not None:
            request._on_event(event)
        else:
            request._events.put(event)
