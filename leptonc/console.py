"""Where the CLI writes: results on stdout, messages and progress on stderr, JSON for CI.

User text (prompts, generated text, paths, model names) is always printed as text, never read as rich
markup: `text()` escapes it for a markup string, `plain()` prints it with markup off. When a stream is not
a terminal (a CI log, `| cat`) tables are printed at their natural width instead of being cut at 80
columns (the console is wide and does not wrap); rules stay at 80.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.rule import Rule

NARROW = 80  # a non-terminal's width for rules and prose
WIDE = 100_000  # a non-terminal's width for tables: no cell is cut


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if terminal:
        return Console(stderr=stderr, emoji=False)
    return Console(stderr=stderr, emoji=False, width=WIDE, soft_wrap=True)


out = _console(stderr=False)
err = _console(stderr=True)


def text(value: object) -> str:
    """`value` as literal text inside a rich markup string ("x[i]" stays "x[i]", "[/]" cannot close a tag)."""
    return escape(str(value))


def plain(console: Console, value: object, **kw: Any) -> None:
    """Print user text with neither markup nor highlighting."""
    console.print(str(value), markup=False, highlight=False, emoji=False, **kw)


def rule(console: Console, title: str = "") -> None:
    """A horizontal rule: the terminal's width, or 80 columns in a log."""
    console.print(Rule(title), width=None if console.is_terminal else NARROW)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()
