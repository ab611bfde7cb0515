"""`leptonc bench-serve`: load on an OpenAI-compatible completions endpoint, measured as a client sees it.

Either N clients each sending one request after another (`concurrency`), or requests started at a
fixed rate (`rate` per second, Poisson arrivals, seeded). Every request streams, with `ignore_eos` so
each produces exactly `gen_len` tokens, and a prompt of exactly `prompt_len` token ids (distinct per
request, so no cache could answer for another). Measured: output tokens/s and requests/s over the
wall time of the run, time to first token, and inter-token latency (a chunk that carries k tokens
after a gap g counts as k gaps of g/k), p50 and p99.

One Python process cannot read tens of thousands of server-sent events a second, so the clients are spread
over `workers` processes: in the closed loop each process runs its share of the clients, all taking the next
request from one shared counter; at a rate, request i (of the one seeded schedule) goes to process i mod workers
and starts at its planned offset from the common start. Each process times its own requests with
`time.perf_counter` (the system's monotonic clock, the same in every process) and the results are merged.
The streams are read by a small HTTP/1.1 client (sse_client.py) rather than httpx, and a server's chunk without
a JSON parse: its token ids are counted where the `"token_ids": [...]` key is (a key cannot appear inside a JSON
string, whose quotes are escaped), and only a chunk with an `"error"` key is parsed in full.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import queue
import re
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from leptonc.errors import InputError
from leptonc.server.sse_client import SseClient

PROGRESS_EVERY_S = 10.0  # a long run reports progress this often (to the callback run_load is given)


@dataclass(frozen=True)
class LoadConfig:
    url: str  # the server's base URL, http://host:port
    requests: int = 64
    concurrency: int | None = 8  # clients, each one request at a time (None: use rate)
    rate: float | None = None  # requests started per second (Poisson)
    prompt_len: int = 128
    gen_len: int = 128
    model: str | None = None  # None: the first model /v1/models lists
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 600.0
    workers: int | None = None  # client processes (None: one per client, up to half the CPUs)

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise InputError("give either --concurrency N or --rate R (requests per second), not both")
        if self.concurrency is not None and self.concurrency < 1:
            raise InputError("--concurrency must be >= 1")
        if self.rate is not None and self.rate <= 0:
            raise InputError("--rate must be > 0 requests per second")
        for name in ("requests", "prompt_len", "gen_len"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be >= 1, not {self.workers}", hint="or leave it out for the default")
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"{self.url!r} is not an http(s) URL", hint="e.g. http://127.0.0.1:8000")

    def worker_count(self) -> int:
        """Processes the run uses: never more than there are clients (or requests)."""
        spread = min(self.requests, self.concurrency if self.concurrency is not None else self.requests)
        wanted = self.workers if self.workers is not None else max(1, (os.cpu_count() or 2) // 2)
        return max(1, min(wanted, spread))


@dataclass
class RequestResult:
    ok: bool
    status: int
    tokens: int = 0
    ttft_s: float | None = None
    gaps_s: array = field(default_factory=lambda: array("d"))
    latency_s: float = 0.0
    error: str | None = None


def _percentiles(values) -> dict:
    if len(values) == 0:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    arr = np.asarray(values, dtype=np.float64) * 1000
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3),
            "mean_ms": round(float(arr.mean()), 3)}


_TOKEN_IDS = re.compile(rb'"token_ids"\s*:\s*\[([^\]]*)\]')
_ERROR_KEY = re.compile(rb'"error"\s*:')


def chunk_tokens(payload: bytes) -> int | str:
    """The token ids one server-sent `data:` payload carries (over all its choices), or its error's message."""
    if _ERROR_KEY.search(payload):
        chunk = json.loads(payload)
        if "error" in chunk:
            error = chunk["error"]
            return str(error.get("message") if isinstance(error, dict) else error)
    count = 0
    for found in _TOKEN_IDS.finditer(payload):
        ids = found.group(1).strip()
        if ids:
            count += ids.count(b",") + 1
    return count


async def _one(client, cfg: LoadConfig, model: str, prompt_ids: list[int]) -> RequestResult:
    body = {"model": model, "prompt": prompt_ids, "max_tokens": cfg.gen_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True}
    clock = time.perf_counter
    start = clock()
    result = RequestResult(ok=False, status=0)
    gaps = result.gaps_s
    last = None
    pending = b""
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:300]
                return result
            async for block in response.aiter_bytes():
                pending += block
                if b"\n" not in block:
                    continue
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    count = chunk_tokens(payload)
                    if isinstance(count, str):
                        result.error = count
                        return result
                    if not count:
                        continue
                    now = clock()
                    if last is None:
                        result.ttft_s = now - start
                        if count > 1:
                            gaps.extend([0.0] * (count - 1))
                    elif count == 1:
                        gaps.append(now - last)
                    else:
                        gaps.extend([(now - last) / count] * count)
                    last = now
                    result.tokens += count
        result.ok = result.tokens > 0
    except Exception as exc:  # noqa: BLE001 - a failed request is counted and reported, the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency_s = clock() - start
    return result


@dataclass(frozen=True)
class _Plan:
    """What every process of a run shares: the config, the model, the prompts and (at a rate) the start offsets."""

    cfg: LoadConfig
    model: str
    prompts: list
    offsets: list  # seconds from the common start, per request (rate mode); empty in the closed loop
    workers: int


def _clients_of(plan: _Plan, worker: int) -> int:
    """The closed loop's clients that process `worker` runs (an even split)."""
    clients = min(plan.cfg.concurrency, plan.cfg.requests)
    return clients // plan.workers + (worker < clients % plan.workers)


async def _drive(plan: _Plan, worker: int, next_index, finished, ready: Callable[[], float]) -> tuple[list, float]:
    """This process's share of the run: (its results, when its last request ended). `ready()` blocks until the
    common start and returns it; `next_index()` is the closed loop's shared counter; `finished(tokens)` counts."""
    cfg = plan.cfg
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    results: list[RequestResult] = []

    async def one(index: int) -> None:
        try:
            result = await asyncio.wait_for(_one(client, cfg, plan.model, plan.prompts[index]), cfg.timeout_s)
        except asyncio.TimeoutError:
            result = RequestResult(ok=False, status=0, latency_s=cfg.timeout_s,
                                   error=f"no complete answer within {cfg.timeout_s:g} s")
        results.append(result)
        finished(result.tokens if result.ok else 0)

    async with SseClient(cfg.url.rstrip("/"), headers) as client:
        start = ready()
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        if cfg.concurrency is not None:
            async def client_loop():
                while (index := next_index()) is not None:
                    await one(index)

            await asyncio.gather(*(client_loop() for _ in range(_clients_of(plan, worker))))
        else:
            tasks = []
            for index in range(worker, cfg.requests, plan.workers):
                await asyncio.sleep(max(0.0, start + plan.offsets[index] - time.perf_counter()))
                tasks.append(asyncio.create_task(one(index)))
            await asyncio.gather(*tasks)
    return results, time.perf_counter()


def _event_loop_run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


class _Shared:
    """The closed loop's next request and the run's progress, shared by the processes (one lock, once a request)."""

    def __init__(self, ctx, requests: int):
        self.counts = ctx.Array("q", 3)  # next request index, requests finished, tokens received
        self.requests = requests

    def next_index(self) -> int | None:
        with self.counts.get_lock():
            index = self.counts[0]
            if index >= self.requests:
                return None
            self.counts[0] = index + 1
            return index

    def finished(self, tokens: int) -> None:
        with self.counts.get_lock():
            self.counts[1] += 1
            self.counts[2] += tokens

    def progress(self) -> tuple[int, int]:
        with self.counts.get_lock():
            return self.counts[1], self.counts[2]


def _worker(plan: _Plan, worker: int, shared: _Shared, go, start, out) -> None:
    """One client process: announce readiness, wait for the common start, run its share, send its results."""
    def ready() -> float:
        out.put(("ready", worker))
        go.wait()
        return start.value

    try:
        results, ended = _event_loop_run(_drive(plan, worker, shared.next_index, shared.finished, ready))
        out.put(("done", worker, results, ended))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it; a worker has no console of its own
        out.put(("failed", worker, f"{type(exc).__name__}: {exc}"))


def _in_processes(plan: _Plan, progress: Callable | None) -> tuple[list, float, float]:
    """Run the plan over `plan.workers` processes: (every result, the common start, the last end)."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads or sockets
    shared, go, start, out = _Shared(ctx, plan.cfg.requests), ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(plan, w, shared, go, start, out), daemon=True)
             for w in range(plan.workers)]
    for proc in procs:
        proc.start()
    results, ends, waiting = [], [], set(range(plan.workers))
    begun, last_report, ready = None, 0.0, 0
    try:
        while waiting:
            try:
                message = out.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w in waiting if procs[w].exitcode is not None]
                if dead:
                    raise RuntimeError(f"bench-serve's client process {dead[0]} exited with code "
                                       f"{procs[dead[0]].exitcode} before reporting")
                now = time.perf_counter()
                if begun is not None and progress is not None and now - last_report >= PROGRESS_EVERY_S:
                    last_report = now
                    progress(*shared.progress(), now - begun)
                continue
            if message[0] == "ready":
                ready += 1
                if ready == plan.workers:  # every process is set up: start together, a moment from now
                    begun = start.value = time.perf_counter() + 0.05
                    last_report = begun
                    go.set()
            elif message[0] == "failed":
                raise RuntimeError(f"bench-serve's client process {message[1]} failed: {message[2]}")
            else:
                results += message[2]
                ends.append(message[3])
                waiting.discard(message[1])
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.exitcode is None:
                proc.kill()
    return results, begun, max(ends)


def _in_this_process(plan: _Plan, progress: Callable | None) -> tuple[list, float, float]:
    shared = _Shared(multiprocessing.get_context("spawn"), plan.cfg.requests)
    begun: list[float] = []

    def ready() -> float:
        begun.append(time.perf_counter())
        return begun[0]

    async def with_progress():
        driving = asyncio.ensure_future(_drive(plan, 0, shared.next_index, shared.finished, ready))
        while progress is not None:
            done, _ = await asyncio.wait({driving}, timeout=PROGRESS_EVERY_S)
            if done:
                break
            progress(*shared.progress(), time.perf_counter() - begun[0])
        return await driving

    results, ended = _event_loop_run(with_progress())
    return results, begun[0], ended


def _plan(cfg: LoadConfig) -> _Plan:
    """Ask the server for its model and vocabulary; draw the prompts and (at a rate) the arrival times."""
    import httpx2 as httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    with httpx.Client(base_url=cfg.url.rstrip("/"), headers=headers, timeout=cfg.timeout_s) as client:
        info = client.get("/v1/models").json()
    model = cfg.model if cfg.model is not None else info["data"][0]["id"]
    # ordinary tokens: past the first eighth of the vocabulary (where special and byte tokens sit)
    vocab = int(info["data"][0].get("vocab_size") or 32000)
    low, high = vocab // 8, vocab // 8 + min(4000, vocab // 2)
    rng = np.random.default_rng(cfg.seed)
    prompts = [[int(t) for t in rng.integers(low, high, cfg.prompt_len)] for _ in range(cfg.requests)]
    offsets = []
    if cfg.rate is not None:  # request i starts after the first i gaps, drawn after the prompts as they always were
        gaps = [float(rng.exponential(1.0 / cfg.rate)) for _ in range(cfg.requests)]
        offsets = [0.0, *np.cumsum(gaps[:-1]).tolist()]
    return _Plan(cfg, model, prompts, offsets, cfg.worker_count())


def run_load(cfg: LoadConfig, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Run the load; `progress(requests_done, tokens, seconds)` is called every PROGRESS_EVERY_S of a long run.
    With more than one worker the client processes are spawned, which import the caller's main module again: a
    script that calls this must keep its own work under `if __name__ == "__main__":`."""
    plan = _plan(cfg)
    run = _in_this_process if plan.workers == 1 else _in_processes
    results, started, ended = run(plan, progress)
    wall = ended - started
    done = [r for r in results if r.ok]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    tokens = sum(r.tokens for r in done)
    gaps = np.concatenate([np.frombuffer(r.gaps_s, dtype=np.float64) for r in done]) if done else []
    return {
        "config": asdict(cfg) | {"api_key": "***" if cfg.api_key else None, "model": plan.model},
        "workers": plan.workers,
        "requests_ok": len(done), "requests_failed": len(results) - len(done), "statuses": statuses,
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": round(wall, 3), "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2) if wall else None,
        "requests_per_s": round(len(done) / wall, 3) if wall else None,
        "ttft": _percentiles([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl": _percentiles(gaps),
        "latency": _percentiles([r.latency_s for r in done]),
    }
