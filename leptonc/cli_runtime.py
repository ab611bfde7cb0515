"""The commands that use a bundle: `run`, `bench`, `eval`, `inspect` and `package`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from leptonc.console import emit_json, err, out, plain, rule, text
from leptonc.errors import InputError, UnsupportedRequestError


ENGINE_OPTION_HELP = ("Override one of the bundle's run-time engine settings for this run, KEY=VALUE (repeatable; "
                      "e.g. prefill_tokens=512; the names: leptonc/runtime/engine_settings.py).")


def _open(path: str, tokenizer_dir: Optional[str], verify: bool, device: Optional[str] = None,
          engine_options: Optional[list[str]] = None):
    """(runner, tokenizer, eos ids, bundle or None) for a bundle directory or a bare model file."""
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.engine_settings import parse_engine_options
    from leptonc.runtime.tokenizer import eos_ids, load_tokenizer

    overrides = parse_engine_options(engine_options)
    p = Path(path)
    if p.is_file() and overrides:
        raise InputError("--engine-option needs a .lepton bundle (a bare model file has no engine settings)")
    if p.is_file():
        from leptonc.runtime.bare import open_bare

        return open_bare(p, tokenizer_dir, device)
    bundle = load_bundle(p, verify=verify)
    if device == "cuda" and bundle.manifest["target"]["name"] == "cpu":
        _check_cuda_provider()
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else bundle.tokenizer_dir
    tokenizer = load_tokenizer(tok_dir)
    from leptonc.bundle import engine_load_errors

    with engine_load_errors(bundle.model_path):  # a corrupt engine is a bad bundle (exit 7), not a crash
        runner = open_bundle_runner(bundle, device, overrides)
    return runner, tokenizer, eos_ids(tokenizer, bundle.manifest), bundle


def _check_cuda_provider() -> None:
    """`--device cuda` on a bundle compiled for the cpu target: say what is missing, not "compile for cpu"."""
    from leptonc.errors import BackendUnavailableError

    try:
        import onnxruntime as ort
    except ImportError:
        providers = []
    else:
        providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise BackendUnavailableError("--device cuda needs ONNX Runtime's CUDA provider, which this onnxruntime "
                                      "build lacks", hint="drop --device cuda (this bundle was compiled for the cpu "
                                      "target and runs there), or install onnxruntime-gpu on a machine with an "
                                      "NVIDIA GPU")


def _device_choice(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in DEVICES:
        raise typer.BadParameter(f"{value!r} is not a device; choose {' or '.join(DEVICES)}")
    return value


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in value.split(",") if b.strip())
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give comma-separated integers, e.g. 1,16") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"{value!r}: batch sizes are integers >= 1, e.g. 1,16")
    return sizes


def _probability_mass(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"{value} is not in (0, 1]")
    return value


DEVICES = ("cpu", "cuda")
SKIP_CHECKS_HELP = "Skip the bundle checks (file hashes, toolchain, and the GPU first-load check)."


def run(
    bundle: str = typer.Argument(..., help="A .lepton bundle, or a bare model.onnx / engine.plan with --tokenizer."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text (repeat for a batch)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="One prompt per line."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample from the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", callback=_probability_mass, metavar="(0,1]",
                                help="Nucleus sampling mass (1: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling (same seed, same output)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
    chat: bool = typer.Option(False, "--chat", help="Apply the tokenizer's chat template."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer directory (for bare engines)."),
    device: Optional[str] = typer.Option(None, "--device", callback=_device_choice, metavar="cpu|cuda",
                                         help="Override the device."),
    engine_option: list[str] = typer.Option([], "--engine-option", metavar="KEY=VALUE", help=ENGINE_OPTION_HELP),
    no_verify: bool = typer.Option(False, "--no-verify", help=SKIP_CHECKS_HELP),
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
    if any(not p.strip() for p in prompts):
        raise InputError("a prompt is empty or only whitespace: give some text to continue")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, stop=tuple(stop), stop_at_eos=not ignore_eos)
    runner, tok, eos, _ = _open(bundle, tokenizer, not no_verify, device, engine_option)
    prompt_ids = None
    if chat:
        if not getattr(tok, "chat_template", None):
            raise InputError("--chat: this tokenizer has no chat template; drop --chat")
        prompt_ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]) for p in prompts]
    stream = not as_json and len(prompts) == 1
    # the prompt is echoed once the request was accepted (its first generated text), never before its checks;
    # a chat answer starts on its own line
    between = "\n" if chat else ""
    echoed = []

    def echo_prompt() -> None:
        if not echoed:
            echoed.append(True)
            plain(out, prompts[0] + between, style="dim", end="")

    def on_text(row: int, new_text: str) -> None:
        echo_prompt()
        sys.stdout.write(new_text)
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
        echo_prompt()  # nothing was generated (end of sequence at once): the prompt alone
        sys.stdout.write("\n")
    else:
        for g in result.outputs:
            out.print(f"[dim]{text(g.prompt)}[/]{between}{text(g.text)}", highlight=False)
            rule(out)
    t = result.timings
    rate = f", {t['decode_tokens_per_s']:.1f} tok/s decode" if t.get("decode_tokens_per_s") else ""
    err.print(f"[dim]{t['new_tokens']} tokens; first token {t['ttft_ms']:.0f} ms{rate}[/]")


# ---- bench --------------------------------------------------------------------------------------

def bench(
    bundle: str = typer.Argument(..., help="A .lepton bundle."),
    batch: str = typer.Option("1", "--batch", callback=_batch_sizes, metavar="N[,N...]",
                              help="Comma-separated batch sizes, e.g. 1,16."),
    prompt_len: int = typer.Option(128, "--prompt-len", min=1, help="Prompt tokens."),
    gen_len: int = typer.Option(128, "--gen-len", min=1, help="Generated tokens."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Warm-up runs per batch size."),
    iters: int = typer.Option(5, "--iters", min=1, help="Timed runs per batch size."),
    device: Optional[str] = typer.Option(None, "--device", callback=_device_choice, metavar="cpu|cuda",
                                         help="Override the device."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Also time the source model: 'hf' runs it "
                                           "in Hugging Face transformers (eager) on the same device."),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", min=1.0, help="Memory bandwidth (bytes/s) for "
                                              "the decode floor. Default: the measured figure of the GPU the bench "
                                              "runs on (H100: 3.0e12); no floor on the CPU or an unmeasured GPU."),
    engine_option: list[str] = typer.Option([], "--engine-option", metavar="KEY=VALUE", help=ENGINE_OPTION_HELP),
    no_verify: bool = typer.Option(False, "--no-verify", help=SKIP_CHECKS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Measure time to first token, decode tokens/s, latency percentiles and peak memory."""
    from leptonc.runtime.bench import BenchConfig
    from leptonc.runtime.bench import bench as run_bench

    cfg = BenchConfig(batches=batch, prompt_len=prompt_len, gen_len=gen_len, warmup=warmup, iters=iters)
    if baseline not in (None, "hf"):
        raise typer.BadParameter(f"{baseline!r}: the only baseline is 'hf' (Hugging Face transformers, eager)",
                                 param_hint="'--baseline'")
    runner, _, _, b = _open(bundle, None, not no_verify, device, engine_option)
    if baseline and b is None:
        raise InputError("--baseline hf needs a .lepton bundle (its manifest names the source model)")
    from leptonc.progress import status

    with status(err, "bench", enabled=not as_json) as progress:
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
        from leptonc.runtime import bench as bench_mod

        if b is not None:
            result.update({"target": b.manifest["target"]["name"], "backend": b.backend,
                           "precision": b.manifest["precision"]})
            bench_mod.add_memory_figures(result, b, mean_context=prompt_len + gen_len / 2, kv_capacity=capacity,
                                         bandwidth=bandwidth)
        if baseline == "hf":
            source = (b.manifest.get("config") or {}).get("source") or b.manifest["source"]["name"]
            dtype = "fp32" if runner_device == "cpu" or b.io["kv_dtype"] == "float32" else "fp16"
            result["baseline"] = bench_mod.hf_baseline(source, cfg, "cuda" if runner_device == "cuda" else "cpu",
                                                       dtype, b.io["vocab_size"], on_progress=progress)
            result["comparison"] = bench_mod.compare(result, result["baseline"])
    if as_json:
        emit_json(result)
        return
    _print_bench(result)


def _print_bench(result: dict) -> None:
    table = Table(title=f"{text(result['bundle'])} on {text(result['device'])}")
    for col in ("batch", "prompt", "gen", "TTFT ms", "decode tok/s", "p50 ms", "p99 ms", "peak host MB", "peak GPU MB"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        table.add_row(str(r["batch"]), str(r["prompt_len"]), str(r["gen_len"]), f"{r['ttft_ms']:.1f}",
                      f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-", f"{r['p50_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['peak_host_mb']:.0f}",
                      f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] else "-")
    out.print(table)
    info = {k: v for k, v in (result.get("runner") or {}).items() if k != "runner"}
    if info:  # how the bundle ran: cache layout, padding, CUDA graph (and why not), one setting a line
        ran = Table(title="how it ran", show_header=False, box=None, title_justify="left")
        ran.add_column(style="bold")
        ran.add_column()
        for key, value in info.items():
            ran.add_row(text(key), text(value))
        out.print(ran)
    bandwidth = result.get("floor_bandwidth_bytes_per_s")
    if bandwidth and result["results"] and "memory_floor" in result["results"][0]:
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
    if bounds:  # peak device memory against weights + K/V blocks held + 25%
        out.print("; ".join(f"batch {r['batch']}: peak GPU {r['peak_gpu_mb']:.0f} MB vs bound "
                            f"{r['memory_bound']['bound_mb']:.0f} MB (weights {r['memory_bound']['weights_mb']:.0f} + "
                            f"K/V held {r['memory_bound']['kv_held_mb']:.0f}, + 25%)" for r in bounds)
                  + " (peak includes the CUDA context)")
    if "comparison" in result:
        cmp = Table(title=f"bundle vs {result['baseline']['framework']} on {text(result['baseline']['device'])}")
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
    engine_option: list[str] = typer.Option([], "--engine-option", metavar="KEY=VALUE", help=ENGINE_OPTION_HELP),
    no_verify: bool = typer.Option(False, "--no-verify", help=SKIP_CHECKS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Perplexity over a text file with a sliding window."""
    from leptonc.progress import status
    from leptonc.runtime import evaluate as ev

    cfg = ev.EvalConfig(data=data, max_tokens=max_tokens, window=window, stride=stride, offset_chars=offset_chars)
    p = Path(model)
    if p.suffix == ".lepton" or (p.is_dir() and (p / "manifest.json").is_file()):  # a bundle, or one named as such
        runner, tok, _, _ = _open(model, None, not no_verify, engine_options=engine_option)
        if window > runner.max_sequence:
            raise InputError(f"--window {window} exceeds this bundle's maximum sequence of {runner.max_sequence}")
        scorer, kind = ev.runner_scorer(runner), "bundle"
    else:
        from leptonc.models.intake import load_model

        with status(err, f"loading {model}"):
            lm = load_model(model)
        tok, scorer, kind = lm.tokenizer, ev.torch_scorer(lm.module), "pytorch"
        runner = None
    ids = ev.load_tokens(tok, cfg)
    try:
        with status(err, "eval", enabled=not as_json) as progress:
            on_window = (lambda i, n: progress(f"window {i + 1}/{n}")) if progress else None
            result = ev.perplexity(scorer, ids, cfg, on_progress=on_window)
    finally:
        if runner is not None:
            runner.release()
    result.update({"model": model, "evaluated": kind, "data": data})
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"perplexity of {text(model)} ({kind})")
    for col in ("perplexity", "tokens", "window", "stride"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['perplexity']:.3f}", str(result["tokens"]), str(window), str(stride))
    out.print(table)


# ---- inspect ------------------------------------------------------------------------------------

def inspect(
    path: str = typer.Argument(..., help="A .lepton bundle or an .onnx model."),
    trt: bool = typer.Option(False, "--trt", help="Lint an ONNX model for TensorRT compatibility."),
    no_verify: bool = typer.Option(False, "--no-verify", help=SKIP_CHECKS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Summarize a bundle (manifest, passes, verification) or an ONNX model."""
    from leptonc.inspect import inspect_path

    info = inspect_path(Path(path), verify=not no_verify, trt=trt)
    if as_json:
        emit_json(info)
        return
    _print_inspection(info)
    if info.get("trt_lint", {}).get("issues"):
        raise typer.Exit(code=UnsupportedRequestError.exit_code)


def _print_inspection(info: dict) -> None:
    """`inspect` as a table of what a reader looks for first; `--json` has everything."""
    table = Table(title=text(info["path"]), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    if "backend" in info:  # a bundle (an ONNX model has no backend)
        src = info.get("source") or {}
        random = " [RANDOM weights]" if src.get("random_weights") else ""
        table.add_row("source", text(f"{src.get('name')} ({src.get('architecture')}){random}"))
        table.add_row("target", text(f"{info['target']} / {info['backend']} / {info['precision']} "
                                     f"({info.get('precision_mode')})"))
        table.add_row("limits", ", ".join(f"{k} {v}" for k, v in info["limits"].items()))
        table.add_row("files", f"{len(info['files'])} files, {sum(info['files'].values()) / 1e6:.1f} MB"
                               + ("" if info.get("verified_files") else " (hashes not checked: --no-verify)"))
        v = info.get("verification") or {}
        table.add_row("verify", text(v.get("status", "skipped")
                                     + (f": max |logits err| {v['max_abs_error']:.2e}" if "max_abs_error" in v else "")))
        passes = info.get("passes") or []
        applied = [p["name"] for p in passes if isinstance(p, dict) and p.get("status") == "applied"]
        table.add_row("passes", text(f"{len(applied)} applied: {', '.join(applied)}" if applied else "none applied"))
        if info.get("graph"):
            table.add_row("graph", f"{info['graph'].get('nodes', '?')} nodes")
        table.add_row("toolchain", text(", ".join(f"{k} {v}" for k, v in (info.get("toolchain") or {}).items())))
        table.add_row("built", text(f"leptonc {info.get('leptonc_version')}, {info.get('created')}"))
    else:  # an ONNX model
        table.add_row("model", text(f"IR {info['ir_version']}, opsets "
                                    + ", ".join(f"{k} {v}" for k, v in info["opsets"].items())
                                    + f", producer {info['producer'] or '-'}"))
        table.add_row("graph", f"{info['nodes']} nodes, {info['initializers']} initializers")
        for key in ("inputs", "outputs"):
            table.add_row(key, text(", ".join(f"{v['name']} {v['dtype']}{v['shape']}" for v in info[key])))
        top = sorted(info["op_counts"].items(), key=lambda kv: -kv[1])
        table.add_row("ops", text(", ".join(f"{op} {n}" for op, n in top)))
        lint = info.get("trt_lint")
        if lint is not None:
            issues = lint.get("issues") or []
            # each finding leads with its node's name: what the user searches for in the graph
            table.add_row("TensorRT lint", text("no issues" if not issues else
                                                "\n".join(f"{i.get('node', '?')}: {i.get('message', '')}"
                                                          if isinstance(i, dict) else str(i) for i in issues)))
    out.print(table)


# ---- package ------------------------------------------------------------------------------------

def package(
    bundle: str = typer.Argument(..., help="A .lepton bundle (onnxruntime; tensorrt too with --triton-raw-decoder)."),
    triton: Path = typer.Option(..., "--triton", help="Triton model repository folder to write the model into."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the repository (default: the bundle's)."),
    version: int = typer.Option(1, "--version", help="Model version folder."),
    instance_group: Optional[list[str]] = typer.Option(
        None, "--instance-group", help="cpu, cpu:N, gpu (one per GPU) or gpu:0,1 (one per listed GPU); repeatable. "
        "Default: the bundle's device."),
    instances: int = typer.Option(1, "--instances", help="Instances of the default group."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests each engine queues beyond its slots."),
    raw_decoder: bool = typer.Option(False, "--triton-raw-decoder", help="Package the raw decoder (token ids and "
                                     "every KV tensor in and out; the client runs the loop) instead of leptonc's "
                                     "engine in Triton's Python backend."),
    max_queue_delay_us: int = typer.Option(100, "--max-queue-delay-us", help="Raw decoder: dynamic batching delay."),
    force: bool = typer.Option(False, "--force", help="Replace a model of the same name in the repository."),
    no_verify: bool = typer.Option(False, "--no-verify", help=SKIP_CHECKS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Package a bundle as a Triton Inference Server model: leptonc's batching engine in Triton's Python
    backend (decoupled, text in, text streamed out), or with --triton-raw-decoder the decoder alone."""
    from leptonc.triton_repository import InstanceGroup, TritonOptions, package_triton

    groups = tuple(InstanceGroup.parse(g) for g in instance_group or ())
    options = TritonOptions(name=name, version=version, raw_decoder=raw_decoder, instance_groups=groups,
                            instances=instances, max_queue=max_queue, max_queue_delay_us=max_queue_delay_us,
                            force=force)
    result = package_triton(bundle, triton, options, verify=not no_verify)
    if as_json:
        emit_json(result)
        return
    out.print(f"[green]✓[/] packaged {text(bundle)} as Triton model [bold]{text(result['model'])}[/] "
              f"({result['platform']}) in {text(result['model_dir'])}")
    for f in result["files"]:
        plain(out, f"  {f}")
    out.print(f"serve it with: [bold]{text(result['serve'])}[/]")


def verify(
    bundle: Path = typer.Argument(..., help="A GPU bundle (NAME.lepton), e.g. one cross-compiled on a CPU-only machine."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Run a bundle's pending GPU checks on this GPU and record the result beside it (exit 6 if one fails)."""
    from leptonc import gpu_check

    result = gpu_check.verify_bundle(bundle)
    if as_json:
        emit_json(result)
        return
    if result["result"] is None:
        out.print(f"{text(str(bundle))}: no pending GPU checks (verified when it was compiled)")
        return
    r = result["result"]
    out.print(f"{text(str(bundle))}: {r['check']} {r['status']} on {text(gpu_check.gpu_name())}: top-1 agreement "
              f"{r.get('top1_agreement')} ({text(r.get('rule', ''))}); recorded in {text(r.get('recorded_in', ''))}")
