"""The ONNX Runtime backend (CPU and CUDA execution providers): its pass pipelines, its build step
(run the passes, write the model with external data, record the session settings the runtime must
use), and how to open a runner on the result."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from leptonc.config import KernelOptions
from leptonc.errors import BackendUnavailableError
from leptonc.graph_contract import LOGITS, LOGITS_POSITIONS, NEXT_TOKEN
from leptonc.targets.backends.base import Backend, register_backend

MODEL_FILE = "model.onnx"

# ---- pipelines ----------------------------------------------------------------------------------
# One explicit list per device. The order matters; each constraint is stated where it applies.
CLEANUP: list[str] = [
    "infer_shapes",         # first: fusions check operand shapes (a skip-norm must not hide a broadcast)
    "fold_constants",       # needs shapes (folds Shape of static dims)
    "remove_dead_nodes",
    "dedupe_initializers",  # before fusions copy any constant into a merged weight
]
CPU_PIPELINE: list[str] = CLEANUP + [
    "fuse_rmsnorm",
    "fuse_skip_rmsnorm",    # after fuse_rmsnorm: it absorbs the residual Add into the fused norm
    "fuse_skip_layernorm",  # gpt2-style graphs (LayerNormalization); skipped on RMSNorm models
    "fuse_gelu",
    "fuse_silu",            # SiLU -> QuickGelu(alpha 1): one kernel for x * sigmoid(x)
    "fuse_rotary",          # before fuse_gqa: attention takes q/k already rotated, in [B, S, hidden]
    "fuse_gqa",             # before the merges: it peels the head-split Reshape/Transpose off q/k/v
    "merge_qkv",            # after fuse_gqa, so attention matching sees three separate projections
    "fold_rotary_into_gqa",  # after merge_qkv: GQA takes the packed projection; mask-sum graphs only
    "merge_gate_up",
    "select_logits",        # the LM head reads only the positions the runtime asks for
    "greedy_token",         # after select_logits: ArgMax over the selected logits, a next_token output
]
# ONNX Runtime's CUDA provider has kernels for every contrib op above (GroupQueryAttention in fp16).
CUDA_PIPELINE: list[str] = list(CPU_PIPELINE)


# Quantization (passes/quantize_*.py) comes LAST, after cleanup and fusion: the fusions
# match float MatMul/Gemm patterns, and the quantizers then replace whatever MatMuls remain (fused
# or not) with what ONNX Runtime runs natively: MatMulNBits (int4, int8 weight-only), QDQ int8
# (fused by ORT into integer MatMuls), float8 Q/DQ (fp8, simulated on the CPU).
QUANT_PASSES: dict[str, list[str]] = {"int8": ["quantize_int8"], "int4": ["quantize_int4"], "fp8": ["quantize_fp8"]}


# GPU targets, last: MatMulNBits moved to leptonc's own CUDA kernel (targets/kernels/). After quantization
# and select_logits, which create and rewire the MatMulNBits nodes it lowers. On by default since it
# ran on the H100 (2026-11-23): smollm2-135m int4 1,130 tok/s at batch 1 and 12,637 at batch 16
# against 861 and 6,949 with ONNX Runtime's kernel in the same call, the same greedy tokens; llama-1b-shape
# int4 1,035 and 985 tok/s at batch 1 in two calls (1.62x and 1.59x fp16), where ONNX Runtime's kernel
# measured 876-890 in earlier calls (not the same call). Where the library cannot be built (no nvcc or
# no ONNX Runtime header), the pass is skipped with the reason.
# fp16 graphs (H100, 2026-11-23): MatMul/Gemm with constant fp16 weights -> ai.leptonc.MatMulF16 (SwiGLU folded in):
# llama-1b-shape fp16 745 vs 676-684 tok/s at batch 1, smollm2 1,024 vs 910, against ONNX Runtime's ops in one call.
# --no-cuda-kernels (KernelOptions.cuda_kernels) or --disable-pass use_leptonc_kernels keeps ONNX Runtime's kernels.
GPU_LOWERING: list[str] = ["use_leptonc_kernels"]


def pipeline(target, precision: str, kernels: KernelOptions = KernelOptions()) -> list[str]:
    lower = target.is_gpu and kernels.cuda_kernels
    return (list(CUDA_PIPELINE if target.is_gpu else CPU_PIPELINE) + QUANT_PASSES.get(precision, [])
            + (GPU_LOWERING if lower else []))


def export_dtype(target, precision: str) -> str:
    """The float type of the exported graph: fp16 on GPUs (tensor cores), fp32 on the CPU."""
    if precision in ("fp16", "bf16") or (target.is_gpu and precision != "fp32"):
        return "fp16"
    return "fp32"


def provider(target) -> str:
    return "CUDAExecutionProvider" if target.is_gpu else "CPUExecutionProvider"


def check_available(target) -> None:
    try:
        importlib.import_module("onnxruntime")
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed", hint="pip install onnxruntime") from None
    # A GPU target without ONNX Runtime's CUDA provider here is a cross-compile (cross_compiling): the bundle is
    # built as on the GPU, verified on the CPU as far as it can be, and its GPU check waits for the GPU.


def cross_compiling(target) -> bool:
    """A GPU bundle built where ONNX Runtime has no CUDA provider (a CPU-only CI runner): the graph before the
    lowering to leptonc's kernels is verified on the CPU provider; the rest is a pending GPU check (gpu_check.py)."""
    import onnxruntime as ort

    return target.is_gpu and "CUDAExecutionProvider" not in ort.get_available_providers()


CPU_CHECK_MODEL = "cpu_check.onnx"  # in the compile's work folder: the GPU graph before use_leptonc_kernels


def cpu_cannot_run(model_path: Path) -> str | None:
    """None where ONNX Runtime's CPU provider loads `model_path`; otherwise its reason (e.g. fp16 int8 Q/DQ)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's load errors have no common type
        return f"ONNX Runtime's CPU provider cannot run it: {str(exc).splitlines()[0][:300]}"
    return None


def cpu_check_engine(engine: dict, model_file: str) -> dict:
    """The engine section that runs `model_file` (relative to the staging folder) on the CPU provider."""
    session = {k: v for k, v in engine.get("session", {}).items() if k != "custom_ops_library"}
    return {**engine, "file": model_file, "session": {**session, "provider": "CPUExecutionProvider"}}


def session_settings(target) -> dict:
    return {"provider": provider(target), "graph_optimization_level": "all", "intra_op_num_threads": 0}


def build(exported, staging: Path, pipeline_names: list[str], ctx, disabled: tuple[str, ...] = (),
          on_pass=None) -> tuple[dict, list[dict]]:
    """Run the pass pipeline on the plain export and write the bundle's model files into `staging`.
    Returns (engine section of the manifest, pass records)."""
    records: list[dict] = []
    out = staging / MODEL_FILE
    kernels = _prepare_kernels(ctx, pipeline_names, disabled)
    if pipeline_names:
        from leptonc.passes import run_pipeline
        from leptonc.passes.graph_io import load_graph, save_graph

        # Weights stay on disk until a pass reads them, and untouched ones are streamed file to file
        # (passes/graph_io.py): models over 2 GB compile within 2.5x their weight bytes.
        graph = load_graph(exported.model_path)
        cpu_check = exported.model_path.parent / CPU_CHECK_MODEL if cross_compiling(ctx.target) else None

        def before_pass(name: str) -> None:
            if cpu_check is not None and name in GPU_LOWERING:  # what the CPU can run and verify
                save_graph(graph, cpu_check, exported.model_path.parent)
            if on_pass:
                on_pass(name)

        records = run_pipeline(graph, pipeline_names, ctx, disabled, on_pass=before_pass)
        save_graph(graph, out, exported.model_path.parent)
        del graph
    else:
        shutil.move(str(exported.model_path), out)
        shutil.move(str(exported.data_path), staging / f"{MODEL_FILE}.data")
    io = exported.io
    if any(r["name"] == "select_logits" and r["status"] == "applied" for r in records):
        io = {**io, "inputs": [*io["inputs"], {"name": LOGITS_POSITIONS, "dtype": "int64",
                                               "shape": ["batch", "logits_sequence"]}],
              "outputs": [({**t, "shape": [t["shape"][0], "logits_sequence", *t["shape"][2:]]} if t["name"] == LOGITS
                           else t) for t in io["outputs"]]}
    if any(r["name"] == "greedy_token" and r["status"] == "applied" for r in records):
        logits = next(t for t in io["outputs"] if t["name"] == LOGITS)
        io = {**io, "outputs": [*io["outputs"], {"name": NEXT_TOKEN, "dtype": "int64", "shape": logits["shape"][:2]}]}
    from leptonc.runtime.engine_settings import EngineSettings

    session = session_settings(ctx.target)
    if any(r["name"] == "fuse_gqa" and (r.get("counts") or {}).get("mask_sum") for r in records):
        # The runtime's side of the contract (passes/fuse_gqa.py): right-padded prompts, a fixed
        # [B, capacity] decode mask, and with it CUDA graphs for the decode step on the CUDA provider.
        session["gqa_lengths"] = "mask_sum"
    engine = {
        "file": MODEL_FILE,
        "format": "onnx",
        "io": io,
        "session": session,
        # how it runs, overridable per run (leptonc/runtime/engine_settings.py)
        "run_settings": EngineSettings().as_dict(),
    }
    if kernels is not None and any(r["name"] == "use_leptonc_kernels" and r["status"] == "applied" for r in records):
        info = kernels.manifest()
        (staging / info["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernels.path, staging / info["file"])
        session["custom_ops_library"] = info["file"]
        engine["kernels"] = info
    return engine, records


def _prepare_kernels(ctx, pipeline_names: list[str], disabled: tuple[str, ...]):
    """Build leptonc's CUDA kernel library when the pipeline may lower ops to it (fp16 GPU graphs: the
    MatMulNBits of int4/int8 weights, fp16 products with constant weights, SwiGLU). Where it cannot be
    built, the pass is skipped and its record says why."""
    if "use_leptonc_kernels" not in pipeline_names or "use_leptonc_kernels" in disabled:
        return None
    if export_dtype(ctx.target, ctx.precision) != "fp16":
        ctx.kernel_library = {"unavailable": f"not needed for {ctx.precision} (the kernels are fp16)"}
        return None
    from leptonc.targets.kernels import KernelsUnavailable, build_library

    # What use_leptonc_kernels lowers (attention, the norm prologues) is the compile's KernelOptions, in ctx.kernels.
    try:
        lib = build_library(ctx.target.compute_capability)
    except KernelsUnavailable as exc:
        ctx.kernel_library = {"unavailable": str(exc)}
        return None
    ctx.kernel_library = lib.manifest()
    return lib


def open_runner(model_path: Path, engine: dict, limits: dict, device: str | None = None, run_settings=None):
    """The bundle's runner; `run_settings` (leptonc.runtime.engine_settings.EngineSettings) as recorded, or overridden."""
    session = engine.get("session", {})
    if session.get("provider") == "CUDAExecutionProvider" or device == "cuda":
        from leptonc.runtime.ort_cuda import OrtCudaRunner

        return OrtCudaRunner(model_path, engine["io"], session, max_sequence=limits["max_sequence"],
                             max_batch=limits["max_batch"], run_settings=run_settings)
    from leptonc.runtime.ort_cuda import OrtCudaRunner
    from leptonc.runtime.ort_cuda_session import graph_op_types

    if "GroupQueryAttention" in graph_op_types(model_path):
        # The fused graph reads and writes one preallocated KV buffer in place (GQA's shared past/present),
        # so a decode step no longer copies the whole cache: the I/O-binding runner does that on the CPU
        # provider too (measured 1.56x over the plain graph at a 1,024-token prompt, BENCHMARKS.md).
        return OrtCudaRunner(model_path, engine["io"], session, max_sequence=limits["max_sequence"],
                             max_batch=limits["max_batch"], device_type="cpu", run_settings=run_settings)
    from leptonc.runtime.ort import OrtCpuRunner

    return OrtCpuRunner(model_path, engine["io"], session, max_sequence=limits["max_sequence"],
                        max_batch=limits["max_batch"])


@register_backend
class OnnxRuntimeBackend(Backend):
    """The interface of targets/backends/base.py over this module's functions."""

    name = "onnxruntime"
    cpu_check_model = CPU_CHECK_MODEL

    def pipeline(self, config) -> list[str]:
        return pipeline(config.target_record, config.precision, config.kernels)

    def export_dtype(self, target, precision: str) -> str:
        return export_dtype(target, precision)

    def preflight(self, config) -> None:
        check_available(config.target_record)

    def build(self, exported, staging: Path, pipeline: list[str], ctx, disabled: tuple[str, ...] = (),
              on_pass=None) -> tuple[dict, list[dict]]:
        return build(exported, staging, pipeline, ctx, disabled, on_pass=on_pass)

    def open_runner(self, model_path: Path, engine: dict, limits: dict, device: str | None = None, run_settings=None):
        return open_runner(model_path, engine, limits, device, run_settings)

    def cross_compiling(self, target) -> bool:
        return cross_compiling(target)

    def cpu_check_engine(self, engine: dict, model_file: str) -> dict:
        return cpu_check_engine(engine, model_file)

    def cpu_cannot_run(self, model_path: Path) -> str | None:
        return cpu_cannot_run(model_path)
