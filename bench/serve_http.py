"""The host side of `leptonc serve` alone: the real app (leptonc/server/app.py) over a fake engine that emits
one token per running request per step, with no model, so what is measured is the server's per-event cost
(engine thread -> event loop -> SSE chunk -> socket), or, with --loadgen, the load generator's. With
`--engine real --tokenizer DIR`, the real batching engine (scheduler, writer thread, detokenizer) runs over a
stand-in for the GPU's slots whose steps take --step-ms: the whole host cost of a served token, with no model.

    .venv/bin/python bench/serve_http.py                       # 64 streams x 128 tokens, steps as fast as possible
    .venv/bin/python bench/serve_http.py --step-ms 1.65        # an H100's batch-64 decode step
    .venv/bin/python bench/serve_http.py --loop asyncio --http h11   # uvicorn without uvloop and httptools
    .venv/bin/python bench/serve_http.py --loadgen 2           # the client is `leptonc bench-serve --workers 2`
    .venv/bin/python bench/serve_http.py --engine real --tokenizer B.lepton/tokenizer --step-ms 1.65 --stream-interval 4

The server runs in a child process; the default client is a minimal one (raw sockets, one connection per
request, bodies parsed after the run) in this process, so that it costs the server as little CPU as can be.
Prints JSON: tokens/s delivered, SSE chunks/s, tokens per chunk, the server process's CPU time per token and per
chunk (engine thread included), and whether every stream carried exactly its tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from bench_json import emit  # noqa: E402


class FakeRequest:
    def __init__(self, prompt_ids, params, on_event):
        self.prompt_ids, self.params, self.on_event = list(prompt_ids), params, on_event
        self.token_ids: list[int] = []
        self.finish_reason = None
        self.cancelled = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine:
    """What app.py reads of a BatchingEngine; one step every `step_s` (0: back to back) emits one event per request."""

    model_name, max_sequence, num_slots = "fake", 1 << 20, 256

    def __init__(self, step_s: float):
        from types import SimpleNamespace

        self.step_s, self.slots, self.failure = step_s, SimpleNamespace(vocab_size=32000), None
        self._cond = threading.Condition()
        self._new: list[FakeRequest] = []
        self._running: list[FakeRequest] = []
        self._stop, self._thread, self.generated = False, None, 0

    ready = property(lambda self: self._thread is not None)

    def encode(self, text):
        return [1] * max(1, len(text.split()))

    def start(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop_accepting(self):
        pass

    def shutdown(self, grace_s=0):
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(5)

    def submit(self, prompt_ids, params, on_event=None):
        request = FakeRequest(prompt_ids, params, on_event)
        with self._cond:
            self._new.append(request)
            self._cond.notify_all()
        return request

    def metrics(self):
        return {"running": len(self._running), "queued": 0, "slots_used": len(self._running), "slots_total": 256,
                "prompt_tokens_total": 0, "generated_tokens_total": self.generated, "rejected_queue_full_total": 0,
                "finished_total": {"length": 0}}

    def _loop(self):
        from leptonc.runtime.batching import Event

        next_step = time.perf_counter()
        while True:
            with self._cond:
                while not (self._new or self._running or self._stop):
                    self._cond.wait()
                if self._stop:
                    return
                self._running += self._new
                self._new = []
            kept = []
            for r in self._running:
                if r.cancelled:
                    r.finish_reason = "cancelled"
                    r.on_event(Event((), "", "cancelled"))
                    continue
                token = 1000 + len(r.token_ids) % 2000
                r.token_ids.append(token)
                self.generated += 1
                done = len(r.token_ids) >= r.params.max_tokens
                if done:
                    r.finish_reason = "length"
                r.on_event(Event((token,), f" w{token}", "length" if done else None))
                if not done:
                    kept.append(r)
            self._running = kept
            if self.step_s:
                next_step = max(next_step + self.step_s, time.perf_counter() - self.step_s)
                pause = next_step - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)


class StandInSlots:
    """What the batching engine reads of the GPU's pipelined slots (block_slots.BlockKvSlots), with no model: a step
    over a bucket of b rows takes step_s x (SMALL_STEP + (1 - SMALL_STEP) x b / num_slots) of the "device" (which runs
    queued work one after another) after launch_host_s of the host; a prefill run takes prefill_host_s of the host to
    launch (Python's lock let go, as in ONNX Runtime's run) and prefill_fixed_s + prefill_token_s per token of the
    device, which cannot finish it before it is launched. A sequence's next token is 1000 + its position % 2000 (the
    token ids `check` expects). The defaults are an H100's llama-1b-shape fp16 bundle on one thread
    (`bench/slots_steps_gpu.py`): a prefill of one 128-token prompt 2.3 ms, of 20 such prompts 9.4 ms, a launch 0.2
    ms; SMALL_STEP is its one-row step over its 64-row step."""

    prefill_in_chunks, pipelined, pipeline_depth, device = False, True, 3, "cuda"
    SMALL_STEP = 0.68

    def __init__(self, num_slots: int, vocab_size: int, step_s: float, prefill_fixed_s: float = 0.0005,
                 prefill_token_s: float = 2.9e-6, async_prefill: bool = True, prefill_host_s: float = 0.002,
                 launch_host_s: float = 0.0002):
        import numpy as np

        self.np, self.step_s, self.async_prefill = np, step_s, async_prefill
        self.prefill_fixed_s, self.prefill_token_s = prefill_fixed_s, prefill_token_s
        self.prefill_host_s, self.launch_host_s = prefill_host_s, launch_host_s
        self.num_slots, self.max_sequence, self.vocab_size, self.prefill_budget = num_slots, 4096, vocab_size, 4096
        self.lengths = np.zeros(num_slots, np.int64)
        self.made = np.zeros(num_slots, np.int64)
        self._device_free_at = 0.0

    def _run(self, work_s: float) -> float:
        """Queue work on the device; when it will be done."""
        self._device_free_at = max(self._device_free_at, time.perf_counter()) + work_s
        return self._device_free_at

    def _wait(self, until: float) -> None:
        pause = until - time.perf_counter()
        if pause > 0:
            time.sleep(pause)  # lets go of Python's lock, as a device sync does

    def _queue_prefill(self, slots, prompts) -> float:
        """Launch the runs (neighbouring slots in one run within the budget, as BlockKvSlots runs them); when the
        device will be done with them."""
        from leptonc.runtime.block_slots import prefill_runs

        runs = prefill_runs(list(slots), [len(p) for p in prompts], self.prefill_budget)
        self.last_prefill_runs = len(runs)
        for run in runs:
            started = time.perf_counter()
            time.sleep(self.prefill_host_s)  # the launch: the host busy, Python's lock let go
            work = self.prefill_fixed_s + self.prefill_token_s * len(run) * max(len(prompts[i]) for i in run)
            self._device_free_at = max(max(self._device_free_at, started) + work, time.perf_counter())
        for slot, prompt in zip(slots, prompts):
            self.lengths[slot], self.made[slot] = len(prompt), 1
        return self._device_free_at

    def _step_s(self, rows) -> float:
        bucket = 1 << max(0, int(max(rows))).bit_length()
        return self.step_s * (self.SMALL_STEP + (1 - self.SMALL_STEP) * min(bucket, self.num_slots) / self.num_slots)

    def prefill_many(self, slots, prompts):
        self._wait(self._queue_prefill(slots, prompts))
        out = []
        for _ in slots:
            logits = self.np.zeros(self.vocab_size, self.np.float32)
            logits[1000] = 1
            out.append(logits)
        return out

    def prefill_tokens(self, slots, prompts):  # greedy first tokens: the graph's next_token, no logits on the host
        self._wait(self._queue_prefill(slots, prompts))
        return [1000] * len(slots)

    def prefill(self, slot, ids):
        return self.prefill_many([slot], [ids])[0]

    def prefill_launch(self, slots, prompts):  # queued behind the steps in flight, as BlockKvSlots.prefill_launch
        return self._queue_prefill(slots, prompts), [1000] * len(slots)

    def prefill_collect(self, handle):
        return self.decode_collect(handle)

    def decode_launch(self, slots, ids):
        time.sleep(self.launch_host_s)
        slots = self.np.asarray(slots)
        tokens = 1000 + self.made[slots] % 2000
        self.made[slots] += 1
        self.lengths[slots] += 1
        return self._run(self._step_s(slots)), tokens

    def decode_collect(self, handle):
        done_at, tokens = handle
        self._wait(done_at)
        return tokens

    def decode(self, slots, ids, logits=False):
        tokens = self.decode_collect(self.decode_launch(slots, ids))
        if not logits:
            return tokens, None
        rows = self.np.zeros((len(tokens), self.vocab_size), self.np.float32)
        rows[self.np.arange(len(tokens)), tokens] = 1
        return tokens, rows

    def drain(self):
        self._wait(self._device_free_at)

    def free(self, slot):
        self.lengths[slot] = self.made[slot] = 0

    def length(self, slot):
        return int(self.lengths[slot])

    def describe(self):
        return {"slots": "stand-in (bench/serve_http.py)"}

    def release(self):
        pass


def real_config(args):
    from leptonc.runtime.batching import EngineConfig

    interval = int(args.stream_interval) if args.stream_interval.isdigit() else args.stream_interval
    return EngineConfig(max_queue=4 * args.concurrency, verify=False, stream_interval=interval, trace=bool(args.trace))


def real_engine(args):
    """The batching engine over StandInSlots, with a real tokenizer: the host's whole work per token."""
    from leptonc.runtime.batching import BatchingEngine
    from leptonc.runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(args.tokenizer))
    slots = StandInSlots(args.concurrency, len(tokenizer), args.step_ms / 1000, args.prefill_fixed_ms / 1000,
                         args.prefill_us_per_token / 1e6, not args.prefill_waited, args.prefill_host_ms / 1000,
                         args.launch_host_ms / 1000)
    return BatchingEngine(slots, tokenizer, (), real_config(args), model_name="fake")


def serve(args) -> None:
    import uvicorn

    from leptonc.server.app import create_app

    if args.engine == "real" and args.engine_process:  # as `leptonc serve --engine-process`
        import functools

        from leptonc.server.engine_process import EngineProcess

        engine = EngineProcess(None, real_config(args), Path(args.trace) if args.trace else None,
                               make_engine=functools.partial(real_engine, args))
    else:
        engine = real_engine(args) if args.engine == "real" else FakeEngine(args.step_ms / 1000)
    app = create_app(engine)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(sock.getsockname()[1], flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # stop on SIGTERM without uvicorn raising it again at the end
            self.should_exit = True

    Server(uvicorn.Config(app, loop=args.loop, http=args.http, log_level="warning", access_log=False,
                          lifespan="on")).run(sockets=[sock])
    if args.trace and args.engine == "real":  # stopped by SIGTERM: the engine has shut down
        engine.write_trace(Path(args.trace))


async def one(port: int, body: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    data = bytearray()
    while chunk := await reader.read(1 << 16):
        data += chunk
    writer.close()
    return bytes(data)


def check(raw: bytes, gen_len: int, text_check: bool = True) -> tuple[int, int, bool]:
    """(tokens, chunks, exact): the stream's token ids are 1000.. in order and its text matches them."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    body, pos = bytearray(), 0
    while True:  # de-chunk
        end = rest.index(b"\r\n", pos)
        size = int(rest[pos:end], 16)
        if not size:
            break
        body += rest[end + 2:end + 2 + size]
        pos = end + 4 + size
    tokens, text, chunks = [], [], 0
    for line in body.decode().split("\n"):
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            if "choices" not in chunk:
                raise SystemExit(f"the server sent an error: {line[6:300]}")
            choice = chunk["choices"]
            if choice:
                chunks += 1
                tokens += choice[0]["token_ids"]
                text.append(choice[0]["text"])
    want = [1000 + i % 2000 for i in range(gen_len)]
    if not text_check:  # the real engine's text is its tokenizer's: the ids are what is checked
        return len(tokens), chunks, tokens == want
    return len(tokens), chunks, tokens == want and "".join(text) == "".join(f" w{t}" for t in want)


async def drive(port: int, args) -> dict:
    body = json.dumps({"model": "fake", "prompt": list(range(1, args.prompt_len + 1)), "max_tokens": args.gen_len, "stream": True,
                       "temperature": 0.0}).encode()
    left, raws = list(range(args.requests)), []

    async def client():
        while left:
            left.pop()
            raws.append(await one(port, body))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    wall = time.perf_counter() - start
    checked = [check(raw, args.gen_len, args.engine == "fake") for raw in raws]
    tokens, chunks = sum(c[0] for c in checked), sum(c[1] for c in checked)
    return {"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall), "sse_chunks": chunks,
            "chunks_per_s": round(chunks / wall), "tokens_per_chunk": round(tokens / max(1, chunks), 2),
            "exact": all(c[2] for c in checked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--step-ms", type=float, default=0.0, help="the fake engine's step time (0: back to back)")
    parser.add_argument("--loop", default="auto", help="uvicorn's loop: auto, asyncio or uvloop")
    parser.add_argument("--http", default="auto", help="uvicorn's HTTP parser: auto, h11 or httptools")
    parser.add_argument("--engine", choices=("fake", "real"), default="fake",
                        help="fake: one event per request per step, no engine; real: the batching engine over stand-in slots")
    parser.add_argument("--tokenizer", help="--engine real: a tokenizer directory (a bundle's tokenizer/)")
    parser.add_argument("--stream-interval", default="auto", help="--engine real: the engine's stream_interval (auto or N)")
    parser.add_argument("--prefill-host-ms", type=float, default=2.0, help="--engine real: a prefill run's launch on "
                        "the host")
    parser.add_argument("--prefill-fixed-ms", type=float, default=0.5, help="--engine real: its fixed device time")
    parser.add_argument("--prefill-us-per-token", type=float, default=2.9, help="--engine real: its device time per "
                        "token")
    parser.add_argument("--launch-host-ms", type=float, default=0.2, help="--engine real: a step's launch on the host")
    parser.add_argument("--prompt-len", type=int, default=3, help="prompt tokens of each request")
    parser.add_argument("--engine-process", action="store_true", help="--engine real: the engine in a process of its "
                        "own (as `leptonc serve --engine-process`)")
    parser.add_argument("--prefill-waited", action="store_true", help="--engine real: the engine waits for each "
                        "prefill run (as on slots without async_prefill) instead of queueing it behind the steps")
    parser.add_argument("--trace", help="--engine real: write the scheduler's timeline here (as `leptonc serve --trace`)")
    parser.add_argument("--loadgen", type=int, default=0, help="drive with `leptonc bench-serve --workers N` instead")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.engine == "real" and not args.tokenizer:
        parser.error("--engine real needs --tokenizer DIR (e.g. a bundle's tokenizer/ directory)")
    if args.serve:
        return serve(args)
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--step-ms", str(args.step_ms), "--loop", args.loop,
                              "--http", args.http, "--engine", args.engine, "--tokenizer", str(args.tokenizer),
                              "--stream-interval", str(args.stream_interval), "--concurrency", str(args.concurrency),
                              "--prefill-fixed-ms", str(args.prefill_fixed_ms), "--prefill-us-per-token",
                              str(args.prefill_us_per_token), "--prefill-host-ms", str(args.prefill_host_ms),
                              "--launch-host-ms", str(args.launch_host_ms),
                              *(["--prefill-waited"] if args.prefill_waited else []),
                              *(["--engine-process"] if args.engine_process else []),
                              *(["--trace", args.trace] if args.trace else [])],
                             stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        time.sleep(0.5)
        cpu = psutil.Process(child.pid).cpu_times()
        if args.loadgen:
            proc = subprocess.run([sys.executable, "-m", "leptonc", "bench-serve", f"http://127.0.0.1:{port}",
                                   "--concurrency", str(args.concurrency), "--requests", str(args.requests),
                                   "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--workers",
                                   str(args.loadgen), "--json"], capture_output=True, text=True, check=True)
            report = json.loads(proc.stdout)
            result = {key: report[key] for key in ("wall_s", "output_tokens", "output_tokens_per_s", "requests_ok",
                                                   "workers", "itl")}
        else:
            result = asyncio.run(drive(port, args))
        spent = psutil.Process(child.pid).cpu_times()
        if args.engine == "real":  # how the engine batched the load: prefill runs and decode steps
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                result["engine"] = {line.split()[0]: float(line.split()[1]) for line in reply.read().decode().splitlines()
                                    if line.startswith(("leptonc_prefill_runs", "leptonc_decode_steps"))}
        server_cpu = spent.user + spent.system - cpu.user - cpu.system
        result["server_cpu_s"] = round(server_cpu, 3)
        tokens = result.get("tokens") or result.get("output_tokens")
        result["server_cpu_us_per_token"] = round(server_cpu / tokens * 1e6, 2)
        if "sse_chunks" in result:
            result["server_cpu_us_per_chunk"] = round(server_cpu / result["sse_chunks"] * 1e6, 2)
    finally:
        child.terminate()
        child.wait(10)
    emit({"config": vars(args) | {"cpus": os.cpu_count()}} | result, args.out)


if __name__ == "__main__":
    main()
