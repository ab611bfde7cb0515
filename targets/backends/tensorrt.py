"""The TensorRT backend: its pass pipeline, the builder configuration it derives for a target, the
engine build through Polygraphy's loaders, and how a runner is opened on the engine.

Written against TensorRT 10/11 and Polygraphy 0.49+:

- Networks are always built **strongly typed** (`NetworkFromOnnxPath(strongly_typed=True)`): the
  tensor types come from the graph (fp16 export, or Q/DQ for int8/fp8/int4), as TensorRT 11 requires
  (it removed the weak-typing precision flags `BuilderFlag.FP16/BF16/INT8/FP8` and the implicit INT8
  calibrators; TensorRT 10.12+ deprecated them). So the builder precision flags are all off and the
  precision lives in the graph; TF32 stays off so that fp32 means IEEE fp32.
- Two optimization profiles: 0 = prefill (batch 1..max, sequence 1..max, empty past), 1 = decode (one
  token, past 1..max-1). The runner keeps one execution context per profile.
- Timing cache in and out, hardware compatibility (`ampere+`, `same-cc`), version compatibility
  (lean runtime embedded), builder optimization level, 2:4 sparse weights, workspace from the target's
  memory.

Nothing here imports tensorrt at module import time: `plan_extras` (for `compile --dry-run`) and the
lint run without it. The loader chain is built from real Polygraphy objects, which import tensorrt
only when called.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from leptonc.config import TensorRTOptions
from leptonc.errors import BackendUnavailableError, BundleError, UnsupportedRequestError
from leptonc.graph_contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, past_name
from leptonc.targets.backends.base import Backend, register_backend

ENGINE_FILE = "engine.plan"
ONNX_FOR_BUILD = "tensorrt_input.onnx"
MIN_TENSORRT = (10, 0)  # strongly typed networks, INT64 I/O, enqueueV3 tensor addresses
DEFAULT_OPT_BATCH = 1
DEFAULT_OPT_SEQ = 128
DEFAULT_BUILDER_OPT_LEVEL = 3  # TensorRT's own default
WORKSPACE_FRACTION = 0.25  # of the target's memory; the rest is for weights, KV cache and activations
HARDWARE_COMPAT = {"ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}  # TensorRT's enum names
PROFILE_NAMES = ("prefill", "decode")
INSTALL_HINT = ("install TensorRT 10 or later on a machine with an NVIDIA GPU (pip install tensorrt), "
                "or compile with --backend onnxruntime")

# ---- pipelines ----------------------------------------------------------------------------------
# Standard ONNX operators only. TensorRT's own optimizer recognizes the exported RMSNorm, rotary,
# SwiGLU and MatMul-Softmax-MatMul attention patterns and fuses them into its kernels, so the graph
# passes that lower those patterns to ONNX Runtime contrib operators (SimplifiedLayerNormalization,
# GroupQueryAttention, ...) are not in this pipeline: TensorRT's parser has no importer for them
# (the lint refuses them). What TensorRT gains from us is a clean graph:
FLOAT_PIPELINE: list[str] = [
    "infer_shapes",         # types and shapes first: constant folding needs them
    "fold_constants",       # shape arithmetic and constant subgraphs become initializers
    "remove_dead_nodes",    # after folding, which leaves the nodes it replaced unread
    "dedupe_initializers",  # last: folding can produce identical constants
]
# Quantization comes after cleanup (the quantizers match MatMuls on the clean graph) and writes the
# explicit Q/DQ that a strongly typed TensorRT network takes its precision from. For this backend the
# passes write TensorRT's forms (passes/quantize_tensorrt.py): symmetric int8/fp8 Q/DQ with fp16 scales,
# INT4 block-quantized DequantizeLinear weights. They raise the exported graph's opset (17) where the
# form needs it: 19 for fp16 scales and float8 (int8, fp8), 21 for DequantizeLinear's block_size
# (int4); the lint reads opsets 9..24 (tensorrt_lint.OPSET_RANGE).
QUANT_PASSES: dict[str, list[str]] = {"int8": ["quantize_int8"], "fp8": ["quantize_fp8"], "int4": ["quantize_int4"]}


def pipeline(target, precision: str, kernels=None) -> list[str]:
    """`kernels` (leptonc's CUDA kernel switches) are ONNX Runtime's; CompileConfig refuses them here."""
    return FLOAT_PIPELINE + QUANT_PASSES.get(precision, [])


def export_dtype(target, precision: str) -> str:
    """fp32 stays fp32; everything else is exported fp16 (quantized graphs keep fp16 activations
    around their Q/DQ pairs). CompileConfig has refused bf16 for this backend."""
    return "fp32" if precision == "fp32" else "fp16"


# Its options are `leptonc.config.TensorRTOptions`, validated once by CompileConfig.


# ---- the builder configuration (pure: no TensorRT needed) ---------------------------------------

def dims_for(profile: str, max_batch: int, max_sequence: int, opt_batch: int, opt_seq: int) -> dict:
    """(min, opt, max) of every symbolic dimension of the decoder's inputs, per profile.
    Prefill starts a sequence (empty past); decode appends one token to a past of 1..max-1."""
    batch = (1, opt_batch, max_batch)
    if profile == "prefill":
        return {"batch": batch, "sequence": (1, opt_seq, max_sequence), "past_sequence": (0, 0, 0),
                "total_sequence": (1, opt_seq, max_sequence)}
    past_opt = max(1, min(opt_seq, max_sequence - 1))
    return {"batch": batch, "sequence": (1, 1, 1), "past_sequence": (1, past_opt, max_sequence - 1),
            "total_sequence": (2, past_opt + 1, max_sequence)}


def profile_shapes(inputs: list[dict], dims: dict) -> dict:
    """{input name: {"min": [...], "opt": [...], "max": [...]}} for inputs with symbolic shapes."""
    out = {}
    for spec in inputs:
        shape = spec["shape"]
        resolved = {"min": [], "opt": [], "max": []}
        for d in shape:
            lo, mid, hi = dims[d] if isinstance(d, str) else (d, d, d)
            resolved["min"].append(lo)
            resolved["opt"].append(mid)
            resolved["max"].append(hi)
        out[spec["name"]] = resolved
    return out


def builder_config(target, precision: str, max_batch: int, max_sequence: int, opts: TensorRTOptions,
                   inputs: list[dict] | None = None) -> dict:
    """The full builder configuration a build uses, as plain data (what `--dry-run --json` prints and
    what `engine_loaders` turns into Polygraphy loaders). `inputs` is the graph's input spec (names
    and symbolic shapes); without it the profiles are given per symbolic dimension only. The options
    come validated for this target from `CompileConfig`."""
    opt_batch = opts.opt_batch or min(DEFAULT_OPT_BATCH, max_batch)
    opt_seq = opts.opt_seq or min(DEFAULT_OPT_SEQ, max_sequence)
    profiles = []
    for name in PROFILE_NAMES:
        if name == "decode" and max_sequence < 2:
            continue  # no room for a past token: prefill only
        dims = dims_for(name, max_batch, max_sequence, opt_batch, opt_seq)
        entry = {"index": len(profiles), "name": name,
                 "dims": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in dims.items()}}
        if inputs is not None:
            entry["shapes"] = profile_shapes(inputs, dims)
        profiles.append(entry)
    quantized = precision in ("int8", "fp8", "int4")
    timing = str(Path(opts.timing_cache).expanduser().resolve()) if opts.timing_cache else None
    compat = HARDWARE_COMPAT.get(opts.hardware_compat or "", "NONE")
    return {
        "tensorrt_min_version": ".".join(map(str, MIN_TENSORRT)),
        "target": target.name,
        "compute_capability": ".".join(map(str, target.compute_capability)),
        "network": {
            "loader": "NetworkFromOnnxPath",
            "strongly_typed": True,
            "reason": ("explicit Q/DQ quantization: TensorRT takes each tensor's type from the Q/DQ graph"
                       if quantized else "tensor types come from the exported graph"
                       f" ({'fp32' if precision == 'fp32' else 'fp16'}); TensorRT 11 builds strongly typed only"),
        },
        "precision": {
            "requested": precision,
            "mode": target.mode(precision),
            "graph": {"fp32": "fp32 weights and activations", "fp16": "fp16 weights and activations",
                      "int8": "int8 Q/DQ (W8A8 or weight-only) around fp16", "fp8": "fp8 E4M3 Q/DQ around fp16",
                      "int4": "int4 block-quantized weights (DQ) with fp16 activations"}[precision],
            "builder_flags": {"fp16": False, "bf16": False, "int8": False, "fp8": False, "tf32": False},
            "flags_reason": "strongly typed network: precision flags are not set (removed in TensorRT 11); "
                            "TF32 off so fp32 keeps IEEE fp32 math",
        },
        "profiles": profiles,
        "opt_batch": opt_batch,
        "opt_seq": opt_seq,
        "sparse_weights": opts.sparsity == "2:4",
        "sparsity_note": ("TensorRT picks sparse kernels only for weights that already have the 2:4 pattern"
                          if opts.sparsity else None),
        "timing_cache": {"load": timing, "save": timing},
        "hardware_compatibility_level": compat,
        "version_compatible": bool(opts.version_compatible),
        "exclude_lean_runtime": False,
        "runtime": "lean runtime (embedded in the plan)" if opts.version_compatible else "full TensorRT runtime",
        "builder_optimization_level": (opts.builder_opt_level if opts.builder_opt_level is not None
                                       else DEFAULT_BUILDER_OPT_LEVEL),
        "memory_pool_limits": {"WORKSPACE": int(target.memory_gb * WORKSPACE_FRACTION * (1 << 30))},
        "engine_file": ENGINE_FILE,
    }


def plan_extras(config) -> dict:
    """Merged into `compile --dry-run --json`: the builder configuration and profiles, computed
    without TensorRT (whether it is installed here is reported, not required)."""
    if config.backend != "tensorrt":
        return {}
    opts = config.tensorrt
    inputs = _inputs_from_source(config.source)
    cfg = builder_config(config.target_record, config.precision, config.max_batch, config.max_sequence, opts,
                         inputs)
    if inputs is None:
        cfg["profiles_note"] = ("per-input shapes are resolved at build time from the exported graph "
                                "(this source's layer count and head sizes are read only when it is loaded)")
    cfg["tensorrt_installed_here"] = tensorrt_installed()
    cfg["lint"] = "every graph is linted against TensorRT's ONNX support matrix before the build"
    return {"tensorrt": cfg}


def _inputs_from_source(source: str) -> list[dict] | None:
    """The decoder's input spec from a config we can read without loading weights (built-ins with a
    config dict, Hugging Face directories); None for GGUF files and packaged models."""
    from leptonc.models.intake import describe_source, read_hf_config

    kind, what = describe_source(source)
    cfg = getattr(what, "config", None) if kind == "builtin" else (read_hf_config(what) if kind == "hf-dir" else None)
    if not cfg:
        return None
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    if not (layers and heads and hidden):
        return None
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    inputs = [{"name": INPUT_IDS, "shape": ["batch", "sequence"]},
              {"name": ATTENTION_MASK, "shape": ["batch", "total_sequence"]},
              {"name": POSITION_IDS, "shape": ["batch", "sequence"]}]
    for i in range(layers):
        for kind_ in ("key", "value"):
            inputs.append({"name": past_name(i, kind_), "shape": ["batch", kv, "past_sequence", head_dim]})
    return inputs


# ---- availability and the build GPU --------------------------------------------------------------

def tensorrt_installed() -> bool:
    """Whether `import tensorrt` can be attempted (found on the path), without importing it."""
    return importlib.util.find_spec("tensorrt") is not None


def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or the bindings failing to load their libraries
        raise BackendUnavailableError(
            f"TensorRT is not available here (import tensorrt failed: {type(exc).__name__}: {exc})",
            hint=INSTALL_HINT) from None
    version = _ver(trt.__version__)
    if version[:2] < MIN_TENSORRT:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old; leptonc needs "
                                      f"{'.'.join(map(str, MIN_TENSORRT))} or later", hint="pip install -U tensorrt")
    return trt


def check_available(target) -> None:
    """TensorRT must import (exit 5 otherwise, saying how to get it or to use ONNX Runtime)."""
    import_tensorrt()


def local_compute_capability() -> tuple[int, int] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))


def check_build_gpu(target, hardware_compat: str | None, local: tuple[int, int] | None) -> None:
    """TensorRT builds for the GPU it runs on. Refuse a build whose engine would not run on the target."""
    want = target.compute_capability
    if local is None:
        raise BackendUnavailableError(
            f"no NVIDIA GPU is visible here; TensorRT builds an engine on the GPU it targets ({target.name}, {target.sm})",
            hint=f"run the compile on a {target.name}, or use --backend onnxruntime")
    if tuple(local) == tuple(want):
        return
    here = f"sm{local[0]}{local[1]}"
    if hardware_compat == "ampere+":
        if local >= (8, 0) and want >= (8, 0):
            return
        raise UnsupportedRequestError(
            f"--hardware-compat ampere+ needs an Ampere or newer GPU on both sides; this GPU is {here}, "
            f"{target.name} is {target.sm}", hint=f"build on a {target.name}")
    extra = ("; --hardware-compat same-cc only makes the engine portable across GPUs with the build GPU's "
             f"compute capability ({here})" if hardware_compat == "same-cc" else "")
    raise UnsupportedRequestError(
        f"this GPU is {here} but target {target.name} is {target.sm}: TensorRT engines run only on the compute "
        f"capability they were built on{extra}",
        hint=f"build on a {target.name}, or pass --hardware-compat ampere+ (both sm80+), or --target for this GPU")


def preflight(config) -> None:
    """What can refuse a TensorRT compile before the model is loaded, once `CompileConfig` has checked
    the options (exit 2): TensorRT present (exit 5), the build GPU (exit 5 / 2)."""
    target = config.target_record
    check_available(target)
    check_build_gpu(target, config.tensorrt.hardware_compat, local_compute_capability())


# ---- the build ---------------------------------------------------------------------------------

def engine_loaders(settings: dict, onnx_path: Path, engine_path: Path):
    """The Polygraphy loader chain for `settings` (from `builder_config` with per-input shapes):
    SaveEngine(EngineFromNetwork(NetworkFromOnnxPath, CreateConfig)). Constructing it needs no
    TensorRT; calling it builds and writes the engine."""
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, PostprocessConfig,
                                        Profile, SaveEngine)

    profiles = []
    for entry in settings["profiles"]:
        prof = Profile()
        for name, shape in entry["shapes"].items():
            prof.add(name, min=tuple(shape["min"]), opt=tuple(shape["opt"]), max=tuple(shape["max"]))
        profiles.append(prof)
    flags = settings["precision"]["builder_flags"]
    create = CreateConfig(
        profiles=profiles,
        tf32=flags["tf32"], fp16=flags["fp16"], bf16=flags["bf16"], int8=flags["int8"], fp8=flags["fp8"],
        sparse_weights=settings["sparse_weights"],
        load_timing_cache=settings["timing_cache"]["load"],
        builder_optimization_level=settings["builder_optimization_level"],
        version_compatible=settings["version_compatible"] or None,
        exclude_lean_runtime=settings["exclude_lean_runtime"] or None,
    )
    # Enum-valued settings need the tensorrt module, so they are applied when the config is created.
    config = PostprocessConfig(create, _apply_enum_settings(settings))
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=settings["network"]["strongly_typed"])
    engine = EngineFromNetwork(network, config=config, save_timing_cache=settings["timing_cache"]["save"])
    return SaveEngine(engine, str(engine_path))


def _apply_enum_settings(settings: dict):
    workspace = settings["memory_pool_limits"]["WORKSPACE"]
    level = settings["hardware_compatibility_level"]

    def apply(builder, network, config) -> None:
        import tensorrt as trt

        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        if level != "NONE":
            config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)

    return apply


def build(exported, staging: Path, pipeline_names: list[str], ctx, disabled: tuple[str, ...] = (),
          on_pass=None) -> tuple[dict, list[dict]]:
    """Passes -> lint -> TensorRT engine in `staging`. Returns (engine section of the manifest, records)."""
    from leptonc.targets.backends.tensorrt_lint import format_issues, lint_model

    target = ctx.target
    opts = ctx.tensorrt  # validated by CompileConfig
    max_batch, max_sequence = ctx.max_batch, ctx.max_sequence  # the profiles span the bundle's limits
    trt = import_tensorrt()
    check_build_gpu(target, opts.hardware_compat, local_compute_capability())

    work = Path(ctx.work_dir or staging / "_work")
    onnx_path, records = _graph_for_build(exported, work, pipeline_names, ctx, disabled, on_pass)
    if on_pass:
        on_pass("tensorrt lint")
    lint = lint_model(onnx_path)
    if lint["issues"]:
        raise UnsupportedRequestError(
            f"the graph for TensorRT has {len(lint['issues'])} node(s) its parser would reject:\n"
            f"{format_issues(lint)}",
            hint="run `leptonc inspect MODEL.onnx --trt` on the graph, --disable-pass the pass that produced "
                 "them, or use --backend onnxruntime")
    settings = builder_config(target, ctx.precision, max_batch, max_sequence, opts, exported.io["inputs"])
    engine_path = staging / ENGINE_FILE
    if on_pass:
        on_pass("tensorrt build")
    engine = engine_loaders(settings, onnx_path, engine_path)()
    local = local_compute_capability()
    section = {
        "file": ENGINE_FILE,
        "format": "tensorrt-plan",
        "io": exported.io,
        "tensorrt_version": trt.__version__,
        "compute_capability": ".".join(map(str, local)) if local else None,
        "target_compute_capability": settings["compute_capability"],
        "strongly_typed": True,
        "version_compatible": settings["version_compatible"],
        "hardware_compatibility_level": settings["hardware_compatibility_level"],
        "profiles": [{"index": p["index"], "name": p["name"], "shapes": p["shapes"]} for p in settings["profiles"]],
        "engine_io": describe_engine_io(engine, trt),
        "builder": {k: v for k, v in settings.items() if k != "profiles"},
        "lint": {"issues": 0, "warnings": len(lint["warnings"]), "matrix": lint["tensorrt_matrix"]},
        "bytes": engine_path.stat().st_size,
        "limits": {"max_batch": max_batch, "max_sequence": max_sequence},
    }
    return section, records


def _graph_for_build(exported, work: Path, pipeline_names, ctx, disabled, on_pass) -> tuple[Path, list[dict]]:
    """Run the pass pipeline (if any) and write the ONNX file the builder parses."""
    if not pipeline_names:
        return Path(exported.model_path), []
    from leptonc.passes import run_pipeline
    from leptonc.passes.graph_io import load_graph, save_graph

    graph = load_graph(exported.model_path)
    records = run_pipeline(graph, pipeline_names, ctx, disabled, on_pass=on_pass)
    out = work / ONNX_FOR_BUILD
    save_graph(graph, out, exported.model_path.parent)
    return out, records


def describe_engine_io(engine, trt) -> list[dict]:
    """Each I/O tensor of a deserialized engine: name, input/output, dtype, shape (-1 dynamic), and
    its (min, opt, max) per profile for inputs."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        entry = {"name": name, "mode": "input" if is_input else "output",
                 "dtype": engine.get_tensor_dtype(name).name, "shape": list(engine.get_tensor_shape(name))}
        if is_input:
            entry["profiles"] = [[list(s) for s in engine.get_tensor_profile_shape(name, p)]
                                 for p in range(engine.num_optimization_profiles)]
        out.append(entry)
    return out


# ---- runners and toolchain checks ----------------------------------------------------------------

def open_runner(model_path: Path, engine: dict, limits: dict, device: str | None = None):
    if device not in (None, "cuda"):
        raise UnsupportedRequestError(f"--device {device}: a TensorRT engine runs only on its NVIDIA GPU")
    from leptonc.runtime.trt import TrtRunner

    return TrtRunner(Path(model_path), engine, limits)


def open_bare_engine(path: Path):
    """A runner on a bare `.plan` (no bundle): I/O, limits and profiles are read from the engine."""
    from leptonc.runtime.trt import TrtRunner

    return TrtRunner.from_plan(Path(path))


def installed_tensorrt_version() -> str | None:
    """The TensorRT runtime installed here, from package metadata (no import)."""
    import importlib.metadata as md

    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-lean", "tensorrt-lean-cu13",
                 "tensorrt-lean-cu12"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def compare_engine_versions(built: str, installed: str, version_compatible: bool) -> str | None:
    """None if a runtime `installed` can deserialize an engine from `built`; else the reason."""
    b, i = _ver(built), _ver(installed)
    if version_compatible:
        if i[:3] >= b[:3]:
            return None
        return (f"this version-compatible engine was built with TensorRT {built}; it runs on that version or later, "
                f"but this machine has TensorRT {installed}")
    n = min(len(b), len(i), 4)
    if b[:n] == i[:n]:
        return None
    return (f"this engine was built with TensorRT {built} and this machine has TensorRT {installed}; a TensorRT "
            "engine loads only in the exact version that built it")


def check_engine_toolchain(manifest: dict) -> None:
    """Called when a tensorrt bundle is loaded with verification on."""
    engine = manifest.get("engine") or {}
    built = engine.get("tensorrt_version") or (manifest.get("toolchain") or {}).get("tensorrt")
    if not built:
        raise BundleError("this TensorRT bundle does not record the TensorRT version that built its engine",
                          hint="recompile the bundle")
    installed = installed_tensorrt_version()
    if installed is None:
        raise BackendUnavailableError(
            f"this bundle holds a TensorRT {built} engine, and TensorRT is not installed here",
            hint=f"pip install tensorrt=={built} on a machine with an NVIDIA GPU")
    reason = compare_engine_versions(built, installed, bool(engine.get("version_compatible")))
    if reason:
        raise BundleError(reason, hint=f"pip install tensorrt=={built}, or recompile the bundle with TensorRT {installed}")


def _ver(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:4])


@register_backend
class TensorRTBackend(Backend):
    """The interface of targets/backends/base.py over this module's functions."""

    name = "tensorrt"

    def pipeline(self, config) -> list[str]:
        return pipeline(config.target_record, config.precision, config.kernels)

    def export_dtype(self, target, precision: str) -> str:
        return export_dtype(target, precision)

    def preflight(self, config) -> None:
        preflight(config)

    def plan_extras(self, config) -> dict:
        return plan_extras(config)

    def build(self, exported, staging: Path, pipeline: list[str], ctx, disabled: tuple[str, ...] = (),
              on_pass=None) -> tuple[dict, list[dict]]:
        return build(exported, staging, pipeline, ctx, disabled, on_pass=on_pass)

    def open_runner(self, model_path: Path, engine: dict, limits: dict, device: str | None = None, run_settings=None):
        return open_runner(model_path, engine, limits, device)


__all__ = [
    "ENGINE_FILE", "build", "builder_config", "check_available", "check_build_gpu",
    "check_engine_toolchain", "compare_engine_versions", "engine_loaders", "export_dtype", "open_bare_engine",
    "open_runner", "pipeline", "plan_extras", "preflight", "TensorRTBackend",
]
