"""The frozen compile configuration: what the CLI builds from flags and `leptonc.compile` takes.

Every setting that changes a bundle is a typed field here: the compile's own fields, and one frozen
record each for TensorRT (`TensorRTOptions`), pruning (`PruningOptions`), leptonc's CUDA kernels
(`KernelOptions`) and quantization (`QuantSettings`, in calibration/quantize.py beside the calibration
it drives). Each record checks its own values in `__post_init__`; what depends on the target, backend
or precision is checked once, in `CompileConfig.__post_init__`. Messages say what to do. Cheap to
import (no torch). The same record is printed by `--dry-run` and saved into the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from leptonc.errors import UnsupportedRequestError
from leptonc.targets import BACKENDS, PRECISIONS, Target, get_target
from leptonc.targets.backends.selection import choose_backend

if TYPE_CHECKING:  # the annotation's name only: calibration is imported where a quantized compile needs it
    from leptonc.calibration.quantize import QuantSettings

DEFAULT_MAX_SEQUENCE = 2048
DEFAULT_MAX_BATCH = 16
QUANTIZED = ("int8", "fp8", "int4")
HARDWARE_COMPAT = ("ampere+", "same-cc")
MAX_BUILDER_OPT_LEVEL = 5


def _record(cls, value, what: str):
    """A sub-record given as itself, as a dict (a config file, a manifest) or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UnsupportedRequestError(f"{what}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**value)
    raise UnsupportedRequestError(f"{what} must be a table of settings, not {type(value).__name__}")


def _check_bools(record, what: str) -> None:
    for f in fields(record):
        if f.type in ("bool", bool) and not isinstance(getattr(record, f.name), bool):
            raise UnsupportedRequestError(f"{what}.{f.name} must be true or false, not {getattr(record, f.name)!r}")


@dataclass(frozen=True)
class KernelOptions:
    """How a GPU graph for ONNX Runtime is lowered to leptonc's own CUDA kernels (targets/kernels/,
    passes/use_kernels.py). All on by default; each off switch keeps ONNX Runtime's kernel for that part.
    Only GPU targets with the onnxruntime backend use them."""

    cuda_kernels: bool = True  # use_leptonc_kernels in the pipeline (--no-cuda-kernels: ONNX Runtime's kernels)
    attention_kernel: bool = True  # GroupQueryAttention -> CachedAttention (--no-attention-kernel)
    # SkipSimplifiedLayerNormalization folded into the fp16 product after it (NormMatMulF16): alone no faster,
    # but a decode layer then holds only leptonc's kernels, whose launches overlap: +4-5% at batch 1 on
    # llama-1b-shape fp16 on the H100 (BENCHMARKS.md). --no-norm-prologue
    norm_prologue: bool = True
    # the same fold into the int4/int8 products (NormMatMulNBitsTiled): +0.8% for llama-1b-shape int4 at batch 1,
    # the same greedy tokens (BENCHMARKS.md). --no-norm-prologue-nbits
    norm_prologue_nbits: bool = True

    def __post_init__(self) -> None:
        _check_bools(self, "kernels")

    def changed(self) -> list[str]:
        """CLI spellings of the switches turned off (for refusing them where no kernel is built)."""
        return [f"--no-{f.name.replace('_', '-')}" for f in fields(self) if getattr(self, f.name) is not True]


@dataclass(frozen=True)
class TensorRTOptions:
    """The TensorRT backend's build options (targets/backends/tensorrt.py turns them into Polygraphy loaders)."""

    opt_batch: int | None = None  # batch the profiles are tuned for (None: 1)
    opt_seq: int | None = None  # prompt length the profiles are tuned for (None: 128)
    sparsity: str | None = None  # "2:4": sparse tensor cores for weights with the pattern
    timing_cache: str | None = None
    hardware_compat: str | None = None  # "ampere+" | "same-cc"
    version_compatible: bool = False
    builder_opt_level: int | None = None  # 0..5 (None: TensorRT's default, 3)

    def __post_init__(self) -> None:
        _check_bools(self, "tensorrt")
        for name in ("opt_batch", "opt_seq"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UnsupportedRequestError(f"--{name.replace('_', '-')} {value}: give a whole number >= 1")
        if self.sparsity is not None and self.sparsity != "2:4":
            raise UnsupportedRequestError(f"--sparsity {self.sparsity}: the only structured sparsity TensorRT runs is "
                                          "2:4", hint="use --sparsity 2:4")
        if self.hardware_compat is not None and self.hardware_compat not in HARDWARE_COMPAT:
            raise UnsupportedRequestError(f"--hardware-compat {self.hardware_compat}: use ampere+ or same-cc")
        if self.builder_opt_level is not None and not 0 <= self.builder_opt_level <= MAX_BUILDER_OPT_LEVEL:
            raise UnsupportedRequestError(f"--builder-opt-level {self.builder_opt_level}: TensorRT's levels are "
                                          f"0..{MAX_BUILDER_OPT_LEVEL} (default 3)")
        if self.timing_cache is not None:
            parent = Path(self.timing_cache).expanduser().resolve().parent
            if not parent.is_dir():
                raise UnsupportedRequestError(f"--timing-cache {self.timing_cache}: directory {parent} does not exist")
            if Path(self.timing_cache).is_dir():
                raise UnsupportedRequestError(f"--timing-cache {self.timing_cache} is a directory; give a file path")

    def given(self) -> list[str]:
        """CLI spellings of the options that were set (for refusing them on another backend)."""
        return [f"--{k.replace('_', '-')}" for k, v in asdict(self).items() if v not in (None, False)]

    def check_for(self, target: Target, precision: str, max_batch: int, max_sequence: int) -> None:
        """What depends on the compile: the target, the precision and the bundle's limits (exit 2)."""
        if precision == "bf16":
            raise UnsupportedRequestError(
                "the TensorRT backend builds strongly typed networks, whose types come from the graph, and "
                "leptonc exports fp32 or fp16 graphs, not bf16",
                hint="use --fp16 with --backend tensorrt, or --bf16 with --backend onnxruntime")
        if not target.is_gpu:
            raise UnsupportedRequestError(f"target {target.name} is not a GPU; TensorRT builds for NVIDIA GPUs",
                                          hint="use --backend onnxruntime for the CPU")
        if self.opt_batch is not None and self.opt_batch > max_batch:
            raise UnsupportedRequestError(f"--opt-batch {self.opt_batch} must be between 1 and --max-batch {max_batch}")
        if self.opt_seq is not None and self.opt_seq > max_sequence:
            raise UnsupportedRequestError(f"--opt-seq {self.opt_seq} must be between 1 and --max-seq {max_sequence}")
        if self.sparsity is not None and not target.sparsity_2_4:
            raise UnsupportedRequestError(f"{target.name} is {target.sm}: 2:4 sparse tensor cores need sm80+",
                                          hint="drop --sparsity, or target a100, l4, h100")
        if self.hardware_compat == "ampere+" and target.compute_capability < (8, 0):
            raise UnsupportedRequestError(
                f"--hardware-compat ampere+ builds engines for Ampere and newer GPUs; {target.name} is {target.sm}",
                hint=f"drop --hardware-compat and build on a {target.name}")


@dataclass(frozen=True)
class PruningOptions:
    """Pruning of the PyTorch model before export (passes/pruning.py)."""

    mlp_ratio: float | None = None  # --prune
    kv_heads: int = 0  # --prune-heads
    sparsity: str | None = None  # --sparsity ("2:4")
    calib_data: str | None = None  # shared with quantization's --calib-data (None: shipped WikiText-2 slice)
    calib_samples: int = 8
    calib_seq_len: int = 256
    check_tokens: int = 1024
    channel_multiple: int = 8  # kept MLP channels are rounded to a multiple of this (wide layers only)

    def __post_init__(self) -> None:
        if self.mlp_ratio is not None and not 0.0 < self.mlp_ratio < 1.0:
            raise UnsupportedRequestError(f"--prune {self.mlp_ratio:g}: the ratio of MLP channels to remove must be "
                                          "between 0 and 1 (e.g. --prune 0.25)")
        if self.kv_heads < 0:
            raise UnsupportedRequestError(f"--prune-heads {self.kv_heads}: give a number of KV head groups >= 1")
        if self.sparsity is not None and self.sparsity != "2:4":
            raise UnsupportedRequestError(f"--sparsity {self.sparsity}: the supported pattern is 2:4",
                                          hint="use --sparsity 2:4")

    @property
    def active(self) -> bool:
        return self.mlp_ratio is not None or self.kv_heads > 0 or self.sparsity is not None

    @property
    def structured(self) -> bool:
        return self.mlp_ratio is not None or self.kv_heads > 0


@dataclass(frozen=True)
class CompileConfig:
    source: str
    target: str = "cpu"
    output: str | None = None
    backend: str | None = None  # None or "auto": targets/backends/selection.py chooses (reason in backend_choice)
    precision: str | None = None  # None: the target's default
    max_batch: int = DEFAULT_MAX_BATCH
    max_sequence: int = DEFAULT_MAX_SEQUENCE
    passes: bool = True
    disabled_passes: tuple[str, ...] = ()
    verify: bool = True
    max_parity_error: float = 1e-3
    allow_pickle: bool = False
    trust_remote_code: bool = False
    force: bool = False
    quantization: "QuantSettings | dict | None" = None  # with a quantized precision; None: its defaults
    pruning: PruningOptions | dict | None = None  # None: no pruning
    tensorrt: TensorRTOptions | dict | None = None  # --backend tensorrt only; None: its defaults
    kernels: KernelOptions | dict | None = None  # GPU targets with --backend onnxruntime; None: its defaults
    backend_choice: str = ""  # set by __post_init__: why this backend (targets/backends/selection.py); kept on copies

    def __post_init__(self) -> None:
        target = get_target(self.target)  # raises with the list of valid targets
        object.__setattr__(self, "target", target.name)
        choice = choose_backend(target, self.backend)  # None or "auto": TensorRT where its builder imports, else ORT
        if not (self.backend_choice and self.backend == choice.backend):  # a copy (with_) keeps the reason it had
            object.__setattr__(self, "backend_choice", choice.reason)
        backend = choice.backend
        if backend not in BACKENDS:
            raise UnsupportedRequestError(f"unknown backend {backend!r}; use one of: {', '.join(BACKENDS)}")
        target.check_backend(backend)
        object.__setattr__(self, "backend", backend)
        precision = self.precision or target.default_precision
        if precision not in PRECISIONS:
            raise UnsupportedRequestError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
        target.check_precision(precision)
        object.__setattr__(self, "precision", precision)
        if not 1 <= self.max_batch <= 4096:
            raise UnsupportedRequestError(f"--max-batch {self.max_batch} is out of range; use 1..4096")
        if not 1 <= self.max_sequence <= 1 << 20:
            raise UnsupportedRequestError(f"--max-seq {self.max_sequence} is out of range; use 1..1048576")
        if self.max_parity_error <= 0:
            raise UnsupportedRequestError("--max-parity-error must be positive")
        if self.output is None:
            stem = Path(self.source.rstrip("/")).name.removesuffix(".gguf") or "model"
            object.__setattr__(self, "output", f"{stem}.{target.name}.lepton")
        object.__setattr__(self, "disabled_passes", tuple(self.disabled_passes))
        self._check_settings(target, backend, precision)

    def _check_settings(self, target: Target, backend: str, precision: str) -> None:
        """The sub-records, as typed values, and what they need of the target, backend and precision."""
        trt = _record(TensorRTOptions, self.tensorrt, "tensorrt")
        if backend == "tensorrt":
            trt.check_for(target, precision, self.max_batch, self.max_sequence)
        elif trt.given():
            flags = trt.given()
            why = "" if self.backend_choice == f"--backend {backend}" else f" (--backend auto: {self.backend_choice})"
            raise UnsupportedRequestError(f"{', '.join(flags)} only {'applies' if len(flags) == 1 else 'apply'} to "
                                          f"--backend tensorrt; this compile uses {backend}{why}",
                                          hint=f"drop {'it' if len(flags) == 1 else 'them'} or pass --backend tensorrt")
        object.__setattr__(self, "tensorrt", trt)
        kernels = _record(KernelOptions, self.kernels, "kernels")
        if kernels.changed() and not (target.is_gpu and backend == "onnxruntime"):
            raise UnsupportedRequestError(f"{', '.join(kernels.changed())}: leptonc's CUDA kernels are built only for "
                                          f"GPU targets with --backend onnxruntime (this compile: {target.name}, "
                                          f"{backend})", hint="drop the kernel switches")
        object.__setattr__(self, "kernels", kernels)
        pruning = None if self.pruning is None else _record(PruningOptions, self.pruning, "pruning")
        if pruning is not None and pruning.sparsity and backend == "tensorrt" and not target.sparsity_2_4:
            raise UnsupportedRequestError(f"--sparsity 2:4 needs sparse tensor cores (sm80+); {target.name} has none",
                                          hint="drop --sparsity, or target a100, l4, h100")
        object.__setattr__(self, "pruning", pruning if pruning is not None and pruning.active else None)
        object.__setattr__(self, "quantization", self._quantization(backend, precision))

    def _quantization(self, backend: str, precision: str):
        given = self.quantization
        if precision not in QUANTIZED:
            if given is not None and given != {}:
                raise UnsupportedRequestError("quantization settings only apply to a quantized compile (--int8, "
                                              f"--fp8 or --int4); this one is {precision}")
            return None
        from leptonc.calibration.quantize import INT8_BLOCK, INT8_BLOCK_CPU, QuantSettings  # numpy only

        if isinstance(given, QuantSettings):
            settings = given if given.precision == precision else replace(given, precision=precision)
        elif isinstance(given, dict) or given is None:
            raw = dict(given or {})
            known = {f.name for f in fields(QuantSettings)} - {"precision"}
            unknown = sorted(set(raw) - known)
            if unknown:
                raise UnsupportedRequestError(f"quantization: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
            for key in ("keep_fp", "int4_8bit"):
                if raw.get(key) is not None:
                    raw[key] = tuple(raw[key])
            if backend == "tensorrt" and precision == "int4" and (
                    raw.get("int4_rounding") == "gptq" or raw.get("gptq_samples") is not None
                    or raw.get("gptq_act_order")):
                raise UnsupportedRequestError(
                    "GPTQ rounding is for ONNX Runtime's MatMulNBits grid (asymmetric blocks); the TensorRT int4 "
                    "weights are symmetric blocks rounded to nearest",
                    hint="drop --int4-rounding / --gptq-samples, or use --backend onnxruntime")
            settings = QuantSettings(precision=precision, **{k: v for k, v in raw.items() if v is not None})
        else:
            raise UnsupportedRequestError(f"quantization must be a table of settings, not {type(given).__name__}")
        if not self.passes:
            raise UnsupportedRequestError(f"--{precision} is a graph rewrite and --no-passes turns passes off; "
                                          "drop one of them")
        if f"quantize_{precision}" in self.disabled_passes:
            raise UnsupportedRequestError(f"--disable-pass quantize_{precision} would leave the --{precision} bundle "
                                          "unquantized; drop one of them")
        cpu_ort = backend == "onnxruntime" and self.target_record.family == "cpu"
        if settings.precision == "int8" and settings.int8_block is None:  # the CPU kernel rounds activations per block
            settings = replace(settings, int8_block=INT8_BLOCK_CPU if cpu_ort else INT8_BLOCK)
        if settings.format in ("int8-w8a8", "fp8"):  # dynamic per-token activation scales: ONNX Runtime on the CPU
            if settings.activations == "dynamic" and not cpu_ort:
                raise UnsupportedRequestError(
                    f"--activations dynamic (per-token scales) is built for ONNX Runtime on the CPU; "
                    f"{self.target_record.name} with {backend} runs static per-tensor Q/DQ",
                    hint="drop --activations (static is the default here)")
            if settings.activations is None:
                settings = replace(settings, activations="dynamic" if cpu_ort else "static")
        if backend == "tensorrt" and settings.uses_gptq and settings.precision == "int4":  # its symmetric int4 grid
            # is not AWQ's (the pass notes it); fp8's per-row E4M3 grid is the same for both backends
            settings = replace(settings, int4_rounding="nearest", gptq_samples=None, gptq_act_order=None)
        if settings.kv_cache and backend == "onnxruntime":
            raise UnsupportedRequestError(
                f"--kv-cache {settings.kv_cache} is not supported by the onnxruntime backend: its attention kernels "
                "read fp32/fp16 caches", hint="drop --kv-cache (the cache stays in the graph's float type)")
        return settings

    @property
    def target_record(self) -> Target:
        return get_target(self.target)

    @property
    def precision_mode(self) -> str:
        return self.target_record.mode(self.precision)

    def with_(self, **changes) -> "CompileConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain data (the sub-records as dicts): what --dry-run --json prints and the manifest records."""
        return asdict(self)
