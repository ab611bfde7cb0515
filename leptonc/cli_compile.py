"""`leptonc compile`: flags -> a frozen CompileConfig (or a build matrix) -> the compiler -> a report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from leptonc.console import emit_json, err, out, plain, rule, text
from leptonc.errors import UnsupportedRequestError


def _precision_from_flags(precision: Optional[str], flags: dict[str, bool]) -> Optional[str]:
    chosen = [name for name, on in flags.items() if on]
    if len(chosen) > 1:
        raise UnsupportedRequestError(f"choose one precision flag, not {' and '.join('--' + c for c in chosen)}")
    if chosen and precision and precision != chosen[0]:
        raise UnsupportedRequestError(f"--precision {precision} conflicts with --{chosen[0]}")
    return chosen[0] if chosen else precision


def compile_cmd(
    ctx: typer.Context,
    source: Optional[str] = typer.Argument(None, help="Hugging Face model directory, .gguf file, or built-in name "
                                                      "(tiny-llama, smollm2-135m, gemma-3-270m, llama-1b-shape, llama-8b-shape). "
                                                      "Omit with --config."),
    target: str = typer.Option("cpu", "--target", "-t", help="Hardware target (see `leptonc targets`)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Bundle path (default NAME.TARGET.lepton)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="onnxruntime or tensorrt (default: the target's)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16, bf16, int8, fp8, int4."),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 weights and activations."),
    bf16: bool = typer.Option(False, "--bf16", help="BF16 weights and activations."),
    int8: bool = typer.Option(False, "--int8", help="INT8 quantization."),
    fp8: bool = typer.Option(False, "--fp8", help="FP8 (E4M3) quantization; the LM head and tied embedding stay "
                                                  "in higher precision unless --fp8-lm-head."),
    int4: bool = typer.Option(False, "--int4", help="INT4 weight-only quantization."),
    max_batch: int = typer.Option(16, "--max-batch", help="Largest batch the bundle accepts."),
    max_seq: int = typer.Option(2048, "--max-seq", help="Longest sequence (prompt + generated) the bundle accepts."),
    no_passes: bool = typer.Option(False, "--no-passes", help="Compile the plain export (baseline)."),
    disable_pass: list[str] = typer.Option([], "--disable-pass", help="Drop one pass (repeatable)."),
    no_parity: bool = typer.Option(False, "--no-parity", help="Skip the check against PyTorch."),
    max_parity_error: float = typer.Option(1e-3, "--max-parity-error", help="fp32 max |logits error| allowed."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pytorch_model.bin (pickle) weights."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model's own Python code."),
    force: bool = typer.Option(False, "--force", help="Replace a non-bundle at the output path."),
    opt_batch: Optional[int] = typer.Option(None, "--opt-batch", help="TensorRT: batch the profiles are tuned for "
                                                                      "(default 1)."),
    opt_seq: Optional[int] = typer.Option(None, "--opt-seq", help="TensorRT: prompt length the profiles are tuned for "
                                                                  "(default 128)."),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", help="2:4: two of every four linear weights kept; TensorRT "
                                                                    "runs them on sparse tensor cores (sm80+), ONNX "
                                                                    "Runtime simulates them (zeros)."),
    timing_cache: Optional[str] = typer.Option(None, "--timing-cache", help="TensorRT: timing cache file, loaded "
                                                                            "and updated."),
    hardware_compat: Optional[str] = typer.Option(None, "--hardware-compat", help="TensorRT: ampere+ or same-cc."),
    version_compatible: bool = typer.Option(False, "--version-compatible", help="TensorRT: engine loads in later "
                                                                                "TensorRT versions (lean runtime)."),
    builder_opt_level: Optional[int] = typer.Option(None, "--builder-opt-level", help="TensorRT: builder "
                                                                                      "optimization level 0..5."),
    # leptonc's CUDA kernels (GPU targets, --backend onnxruntime): CompileConfig.kernels
    no_cuda_kernels: bool = typer.Option(False, "--no-cuda-kernels", help="GPU, onnxruntime: keep ONNX Runtime's "
                                                                          "kernels (no leptonc CUDA kernel library)."),
    no_attention_kernel: bool = typer.Option(False, "--no-attention-kernel", help="GPU, onnxruntime: keep ONNX "
                                                                                  "Runtime's GroupQueryAttention."),
    no_norm_prologue: bool = typer.Option(False, "--no-norm-prologue", help="GPU, onnxruntime: keep the skip-norm "
                                                                            "apart from the fp16 product after it."),
    no_norm_prologue_nbits: bool = typer.Option(False, "--no-norm-prologue-nbits", help="GPU, onnxruntime: keep the "
                                                                                        "skip-norm apart from the "
                                                                                        "int4/int8 product after it."),
    # quantization: CompileConfig.quantization (leptonc.calibration.quantize.QuantSettings)
    int8_mode: Optional[str] = typer.Option(None, "--int8-mode", help="--int8: w8a8 (SmoothQuant, default) or weight-only."),
    activations: Optional[str] = typer.Option(None, "--activations", help="--int8 W8A8 and --fp8 "
                                                   "activation scales: dynamic (per token; the CPU default) or "
                                                   "static (per tensor from calibration; GPU targets). "
                                                   "--int8-mode weight-only: fp32 keeps them unrounded on the "
                                                   "CPU (slower than fp32 there)."),
    smoothquant_alpha: Optional[float] = typer.Option(None, "--smoothquant-alpha", help="SmoothQuant migration strength: --int8 W8A8 "
                                                                                  "(default: searched per layer group); "
                                                                                  "--fp8 (default 0.5)."),
    int8_block: Optional[int] = typer.Option(None, "--int8-block", help="--int8 MatMulNBits block size: 16, 32 (the "
                                                                        "CPU's default), 64 (elsewhere) or 128."),
    int4_block: Optional[int] = typer.Option(None, "--int4-block", help="--int4 block size: 32, 64 (default) or 128."),
    int4_method: Optional[str] = typer.Option(None, "--int4-method", help="--int4 scales: awq (default) or rtn."),
    int4_rounding: Optional[str] = typer.Option(None, "--int4-rounding", help="--int4 awq codes: gptq (default; "
                                                                              "error-compensated, on AWQ's grid) or "
                                                                              "nearest."),
    fp8_rounding: Optional[str] = typer.Option(None, "--fp8-rounding", help="--fp8 weight codes: gptq (default; "
                                                                            "error-compensated, a scale per row) or "
                                                                            "nearest."),
    gptq_samples: Optional[int] = typer.Option(None, "--gptq-samples", help="GPTQ: calibration sequences whose every "
                                                                            "token enters the Hessian (default 128, "
                                                                            "capped by the text)."),
    gptq_act_order: Optional[bool] = typer.Option(None, "--gptq-act-order/--gptq-natural-order",
                                                  help="GPTQ: round columns in order of decreasing input energy "
                                                       "(default) or in their natural order."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="KV cache precision fp8|int8 (where the backend supports it)."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration text file (default: the shipped text of prose, docs and code)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration sequences (default 16)."),
    calib_seq_len: Optional[int] = typer.Option(None, "--calib-seq-len", help="Tokens per calibration sequence (default 256)."),
    calib_method: Optional[str] = typer.Option(None, "--calib-method", help="Activation ranges: minmax (default), percentile, entropy (int8 only in practice: they clip outliers that fp8 keeps)."),
    keep_fp: list[str] = typer.Option([], "--keep-fp", help="Keep matching layers in fp32 (repeatable; e.g. lm_head, 'layers.0.*')."),
    int4_8bit: list[str] = typer.Option([], "--int4-8bit", help="--int4: quantize matching layers to 8 bits instead (repeatable)."),
    int4_bits_budget: Optional[float] = typer.Option(None, "--int4-bits-budget", help="--int4: effective bits per "
                                                     "weight the most sensitive layers may raise the model to by "
                                                     "going 8-bit (default 4.5; 0: none)."),
    fp8_lm_head: bool = typer.Option(False, "--fp8-lm-head", help="--fp8: also quantize the LM head and the embedding "
                                                                   "tied to it (by default they stay in higher precision, "
                                                                   "as in NVIDIA ModelOpt's FP8 recipe)."),
    max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase", help="Accuracy gate: allowed perplexity increase in percent (default: int4 15, int8 and fp8 5)."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the accuracy gate (the report says it was skipped)."),
    check_tokens: Optional[int] = typer.Option(None, "--check-tokens", help="Held-out tokens the accuracy gate scores (default 2048)."),
    # pruning: CompileConfig.pruning (leptonc.config.PruningOptions)
    prune: Optional[float] = typer.Option(None, "--prune", help="Remove this ratio of each layer's MLP channels "
                                                                "(e.g. 0.25), least important first (calibration)."),
    prune_heads: Optional[int] = typer.Option(None, "--prune-heads", help="Remove N key/value head groups (with "
                                                                          "their query heads) from every layer."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (pipeline, backend config); build nothing."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Build matrix (leptonc.toml): one bundle per "
                                                                     "entry, one summary. Exit 0 if all built, else "
                                                                     "the first failed entry's code; 2 bad file."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="With --config: stop at the first failed entry."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for CI."),
) -> None:
    """Compile a model into a deployable bundle for one target (or a build matrix with --config)."""
    from leptonc.config import CompileConfig

    if config_file is not None:
        _compile_matrix(ctx, source, config_file, force, fail_fast, dry_run, as_json)
        return
    if source is None:
        raise UnsupportedRequestError("compile: give a model SOURCE, or --config leptonc.toml for a build matrix")
    if fail_fast:
        raise UnsupportedRequestError("--fail-fast only applies to --config build matrices; drop it")
    chosen = _precision_from_flags(precision, {"fp16": fp16, "bf16": bf16, "int8": int8, "fp8": fp8, "int4": int4})
    config = CompileConfig(
        source=source, target=target, output=output, backend=backend, precision=chosen, max_batch=max_batch,
        max_sequence=max_seq, passes=not no_passes, disabled_passes=tuple(disable_pass), verify=not no_parity,
        max_parity_error=max_parity_error, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        force=force,
    )
    trt_sparsity = sparsity if config.backend == "tensorrt" else None  # elsewhere 2:4 is pruning's (simulated)
    config = _tensorrt_options(config, {"opt_batch": opt_batch, "opt_seq": opt_seq, "sparsity": trt_sparsity,
                                        "timing_cache": timing_cache, "hardware_compat": hardware_compat,
                                        "version_compatible": version_compatible or None,
                                        "builder_opt_level": builder_opt_level}, dry_run)
    config = _quant_options(config, {"int8_mode": int8_mode, "activations": activations,
                                     "smoothquant_alpha": smoothquant_alpha, "int4_bits_budget": int4_bits_budget,
                                     "int8_block": int8_block, "int4_block": int4_block,
                                     "int4_method": int4_method, "int4_rounding": int4_rounding,
                                     "fp8_rounding": fp8_rounding, "gptq_samples": gptq_samples,
                                     "gptq_act_order": gptq_act_order,
                                     "kv_cache": kv_cache,
                                     "calib_data": calib_data, "calib_samples": calib_samples,
                                     "calib_seq_len": calib_seq_len, "calib_method": calib_method,
                                     "keep_fp": list(keep_fp) or None, "int4_8bit": list(int4_8bit) or None,
                                     "fp8_lm_head": fp8_lm_head or None,
                                     "max_ppl_increase": max_ppl_increase,
                                     "check": False if no_check else None, "check_tokens": check_tokens})
    config = _prune_options(config, {"mlp_ratio": prune, "kv_heads": prune_heads, "sparsity": sparsity,
                                     "calib_data": calib_data})
    kernels = {"cuda_kernels": no_cuda_kernels, "attention_kernel": no_attention_kernel,
               "norm_prologue": no_norm_prologue, "norm_prologue_nbits": no_norm_prologue_nbits}
    if any(kernels.values()):
        config = config.with_(kernels={k: not off for k, off in kernels.items()})
    from leptonc import compiler

    if dry_run:
        plan = compiler.plan(config)
        if as_json:
            emit_json(plan)
        else:
            _print_plan(plan)
            if _gate_line(config):
                out.print(f"[bold]accuracy gate[/] {_gate_line(config)}")
        return
    from leptonc.progress import Steps

    if config.precision_mode == "simulated":
        err.print(f"[yellow]note:[/] {config.precision} is simulated on {config.target} (accuracy only, not speed)")
    if _gate_line(config) and not as_json:
        err.print(f"[yellow]note:[/] accuracy gate: {_gate_line(config)}")
    steps = Steps(console=err, enabled=not as_json)
    bundle = compiler.compile_model(config, steps)
    report = bundle.report()
    if as_json:
        emit_json({"bundle": str(bundle.path), "manifest": bundle.manifest, "report": report})
        return
    _print_compile_report(bundle, report)


_MATRIX_FLAGS_OK = {"ctx", "source", "config_file", "force", "fail_fast", "dry_run", "as_json"}


def _compile_matrix(ctx: typer.Context, source: Optional[str], config_file: Path, force: bool, fail_fast: bool,
                    dry_run: bool, as_json: bool) -> None:
    """`compile --config`: validate every entry, build them in order, print one summary."""
    from leptonc import matrix

    if source is not None:
        raise UnsupportedRequestError("give a model SOURCE or --config, not both (add the model to the matrix file)")
    given = [p.opts[0] for p in ctx.command.params if p.name not in _MATRIX_FLAGS_OK
             and ctx.get_parameter_source(p.name) is not None
             and ctx.get_parameter_source(p.name).name == "COMMANDLINE"]
    if given:
        raise UnsupportedRequestError(f"{', '.join(given)} cannot be combined with --config; set it in {config_file} "
                                      "(in [defaults] or per [[build]] entry)")
    entries = matrix.load_matrix(config_file, force=force)
    if dry_run:
        from leptonc import compiler

        plans = [{"entry": e.index, "output": e.config.output, "plan": compiler.plan(e.config)} for e in entries]
        if as_json:
            emit_json({"config": str(config_file), "entries": plans})
        else:
            for p in plans:
                rule(out, f"#{p['entry']} -> {text(p['output'])}")
                _print_plan(p["plan"])
        return
    from leptonc.progress import Steps

    def start(entry) -> None:
        if not as_json:
            rule(err, text(f"[{entry.index}/{len(entries)}] {entry.label}"))

    summary = matrix.run_matrix(entries, fail_fast=fail_fast, on_start=start,
                                steps_factory=lambda: Steps(console=err, enabled=not as_json))
    summary["config"] = str(config_file)
    if as_json:
        emit_json(summary)
    else:
        table = Table(title=f"build matrix {config_file}: {summary['built']} built, {summary['failed']} failed"
                            + (f", {summary['not_run']} not run" if summary["not_run"] else ""))
        for col in ("#", "build", "bundle", "status", "exit", "time s", "detail"):
            table.add_column(col)
        for r in summary["entries"]:
            v = r.get("verification") or {}
            detail = r["error"] or (f"verify {v.get('status')}" if v else "")
            table.add_row(str(r["index"]), r["label"], r["output"],
                          {"built": "[green]built[/]", "failed": "[red]failed[/]"}.get(r["status"], r["status"]),
                          str(r["exit_code"]), f"{r['seconds']:.1f}", detail)
        out.print(table)
    if summary["exit_code"]:
        raise typer.Exit(code=summary["exit_code"])


def _quant_options(config, given: dict):
    """The quantization flags as `config.quantization`; refused without a quantized precision."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return config
    if config.precision not in ("int8", "fp8", "int4"):
        flags = ", ".join("--no-check" if k == "check" else f"--{k.replace('_', '-')}" for k in given)
        verb = "applies" if len(given) == 1 else "apply"
        raise UnsupportedRequestError(f"{flags} only {verb} to a quantized compile (--int8, --fp8 or --int4); "
                                      f"this one is {config.precision}")
    config = config.with_(quantization=given)  # validated by QuantSettings and CompileConfig, naming the flag
    if config.quantization.caution:
        err.print(f"[yellow]note:[/] {config.quantization.caution}")
    return config


def _prune_options(config, given: dict):
    """The pruning flags as `config.pruning` (validated by PruningOptions, naming the flag)."""
    given = {k: v for k, v in given.items() if v is not None}
    if not set(given) - {"calib_data"}:
        return config
    return config.with_(pruning=given)


def _tensorrt_options(config, given: dict, dry_run: bool):
    """The TensorRT flags as `config.tensorrt` (CompileConfig refuses them on another backend), and
    TensorRT's preflight (library, build GPU) before a build."""
    given = {k: v for k, v in given.items() if v is not None}
    if given:
        config = config.with_(tensorrt=given)
    if config.backend == "tensorrt" and not dry_run:
        from leptonc.targets.backends.tensorrt import preflight

        preflight(config)
    return config


def _gate_line(config) -> str:
    """The accuracy gate a quantized compile will apply, said before the work starts ("" when none)."""
    if config.precision not in ("int8", "fp8", "int4"):
        return ""
    settings = config.quantization
    if not settings.check:
        return "skipped (--no-check)"
    text = "the user's --check-data text" if settings.check_data else \
        "held-out text (leptonc/data/eval_python_docs.txt: never calibrated or tuned on)"
    return (f"perplexity increase <= {settings.max_ppl_increase:g}% on {text}, or exit 6 with the failed "
            "report kept beside the output (--max-ppl-increase sets it)")


def _print_plan(plan: dict) -> None:
    sm = plan["target"]["sm"]
    out.print(f"[bold]source[/]    {text(plan['source']['ref'])} ({plan['source']['kind']})")
    out.print(f"[bold]target[/]    {plan['target']['name']}{f' ({sm})' if sm and sm != '-' else ''}, "
              f"backend {plan['backend']}")
    out.print(f"[bold]precision[/] {plan['precision']} ({plan['precision_mode']}), export dtype {plan['export_dtype']}")
    out.print(f"[bold]pipeline[/]  {' -> '.join(plan['pipeline']) or '(none: plain export)'}")
    for key, value in plan.items():
        if key not in ("config", "source", "target", "backend", "precision", "precision_mode", "export_dtype",
                       "pipeline", "disabled_passes"):
            out.print(f"[bold]{text(key)}[/]")
            _print_nested(value, "  ")


def _print_nested(value, indent: str) -> None:
    """A nested plan section as indented `key: value` lines (a list of numbers on one line), not raw JSON."""
    def scalar(v) -> bool:
        return not isinstance(v, (dict, list)) or (isinstance(v, list) and all(not isinstance(x, (dict, list))
                                                                                  for x in v))

    def show(v) -> str:
        return "[" + ", ".join(map(str, v)) + "]" if isinstance(v, list) else str(v)

    if isinstance(value, dict):
        for k, v in value.items():
            if scalar(v):
                plain(out, f"{indent}{k}: {show(v)}")
            elif isinstance(v, dict) and all(scalar(x) for x in v.values()) and len(v) <= 4:
                plain(out, f"{indent}{k}: " + ", ".join(f"{kk} {show(vv)}" for kk, vv in v.items()))
            else:
                plain(out, f"{indent}{k}:")
                _print_nested(v, indent + "  ")
    elif isinstance(value, list):
        for item in value:
            if scalar(item):
                plain(out, f"{indent}- {show(item)}")
            else:
                plain(out, f"{indent}-")
                _print_nested(item, indent + "  ")
    else:
        plain(out, f"{indent}{value}")


def _print_compile_report(bundle, report: dict) -> None:
    m = bundle.manifest
    table = Table(title=f"compiled {bundle.path}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    src = m["source"]
    table.add_row("source", f"{src['name']} ({src['architecture']}){' [RANDOM weights]' if src['random_weights'] else ''}")
    table.add_row("target", f"{m['target']['name']} / {m['backend']} / {m['precision']} ({m['precision_mode']})")
    if m.get("backend_choice"):  # why this backend (--backend auto: targets/backends/selection.py)
        table.add_row("backend", text(m["backend_choice"]))
    graph = report.get("graph") or {}
    table.add_row("graph", f"{report['export']['nodes']} nodes exported -> {graph.get('nodes', '?')} after passes")
    applied = [p for p in report.get("passes", []) if p["status"] == "applied"]
    skipped = [p for p in report.get("passes", []) if p["status"] != "applied"]
    if applied or skipped:
        table.add_row("passes", "\n".join([f"✓ {p['name']}: {p['detail']}" for p in applied] +
                                         [f"– {p['name']}: {p['status']} ({p['detail']})" for p in skipped]))
    v = m.get("verification") or {}
    if v.get("status") == "passed":
        table.add_row("verify", f"passed: max |logits err| {v['max_abs_error']:.2e}, top-1 agreement "
                                f"{v['top1_agreement']:.3f} ({v['prompts']} prompts, prefill + {v['decode_steps']} decode steps)")
    else:
        table.add_row("verify", f"{v.get('status', 'skipped')} ({v.get('reason', '')})")
    for check in v.get("pending_gpu_checks") or []:  # cross-compiled: what the CPU could not run, and where it runs
        table.add_row("gpu check", text(f"{check.get('name')} pending: {check.get('why')}; run `leptonc verify "
                                        f"{bundle.path}` on a {m['target']['name']} with onnxruntime-gpu installed"))
    q = report.get("quantization")
    if q:  # quantization: the accuracy gate, the mode that ran, the layers that hurt most
        gate = q.get("accuracy_gate") or {}
        if gate.get("status") == "passed":
            table.add_row("accuracy", f"passed: perplexity {gate['reference_perplexity']:.3f} -> "
                                      f"{gate['quantized_perplexity']:.3f} ({gate['ppl_increase_pct']:+.2f}%, {gate['rule']}), "
                                      f"top-1 agreement {gate['top1_agreement']:.3f} on {gate['scored_tokens']} held-out tokens")
        else:
            table.add_row("accuracy", f"{gate.get('status', 'skipped')}: {gate.get('reason', '')}")
        table.add_row("quantized", f"{q['format']} ({q['mode']}): {q['note']}")
        if q.get("worst_layers"):
            table.add_row("lowest SQNR", ", ".join(f"{r['name']} {r['sqnr_db']:.1f} dB" for r in q["worst_layers"][:3]))
    pr = report.get("pruning")
    if pr:  # pruning: parameters removed and the accuracy cost (PyTorch, held-out text)
        p, acc = pr["parameters"], pr.get("accuracy") or {}
        table.add_row("pruned", f"parameters {p['before']['total']:,} -> {p['after']['total']:,} "
                                f"(MLP -{100 * p['mlp_removed_ratio']:.1f}%); perplexity "
                                f"{acc.get('reference_perplexity')} -> {acc.get('pruned_perplexity')}, top-1 agreement "
                                f"{acc.get('top1_agreement')} vs unpruned; {pr['note']}")
    size = sum(f["bytes"] for f in m["files"].values())
    table.add_row("size", f"{size / 1e6:.1f} MB")
    stats = m.get("build_stats") or {}  # run measurements live in the manifest (report.json is reproducible)
    table.add_row("time", f"{sum(stats.get('timings_s', {}).values()):.1f} s; peak host memory "
                          f"{stats.get('peak_host_mb', 0):.0f} MB")
    out.print(table)
