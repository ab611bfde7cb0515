"""The pass registry: a pass is a plain function `(graph, ctx) -> PassResult`, registered by name with
the passes it requires. Pipelines are explicit lists of names, written out per backend in `targets/`.

    @register_pass("fuse_rmsnorm", requires=("infer_shapes",))
    def fuse_rmsnorm(graph: gs.Graph, ctx: PassContext) -> PassResult: ...

`run_pipeline` runs the list in order on an onnx-graphsurgeon graph and records every pass as
applied (with counts), skipped (with the reason) or disabled (by the user).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from leptonc.config import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQUENCE, KernelOptions, TensorRTOptions
from leptonc.errors import UnsupportedRequestError


@dataclass
class PassContext:
    """What a pass may know about the compile: the target, precision and model, the compile's typed
    settings (kernel switches, quantization settings, the bundle's limits), and what earlier steps made
    for the passes (calibration statistics, the built kernel library). `options` holds only test hooks
    that no compile sets (e.g. forcing a GroupQueryAttention length contract)."""

    backend: str = "onnxruntime"
    target: Any = None  # leptonc.targets.Target
    precision: str = "fp32"
    spec: Any = None  # leptonc.models.spec.DecoderSpec
    work_dir: Path | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_sequence: int = DEFAULT_MAX_SEQUENCE
    kernels: KernelOptions = field(default_factory=KernelOptions)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    quantization: Any = None  # leptonc.calibration.quantize.QuantSettings for a quantized compile
    activation_stats: Any = None  # leptonc.calibration.collect.ActivationStats, from calibration
    quant_report: dict = field(default_factory=lambda: {"layers": [], "kept_fp": [], "notes": []})  # written by the quantizers
    kernel_library: dict | None = None  # leptonc's CUDA kernel library, as the backend built it ({"file": ...}),
    # or {"unavailable": reason}
    options: dict = field(default_factory=dict)

    @classmethod
    def for_compile(cls, config, spec: Any, work_dir: Path | None, activation_stats: Any = None) -> "PassContext":
        """The context of a compile: everything from the frozen `CompileConfig`."""
        return cls(backend=config.backend, target=config.target_record, precision=config.precision, spec=spec,
                   work_dir=work_dir, max_batch=config.max_batch, max_sequence=config.max_sequence,
                   kernels=config.kernels, tensorrt=config.tensorrt, quantization=config.quantization, activation_stats=activation_stats)


@dataclass
class PassResult:
    applied: bool
    detail: str
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def skipped(cls, reason: str) -> "PassResult":
        return cls(False, reason)


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    fn: Callable[[Any, PassContext], PassResult]
    requires: tuple[str, ...]
    description: str


PASSES: dict[str, RegisteredPass] = {}


def register_pass(name: str, requires: tuple[str, ...] = ()):
    def wrap(fn):
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        PASSES[name] = RegisteredPass(name, fn, tuple(requires), doc[0] if doc else "")
        return fn

    return wrap


def get_pass(name: str) -> RegisteredPass:
    load_all()
    if name not in PASSES:
        raise UnsupportedRequestError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def check_pipeline(pipeline: list[str], disabled: tuple[str, ...] = ()) -> None:
    """Every pass exists, every disabled name is in the pipeline, and requirements come earlier."""
    load_all()
    for name in disabled:
        if name not in pipeline:
            raise UnsupportedRequestError(
                f"--disable-pass {name}: not in this pipeline; it runs: {', '.join(pipeline)}"
            )
    seen: set[str] = set()
    for name in pipeline:
        p = get_pass(name)
        for req in p.requires:
            if req not in seen:
                raise ValueError(f"pipeline error: {name} requires {req} earlier in the pipeline")
        seen.add(name)


def run_pipeline(graph: Any, pipeline: list[str], ctx: PassContext, disabled: tuple[str, ...] = (),
                 on_pass: Callable[[str], None] | None = None) -> list[dict]:
    """Run passes in order on `graph` (an onnx_graphsurgeon.Graph), mutating it. Returns records."""
    check_pipeline(pipeline, disabled)
    from leptonc.passes.matching import reset_names

    reset_names()  # reproducible builds: generated node names restart for every pipeline run
    records: list[dict] = []
    not_run: set[str] = set()
    for name in pipeline:
        p = PASSES[name]
        if on_pass:
            on_pass(name)
        if name in disabled:
            records.append({"name": name, "status": "disabled", "detail": "disabled by --disable-pass"})
            not_run.add(name)
            continue
        missing = [r for r in p.requires if r in not_run]
        if missing:
            records.append({"name": name, "status": "skipped", "detail": f"requires {', '.join(missing)}, which did not run"})
            not_run.add(name)
            continue
        start = time.perf_counter()
        result = p.fn(graph, ctx)
        records.append({
            "name": name,
            "status": "applied" if result.applied else "skipped",
            "detail": result.detail,
            "counts": result.counts,
            "seconds": round(time.perf_counter() - start, 3),
        })
        if not result.applied:
            not_run.add(name)
    return records


def load_all() -> None:
    """Import every module that registers passes (each file registers its own)."""
    import importlib
    import pkgutil

    import leptonc.passes as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"leptonc.passes.{info.name}")
