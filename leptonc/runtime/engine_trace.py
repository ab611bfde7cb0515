"""A timeline of the batching engine's scheduler, in the Trace Event format that Perfetto (ui.perfetto.dev) and
chrome://tracing open: one span per prefill run (on pipelined slots: its launch, and a "prefill_wait" for its first
tokens), decode launch, wait for a step's tokens, synchronous decode step, and stretch with no request to run; and, on a line of their own, Python's garbage collections that stop every
thread (each full one, and any other longer than GC_SPAN_S). `leptonc serve --trace FILE` writes it when the server stops; it shows where
a served token's time goes (the device busy, the host working, or nobody asking).

    trace = SchedulerTrace()
    started = trace.now()
    ...                                   # the work
    trace.span("prefill", started, rows=4, tokens=512)
    trace.write(Path("serve-trace.json"))
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from pathlib import Path

from leptonc.atomic_rename import atomic_write_text

MAX_SPANS = 1_000_000  # about 100 MB of JSON; a longer run keeps its first spans and says it was cut
GC_SPAN_S = 0.002  # young-generation collections shorter than this are left out (there are thousands)
SCHEDULER, GC = 1, 2  # the timeline's two lines (Trace Event "tid")


class SchedulerTrace:
    def __init__(self, max_spans: int = MAX_SPANS):
        self.max_spans = max_spans
        self.spans: list[tuple[str, float, float, dict]] = []  # (name, start, duration, args), seconds
        self.dropped = 0
        self._origin = time.perf_counter()
        self._lock = threading.Lock()
        self._gc_started = 0.0

    def watch_gc(self) -> None:
        """Record Python's collections (process-wide) until unwatch_gc."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif info["generation"] == 2 or time.perf_counter() - self._gc_started >= GC_SPAN_S:
            self.span("gc", self._gc_started, generation=info["generation"], collected=info["collected"])

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def span(self, name: str, started: float, **args) -> None:
        """A span from `started` (a `now()`) to now."""
        ended = time.perf_counter()
        with self._lock:
            if len(self.spans) < self.max_spans:
                self.spans.append((name, started, ended - started, args))
            else:
                self.dropped += 1

    def totals(self) -> dict:
        """Seconds and count per span name."""
        out: dict[str, dict] = {}
        with self._lock:
            for name, _, duration, _ in self.spans:
                entry = out.setdefault(name, {"count": 0, "seconds": 0.0})
                entry["count"] += 1
                entry["seconds"] += duration
        return {name: {"count": e["count"], "seconds": round(e["seconds"], 6)} for name, e in out.items()}

    def to_json(self) -> dict:
        with self._lock:
            spans, dropped = list(self.spans), self.dropped
        pid = os.getpid()
        events = [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}
                  for tid, name in ((SCHEDULER, "leptonc scheduler"), (GC, "Python garbage collection"))]
        for name, start, duration, args in spans:
            events.append({"name": name, "ph": "X", "pid": pid, "tid": GC if name == "gc" else SCHEDULER,
                           "ts": round((start - self._origin) * 1e6, 1), "dur": round(duration * 1e6, 1), "args": args})
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"producer": "leptonc serve --trace", "spans": len(spans), "spans_dropped": dropped,
                              "totals": self.totals()}}

    def write(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_json(), separators=(",", ":")))


__all__ = ["GC_SPAN_S", "MAX_SPANS", "SchedulerTrace"]
