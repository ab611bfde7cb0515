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
    """Greedy generation as `leptonc run` does it (Runner.greedy_tokens: the argmax on the device where the graph
    has it, as the HF baseline does; where the runner pipelines, steps queue on the device ahead of the host).
    A step's time is the interval between two tokens reaching the host."""
    mask = np.ones_like(ids)
    start = time.perf_counter()
    logits = runner.prefill(ids, mask, last_only=True)
    ttft = time.perf_counter() - start
    steps = []
    s = time.perf_counter()
    for _ in runner.greedy_tokens(logits.argmax(-1), gen_len - 1):
        now = time.perf_counter()
        steps.append(now - s)
        s = now
    return ttft, steps


def bench(runner, cfg: BenchConfig, on_progress=None) -> dict:
    """Time the runner at each batch size: TTFT, decode tokens/s, step latency, peak memory."""
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
    info = runner.describe() if hasattr(runner, "describe") else {"runner": type(runner).__name__}
    return {"device": device_name(runner), "runner": info, "results": results}


# ---- the memory floor and the Hugging Face baseline (`leptonc bench --baseline hf`) ----------------

H100_COPY_BANDWIDTH = 3.0e12  # bytes/s, read + write, measured on the lent H100 (shared/device/README.md)
# Devices whose memory bandwidth was measured, by a part of the name the runner reports. The decode floor
# is drawn only for these (or for a --bandwidth the user gives); on the CPU and on other GPUs it is left out.
MEASURED_BANDWIDTH = {"H100": H100_COPY_BANDWIDTH}


def device_bandwidth(device: str) -> float | None:
    """The measured memory bandwidth (bytes/s) of the device a bench ran on, or None (the CPU, an unmeasured GPU)."""
    if device.startswith("cpu"):
        return None
    return next((bw for key, bw in MEASURED_BANDWIDTH.items() if key in device), None)


def add_memory_figures(result: dict, bundle, *, mean_context: float, kv_capacity: int | None,
                       bandwidth: float | None = None) -> None:
    """Add to each batch's result the decode memory floor (where the bandwidth is known: `bandwidth`, else the
    device's measured one) and, for a runner holding one K/V block of `kv_capacity` tokens per batch size,
    its peak device memory against weights + K/V held + 25%."""
    bandwidth = bandwidth or device_bandwidth(result["device"])
    result["floor_bandwidth_bytes_per_s"] = bandwidth
    weights, kv_tok = bundle_weight_bytes(bundle), kv_bytes_per_token(bundle.io)
    kv_held = 0
    for r in result["results"]:
        if bandwidth:
            r["memory_floor"] = memory_floor(r["batch"], weights, kv_tok, mean_context, bandwidth)
            if r["decode_tokens_per_s"]:
                r["fraction_of_floor"] = round(r["decode_tokens_per_s"] / r["memory_floor"]["floor_tokens_per_s"], 3)
        if kv_capacity and r["peak_gpu_mb"] is not None:
            kv_held += r["batch"] * kv_tok * kv_capacity
            r["memory_bound"] = memory_bound(weights, kv_held, r["peak_gpu_mb"])


def bundle_weight_bytes(bundle) -> int:
    """Bytes of the engine's model files (graph + external weights): what a decode step must read."""
    engine_file = bundle.engine["file"]
    return int(sum(f["bytes"] for name, f in bundle.manifest["files"].items()
                   if name == engine_file or name.startswith(engine_file + ".")))


def kv_bytes_per_token(io: dict) -> int:
    item = np.dtype({"float16": np.float16, "bfloat16": np.float16}.get(io["kv_dtype"], io["kv_dtype"])).itemsize
    return 2 * io["num_layers"] * io["num_kv_heads"] * io["head_dim"] * item


def memory_floor(batch: int, weight_bytes: int, kv_per_token: int, mean_context: float,
                 bandwidth: float = H100_COPY_BANDWIDTH) -> dict:
    """tokens/s <= batch x bandwidth / bytes read per step (weights once, plus each row's KV cache)."""
    kv = batch * kv_per_token * mean_context
    return {"weight_bytes": weight_bytes, "kv_bytes_per_step": int(kv), "bandwidth_bytes_per_s": bandwidth,
            "floor_tokens_per_s": round(batch * bandwidth / weight_bytes, 1),
            "floor_with_kv_tokens_per_s": round(batch * bandwidth / (weight_bytes + kv), 1)}


def memory_bound(weight_bytes: int, kv_held_bytes: int, peak_mb: float) -> dict:
    """Peak device memory (NVML, the whole process, CUDA context included) against the bound leptonc keeps: the
    weights plus the K/V blocks held so far plus 25%."""
    weights, kv = weight_bytes / 2**20, kv_held_bytes / 2**20
    bound = 1.25 * (weights + kv)
    return {"weights_mb": round(weights, 1), "kv_held_mb": round(kv, 1), "bound_mb": round(bound, 1),
            "peak_mb": peak_mb, "within": peak_mb <= bound}


def hf_baseline(source: str, cfg: BenchConfig, device: str, dtype: str, vocab_limit: int, on_progress=None) -> dict:
    """The source model under Hugging Face transformers (eager attention) with the same prompt and
    generation lengths, timed the same way as the runner: prefill, then one forward per new token."""
    import torch

    from leptonc.models.intake import load_model
    from leptonc.verify import cache_arg, cache_of

    if on_progress:
        on_progress(f"loading {source} in transformers")
    lm = load_model(source)
    module = lm.module
    try:
        module.set_attn_implementation("eager")
    except (AttributeError, ValueError):
        module.config._attn_implementation = "eager"
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    module = module.to(device=device, dtype=torch_dtype).eval()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def once(ids, gen_len):
        with torch.no_grad():
            sync()
            start = time.perf_counter()
            out = module(input_ids=ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.cpu()
            ttft = time.perf_counter() - start
            past, kv_arg = cache_of(out), cache_arg(module)
            steps = []
            for _ in range(gen_len - 1):
                s = time.perf_counter()
                out = module(input_ids=token, **{kv_arg: past}, use_cache=True)
                past = cache_of(out)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                token.cpu()  # the runner hands the step's tokens to the host too (decode_tokens)
                steps.append(time.perf_counter() - s)
        return ttft, steps

    rng = np.random.default_rng(cfg.seed)
    results = []
    for batch in cfg.batches:
        ids_np = rng.integers(3, min(vocab_limit, 32000), size=(batch, cfg.prompt_len), dtype=np.int64)
        ids = torch.from_numpy(ids_np).to(device)
        for i in range(cfg.warmup):
            if on_progress:
                on_progress(f"hf batch {batch}: warmup {i + 1}/{cfg.warmup}")
            once(ids, min(cfg.gen_len, 8))
        ttfts, all_steps, rates = [], [], []
        for i in range(cfg.iters):
            if on_progress:
                on_progress(f"hf batch {batch}: iteration {i + 1}/{cfg.iters}")
            ttft, steps = once(ids, cfg.gen_len)
            ttfts.append(ttft)
            all_steps += steps
            if steps:
                rates.append(batch * len(steps) / sum(steps))
        lat = np.asarray(all_steps) * 1000 if all_steps else np.asarray([np.nan])
        results.append({
            "batch": batch, "prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len,
            "ttft_ms": round(float(np.median(ttfts)) * 1000, 3),
            "decode_tokens_per_s": round(float(np.median(rates)), 2) if rates else None,
            "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "peak_host_mb": round(peak_host_mb(), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        })
    import transformers

    info = {"source": source, "framework": f"transformers {transformers.__version__} (eager attention), "
                                          f"torch {torch.__version__}",
            "device": device, "dtype": dtype, "results": results}
    del module, lm
    if cuda:
        torch.cuda.empty_cache()
    return info


def compare(result: dict, baseline: dict) -> list[dict]:
    """Per batch size: the bundle's and the baseline's figures and their ratios."""
    rows = []
    by_batch = {r["batch"]: r for r in baseline["results"]}
    for r in result["results"]:
        h = by_batch.get(r["batch"])
        if h is None:
            continue
        rows.append({
            "batch": r["batch"],
            "decode_tokens_per_s": r["decode_tokens_per_s"], "hf_decode_tokens_per_s": h["decode_tokens_per_s"],
            "decode_speedup": round(r["decode_tokens_per_s"] / h["decode_tokens_per_s"], 2)
            if r["decode_tokens_per_s"] and h["decode_tokens_per_s"] else None,
            "ttft_ms": r["ttft_ms"], "hf_ttft_ms": h["ttft_ms"],
            "ttft_speedup": round(h["ttft_ms"] / r["ttft_ms"], 2) if r["ttft_ms"] else None,
        })
    return rows
