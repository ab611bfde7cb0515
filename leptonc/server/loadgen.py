"""`leptonc bench-serve`: load on an OpenAI-compatible completions endpoint, measured as a client sees it.

Either N clients each sending one request after another (`concurrency`), or requests started at a
fixed rate (`rate` per second, Poisson arrivals, seeded). Every request streams, with `ignore_eos` so
each produces exactly `gen_len` tokens, and a prompt of exactly `prompt_len` token ids (distinct per
request, so no cache could answer for another). Measured: output tokens/s and requests/s over the
wall time of the run, time to first token, and inter-token latency (a chunk that carries k tokens
after a gap g counts as k gaps of g/k), p50 and p99.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from leptonc.errors import InputError


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
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"{self.url!r} is not an http(s) URL", hint="e.g. http://127.0.0.1:8000")


@dataclass
class RequestResult:
    ok: bool
    status: int
    tokens: int = 0
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    error: str | None = None


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    arr = np.asarray(values) * 1000
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3),
            "mean_ms": round(float(arr.mean()), 3)}


async def _one(client, cfg: LoadConfig, model: str, prompt_ids: list[int]) -> RequestResult:
    body = {"model": model, "prompt": prompt_ids, "max_tokens": cfg.gen_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    result = RequestResult(ok=False, status=0)
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:300]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message")
                    return result
                count = sum(len(c.get("token_ids") or []) for c in chunk.get("choices", []))
                if not count:
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - start
                else:
                    result.gaps_s.extend([(now - last) / count] * count)
                if last is None and count > 1:
                    result.gaps_s.extend([0.0] * (count - 1))
                last = now
                result.tokens += count
        result.ok = result.tokens > 0
    except Exception as exc:  # noqa: BLE001 - a failed request is counted and reported, the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency_s = time.perf_counter() - start
    return result


async def _run(cfg: LoadConfig) -> dict:
    import httpx2 as httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), headers=headers, timeout=cfg.timeout_s,
                                 limits=limits) as client:
        model = cfg.model
        info = (await client.get("/v1/models")).json()
        if model is None:
            model = info["data"][0]["id"]
        # ordinary tokens: past the first eighth of the vocabulary (where special and byte tokens sit)
        vocab = int(info["data"][0].get("vocab_size") or 32000)
        low, high = vocab // 8, vocab // 8 + min(4000, vocab // 2)
        rng = np.random.default_rng(cfg.seed)
        prompts = [[int(t) for t in rng.integers(low, high, cfg.prompt_len)] for _ in range(cfg.requests)]
        started = time.perf_counter()
        if cfg.concurrency is not None:
            queue = list(range(cfg.requests))
            results: list[RequestResult] = []

            async def client_loop():
                while queue:
                    results.append(await _one(client, cfg, model, prompts[queue.pop()]))

            await asyncio.gather(*(client_loop() for _ in range(min(cfg.concurrency, cfg.requests))))
        else:
            tasks = []
            for prompt in prompts:
                tasks.append(asyncio.create_task(_one(client, cfg, model, prompt)))
                await asyncio.sleep(float(rng.exponential(1.0 / cfg.rate)))
            results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - started
    done = [r for r in results if r.ok]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    tokens = sum(r.tokens for r in done)
    return {
        "config": asdict(cfg) | {"api_key": "***" if cfg.api_key else None, "model": model},
        "requests_ok": len(done), "requests_failed": len(results) - len(done), "statuses": statuses,
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": round(wall, 3), "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2) if wall else None,
        "requests_per_s": round(len(done) / wall, 3) if wall else None,
        "ttft": _percentiles([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl": _percentiles([g for r in done for g in r.gaps_s]),
        "latency": _percentiles([r.latency_s for r in done]),
    }


def run_load(cfg: LoadConfig) -> dict:
    return asyncio.run(_run(cfg))
