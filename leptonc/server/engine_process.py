"""The batching engine in a process of its own, the HTTP server in this one (`leptonc serve` of a CUDA bundle, or
`--engine-process`).

In one process the HTTP server's event loop, the engine's writer (detokenization, stop strings, events) and the
scheduler share Python's lock, and while a burst of requests arrives the scheduler waits for it between the
device's runs (BENCHMARKS.md, "Serving"). Here the engine's process runs the scheduler and little else: requests
and cancellations come in over a pipe, each step's tokens go out as they are taken. This process keeps the HTTP
server, the tokenizer and the writer (engine_output.EngineWriter), so text, stop strings and events are made here.
`EngineProcess` answers the calls the server makes of a BatchingEngine (submit, metrics, ready, shutdown, ...).

The messages, tuples over one duplex pipe:
- to the engine: ("submit", id, ids, params), ("cancel", id), ("stop", id) (a stop string ended it here),
  ("metrics", n), ("stop_accepting",), ("shutdown", grace_s);
- from the engine: ("ready", info) or ("error", kind, message, hint) once at start, then ("tokens", [(id, token,
  end)]) per step, ("finish", id, reason, error), ("metrics", n, counts), ("failure", text), ("stopped", clean,
  spans).
"""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from leptonc import errors
from leptonc.errors import BundleError, LeptonError
from leptonc.runtime.engine_counters import EngineCounters
from leptonc.runtime.engine_output import EngineWriter
from leptonc.runtime.engine_requests import (EngineConfig, Event, Request, SamplingParams, checked_prompt,
                                             queue_full_error, stopped_error)
from leptonc.runtime.tokenizer import chat_ids, encode, load_tokenizer

log = logging.getLogger("leptonc.serve.engine")
POLL_S = 0.5  # how often the engine's process looks at its scheduler's health while no message comes


class EngineProcess:
    """A BatchingEngine in a child process (module doc), with the calls `leptonc serve` makes of one."""

    def __init__(self, bundle: str | Path | None, config: EngineConfig | None = None, trace_path: Path | None = None,
                 make_engine: Callable | None = None):
        """`make_engine`: instead of loading `bundle`, a function (importable there) that makes the engine in the
        engine's process (bench/serve_http.py's engine over stand-in slots)."""
        self.config = config or EngineConfig()
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of this one's threads
        self._conn, child = context.Pipe(duplex=True)
        args = (str(bundle) if bundle else None, self.config, child, str(trace_path) if trace_path else None, make_engine)
        self._process = context.Process(target=engine_main, args=args, name="leptonc-engine", daemon=True)
        self._process.start()
        child.close()
        self._send_lock, self._lock, self._rpc = threading.Lock(), threading.Lock(), threading.Lock()
        info = self._started()
        self.model_name, self.num_slots, self.max_sequence = info["model_name"], info["num_slots"], info["max_sequence"]
        self.slots = SimpleNamespace(vocab_size=info["vocab_size"], warmed=info["warmed"],
                                     pipelined=info["pipeline_depth"] is not None,
                                     pipeline_depth=info["pipeline_depth"] or 1)
        self.tokenizer = load_tokenizer(Path(info["tokenizer_dir"]))
        self.failure: str | None = None
        self.trace_spans = 0
        self._requests: dict[int, Request] = {}  # submitted, last event not delivered yet
        self._ids = itertools.count(1)
        self._asked = itertools.count(1)  # metrics questions, each answer carries its number
        self._counts = EngineCounters()  # what is counted here: generated tokens, ends by reason, refusals
        self._last = info["metrics"]  # the engine's counts as last read (what metrics() gives once it is gone)
        self._accepting = False
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = EngineWriter(self.tokenizer, self._count_generated, self._finished, lambda: None,
                                    self.config.stream_interval)
        self._reader = threading.Thread(target=self._read, name="leptonc-engine-reader", daemon=True)
        self._reader.start()

    def _started(self) -> dict:
        """The engine's "ready" (its bundle loaded and warmed up), or its loading error raised here."""
        while not self._conn.poll(POLL_S):
            if not self._process.is_alive():
                raise BundleError(f"the engine's process exited while loading the bundle (exit code "
                                  f"{self._process.exitcode})", hint="its error is printed above")
        try:
            message = self._conn.recv()
        except EOFError:
            raise BundleError("the engine's process exited while loading the bundle",
                              hint="its error is printed above") from None
        if message[0] == "error":
            _, kind, text, hint = message
            self._process.join(10)
            cls = getattr(errors, kind, None)
            raise (cls if isinstance(cls, type) and issubclass(cls, LeptonError) else LeptonError)(text, hint)
        return message[1]

    # ---- what the server calls --------------------------------------------------------------------

    def start(self) -> "EngineProcess":
        self._accepting = True
        return self

    @property
    def ready(self) -> bool:
        return self._accepting and self.failure is None and self._process.is_alive()

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return chat_ids(self.tokenizer, messages)

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """As BatchingEngine.submit: the prompt is checked and the queue counted here, then it goes to the engine."""
        params = params or SamplingParams()
        ids = checked_prompt(prompt_ids, params, self.slots.vocab_size, self.max_sequence)
        with self._lock:
            if not self._accepting or self.failure is not None:
                raise stopped_error()
            if len(self._requests) >= self.num_slots + self.config.max_queue:
                self._counts.rejected_queue_full += 1
                raise queue_full_error(self.num_slots, len(self._requests) - self.num_slots, self.config.max_queue)
            ident = next(self._ids)
            request = Request(ident, ids, params, on_event, lambda: self._send(("cancel", ident)))
            self._requests[ident] = request
        self._send(("submit", ident, ids, params))
        return request

    def metrics(self) -> dict:
        """The engine's counts (asked of its process), with what is counted here."""
        if self.failure is None and self._process.is_alive():
            with self._rpc:
                asked = next(self._asked)
                if self._send(("metrics", asked)):
                    try:
                        while (reply := self._replies.get(timeout=5))[0] != asked:
                            pass  # the answer to a question that timed out
                        self._last = reply[1]
                    except queue.Empty:
                        pass
        with self._lock:
            c = self._counts
            # running: as the engine counts it, a request runs until its last event is delivered (here)
            running = max(self._last["running"], len(self._requests) - self._last["queued"])
            return {**self._last, "running": running, "generated_tokens_total": c.generated_tokens_total,
                    "finished_total": dict(c.finished),
                    "rejected_queue_full_total": self._last["rejected_queue_full_total"] + c.rejected_queue_full}

    def stop_accepting(self) -> None:
        self._accepting = False
        self._send(("stop_accepting",))

    def shutdown(self, grace_s: float = 30.0) -> bool:
        """As BatchingEngine.shutdown, then the engine's process exits. True when nothing had to be cancelled."""
        self._accepting = False
        clean = False
        if self._send(("shutdown", grace_s)):
            try:
                clean, self.trace_spans = self._stopped.get(timeout=grace_s + 30)
            except queue.Empty:
                log.error("the engine's process did not stop in time: killed")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._reader.join(5)
        self._writer.close()
        self._conn.close()
        return clean

    def write_trace(self, path: Path) -> int:
        """The engine's process wrote the timeline to `trace_path` at its shutdown; the spans it wrote."""
        if isinstance(self.trace_spans, str):
            raise OSError(self.trace_spans)
        return self.trace_spans

    # ---- the pipe ---------------------------------------------------------------------------------

    def _send(self, message: tuple) -> bool:
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):  # the engine's process is gone (the reader says why)
            return False

    def _read(self) -> None:
        """The engine's messages, in order: each step's tokens and each end to the writer."""
        stopped = False
        try:
            while not stopped:
                message = self._conn.recv()
                kind = message[0]
                if kind == "tokens":
                    step = [(self._requests[i], token, end) for i, token, end in message[1] if i in self._requests]
                    self._writer.tokens(step)
                elif kind == "finish":
                    request = self._requests.get(message[1])
                    if request is not None:
                        self._writer.finish(request, message[2], message[3])
                elif kind == "metrics":
                    self._replies.put(message[1:])
                elif kind == "failure":
                    self.failure = message[1]
                elif kind == "stopped":
                    self._stopped.put(message[1:])
                    stopped = True
        except (EOFError, OSError):
            pass
        if not stopped:  # the process died: what it held ends with the error, and the server reports it
            self.failure = self.failure or f"the engine's process exited (exit code {self._process.exitcode})"
            log.error("%s", self.failure)
            for request in list(self._requests.values()):
                self._writer.finish(request, "error", f"the engine stopped: {self.failure}")

    # ---- the writer's callbacks -------------------------------------------------------------------

    def _count_generated(self, n: int) -> None:
        with self._lock:
            self._counts.generated_tokens_total += n

    def _finished(self, request: Request, reason: str) -> None:
        with self._lock:
            request.finish_reason = reason
            self._counts.finished[reason] += 1
            self._requests.pop(request.id, None)
        if reason == "stop":  # found here: the engine frees the slot
            self._send(("stop", request.id))


class _Forwarder:
    """The engine's writer in its process: each step's tokens and each end go to the server's process at once."""

    def __init__(self, send: Callable[[tuple], None], requests: dict, finished: Callable[[Request, str], None]):
        self._send, self._requests, self._finished = send, requests, finished

    def tokens(self, step: list) -> None:
        if step:
            self._send(("tokens", [(r.tag, token, end) for r, token, end in step]))
            for request, _, end in step:
                if end is not None:
                    self._ended(request, end)

    def finish(self, request: Request, reason: str, error: str | None = None) -> None:
        self._send(("finish", request.tag, reason, error))
        self._ended(request, reason)

    def _ended(self, request: Request, reason: str) -> None:
        self._requests.pop(request.tag, None)
        if not request.finished:
            self._finished(request, reason)

    def close(self, timeout: float = 10.0) -> None:
        pass


def engine_main(bundle: str | None, config: EngineConfig, conn, trace_path: str | None = None,
                make_engine: Callable | None = None) -> None:
    """The engine's process: load and warm up, say ready, then serve the pipe's messages until shutdown."""
    from leptonc.runtime.batching import BatchingEngine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's process decides when this one stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    try:
        engine = make_engine() if make_engine is not None else BatchingEngine.from_bundle(bundle, config)
    except LeptonError as exc:
        send(("error", type(exc).__name__, exc.message, exc.hint))
        return
    except Exception as exc:  # noqa: BLE001 - a bug: its traceback goes to the log, the server exits with it
        log.exception("the engine's process could not load %s", bundle)
        send(("error", "LeptonError", f"{type(exc).__name__}: {exc}", None))
        return
    requests: dict[int, Request] = {}
    gc.collect()  # what loading made lives as long as the process: frozen, full collections do not walk it (as the
    gc.freeze()  # server's own start-up does, app.py)
    engine.start(lambda count, finished, on_stop: _Forwarder(send, requests, finished))
    send(("ready", {"model_name": engine.model_name, "num_slots": engine.num_slots,
                    "max_sequence": engine.max_sequence, "vocab_size": engine.slots.vocab_size,
                    "warmed": getattr(engine.slots, "warmed", None),
                    "pipeline_depth": engine.slots.pipeline_depth if engine.slots.pipelined else None,
                    "tokenizer_dir": str(engine.tokenizer.name_or_path),
                    "metrics": engine.metrics()}))
    done = threading.Event()
    told_failure = False
    while not done.is_set():
        if not conn.poll(POLL_S):
            if engine.failure and not told_failure:
                send(("failure", engine.failure))
                told_failure = True
            continue
        try:
            message = conn.recv()
        except EOFError:  # the server's process is gone
            engine.shutdown(0)
            return
        kind = message[0]
        if kind == "submit":
            _, ident, ids, params = message
            try:
                requests[ident] = engine.submit(ids, params, tag=ident)
            except LeptonError as exc:  # refused here after all (the server counted its queue)
                send(("finish", ident, "error", exc.message))
        elif kind in ("cancel", "stop"):
            request = requests.get(message[1])
            if request is not None:
                request.cancel() if kind == "cancel" else engine.end(request)
        elif kind == "metrics":
            send(("metrics", message[1], engine.metrics()))
        elif kind == "stop_accepting":
            engine.stop_accepting()
        elif kind == "shutdown":
            threading.Thread(target=_shut_down, args=(engine, message[1], send, done, trace_path),
                             daemon=True).start()
    conn.close()


def _shut_down(engine, grace_s: float, send: Callable[[tuple], None], done: threading.Event,
               trace_path: str | None) -> None:
    """Drain within the grace period, write the timeline where one was asked for, say so, and let the process end."""
    try:
        clean = engine.shutdown(grace_s)
        spans = 0
        if trace_path and engine.trace is not None:
            try:
                spans = engine.write_trace(Path(trace_path))
            except OSError as exc:
                spans = f"could not write it: {exc.strerror or exc}"
        send(("stopped", clean, spans))
    finally:
        done.set()
