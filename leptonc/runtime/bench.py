"""`leptonc bench`: time to first token, decode tokens/s, per-token latency percentiles, peak memory."""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass

import numpy as np

from leptonc.errors import InputError


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1,)
    prompt_len: int = 128
    gen_len: int = 128
    warmup: int = 2
    iters: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise InputError("--batch needs positive integers, e.g. --batch 1,16")
        if self.prompt_len < 1 or self.gen_len < 1:
            raise InputError("--prompt-len and --gen-len must be at least 1")
        if self.iters < 1 or self.warmup < 0:
            raise InputError("--iters must be >= 1 and --warmup >= 0")


def device_name(runner) -> str:
    if getattr(runner, "device", "cpu") != "cpu" and hasattr(runner, "device_name"):
        return runner.device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"cpu: {model} ({os.cpu_count()} threads)"


def peak_host_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_once(runner, ids: np.ndarray, gen_len: int) -> tuple[float, list[float]]:
    mask = np.ones_like(ids)
    start = time.perf_counter()
    logits = runner.prefill(ids, mask, last_only=True)
    ttft = time.perf_counter() - start
    steps = []
    for _ in range(gen_len - 1):
        token = logits.argmax(-1)
        s = time.perf_counter()
        logits = runner.decode(token)
        steps.append(time.perf_counter() - s)
    return ttft, steps


def bench(runner, cfg: BenchConfig, on_progress=None) -> dict:
    limit = runner.max_sequence
    if cfg.prompt_len + cfg.gen_len > limit:
        raise InputError(f"--prompt-len {cfg.prompt_len} + --gen-len {cfg.gen_len} exceeds this bundle's maximum "
                         f"sequence of {limit} tokens; lower them or recompile with a larger --max-seq")
    rng = np.random.default_rng(cfg.seed)
    results = []
    for batch in cfg.batches:
        if batch > runner.max_batch:
            raise InputError(f"--batch {batch} exceeds this bundle's maximum batch of {runner.max_batch}; "
                             "recompile with a larger --max-batch")
        ids = rng.integers(3, min(runner.vocab_size, 32000), size=(batch, cfg.prompt_len), dtype=np.int64)
        for i in range(cfg.warmup):
            if on_progress:
                on_progress(f"batch {batch}: warmup {i + 1}/{cfg.warmup}")
            run_once(runner, ids, min(cfg.gen_len, 8))
        ttfts, all_steps, per_iter_rates = [], [], []
        for i in range(cfg.iters):
            if on_progress:
                on_progress(f"batch {batch}: iteration {i + 1}/{cfg.iters}")
            ttft, steps = run_once(runner, ids, cfg.gen_len)
            ttfts.append(ttft)
            all_steps += steps
            if steps:
                per_iter_rates.append(batch * len(steps) / sum(steps))
        lat = np.asarray(all_steps) * 1000 if all_steps else np.asarray([np.nan])
        results.append({
            "batch": batch,
            "prompt_len": cfg.prompt_len,
            "gen_len": cfg.gen_len,
            "ttft_ms": round(float(np.median(ttfts)) * 1000, 3),
            "decode_tokens_per_s": round(float(np.median(per_iter_rates)), 2) if per_iter_rates else None,
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "peak_host_mb": round(peak_host_mb(), 1),
            "peak_gpu_mb": runner.peak_device_memory_mb(),
            "iters": cfg.iters,
            "warmup": cfg.warmup,
        })
    return {"device": device_name(runner), "results": results}
