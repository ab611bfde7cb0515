"""The `leptonc` command: argv -> frozen config -> library call -> rich output or --json.

This module imports neither torch, onnxruntime nor tensorrt at import time: `leptonc --help` and
`leptonc targets` stay fast. Commands import what they need when they run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import click
import typer

try:  # typer >= 0.16 vendors click as typer._click: its exceptions are not click's own classes
    from typer import _click as _tclick
except ImportError:  # pragma: no cover - older typer uses click itself
    _tclick = click
_EXIT = tuple({click.exceptions.Exit, typer.Exit})
_CLICK_ERROR = tuple({click.exceptions.ClickException, _tclick.exceptions.ClickException})
_ABORT = tuple({click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort)})
from rich.console import Console
from rich.markup import escape as _escape
from rich.table import Table

from leptonc import __version__
from leptonc.errors import EXIT_CODES, InputError, LeptonError, UnsupportedRequestError

app = typer.Typer(
    name="leptonc",
    help="Ahead-of-time compiler for large language models: PyTorch LLM -> optimized engine bundle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"leptonc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Compile, run, benchmark and evaluate LLM bundles.

    Exit codes: 0 ok, 1 internal error (a bug), 2 unsupported request, 3 model source, 4 architecture,
    5 backend missing, 6 verification failed, 7 bad bundle, 8 bad runtime input, 9 export, 130 interrupted.
    """


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


# ---- targets ------------------------------------------------------------------------------------

@app.command()
def targets(as_json: bool = typer.Option(False, "--json", help="Print JSON for CI.")) -> None:
    """List hardware targets: compute capability, native precisions, memory, default backend."""
    from leptonc.targets import TARGETS

    if as_json:
        _emit_json({"targets": [t.to_dict() for t in TARGETS.values()]})
        return
    table = Table(title="leptonc targets")
    for col in ("target", "device", "compute", "native precisions", "simulated", "memory", "default backend"):
        table.add_column(col)
    for t in TARGETS.values():
        table.add_row(t.name, t.description, t.sm, ", ".join(t.native), ", ".join(t.simulated) or "-",
                      f"{t.memory_gb:g} GB" if t.memory_gb else "host", t.default_backend)
    out.print(table)


# ---- compile ------------------------------------------------------------------------------------

def _precision_from_flags(precision: Optional[str], flags: dict[str, bool]) -> Optional[str]:
    chosen = [name for name, on in flags.items() if on]
    if len(chosen) > 1:
        raise UnsupportedRequestError(f"choose one precision flag, not {' and '.join('--' + c for c in chosen)}")
    if chosen and precision and precision != chosen[0]:
        raise UnsupportedRequestError(f"--precision {precision} conflicts with --{chosen[0]}")
    return chosen[0] if chosen else precision


@app.command("compile")
def compile_cmd(
    ctx: typer.Context,
    source: Optional[str] = typer.Argument(None, help="Hugging Face model directory, .gguf file, or built-in name "
                                                      "(tiny-llama, smollm2-135m, llama-1b-shape, llama-8b-shape). "
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
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity check against PyTorch."),
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
    # quantization (issue 6): put into config.options, validated by leptonc.calibration.quantize
    int8_mode: Optional[str] = typer.Option(None, "--int8-mode", help="--int8: w8a8 (SmoothQuant, default) or weight-only."),
    smoothquant_alpha: Optional[float] = typer.Option(None, "--smoothquant-alpha", help="SmoothQuant migration strength: --int8 W8A8 "
                                                                                  "(default: searched per layer group); "
                                                                                  "--fp8 (default 0.5)."),
    int4_block: Optional[int] = typer.Option(None, "--int4-block", help="--int4 block size: 32, 64 or 128 (default)."),
    int4_method: Optional[str] = typer.Option(None, "--int4-method", help="--int4 scales: awq (default) or rtn."),
    int4_rounding: Optional[str] = typer.Option(None, "--int4-rounding", help="--int4 awq codes: gptq (default; "
                                                                              "error-compensated, on AWQ's grid) or "
                                                                              "nearest."),
    gptq_samples: Optional[int] = typer.Option(None, "--gptq-samples", help="GPTQ: calibration sequences whose every "
                                                                            "token enters the Hessian (default 128, "
                                                                            "capped by the text)."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="KV cache precision fp8|int8 (where the backend supports it)."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration text file (default: shipped WikiText-2 slice)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration sequences (default 16)."),
    calib_seq_len: Optional[int] = typer.Option(None, "--calib-seq-len", help="Tokens per calibration sequence (default 256)."),
    calib_method: Optional[str] = typer.Option(None, "--calib-method", help="Activation ranges: minmax (default), percentile, entropy (int8 only in practice: they clip outliers that fp8 keeps)."),
    keep_fp: list[str] = typer.Option([], "--keep-fp", help="Keep matching layers in fp32 (repeatable; e.g. lm_head, 'layers.0.*')."),
    int4_8bit: list[str] = typer.Option([], "--int4-8bit", help="--int4: quantize matching layers to 8 bits instead (repeatable)."),
    fp8_lm_head: bool = typer.Option(False, "--fp8-lm-head", help="--fp8: also quantize the LM head and the embedding "
                                                                   "tied to it (by default they stay in higher precision, "
                                                                   "as in NVIDIA ModelOpt's FP8 recipe)."),
    max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase", help="Accuracy gate: allowed perplexity increase in %% (default 5)."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the accuracy gate (the report says it was skipped)."),
    check_tokens: Optional[int] = typer.Option(None, "--check-tokens", help="Held-out tokens the accuracy gate scores (default 2048)."),
    # pruning (issue 9): put into config.options, validated by leptonc.calibration.pruning
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
        max_sequence=max_seq, passes=not no_passes, disabled_passes=tuple(disable_pass), verify=not no_verify,
        max_parity_error=max_parity_error, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        force=force,
    )
    trt_sparsity = sparsity if config.backend == "tensorrt" else None  # elsewhere 2:4 is pruning's (simulated)
    config = _tensorrt_options(config, {"opt_batch": opt_batch, "opt_seq": opt_seq, "sparsity": trt_sparsity,
                                        "timing_cache": timing_cache, "hardware_compat": hardware_compat,
                                        "version_compatible": version_compatible or None,
                                        "builder_opt_level": builder_opt_level}, dry_run)
    config = _quant_options(config, {"int8_mode": int8_mode, "smoothquant_alpha": smoothquant_alpha,
                                     "int4_block": int4_block, "int4_method": int4_method, "int4_rounding": int4_rounding,
                                     "gptq_samples": gptq_samples, "kv_cache": kv_cache,
                                     "calib_data": calib_data, "calib_samples": calib_samples,
                                     "calib_seq_len": calib_seq_len, "calib_method": calib_method,
                                     "keep_fp": list(keep_fp) or None, "int4_8bit": list(int4_8bit) or None,
                                     "fp8_lm_head": fp8_lm_head or None,
                                     "max_ppl_increase": max_ppl_increase,
                                     "check": False if no_check else None, "check_tokens": check_tokens})
    config = _prune_options(config, {"prune": prune, "prune_heads": prune_heads, "sparsity": sparsity})
    from leptonc import compiler

    if dry_run:
        plan = compiler.plan(config)
        if as_json:
            _emit_json(plan)
        else:
            _print_plan(plan)
        return
    from leptonc.progress import Steps

    if config.precision_mode == "simulated":
        err.print(f"[yellow]note:[/] {config.precision} is simulated on {config.target} (accuracy only, not speed)")
    steps = Steps(console=err, enabled=not as_json)
    bundle = compiler.compile_model(config, steps)
    report = bundle.report()
    if as_json:
        _emit_json({"bundle": str(bundle.path), "manifest": bundle.manifest, "report": report})
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
            _emit_json({"config": str(config_file), "entries": plans})
        else:
            for p in plans:
                out.rule(f"#{p['entry']} -> {p['output']}")
                _print_plan(p["plan"])
        return
    from leptonc.progress import Steps

    def start(entry) -> None:
        if not as_json:
            err.rule(f"[{entry.index}/{len(entries)}] {entry.label}")

    summary = matrix.run_matrix(entries, fail_fast=fail_fast, on_start=start,
                                steps_factory=lambda: Steps(console=err, enabled=not as_json))
    summary["config"] = str(config_file)
    if as_json:
        _emit_json(summary)
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
    """Put the quantization flags into `config.options`; refuse them without a quantized precision."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return config
    if config.precision not in ("int8", "fp8", "int4"):
        flags = ", ".join("--no-check" if k == "check" else f"--{k.replace('_', '-')}" for k in given)
        raise UnsupportedRequestError(f"{flags} only apply to a quantized compile (--int8, --fp8 or --int4); "
                                      f"this one is {config.precision}")
    from leptonc.calibration.quantize import QuantSettings

    caution = QuantSettings.from_options(config.precision, given).caution  # validates, naming the flag
    if caution:
        err.print(f"[yellow]note:[/] {caution}")
    return config.with_(options={**config.options, **given})


def _prune_options(config, given: dict):
    """Put the pruning flags (issue 9) into `config.options`, validated by leptonc.calibration.pruning."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return config
    from leptonc.calibration.pruning import PruneSettings

    # validates, with messages naming the flag; TensorRT validates its own --sparsity (its preflight / plan)
    PruneSettings.from_options({k: v for k, v in given.items() if k != "sparsity" or config.backend != "tensorrt"})
    return config.with_(options={**config.options, **given})


def _tensorrt_options(config, given: dict, dry_run: bool):
    """Put the TensorRT flags into `config.options` (with the limits its profiles need), refuse them
    on another backend, and run TensorRT's preflight (options, library, build GPU) before a build."""
    given = {k: v for k, v in given.items() if v is not None}
    if config.backend != "tensorrt":
        if given:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in given)
            verb = "applies" if len(given) == 1 else "apply"
            raise UnsupportedRequestError(f"{flags} only {verb} to --backend tensorrt (this compile uses "
                                          f"{config.backend}); drop them or pass --backend tensorrt")
        return config
    config = config.with_(options={**config.options, **given})  # the compiler adds the limits to the pass context
    if not dry_run:
        from leptonc.targets.tensorrt import preflight

        preflight(config)
    return config


def _print_plan(plan: dict) -> None:
    out.print(f"[bold]source[/]    {plan['source']['ref']} ({plan['source']['kind']})")
    out.print(f"[bold]target[/]    {plan['target']['name']} ({plan['target']['sm']}), backend {plan['backend']}")
    out.print(f"[bold]precision[/] {plan['precision']} ({plan['precision_mode']}), export dtype {plan['export_dtype']}")
    out.print(f"[bold]pipeline[/]  {' -> '.join(plan['pipeline']) or '(none: plain export)'}")
    for key, value in plan.items():
        if key not in ("config", "source", "target", "backend", "precision", "precision_mode", "export_dtype",
                       "pipeline", "disabled_passes"):
            out.print(f"[bold]{key}[/]")
            out.print_json(data=value)


def _print_compile_report(bundle, report: dict) -> None:
    m = bundle.manifest
    table = Table(title=f"compiled {bundle.path}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    src = m["source"]
    table.add_row("source", f"{src['name']} ({src['architecture']}){' [RANDOM weights]' if src['random_weights'] else ''}")
    table.add_row("target", f"{m['target']['name']} / {m['backend']} / {m['precision']} ({m['precision_mode']})")
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
    q = report.get("quantization")
    if q:  # issue 6: the accuracy gate, the mode that ran, the layers that hurt most
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
    if pr:  # issue 9: parameters removed and the accuracy cost (PyTorch, held-out text)
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


# ---- run ----------------------------------------------------------------------------------------

def _open(path: str, tokenizer_dir: Optional[str], verify: bool, device: Optional[str] = None):
    """(runner, tokenizer, eos ids, bundle or None) for a bundle directory or a bare model file."""
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner

    p = Path(path)
    if p.is_file():
        from leptonc.runtime.bare import open_bare

        return open_bare(p, tokenizer_dir, device)
    bundle = load_bundle(p, verify=verify)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else bundle.tokenizer_dir
    tokenizer = _load_tokenizer(tok_dir)
    from leptonc.bundle import engine_load_errors

    with engine_load_errors(bundle.model_path):  # a corrupt engine is a bad bundle (exit 7), not a crash
        runner = open_bundle_runner(bundle, device)
    eos = tuple(bundle.manifest.get("model", {}).get("eos_token_ids") or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos = tuple(dict.fromkeys((*eos, tokenizer.eos_token_id)))
    return runner, tokenizer, eos, bundle


def _load_tokenizer(directory: Optional[Path]):
    if directory is None or not Path(directory).is_dir():
        raise InputError("no tokenizer: this bundle has none; pass --tokenizer DIR (a Hugging Face tokenizer directory)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise InputError(f"could not load the tokenizer in {directory}: {exc}") from None


@app.command()
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
        _emit_json({"outputs": [{"prompt": g.prompt, "text": g.text, "token_ids": g.token_ids,
                                 "finish_reason": g.finish_reason} for g in result.outputs],
                    "timings": result.timings})
        return
    if stream:
        sys.stdout.write("\n")
    else:
        for g in result.outputs:
            out.print(f"[dim]{g.prompt}[/]{g.text}")
            out.rule()
    t = result.timings
    rate = f", {t['decode_tokens_per_s']:.1f} tok/s decode" if t.get("decode_tokens_per_s") else ""
    err.print(f"[dim]{t['new_tokens']} tokens; first token {t['ttft_ms']:.0f} ms{rate}[/]")


# ---- bench --------------------------------------------------------------------------------------

@app.command()
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
        _emit_json(result)
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

@app.command("eval")
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
        _emit_json(result)
        return
    table = Table(title=f"perplexity of {model} ({kind})")
    for col in ("perplexity", "tokens", "window", "stride"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['perplexity']:.3f}", str(result["tokens"]), str(window), str(stride))
    out.print(table)


# ---- inspect ------------------------------------------------------------------------------------

@app.command()
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
        _emit_json(info)
        return
    out.print_json(data=info)
    if info.get("trt_lint", {}).get("issues"):
        raise typer.Exit(code=UnsupportedRequestError.exit_code)


# ---- package ------------------------------------------------------------------------------------

@app.command()
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
        _emit_json(result)
        return
    out.print(f"[green]✓[/] packaged {bundle} as Triton model [bold]{result['model']}[/] "
              f"({result['platform']}) in {result['model_dir']}")
    for f in result["files"]:
        out.print(f"  {f}")
    out.print(f"serve it with: [bold]{result['serve']}[/]")


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
        err.print(f"[bold red]error:[/] {_escape(exc.message)}", highlight=False)
        if exc.hint:
            err.print(f"[yellow]next step:[/] {_escape(exc.hint)}", highlight=False)
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
