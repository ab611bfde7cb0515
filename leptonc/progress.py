"""Progress for long steps: a rich spinner on a terminal; plain lines in a log; nothing in --json mode.

In a log (stderr is not a terminal: CI, `2> file`) each step prints "[  12.3s] step: detail" lines: one
when it starts, its updates at most one every `LogLines.EVERY_S` seconds, and one when it ends, so a
silent 270-second calibration shows it is alive. Times are seconds since the command started.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from leptonc.console import text


class LogLines:
    """Plain, throttled progress lines for a console that is not a terminal."""

    EVERY_S = 5.0

    def __init__(self, console, start: float | None = None):
        self.console = console
        self.start = time.monotonic() if start is None else start
        self._last: dict[str, float] = {}

    def line(self, step: str, detail: str = "", *, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last.get(step, float("-inf")) < self.EVERY_S:
            return
        self._last[step] = now
        message = f"[{now - self.start:6.1f}s] {step}" + (f": {detail}" if detail else "")
        self.console.print(message, markup=False, highlight=False, emoji=False, soft_wrap=True)


class Steps:
    """Named steps with timings. `with steps.step("export"): ...`; `steps.update(text)` inside."""

    def __init__(self, console=None, enabled: bool = True):
        self.console = console
        self.enabled = enabled and console is not None
        self.timings: dict[str, float] = {}
        self._status = None
        self._current = ""
        self._log = LogLines(console) if self.enabled and not console.is_terminal else None

    @contextmanager
    def step(self, name: str, label: str | None = None) -> Iterator["Steps"]:
        label = label or name
        self._current = label
        start = time.perf_counter()
        if self._log is not None:
            self._log.line(label, "started")
            yield self
        elif self.enabled:
            with self.console.status(f"[bold]{text(label)}[/]…") as status:
                self._status = status
                yield self
            self._status = None
        else:
            yield self
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 3)
        if self._log is not None:
            self._log.line(label, f"done in {elapsed:.1f}s")
        elif self.enabled:
            self.console.print(f"[green]✓[/] {text(label)} [dim]({elapsed:.1f}s)[/]")

    def update(self, detail: str) -> None:
        if self._log is not None:
            self._log.line(self._current, detail, force=False)
        elif self._status is not None:
            self._status.update(f"[bold]{text(self._current)}[/]: {text(detail)}")


@contextmanager
def status(console, label: str, enabled: bool = True) -> Iterator[Callable[[str], None] | None]:
    """One long step without a result line: yields `update(detail)` (None when disabled)."""
    if not enabled:
        yield None
    elif console.is_terminal:
        with console.status(f"{text(label)}…") as spinner:
            yield lambda detail: spinner.update(f"{text(label)}: {text(detail)}")
    else:
        log = LogLines(console)
        log.line(label, "started")
        yield lambda detail: log.line(label, detail, force=False)
        log.line(label, "done")
