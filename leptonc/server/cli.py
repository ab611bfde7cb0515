"""The `serve` and `bench-serve` commands (registered in leptonc/cli.py). Imports of the server's
libraries (uvicorn, FastAPI, prometheus_client, the engine) happen when a command runs."""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from pathlib import Path
from typing import Optional

import typer

from leptonc.console import emit_json, err, out, plain
from leptonc.errors import InputError, UnsupportedRequestError


class _JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _log_config(json_logs: bool) -> dict:
    formatter = ({"()": _JsonLogFormatter} if json_logs else
                 {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"})
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"default": formatter},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}},
            "loggers": {name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
                        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "leptonc.serve")}}


def _read_key(key: str | None, key_file: Path | None) -> str | None:
    """The API key from --api-key or --api-key-file (one of them), its surrounding whitespace stripped."""
    if key_file is None:
        return key
    if key:
        raise UnsupportedRequestError("give --api-key or --api-key-file, not both")
    try:
        text = key_file.read_text().strip()
    except OSError as exc:
        raise UnsupportedRequestError(f"--api-key-file {key_file}: {exc.strerror or exc}",
                                      hint="name a readable file that holds the key") from None
    if not text:
        raise UnsupportedRequestError(f"--api-key-file {key_file} is empty", hint="write the key into it")
    return text


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                         hint="choose another --port (0 picks a free one), or stop what holds this one") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _io_stack(config) -> str:
    """Which event loop and HTTP parser uvicorn chose ("auto": uvloop and httptools where installed)."""
    import asyncio

    loop = "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    protocol = getattr(config, "http_protocol_class", None)
    http = "httptools" if protocol is not None and "httptools" in protocol.__module__ else "h11"
    return f"{loop}, {http}"


def _stream_interval(value: str) -> str | int:
    """--stream-interval: 'auto' or a whole number >= 1 (a bad option, exit 2, otherwise)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(f"{value!r} is neither 'auto' nor a whole number >= 1")
    return int(value)


def _switch_interval(value: float) -> float:
    """--switch-interval-ms: 0 (Python's own) or 0.01 to 1000 ms (a bad option, exit 2, otherwise)."""
    if value != 0 and not 0.01 <= value <= 1000:
        raise typer.BadParameter(f"{value} is neither 0 (Python's own interval) nor between 0.01 and 1000 ms")
    return value


def engine_apart_by_default(bundle: str, device: str | None) -> bool:
    """Whether `leptonc serve` runs the engine in a process of its own when neither --engine-process nor
    --engine-in-server is given: yes for a bundle served on CUDA (its steps are queued on the device, and the
    scheduler launching them loses time waiting for Python's lock while the HTTP threads hold it: BENCHMARKS.md,
    "Serving"), no on the CPU, where each step's own work dwarfs that wait. A manifest that cannot be read says
    no here; loading the bundle then reports what is wrong with it."""
    from leptonc.bundle import read_manifest
    from leptonc.errors import BundleError
    from leptonc.runtime.slots import serves_on_cuda

    engine = {}  # --device decides alone
    if device is None:
        try:
            engine = read_manifest(Path(bundle))["engine"]
        except BundleError:
            return False
    return serves_on_cuda(engine, device)


def serve(
    bundle: str = typer.Argument(..., help="A .lepton bundle directory."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: a free one, printed when ready)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1/*."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Read the key from this file (a mounted "
                                                "secret), so it does not appear in the process list."),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="Requests that may wait beyond the slots; past it: 429."),
    grace: float = typer.Option(30.0, "--grace", min=0, help="Seconds in-flight requests get to finish on SIGTERM."),
    max_body_kb: int = typer.Option(1024, "--max-body-kb", min=1, help="Largest request body accepted (413 beyond)."),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", min=1, help="Prompt tokens prefilled between decode steps."),
    stream_interval: str = typer.Option("auto", "--stream-interval", callback=_stream_interval,
                                        help="Tokens a stream gathers per chunk after its first: a whole number (1: "
                                        "every token), or auto: every token while at most 16 sequences run, then "
                                        "about 16 chunks a step (64 sequences: every 4th token). Larger cuts the "
                                        "host's work per token."),
    switch_interval_ms: float = typer.Option(0.5, "--switch-interval-ms", callback=_switch_interval,
                                             help="Python's thread switch interval while serving: the longest the "
                                             "scheduler waits for the interpreter's lock after a step while the HTTP "
                                             "threads hold it. 0 keeps Python's own (5 ms)."),
    device: Optional[str] = typer.Option(None, "--device", help="Override the device (cpu or cuda)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the bundle's sha256 and toolchain checks."),
    no_warmup: bool = typer.Option(False, "--no-warmup", help="Do not run every decode batch size and prefills of "
                                   "every multiple of 64 tokens before saying ready (GPU bundles capture a CUDA graph "
                                   "for each batch size, and a prefill of a new token count costs more the first "
                                   "time; without the warm-up the first requests wait for it)."),
    json_logs: bool = typer.Option(False, "--json-logs", help="Log one JSON object per line on stderr."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Record the scheduler's timeline (prefill runs, decode "
                                         "steps, waits, idle time) and write it to this file when the server stops, "
                                         "in the Trace Event format (open it in ui.perfetto.dev)."),
    engine_process: Optional[bool] = typer.Option(None, "--engine-process/--engine-in-server",
                                                  help="Where the batching engine runs: in a process of its own, so "
                                                  "that the HTTP server and the text it makes do not share Python's "
                                                  "lock with the scheduler, or in the server's process. Default: its "
                                                  "own process for a bundle served on CUDA, the server's on the CPU."),
) -> None:
    """Serve a bundle over the OpenAI HTTP API (completions, chat, streaming) with Prometheus /metrics."""
    import uvicorn

    from leptonc.runtime.batching import BatchingEngine, EngineConfig
    from leptonc.server.app import ServerSettings, create_app

    api_key = _read_key(api_key, api_key_file)
    if trace is not None and not trace.parent.is_dir():
        raise UnsupportedRequestError(f"--trace {trace}: the folder {trace.parent} does not exist",
                                      hint="create it, or name another")
    settings = ServerSettings(api_key=api_key or None, max_body_bytes=max_body_kb * 1024, grace_s=grace)
    config = EngineConfig(max_queue=max_queue, device=device, verify=not no_verify, prefill_chunk=prefill_chunk,
                          stream_interval=stream_interval, warmup=not no_warmup,
                          switch_interval_s=switch_interval_ms / 1000 if switch_interval_ms else None,
                          trace=trace is not None)
    sock = _bind(host, port)  # before loading: a taken port fails in a second, not after the model loads
    if engine_process is None:
        engine_process = engine_apart_by_default(bundle, device)
    if engine_process:
        from leptonc.server.engine_process import EngineProcess

        engine = EngineProcess(bundle, config, trace_path=trace)
    else:
        engine = BatchingEngine.from_bundle(bundle, config)
    app = create_app(engine, settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.stop_accepting()  # new requests get 503 at once; those in flight go on
            if sig == signal.SIGTERM:  # a graceful stop: the process exits 0, the signal is not raised again
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            bound = sock.getsockname()
            warmed = engine.slots.warmed
            warm = (f"; warmed up in {warmed['seconds']} s: {len(warmed['decode_buckets'])} decode batch sizes, "
                    f"{len(warmed['prefill_shapes'])} prefill shapes" if warmed else "")
            if warmed and str(warmed.get("queued_prefills", "")).startswith("off: a queued prefill"):
                plain(err, f"warning: prefills are waited for: the warm-up's check of queued ones found "
                           f"{warmed['queued_prefills'][5:]}")
            steps = f", {engine.slots.pipeline_depth} steps in flight" if engine.slots.pipelined else ""
            where = "its own process" if engine_process else "the server's process"
            err.print(f"serving {engine.model_name} on http://{host}:{bound[1]} ({engine.num_slots} slots, queue "
                      f"{max_queue}{steps}{', API key required' if api_key else ''}; engine in {where}; "
                      f"{_io_stack(self.config)}{warm})",
                      markup=False, highlight=False)

    server = Server(uvicorn.Config(app, log_config=_log_config(json_logs), access_log=True, loop="auto", http="auto",
                                   timeout_graceful_shutdown=max(1, int(grace)), lifespan="on"))
    server.run(sockets=[sock])
    if trace is not None:
        try:
            spans = engine.write_trace(trace)
            plain(err, f"wrote the scheduler's timeline to {trace} ({spans:,} spans)")
        except OSError as exc:
            plain(err, f"could not write the timeline to {trace}: {exc.strerror or exc}")
    if engine.failure:
        raise InputError(f"the engine stopped: {engine.failure}")


def bench_serve(
    url: str = typer.Argument(..., help="The server's base URL, e.g. http://127.0.0.1:8000."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", help="Clients, one request at a time each."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Requests started per second (Poisson)."),
    requests: int = typer.Option(64, "--requests", "-n", help="Requests in all."),
    prompt_len: int = typer.Option(128, "--prompt-len", help="Prompt tokens per request."),
    gen_len: int = typer.Option(128, "--gen-len", help="Tokens generated per request (end-of-sequence ignored)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (default: the server's first)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer key."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Read the bearer key from this file."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompts and arrivals."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Client processes the load is spread over "
                                          "(default: one per client, up to half the CPUs)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Load an OpenAI-compatible server: output tokens/s, requests/s, TTFT and inter-token latency p50/p99."""
    from rich.table import Table

    from leptonc.server.loadgen import LoadConfig, run_load

    if concurrency is None and rate is None:
        concurrency = 8
    cfg = LoadConfig(url=url, requests=requests, concurrency=concurrency, rate=rate, prompt_len=prompt_len,
                     gen_len=gen_len, model=model, api_key=_read_key(api_key, api_key_file), seed=seed, workers=workers)

    def progress(done: int, tokens: int, seconds: float) -> None:
        plain(err, f"bench-serve: {done}/{requests} requests done, {tokens:,} tokens in {seconds:.0f} s "
                   f"({tokens / seconds:,.0f} tok/s)")

    try:
        report = run_load(cfg, progress)
    except OSError as exc:
        raise InputError(f"cannot reach {url}: {exc}", hint="start `leptonc serve` first, or check the URL") from None
    except Exception as exc:
        if type(exc).__module__.startswith("httpx"):
            raise InputError(f"cannot reach {url}: {exc}", hint="start `leptonc serve` first, or check the URL") from None
        raise
    if as_json:
        emit_json(report)
    else:
        table = Table(title=f"bench-serve {url} ({report['config']['model']}, {report['workers']} client processes)")
        for col in ("requests ok", "failed", "output tok/s", "req/s", "TTFT p50/p99 ms", "ITL p50/p99 ms"):
            table.add_column(col)
        table.add_row(str(report["requests_ok"]), str(report["requests_failed"]), f"{report['output_tokens_per_s']}",
                      f"{report['requests_per_s']}", f"{report['ttft']['p50_ms']} / {report['ttft']['p99_ms']}",
                      f"{report['itl']['p50_ms']} / {report['itl']['p99_ms']}")
        out.print(table)
        for message in report["errors"]:
            plain(err, f"error: {message}")
