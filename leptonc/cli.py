"""The `leptonc` command: the app, its root options, the command registrations and the entry point.

argv -> frozen config -> library call -> rich output or --json. The commands live beside their helpers
(`cli_compile`: compile; `cli_runtime`: run, bench, eval, inspect, package); output helpers are in
`console`. This module imports neither torch, onnxruntime nor tensorrt at import time: `leptonc --help`
and `leptonc targets` stay fast. Commands import what they need when they run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

import click
import typer
from typer.core import TyperGroup
from rich.table import Table

from leptonc import __version__
from leptonc.cli_compile import compile_cmd
from leptonc.cli_runtime import bench, eval_cmd, inspect, package, run, verify
from leptonc.console import emit_json, err, out, text
from leptonc.errors import EXIT_CODES, LeptonError
from leptonc.server.cli import bench_serve, serve

try:  # typer >= 0.16 vendors click as typer._click: its exceptions are not click's own classes
    from typer import _click as _tclick
except ImportError:  # pragma: no cover - older typer uses click itself
    _tclick = click
_EXIT = tuple({click.exceptions.Exit, typer.Exit})
_CLICK_ERROR = tuple({click.exceptions.ClickException, _tclick.exceptions.ClickException})
_ABORT = tuple({click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort)})

class _Help(TyperGroup):
    """The root group: its commands' help shows a value's kind (INTEGER, TEXT, ...) and no tag on a flag (typer's
    `<bool>`), whichever module registered them."""

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            _tidy_metavars(command, ctx)
        return command

    def format_help(self, ctx, formatter) -> None:
        _tidy_metavars(self, ctx)
        super().format_help(ctx, formatter)


_KINDS = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "path": "PATH", "list[str]": "TEXT", "int range": "INTEGER",
          "float range": "NUMBER"}


def _tidy_metavars(command, ctx) -> None:
    for param in command.get_params(ctx):
        if param.metavar is not None:
            continue
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.param_type_name == "argument":
            param.metavar = param.name.upper()
            param.display_type_rich = lambda ctx: None  # the name says it; typer would add `<str>`
        else:
            display = getattr(param, "display_type", None)  # newer typer; older ones name the type only
            kind = str((display(ctx) if display else getattr(param.type, "name", "")) or "").strip("<>")
            param.metavar = _KINDS.get(kind.lower(), kind.upper() or "VALUE")


app = typer.Typer(
    cls=_Help,
    name="leptonc",
    help="Ahead-of-time compiler for large language models: PyTorch LLM -> optimized engine bundle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def exit_code_summary() -> str:
    """The exit codes as one line for `leptonc --help`, from the code's own table (errors.EXIT_CODES)."""
    return "; ".join(f"{code} {meaning.split(' (')[0].split(':')[0]}" for code, meaning in EXIT_CODES.items())


def _version(value: bool) -> None:
    if value:
        out.print(f"leptonc {__version__}")
        raise typer.Exit()


@app.callback(help=f"Compile, run, benchmark and evaluate LLM bundles.\n\nExit codes: {exit_code_summary()}.")
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


# ---- targets ------------------------------------------------------------------------------------

@app.command()
def targets(as_json: bool = typer.Option(False, "--json", help="Print JSON for CI.")) -> None:
    """List hardware targets: compute capability, native precisions, memory, and the backend a compile uses here."""
    import importlib.util

    from leptonc.targets import TARGETS

    # --backend auto: TensorRT where it is installed (found without importing it), otherwise ONNX Runtime
    tensorrt_here = importlib.util.find_spec("tensorrt") is not None

    def backend_here(t) -> str:
        return t.default_backend if t.default_backend != "tensorrt" or tensorrt_here else "onnxruntime"

    if as_json:
        emit_json({"targets": [{**t.to_dict(), "backend_here": backend_here(t)} for t in TARGETS.values()]})
        return
    table = Table(title="leptonc targets", caption=None if tensorrt_here else
                  "backend here: --backend auto picks ONNX Runtime where TensorRT is not installed")
    for col in ("target", "device", "compute", "native precisions", "simulated", "memory", "backend here"):
        table.add_column(col)
    for t in TARGETS.values():
        table.add_row(t.name, t.description, t.sm, ", ".join(t.native), ", ".join(t.simulated) or "-",
                      f"{t.memory_gb:g} GB" if t.memory_gb else "host", backend_here(t))
    out.print(table)



# ---- the commands (each defined beside its helpers; registered here in the order `--help` lists them) ----

app.command("compile")(compile_cmd)
app.command("run")(run)
app.command("bench")(bench)
app.command("eval")(eval_cmd)
app.command("inspect")(inspect)
app.command("package")(package)
app.command("serve")(serve)
app.command("bench-serve")(bench_serve)
app.command("verify")(verify)

# ---- entry point --------------------------------------------------------------------------------

class _Interrupts:
    """Ctrl-C and SIGTERM unwind the command through KeyboardInterrupt (the compile's cleanup runs, the
    previous bundle stays), but never inside another library's Python that C++ may be calling back
    (a warning raised by torch's C++, a pybind11 callback): a KeyboardInterrupt raised there escapes a
    noexcept C++ frame and the process aborts (SIGABRT, "terminate called after throwing ...
    error_already_set"). So the handler raises only while leptonc's own code runs; elsewhere it asks
    again 50 ms later, and after 10 s of asking it raises wherever the program is."""

    RETRY_S, PATIENCE_S = 0.05, 10.0

    def __init__(self) -> None:
        self.first: float | None = None
        self.timer: threading.Timer | None = None
        self.saved: dict = {}

    def install(self) -> None:
        self.first, self.timer = None, None
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        now = time.monotonic()
        self.first = self.first if self.first is not None else now
        ours = frame is not None and str(frame.f_globals.get("__name__", "")).startswith("leptonc")
        if ours or now - self.first > self.PATIENCE_S:
            self.first = None
            raise KeyboardInterrupt
        self.timer = threading.Timer(self.RETRY_S, os.kill, (os.getpid(), signum))
        self.timer.daemon = True
        self.timer.start()

    def quiet(self) -> None:
        """The interrupt was handled: later signals (or a retry still in flight) must not interrupt the exit."""
        if self.timer is not None:
            self.timer.cancel()
        for sig in self.saved:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for sig, handler in self.saved.items():
            # Once the command is done (its output complete), a late SIGTERM must not raise inside the
            # interpreter's exit handlers (a traceback after success): it just ends the process.
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else handler)


_INTERRUPTS = _Interrupts()


def main(argv: Optional[list[str]] = None) -> None:
    _INTERRUPTS.install()
    code: object = 0
    try:
        _main(argv)
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # a second interrupt that arrived while the first one was being handled
        code = 130
    finally:
        _INTERRUPTS.restore()
    if code == 130 and argv is None:  # the CLI process itself (tests call main(argv) in-process)
        # The interrupt was handled and the cleanup ran. Leave without the interpreter's own exit:
        # if the KeyboardInterrupt first surfaced inside a C extension's embedded eval (PyRun_*),
        # CPython has flagged it as unhandled and would end the process with SIGINT (-2) instead.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)
    sys.exit(code)


def _main(argv: Optional[list[str]]) -> None:
    try:
        # Non-standalone typer returns the exit code of a typer.Exit, and turns Ctrl-C into Exit(130).
        code = app(args=argv, standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and not isinstance(code, bool) and code:
            sys.exit(code)
    except LeptonError as exc:
        err.print(f"[bold red]error:[/] {text(exc.message)}", highlight=False)
        if exc.hint:
            err.print(f"[yellow]next step:[/] {text(exc.hint)}", highlight=False)
        sys.exit(exc.exit_code)
    except _EXIT as exc:
        sys.exit(exc.exit_code)
    except _CLICK_ERROR as exc:  # usage errors (unknown option, missing argument): exit 2, no traceback
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, *_ABORT):
        _INTERRUPTS.quiet()  # the cleanup already ran: don't interrupt the exit
        err.print("[bold red]interrupted[/]; nothing was left half-written")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(0)


__all__ = ["app", "main", "EXIT_CODES"]
