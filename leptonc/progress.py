"""Progress for long steps: a rich spinner/bar on a terminal, nothing in --json mode or in tests."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class Steps:
    """Named steps with timings. `with steps.step("export"): ...`; `steps.update(text)` inside."""

    def __init__(self, console=None, enabled: bool = True):
        self.console = console
        self.enabled = enabled and console is not None
        self.timings: dict[str, float] = {}
        self._status = None
        self._current = ""

    @contextmanager
    def step(self, name: str, label: str | None = None) -> Iterator["Steps"]:
        label = label or name
        self._current = label
        start = time.perf_counter()
        if self.enabled:
            with self.console.status(f"[bold]{label}[/]…") as status:
                self._status = status
                yield self
            self._status = None
        else:
            yield self
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 3)
        if self.enabled:
            self.console.print(f"[green]✓[/] {label} [dim]({elapsed:.1f}s)[/]")

    def update(self, detail: str) -> None:
        if self._status is not None:
            self._status.update(f"[bold]{self._current}[/]: {detail}")
