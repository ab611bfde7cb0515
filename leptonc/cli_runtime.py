"""The commands that use a bundle: `run`, `bench`, `eval`, `inspect` and `package`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from leptonc.console import emit_json, err, out, plain, rule, text
from leptonc.errors import InputError, UnsupportedRequestError


def _open(path: str, tokenizer_dir: Optional[str], verify: bool, device: Optional[str] = None):
    """(runner, tokenizer, eos ids, bundle or None) for a bundle directory or a bare model file."""
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.tokenizer import load_tokenizer

    p = Path(path)
    if p.is_file():
        from leptonc.runtime.bare import open_bare

        return open_bare(p, tokenizer_dir, device)
    bundle = load_bundle(p, verify=verify)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else bundle.tokenizer_dir
    tokenizer = load_tokenizer(tok_dir)
    from leptonc.bundle import engine_load_errors

    with engine_load_errors(bundle.model_path):  # a corrupt engine is a bad bundle (exit 7), not a crash
        runner = open_bundle_runner(bundle, device)
    eos = tuple(bundle.manifest.get("model", {}).get("eos_token_ids") or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos = tuple(dict.fromkeys((*eos, tokenizer.eos_token_id)))
    return runner, tokenizer, eos, bundle


def run(
    bundle: str = typer.Argument(..., help="A .lepton bundle, or a bare model.onnx / engine.plan with --tokenizer."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text (repeat for a batch)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="One prompt per line."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling (same seed, same output)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
    chat: bool = typer.Option(False, "--chat", help="Apply the tokenizer's chat template."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer directory (for bare engines)."),
    device: Optional[str] = typer.Option(None, "--device", help="Override the device (cpu or cuda)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the bundle's sha256 and toolchain checks."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Generate text from a bundle, streaming tokens as they come."""
    from leptonc.runtime.generate import SamplingConfig, generate

    prompts = list(prompt)
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise InputError(f"--prompt-file {prompt_file} does not exist")
        prompts += [line for line in prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise InputError("no prompt: give --prompt TEXT or --prompt-file FILE")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, stop=tuple(stop), stop_at_eos=not ignore_eos)
    runner, tok, eos, _ = _open(bundle, tokenizer, not no_verify, device)
    prompt_ids = None
    if chat:
        if not getattr(tok, "chat_template", None):
            raise InputError("--chat: this tokenizer has no chat template; drop --chat")
        prompt_ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]) for p in prompts]
    stream = not as_json and len(prompts) == 1
    if stream:
        out.print(f"[dim]{prompts[0]}[/]", end="")

    def on_text(row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    from leptonc.bundle import engine_load_errors

    try:
        with engine_load_errors(Path(bundle)):  # a corrupt graph that loads but fails to run: exit 7, no traceback
            result = generate(runner, tok, prompts, cfg, eos_ids=eos, on_text=on_text if stream else None,
                              prompt_ids=prompt_ids)
    finally:
        runner.release()
    if as_json:
        emit_json({"outputs": [{"prompt": g.prompt, "text": g.text, "token_ids": g.token_ids,
                                 "finish_reason": g.finish_reason} for g in result.outputs],
                    "timings": result.timings})
        return
    if stream:
        sys.stdout.write("\n")
    else:
        for g in result.outputs:
            out.print(f"[dim]{g.prompt}[/]{g.text}")
            rule(out)
    t = result.timings
    rate = f", {t['decode_tokens_per_s']:.1f} tok/s decode" if t.get("decode_tokens_per_s") else ""
    err.print(f"[dim]{t['new_tokens']} tokens; first token {t['ttft_ms']:.0f} ms{rate}[/]")


# ---- bench --------------------------------------------------------------------------------------

def bench(
    bundle: str = typer.Argument(..., help="A .lepton bundle."),
    batch: str = typer.Option("1", "--batch", help="Comma-separated batch sizes, e.g. 1,16."),
    prompt_len: int = typer.Option(128, "--prompt-len", help="Prompt tokens."),
    gen_len: int = typer.Option(128, "--gen-len", help="Generated tokens."),
    warmup: int = typer.Option(2, "--warmup", help="Warm-up runs per batch size."),
    iters: int = typer.Option(5, "--iters", help="Timed runs per batch size."),
    device: Optional[str] = typer.Option(None, "--device", help="Override the device (cpu or cuda)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Also time the source model: 'hf' runs it "
                                           "in Hugging Face transformers (eager) on the same device."),
    bandwidth: float = typer.Option(3.0e12, "--bandwidth", help="Memory bandwidth (bytes/s) for the decode floor; "
                                    "default: the measured H100 copy bandwidth."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the bundle's sha256 and toolchain checks."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Measure time to first token, decode tokens/s, latency percentiles and peak memory."""
    from leptonc.runtime.bench import BenchConfig
    from leptonc.runtime.bench import bench as run_bench

    try:
        batches = tuple(int(b) for b in batch.split(",") if b.strip())
    except ValueError:
        raise InputError(f"--batch {batch!r}: give comma-separated integers, e.g. 1,16") from None
    cfg = BenchConfig(batches=batches, prompt_len=prompt_len, gen_len=gen_len, warmup=warmup, iters=iters)
    if baseline not in (None, "hf"):
        raise InputError(f"--baseline {baseline!r}: the only baseline is 'hf' (Hugging Face transformers, eager)")
    if bandwidth <= 0:
        raise InputError("--bandwidth must be positive (bytes per second, e.g. 3.0e12)")
    runner, _, _, b = _open(bundle, None, not no_verify, device)
    if baseline and b is None:
        raise InputError("--baseline hf needs a .lepton bundle (its manifest names the source model)")
    from contextlib import nullcontext

    status = nullcontext() if as_json else err.status("benchmarking…")
    with status as st:
        progress = (lambda s: st.update(s)) if st is not None else None
        from leptonc.bundle import engine_load_errors

        try:
            with engine_load_errors(Path(bundle)):  # a graph that loads but fails to run: exit 7
                result = run_bench(runner, cfg, on_progress=progress)
            runner_device = runner.device
            # one preallocated K/V block per batch size, each at the runner's capacity (shared layout only)
            capacity = getattr(runner, "capacity", None) if getattr(runner, "shared_kv", False) else None
        finally:
            runner.release()
        result["bundle"] = bundle
        if b is not None:
            from leptonc.runtime import bench as bench_mod

            result.update({"target": b.manifest["target"]["name"], "backend": b.backend,
                           "precision": b.manifest["precision"]})
            weights, kv_tok = bench_mod.bundle_weight_bytes(b), bench_mod.kv_bytes_per_token(b.io)
            kv_held = 0
            for r in result["results"]:
                r["memory_floor"] = bench_mod.memory_floor(r["batch"], weights, kv_tok,
                                                           prompt_len + gen_len / 2, bandwidth)
                if capacity and r["peak_gpu_mb"] is not None:
                    kv_held += r["batch"] * kv_tok * capacity
                    r["memory_bound"] = bench_mod.memory_bound(weights, kv_held, r["peak_gpu_mb"])
                if r["decode_tokens_per_s"]:
                    r["fraction_of_floor"] = round(r["decode_tokens_per_s"] / r["memory_floor"]["floor_tokens_per_s"], 3)
        if baseline == "hf":
            source = (b.manifest.get("config") or {}).get("source") or b.manifest["source"]["name"]
            dtype = "fp32" if runner_device == "cpu" or b.io["kv_dtype"] == "float32" else "fp16"
            result["baseline"] = bench_mod.hf_baseline(source, cfg, "cuda" if runner_device == "cuda" else "cpu",
                                                       dtype, b.io["vocab_size"], on_progress=progress)
            result["comparison"] = bench_mod.compare(result, result["baseline"])
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"{bundle} on {result['device']}")
    for col in ("batch", "prompt", "gen", "TTFT ms", "decode tok/s", "p50 ms", "p99 ms", "peak host MB", "peak GPU MB"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        table.add_row(str(r["batch"]), str(r["prompt_len"]), str(r["gen_len"]), f"{r['ttft_ms']:.1f}",
                      f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-", f"{r['p50_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['peak_host_mb']:.0f}",
                      f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] else "-")
    out.print(table)
    info = result.get("runner") or {}
    if info:  # how the bundle ran: cache layout, padding, CUDA graph (and why not)
        out.print(", ".join(f"{k}: {v}" for k, v in info.items() if k != "runner") or info.get("runner", ""))
    if result["results"] and "memory_floor" in result["results"][0]:
        floor = Table(title=f"decode vs the memory floor ({bandwidth:.2g} B/s)")
        for col in ("batch", "weight MB", "floor tok/s", "floor incl. KV", "decode tok/s", "of floor"):
            floor.add_column(col, justify="right")
        for r in result["results"]:
            f = r["memory_floor"]
            floor.add_row(str(r["batch"]), f"{f['weight_bytes'] / 1e6:.0f}", f"{f['floor_tokens_per_s']:.0f}",
                          f"{f['floor_with_kv_tokens_per_s']:.0f}",
                          f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-",
                          f"{r.get('fraction_of_floor', 0):.0%}")
        out.print(floor)
    bounds = [r for r in result["results"] if "memory_bound" in r]
    if bounds:  # issue 8 line 6: peak device memory against weights + K/V blocks held + 25%
        out.print("; ".join(f"batch {r['batch']}: peak GPU {r['peak_gpu_mb']:.0f} MB vs bound "
                            f"{r['memory_bound']['bound_mb']:.0f} MB (weights {r['memory_bound']['weights_mb']:.0f} + "
                            f"K/V held {r['memory_bound']['kv_held_mb']:.0f}, + 25%)" for r in bounds)
                  + " (peak includes the CUDA context)")
    if "comparison" in result:
        cmp = Table(title=f"bundle vs {result['baseline']['framework']} on {result['baseline']['device']}")
        for col in ("batch", "decode tok/s", "HF tok/s", "speedup", "TTFT ms", "HF TTFT ms", "TTFT speedup"):
            cmp.add_column(col, justify="right")
        for c in result["comparison"]:
            cmp.add_row(str(c["batch"]), f"{c['decode_tokens_per_s'] or 0:.1f}", f"{c['hf_decode_tokens_per_s'] or 0:.1f}",
                        f"{c['decode_speedup'] or 0:.2f}x", f"{c['ttft_ms']:.1f}", f"{c['hf_ttft_ms']:.1f}",
                        f"{c['ttft_speedup'] or 0:.2f}x")
        out.print(cmp)


# ---- eval ---------------------------------------------------------------------------------------

def eval_cmd(
    model: str = typer.Argument(..., help="A .lepton bundle, or a model source (evaluated in PyTorch)."),
    data: str = typer.Option(..., "--data", help="UTF-8 text file."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Evaluate the first N tokens."),
    window: int = typer.Option(1024, "--window", help="Tokens per window."),
    stride: int = typer.Option(512, "--stride", help="Window step; each window scores only new tokens."),
    offset_chars: int = typer.Option(0, "--offset-chars", help="Skip this many characters of the file first."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the bundle's sha256 and toolchain checks."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Perplexity over a text file with a sliding window."""
    from leptonc.runtime import evaluate as ev

    cfg = ev.EvalConfig(data=data, max_tokens=max_tokens, window=window, stride=stride, offset_chars=offset_chars)
    p = Path(model)
    if p.is_dir() and (p / "manifest.json").is_file():
        runner, tok, _, _ = _open(model, None, not no_verify)
        if window > runner.max_sequence:
            raise InputError(f"--window {window} exceeds this bundle's maximum sequence of {runner.max_sequence}")
        scorer, kind = ev.runner_scorer(runner), "bundle"
    else:
        from leptonc.models.intake import load_model

        with err.status(f"loading {model}…"):
            lm = load_model(model)
        tok, scorer, kind = lm.tokenizer, ev.torch_scorer(lm.module), "pytorch"
        runner = None
    ids = ev.load_tokens(tok, cfg)
    try:
        if as_json:
            result = ev.perplexity(scorer, ids, cfg)
        else:
            with err.status("evaluating…") as status:
                result = ev.perplexity(scorer, ids, cfg, on_progress=lambda i, n: status.update(f"window {i + 1}/{n}"))
    finally:
        if runner is not None:
            runner.release()
    result.update({"model": model, "evaluated": kind, "data": data})
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"perplexity of {model} ({kind})")
    for col in ("perplexity", "tokens", "window", "stride"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['perplexity']:.3f}", str(result["tokens"]), str(window), str(stride))
    out.print(table)


# ---- inspect ------------------------------------------------------------------------------------

def inspect(
    path: str = typer.Argument(..., help="A .lepton bundle or an .onnx model."),
    trt: bool = typer.Option(False, "--trt", help="Lint an ONNX model for TensorRT compatibility."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the bundle's sha256 checks."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Summarize a bundle (manifest, passes, verification) or an ONNX model."""
    from leptonc.inspect import inspect_path

    info = inspect_path(Path(path), verify=not no_verify, trt=trt)
    if as_json:
        emit_json(info)
        return
    out.print_json(data=info)
    if info.get("trt_lint", {}).get("issues"):
        raise typer.Exit(code=UnsupportedRequestError.exit_code)


# ---- package ------------------------------------------------------------------------------------

def package(
    bundle: str = typer.Argument(..., help="A .lepton bundle (onnxruntime or tensorrt backend)."),
    triton: Path = typer.Option(..., "--triton", help="Triton model repository folder to write the model into."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the repository (default: the bundle's)."),
    version: int = typer.Option(1, "--version", help="Model version folder."),
    instances: int = typer.Option(1, "--instances", help="Model instances (instance_group count)."),
    max_queue_delay_us: int = typer.Option(100, "--max-queue-delay-us", help="Dynamic batching queue delay."),
    force: bool = typer.Option(False, "--force", help="Replace a model of the same name in the repository."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the bundle's sha256 and toolchain checks."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Package a bundle as a Triton Inference Server model (config.pbtxt + version folder)."""
    from leptonc.package import TritonOptions, package_triton

    options = TritonOptions(name=name, version=version, instances=instances, max_queue_delay_us=max_queue_delay_us,
                            force=force)
    result = package_triton(bundle, triton, options, verify=not no_verify)
    if as_json:
        emit_json(result)
        return
    out.print(f"[green]✓[/] packaged {bundle} as Triton model [bold]{result['model']}[/] "
              f"({result['platform']}) in {result['model_dir']}")
    for f in result["files"]:
        out.print(f"  {f}")
    out.print(f"serve it with: [bold]{result['serve']}[/]")
