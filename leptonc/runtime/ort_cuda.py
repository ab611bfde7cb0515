"""ONNX Runtime CUDA runner: the KV cache lives on the GPU between steps.

Every input and output goes through ORT I/O binding to OrtValues on the device; the host sends only
the new token ids (and mask/positions) and reads back only the logits. Two cache layouts:

- **growing** (the plain export, `Concat` attention): each step binds `past_key_values.*` to the
  previous step's `present.*` OrtValues, which ORT allocated on the GPU. Nothing crosses to the host.
- **shared** (graphs with `GroupQueryAttention`): one zeroed device block per batch size holds every
  layer's K and V, [2 x layers, batch, kv_heads, capacity, head_dim]; each layer's slice is bound by
  address as both past and present, so GQA writes the new entries in place (ORT's
  past_present_share_buffer): no per-step allocation, fixed addresses. The block is allocated by an
  ONNX Runtime session at its exact size (`_KvBlock`); the decode binding is made once per batch size;
  a step copies only the new ids and positions in place.
- **prefill in row chunks**: a prompt batch runs through the graph at most `prefill_tokens` tokens at a
  time (engine setting, default 4,096; LEPTONC_PREFILL_TOKENS overrides), whole rows per chunk, each
  chunk bound to its rows of the K/V block, so a large batch of long prompts does not hold all of its
  activations at once. A single row is never split. Smaller chunks cost time to first token: on the
  H100, a 16 x 128 prefill of llama-1b-shape in 512-token chunks took 21.2 ms against 12.1 ms in one
  run (BENCHMARKS.md), hence the default.
- **CUDA graphs** (`enable_cuda_graph`, one captured graph per batch size, prefill uncaptured via
  `gpu_graph_id` -1) additionally need fixed *shapes*. GPU bundles are built for that (engine setting
  "gqa_lengths": "mask_sum", passes/fuse_attention.py): GroupQueryAttention reads each row's length
  from the mask's contents, so this runner right-pads prompts (real tokens first, per-row positions
  0..len-1) and decodes against a fixed [B, capacity] mask whose first `len` entries are 1. Callers
  still pass left-padded batches and get logits in their own layout back. Graphs fused for the CPU
  ("mask_length": lengths from the mask's length, padding masked by a bias) keep left padding and a
  mask that grows each step, so they cannot be captured; `describe()` says why.
- **pipelined greedy decode** (`greedy_tokens`, what `leptonc run` and `leptonc bench` use at temperature 0): ONNX
  Runtime runs on a stream of the runner's (`user_compute_stream`; leptonc/runtime/cuda_driver.py), a step's ids are
  copied on the device from the step before's `next_token`, and up to PIPELINE_DEPTH steps queue ahead of the token
  the host reads, so the GPU does not wait for the host between steps (on the H100: +3% on llama-1b-shape, +16% on
  smollm2 at batch 1, BENCHMARKS.md session 18). LEPTONC_PIPELINE=0 runs one step at a time; describe() says which.
- **device memory** (issue 8 line 6): every cuBLAS handle (one per ONNX Runtime provider instance, and the
  kernel library's) takes a default workspace pool unless CUBLAS_WORKSPACE_CONFIG says otherwise. On the H100
  that cost about 120 MiB per provider instance; the runner sets ":4096:1" (one 4 MiB buffer) where the user
  has not set the variable (`cublas_workspace_env`). The kernel library's own cuBLAS calls use their own
  workspace (LEPTONC_CUBLAS_WORKSPACE_MB). `release()` undoes the setting (`restore_cublas_env`), so what runs
  after the runner (PyTorch in `bench --baseline hf`) gets the environment the user gave it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from leptonc.errors import BackendUnavailableError, InputError
from leptonc.runtime.base import Runner, positions_from_mask

CACHE_ATTENTION_OPS = frozenset({"GroupQueryAttention", "CachedAttention"})  # attention that owns a K/V cache
_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": None}
PREFILL_TOKENS = 4096  # tokens per prefill chunk (whole rows); module doc
PIPELINE_DEPTH = 2  # greedy steps launched ahead of the one whose token the host reads (greedy_tokens)
CUBLAS_WORKSPACE_CONFIG = ":4096:1"  # cuBLAS's default workspace pool per handle: one 4 MiB buffer; module doc
_cublas_env_set = False  # whether this process's CUBLAS_WORKSPACE_CONFIG is the runner's, not the user's


def cublas_workspace_env() -> str:
    """CUBLAS_WORKSPACE_CONFIG as the runner's cuBLAS handles will read it: the user's, or ours where unset.
    It must be in the environment before the first handle is made (the provider's, at session creation)."""
    global _cublas_env_set
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
        _cublas_env_set = True
    value = os.environ["CUBLAS_WORKSPACE_CONFIG"]
    return f"{value} (leptonc's default)" if _cublas_env_set else f"{value} (set by the user)"


def _decode_prefetches() -> str:
    """What the decode kernels' session-19 switches select where this process runs the bundle, read as
    targets/kernels/attention.cuh and leptonc_cuda.cu read them."""
    value_rows = os.environ.get("LEPTONC_ATTN_PREFETCH_V") != "0"
    rows = {"0": "off", "1": "after its wait"}.get(os.environ.get("LEPTONC_ATTN_KV_PREFETCH", ""), "before its wait")
    m = re.match(r"\s*([-+]?\d+):\s*([-+]?\d+)(?::\s*([-+]?\d+))?", os.environ.get("LEPTONC_GEMV_WINDOW", "8:4"))
    window = "off" if m is None or (int(m[1]), int(m[2])) != (8, 4) else "8:4" + (f":{int(m[3])}" if m[3] else "")
    return (f"decode attention: value rows with the keys {'on' if value_rows else 'off (LEPTONC_ATTN_PREFETCH_V=0)'}, "
            f"key/value rows into L2 {rows} (LEPTONC_ATTN_KV_PREFETCH); int4 gate|up rolling window {window} "
            "(LEPTONC_GEMV_WINDOW)")


def _buffer_mib(name: str) -> str:
    """A kernel-library buffer size as leptonc_cuda.cu's env_mib reads it: whole MiB 1-4096, else its default."""
    value = os.environ.get(name, "")
    if value.isdigit() and 1 <= int(value) <= 4096:
        return value
    return "the library's default" + (f" ({name}={value!r} is not a whole number of MiB from 1 to 4096)"
                                      if value else "")


def restore_cublas_env() -> None:
    """Take back the runner's CUBLAS_WORKSPACE_CONFIG (handles already made keep their pools)."""
    global _cublas_env_set
    if _cublas_env_set and os.environ.get("CUBLAS_WORKSPACE_CONFIG") == CUBLAS_WORKSPACE_CONFIG:
        del os.environ["CUBLAS_WORKSPACE_CONFIG"]
    _cublas_env_set = False


class _KvBlock:
    """One batch size's K/V cache: a single zeroed allocation, [2 x layers, batch, kv_heads, capacity,
    head_dim], bound to the graph's past/present names by address (a layer's rows r0:r1 are contiguous).

    The block is the output of a one-node ConstantOfShape session on the runner's provider, so it comes
    from an ONNX Runtime arena that allocates exactly what is asked (kSameAsRequested). An OrtValue made
    from Python (`ortvalue_from_numpy`) would come from the Python module's own device arena, which grows
    in powers of two: on the H100 the first batch-16 prefill of llama-1b-shape (a 640 MiB block) raised
    device memory by 1,082 MiB, consistent with a 1 GiB region."""

    def __init__(self, runner: "OrtCudaRunner", batch: int):
        self.batch, self.dtype = batch, runner.kv_dtype
        self.row_shape = (runner.kv_heads, runner.capacity, runner.head_dim)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.names = list(runner._kv_names())
        self.device_type, self.device_id = runner.device_type, runner.device_id
        shape = np.asarray([2 * runner.num_layers, batch, *self.row_shape], np.int64)
        session = runner._zeros_session()
        binding = session.io_binding()
        binding.bind_cpu_input("shape", shape)
        binding.bind_output("zeros", self.device_type, self.device_id)
        try:
            session.run_with_iobinding(binding)
        except RuntimeError as exc:
            if "allocate" not in str(exc).lower():
                raise
            need = 2 * runner.num_layers * batch * self.row_bytes
            raise InputError(
                f"the KV cache for batch {batch} at this bundle's capacity of {runner.capacity} tokens needs "
                f"{need / 2**30:.2f} GiB of {'device' if self.device_type == 'cuda' else 'host'} memory, and "
                "that much could not be allocated",
                hint="run fewer prompts at once, or recompile with a smaller --max-seq") from None
        self.value = binding.get_outputs()[0]  # owns the memory; zeros, never uninitialized (0 x NaN is NaN)
        self.base = self.value.data_ptr()

    def bind(self, binding, rows: tuple[int, int] | None = None) -> None:
        r0, r1 = rows or (0, self.batch)
        shape = [r1 - r0, *self.row_shape]
        for j, (past, present) in enumerate(self.names):
            ptr = self.base + (j * self.batch + r0) * self.row_bytes
            binding.bind_input(past, self.device_type, self.device_id, self.dtype, shape, ptr)
            binding.bind_output(present, self.device_type, self.device_id, self.dtype, shape, ptr)


def load_ort_cuda():
    """Import onnxruntime with its CUDA provider usable, or raise BackendUnavailableError."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed",
                                      hint="pip install onnxruntime-gpu (on a machine with an NVIDIA GPU)") from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailableError(
            "this bundle runs on ONNX Runtime's CUDA provider, which this onnxruntime build lacks",
            hint="pip uninstall -y onnxruntime && pip install onnxruntime-gpu, on a machine with an NVIDIA GPU; "
                 "or compile for --target cpu")
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:  # finds the CUDA/cuDNN libraries that PyTorch's wheels installed
        try:
            preload()
        except Exception:  # noqa: BLE001 - a missing optional library shows up at session creation instead
            pass
    return ort


def graph_op_types(model_path: Path) -> set[str]:
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf/UTF-8 decode errors of a garbled file
        from leptonc.errors import BundleError

        raise BundleError(f"{Path(model_path).name} is not a readable ONNX model ({type(exc).__name__}); the file is "
                          "corrupt", hint="recompile the bundle (or re-export the model); check it was copied whole") from None
    return {n.op_type for n in model.graph.node}


class _GpuMemory:
    """Device memory in use (NVML), relative to when the runner started: ORT's arena keeps its peak."""

    def __init__(self, device_id: int):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
            self._nvml = pynvml
            self.baseline = self.used()
        except Exception:  # noqa: BLE001 - NVML missing: memory is reported as unknown, not guessed
            self.handle = None
        self.peak = 0.0

    def used(self) -> float:
        return self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20

    def sample(self) -> None:
        if self.handle is not None:
            self.peak = max(self.peak, self.used() - self.baseline)

    def name(self) -> str | None:
        if self.handle is None:
            return None
        name = self._nvml.nvmlDeviceGetName(self.handle)
        return name.decode() if isinstance(name, bytes) else name


class OrtCudaRunner(Runner):
    device = "cuda"

    def __init__(self, model_path: Path, io: dict, settings: dict | None = None, *, max_sequence: int = 2048,
                 max_batch: int = 64, device_id: int = 0, cuda_graph: bool | None = None, device_type: str = "cuda"):
        # device_type "cpu" runs this same I/O-binding code on ONNX Runtime's CPU provider: that is how the
        # CPU-only CI checks its cache handling; speed claims come from "cuda" on the device only.
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type must be 'cuda' or 'cpu', not {device_type!r}")
        self.device_type = device_type
        self.device = device_type
        if device_type == "cuda":
            ort = load_ort_cuda()
        else:
            import onnxruntime as ort
        self.ort = ort
        settings = dict(settings or {})
        self.io = io
        self.device_id = device_id
        self.num_layers = io["num_layers"]
        self.kv_heads, self.head_dim = io["num_kv_heads"], io["head_dim"]
        self.kv_dtype = np.dtype(_DTYPES.get(io["kv_dtype"], io["kv_dtype"]) or np.float16)
        self.vocab_size = io["vocab_size"]
        self.max_sequence, self.max_batch = max_sequence, max_batch
        self.memory = _GpuMemory(device_id) if device_type == "cuda" else None
        tokens = os.environ.get("LEPTONC_PREFILL_TOKENS") or settings.get("prefill_tokens", PREFILL_TOKENS)
        try:
            self.prefill_tokens = int(tokens)
        except (TypeError, ValueError):
            self.prefill_tokens = 0
        if self.prefill_tokens < 1:
            raise InputError(f"prefill chunk size {tokens!r} (LEPTONC_PREFILL_TOKENS or the engine's prefill_tokens) "
                             "is not a whole number of tokens >= 1", hint="unset LEPTONC_PREFILL_TOKENS or set it to "
                             f"a positive integer (default {PREFILL_TOKENS})")

        ops = graph_op_types(model_path)
        # ai.leptonc.CachedAttention (passes/use_kernels.py) keeps GroupQueryAttention's contract: shared past/present
        # buffer, lengths from the mask's contents.
        cached = bool(ops & CACHE_ATTENTION_OPS)
        # LEPTONC_KV_LAYOUT=growing forces the growing layout (for the cache-layout ablation in bench/).
        layout = os.environ.get("LEPTONC_KV_LAYOUT") or settings.get("kv_layout", "shared")
        if layout not in ("shared", "growing"):
            raise InputError(f"kv layout {layout!r}: use 'shared' or 'growing'")
        self.shared_kv = cached and layout == "shared"
        env_graph = os.environ.get("LEPTONC_CUDA_GRAPH")
        if cuda_graph is None:
            cuda_graph = settings.get("cuda_graph", True) if env_graph is None else env_graph == "1"
        # "mask_sum" graphs take right-padded prompts and a fixed [B, capacity] decode mask (module doc).
        self.right_pad = cached and settings.get("gqa_lengths") == "mask_sum"
        if self.right_pad and not self.shared_kv:
            raise InputError("this bundle's attention reads sequence lengths from a fixed-size mask, which "
                             "needs the shared KV layout", hint="unset LEPTONC_KV_LAYOUT")
        self.cuda_graph = bool(cuda_graph) and self.right_pad and device_type == "cuda"
        if self.cuda_graph:
            self.cuda_graph_reason = "on"
        elif not self.shared_kv:
            self.cuda_graph_reason = ("off: the growing cache layout changes shapes every step"
                                      if cached else
                                      "off: the graph has no GroupQueryAttention, so the cache grows each step")
        elif not self.right_pad:
            self.cuda_graph_reason = ("off: this graph derives attention lengths from the mask's length "
                                      "(a CPU-target graph), so decode shapes change every step")
        elif device_type != "cuda":
            self.cuda_graph_reason = "off: CPU provider"
        else:
            self.cuda_graph_reason = "off: disabled (cuda_graph setting or LEPTONC_CUDA_GRAPH=0)"

        from leptonc.runtime.ort import session_options

        if settings.get("custom_ops_library") and device_type != "cuda":
            raise InputError(f"this bundle runs leptonc's CUDA kernels ({settings['custom_ops_library']}), which need "
                             "ONNX Runtime's CUDA provider", hint="run it on a machine with an NVIDIA GPU and "
                             "onnxruntime-gpu, or compile with --disable-pass use_leptonc_kernels")
        so = session_options(settings, Path(model_path).parent)
        # leptonc's decode kernels read LEPTONC_PDL and LEPTONC_F16_SPLIT when they launch
        # (targets/kernels/common.cuh, leptonc_cuda.cu): say what ran
        self.kernel_launch = None
        if settings.get("custom_ops_library"):
            self.kernel_launch = ("stream order (LEPTONC_PDL=0)" if os.environ.get("LEPTONC_PDL") == "0" else
                                  "programmatic dependent launch on sm_90 and later (LEPTONC_PDL=0 turns it off)")
            self.kernel_launch += ("; one-row fp16 products untuned (LEPTONC_F16_SPLIT=0)"
                                   if os.environ.get("LEPTONC_F16_SPLIT") == "0" else
                                   "; one-row fp16 products tuned (rows and K split by shape)")
            self.kernel_launch += "; shared buffers " + ", ".join(
                f"{k.removeprefix('LEPTONC_').lower()} {_buffer_mib(k)}"
                for k in ("LEPTONC_KERNEL_BUFFER_MB", "LEPTONC_CUBLAS_WORKSPACE_MB"))
            self.kernel_launch += "; " + _decode_prefetches()
            if os.environ.get("LEPTONC_F16_PERSISTENT") == "1":
                self.kernel_launch += "; persistent one-row fp16 grids (LEPTONC_F16_PERSISTENT=1, experimental)"
        if os.environ.get("LEPTONC_ORT_PROFILE"):  # bench/device_profile.py: per-node timings and placement
            so.enable_profiling = True
            so.profile_file_prefix = os.environ["LEPTONC_ORT_PROFILE"]
        self.cublas_workspace = cublas_workspace_env() if device_type == "cuda" else None
        cuda_opts = {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested",
                     "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}
        if self.cuda_graph:
            cuda_opts["enable_cuda_graph"] = "1"
        # Pipelined greedy decode (greedy_tokens): ONNX Runtime runs on a stream of ours, so the next step's inputs
        # can be queued behind the step in flight. LEPTONC_PIPELINE=0 keeps one step at a time.
        self._driver = self._stream = None
        self.pipelined = False
        self._pipeline_reason = "off: needs captured decode steps (CUDA graphs)"
        if self.cuda_graph and os.environ.get("LEPTONC_PIPELINE", "1") == "0":
            self._pipeline_reason = "off: LEPTONC_PIPELINE=0"
        elif self.cuda_graph:
            from leptonc.runtime.cuda_driver import CudaDriver, CudaDriverError

            try:
                self._driver = CudaDriver(device_id)
                self._stream = self._driver.stream()
            except CudaDriverError as exc:
                self._driver, self._pipeline_reason = None, f"off: {exc}"
            else:
                cuda_opts["user_compute_stream"] = str(self._stream)
                cuda_opts["do_copy_in_default_stream"] = "0"  # every copy in the one stream's order
        providers = [("CUDAExecutionProvider", cuda_opts)] if device_type == "cuda" else ["CPUExecutionProvider"]
        try:
            try:
                self.session = ort.InferenceSession(str(model_path), so, providers=providers)
            except Exception as exc:  # noqa: BLE001 - retried once without our stream, then handled as before
                if "user_compute_stream" not in cuda_opts:
                    raise
                self._release_stream()
                self._driver = None
                self._pipeline_reason = f"off: ONNX Runtime refused a stream of ours: {str(exc).strip()[-160:]}"
                cuda_opts.pop("user_compute_stream")
                cuda_opts["do_copy_in_default_stream"] = "1"
                self.session = ort.InferenceSession(str(model_path), so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - only the capture refusal is handled; anything else re-raises
            if not (self.cuda_graph and "graph capture" in str(exc)):
                raise
            # Seen on the H100: a graph with shape arithmetic placed on the CPU provider cannot be captured.
            # Run it uncaptured (same results) and say so in describe(); never a silent downgrade.
            cuda_opts.pop("enable_cuda_graph")
            self.session = ort.InferenceSession(str(model_path), so, providers=[("CUDAExecutionProvider", cuda_opts)])
            self.cuda_graph = False
            self.cuda_graph_reason = ("off: ONNX Runtime refused to capture this graph (nodes placed on the CPU "
                                      f"provider): {str(exc).strip()[-160:]}")
        # Helper sessions (K/V block allocator, last-position gather) run on the same provider, without graph capture.
        self._providers = ([("CUDAExecutionProvider", {k: v for k, v in cuda_opts.items() if k != "enable_cuda_graph"})]
                           if device_type == "cuda" else ["CPUExecutionProvider"])
        if device_type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendUnavailableError("ONNX Runtime could not start its CUDA provider on this machine",
                                          hint="check the NVIDIA driver and that onnxruntime-gpu matches the CUDA version")
        self.input_names = {i.name for i in self.session.get_inputs()}
        # passes/select_logits.py: the LM head runs only on the positions bound here.
        self.selects_logits = "logits_positions" in self.input_names
        self.output_names = [o.name for o in self.session.get_outputs()]
        # passes/greedy_token.py: the graph's argmax of the logits, so greedy steps copy B tokens, not B x vocab.
        # The output is always bound where it exists (a captured step must not write to memory it does not
        # own); LEPTONC_DEVICE_ARGMAX=0 reads the logits instead (the A/B in bench/device_session.py).
        self.token_output = "next_token" in self.output_names
        self.greedy_output = self.token_output and os.environ.get("LEPTONC_DEVICE_ARGMAX", "1") != "0"
        self.logits_dtype = np.float16 if self.session.get_outputs()[0].type == "tensor(float16)" else np.float32
        if self._driver is not None and not (self.cuda_graph and self.greedy_output):
            self._pipeline_reason = ("off: the graph has no next_token output (or LEPTONC_DEVICE_ARGMAX=0), so the "
                                     "host must see each step's logits" if self.cuda_graph else
                                     "off: ONNX Runtime refused to capture the decode step")
        elif self._driver is not None:
            self.pipelined = True
            self._pipeline_reason = (f"on: up to {PIPELINE_DEPTH} steps queued ahead of the token the host reads; "
                                     "each step's ids are the step before's next_token, copied on the device")
        self._batch = 0
        self._mask: np.ndarray | None = None  # left-padded layout: the mask so far
        self._positions: np.ndarray | None = None
        self._lengths: np.ndarray | None = None  # right-padded layout: real tokens per row
        self._total = 0  # tokens held per row, padding included
        self._kv: list = []  # OrtValues on the device
        self._static: dict = {}  # per batch size: fixed-address decode inputs/outputs (shared layout)
        self._graph_ids: dict[int, int] = {}
        self._feeds: list = []  # inputs bound for the run in progress
        self._gather = None  # the last-position slicer, made on first use
        self._zeros = None  # the K/V block allocator, made on first use
        self._sample_memory()

    # ---- helpers ----------------------------------------------------------------------------------

    def _ortvalue(self, array: np.ndarray):
        value = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)
        # A binding keeps only the C++ value: on the CPU provider that wraps the numpy buffer, so the Python
        # wrapper (which owns that buffer) must live until the run is over.
        self._feeds.append(value)
        return value

    def _empty(self, shape, dtype):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device_type, self.device_id)

    def _kv_names(self):
        for i in range(self.num_layers):
            for kind in ("key", "value"):
                yield f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"

    def describe(self) -> dict:
        return {"runner": type(self).__name__, "provider": self.session.get_providers()[0] if self.session else None,
                "kv_layout": "shared" if self.shared_kv else "growing",
                "padding": "right (fixed-shape decode mask)" if self.right_pad else "left",
                **({"prefill_tokens": self.prefill_tokens} if self.shared_kv else {}),
                "cuda_graph": self.cuda_graph_reason,
                "greedy_pipeline": self._pipeline_reason,
                **({"leptonc_kernels": self.kernel_launch} if self.kernel_launch else {}),
                **({"cublas_workspace_config": self.cublas_workspace} if self.cublas_workspace else {}),
                "greedy_tokens": ("argmax in the graph (next_token output)" if self.greedy_output else
                                  "argmax of the logits on the host" + (" (LEPTONC_DEVICE_ARGMAX=0)"
                                                                        if self.token_output else ""))}

    def _sample_memory(self) -> None:
        if self.memory is not None:
            self.memory.sample()

    def device_name(self) -> str:
        if self.memory is None:
            return "cpu (I/O-binding runner)"
        name = self.memory.name()
        return f"cuda:{self.device_id} {name}" if name else f"cuda:{self.device_id}"

    @property
    def sequence_length(self) -> int:
        return self._total

    @property
    def capacity(self) -> int:
        return self.max_sequence

    # ---- prefill ----------------------------------------------------------------------------------

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        if seq > self.max_sequence:
            raise InputError(f"prompt is {seq} tokens; this bundle allows at most {self.max_sequence}")
        if batch > self.max_batch:
            raise InputError(f"batch of {batch} exceeds this bundle's maximum batch of {self.max_batch}")
        self._batch = batch
        self._feeds = []
        mask = np.asarray(attention_mask, dtype=np.int64)
        order = None
        if self.right_pad:
            # Real tokens first in each row (stable, so their order is kept); positions 0..S-1.
            self._lengths = mask.sum(axis=1).astype(np.int64)
            order = np.argsort(mask == 0, axis=1, kind="stable")
            input_ids = np.take_along_axis(input_ids, order, axis=1)
            mask = (np.arange(seq)[None, :] < self._lengths[:, None]).astype(np.int64)
            positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))
            last = self._lengths - 1
        else:
            self._mask = mask
            positions = self._positions = positions_from_mask(mask)
            last = np.full(batch, seq - 1, np.int64)
        self._total = seq
        select = None
        if self.selects_logits:  # only the last position, or every one (callers index the full form)
            select = last.reshape(-1, 1) if last_only else np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))
        block = self._kv_block(batch) if self.shared_kv else None
        rows = max(1, self.prefill_tokens // seq) if block is not None else batch
        parts = [self._prefill_rows(r0, min(batch, r0 + rows), input_ids, mask, positions, select, last, last_only,
                                    block) for r0 in range(0, batch, rows)]
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if self.right_pad:
            self._reset_decode_mask(batch)
        if not last_only and order is not None:  # back to the caller's (left-padded) layout
            restored = np.zeros_like(logits)
            np.put_along_axis(restored, order[:, :, None], logits, axis=1)
            logits = restored
        self._sample_memory()
        return logits.astype(np.float32, copy=False)

    def _prefill_rows(self, r0: int, r1: int, input_ids, mask, positions, select, last, last_only: bool,
                      block: "_KvBlock | None") -> np.ndarray:
        """One prefill run over rows r0:r1 (their slice of the K/V block); their logits on the host."""
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("input_ids", self._ortvalue(input_ids[r0:r1]))
        binding.bind_ortvalue_input("attention_mask", self._ortvalue(mask[r0:r1]))
        binding.bind_ortvalue_input("position_ids", self._ortvalue(positions[r0:r1]))
        if select is not None:
            binding.bind_ortvalue_input("logits_positions", self._ortvalue(select[r0:r1]))
        binding.bind_output("logits", self.device_type, self.device_id)  # bound first: get_outputs() keeps binding order
        if block is not None:
            block.bind(binding, (r0, r1))
        else:
            empty = np.zeros((r1 - r0, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
            for past, present in self._kv_names():
                binding.bind_ortvalue_input(past, self._ortvalue(empty))
                binding.bind_output(present, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding, self._run_options(-1))
        outputs = binding.get_outputs()
        if block is None:
            self._kv = list(outputs[1:])
        if last_only and select is not None:  # the graph computed [rows, 1, vocab] only
            return outputs[0].numpy().reshape(r1 - r0, -1)
        if last_only:  # slice on the device: the host gets [rows, vocab], not [rows, S, vocab]
            return self._last_position(outputs[0], last[r0:r1])
        return outputs[0].numpy()

    def _last_position(self, logits_value, last: np.ndarray) -> np.ndarray:
        """logits[b, last[b]] of a device OrtValue, through a one-node GatherND session on the same
        provider, so a prefill copies B x vocab to the host instead of B x S x vocab (0.5 GB for 1,024
        tokens of a 128k vocabulary in fp32)."""
        if self._gather is None:
            from onnx import TensorProto, helper

            elem = TensorProto.FLOAT16 if self.logits_dtype == np.float16 else TensorProto.FLOAT
            self._gather = self._helper_session(
                helper.make_node("GatherND", ["logits", "last"], ["out"], batch_dims=1), "last_position",
                [helper.make_tensor_value_info("logits", elem, ["batch", "sequence", "vocab"]),
                 helper.make_tensor_value_info("last", TensorProto.INT64, ["batch", 1])],
                [helper.make_tensor_value_info("out", elem, ["batch", "vocab"])])
        binding = self._gather.io_binding()
        binding.bind_ortvalue_input("logits", logits_value)
        binding.bind_ortvalue_input("last", self._ortvalue(np.asarray(last, np.int64).reshape(-1, 1)))
        binding.bind_output("out", self.device_type, self.device_id)
        self._gather.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _zeros_session(self):
        """A one-node session (ConstantOfShape, zeros of the cache dtype) on this runner's provider."""
        if self._zeros is None:
            from onnx import TensorProto, helper, numpy_helper

            self._zeros = self._helper_session(
                helper.make_node("ConstantOfShape", ["shape"], ["zeros"],
                                 value=numpy_helper.from_array(np.zeros(1, self.kv_dtype))), "kv_zeros",
                [helper.make_tensor_value_info("shape", TensorProto.INT64, [5])],
                [helper.make_tensor_value_info("zeros", helper.np_dtype_to_tensor_dtype(self.kv_dtype), None)])
        return self._zeros

    def _helper_session(self, node, name: str, inputs: list, outputs: list):
        """A one-node session on this runner's provider and options, without graph capture. Its log is
        quiet: a failure (an allocation that does not fit) reaches the caller as an exception, which
        the caller turns into a message."""
        from onnx import helper

        model = helper.make_model(helper.make_graph([node], name, inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        so = self.ort.SessionOptions()
        so.log_severity_level = 4
        return self.ort.InferenceSession(model.SerializeToString(), so, providers=self._providers)

    def _kv_block(self, batch: int) -> _KvBlock:
        """The batch size's K/V block at full capacity; reused (never reallocated) across sequences."""
        static = self._static.get(batch)
        if static is None:
            static = self._static[batch] = {"kv": _KvBlock(self, batch)}
        return static["kv"]

    def _run_options(self, graph_id: int):
        ro = self.ort.RunOptions()
        if self.cuda_graph:
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))
        return ro

    # ---- decode -----------------------------------------------------------------------------------

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        logits = self._decode(token_ids)["logits"].numpy()
        return logits.reshape(self._batch, -1).astype(np.float32, copy=False)

    def decode_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        """The greedy next token per row. With the graph's `next_token` output, only the B tokens are
        copied to the host: the logits stay on the device (bound, but not read)."""
        if not self.greedy_output:
            return super().decode_tokens(token_ids)
        # a copy: on the CPU provider numpy() is a view of the bound buffer, which the next step overwrites
        return self._decode(token_ids)["next_token"].numpy().reshape(self._batch).copy()

    def _decode(self, token_ids: np.ndarray) -> dict:
        """One decode step; its outputs as device values by name (logits, and next_token where the graph has it)."""
        if self._total == 0:
            raise RuntimeError("decode before prefill")
        if self._total >= self.max_sequence:
            raise InputError(f"sequence reached this bundle's limit of {self.max_sequence} tokens")
        batch = self._batch
        ids = np.asarray(token_ids, dtype=np.int64).reshape(batch, 1)
        self._total += 1
        if self.right_pad:
            return self._decode_shared(ids)
        self._mask = np.concatenate([self._mask, np.ones((batch, 1), np.int64)], axis=1)
        self._positions = self._positions[:, -1:] + 1
        return self._decode_shared(ids) if self.shared_kv else self._decode_bound(ids)

    def _decode_bound(self, ids: np.ndarray) -> dict:
        """One step of the growing layout: past <- the last step's present, both on the device."""
        self._feeds = []
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("input_ids", self._ortvalue(ids))
        binding.bind_ortvalue_input("attention_mask", self._ortvalue(self._mask))
        binding.bind_ortvalue_input("position_ids", self._ortvalue(self._positions))
        if self.selects_logits:
            binding.bind_ortvalue_input("logits_positions", self._ortvalue(np.zeros((self._batch, 1), np.int64)))
        binding.bind_output("logits", self.device_type, self.device_id)  # first: get_outputs() keeps binding order
        for j, (past, present) in enumerate(self._kv_names()):
            binding.bind_ortvalue_input(past, self._kv[j])
            binding.bind_output(present, self.device_type, self.device_id)
        if self.token_output:  # last, after the cache
            binding.bind_output("next_token", self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._kv = list(outputs[1:1 + 2 * self.num_layers])
        return {"logits": outputs[0], **({"next_token": outputs[-1]} if self.token_output else {})}

    def _decode_state(self, batch: int) -> dict:
        """The shared layout's decode binding for one batch size, made once: ids, positions, K/V (past and
        present on one buffer) and logits at fixed device addresses. Each step only copies the new ids
        and positions in place; for right-padded graphs the mask is a fixed [B, capacity] buffer too,
        which is what lets the step be captured as a CUDA graph."""
        static = self._static[batch]
        if "binding" not in static:
            static["logits"] = self._empty((batch, 1, self.vocab_size), self.logits_dtype)
            b = self.session.io_binding()
            if self.right_pad:
                # ids, positions and the [B, capacity] mask are three views of one device buffer (and of one
                # host array), so a step's inputs reach the device in one copy, not three.
                # Each view starts on a 256-byte boundary, as a separate allocation would.
                cap, seg = self.capacity, -(-batch // 32) * 32
                static["inputs"] = self._empty((2 * seg + batch * cap,), np.int64)
                host = static["host_inputs"] = np.zeros(2 * seg + batch * cap, np.int64)
                static["host_ids"], static["host_pos"] = host[:batch].reshape(batch, 1), host[seg:seg + batch].reshape(batch, 1)
                static["host_mask"] = host[2 * seg:].reshape(batch, cap)
                ptr = static["inputs"].data_ptr()
                for name, shape, offset in (("input_ids", [batch, 1], 0), ("position_ids", [batch, 1], seg),
                                            ("attention_mask", [batch, cap], 2 * seg)):
                    b.bind_input(name, self.device_type, self.device_id, np.int64, shape, ptr + 8 * offset)
            else:
                static["ids"] = self._empty((batch, 1), np.int64)
                static["pos"] = self._empty((batch, 1), np.int64)
                b.bind_ortvalue_input("input_ids", static["ids"])
                b.bind_ortvalue_input("position_ids", static["pos"])
            static["kv"].bind(b)
            b.bind_ortvalue_output("logits", static["logits"])
            if self.token_output:
                static["next_token"] = self._empty((batch, 1), np.int64)
                b.bind_ortvalue_output("next_token", static["next_token"])
            if self.selects_logits:  # the one new position of each row: a constant buffer of zeros
                static["logits_positions"] = self.ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((batch, 1), np.int64), self.device_type, self.device_id)
                b.bind_ortvalue_input("logits_positions", static["logits_positions"])
            if self.cuda_graph:
                self._graph_ids.setdefault(batch, len(self._graph_ids) + 1)
                static["run_options"] = self._run_options(self._graph_ids[batch])
            else:
                static["run_options"] = self.ort.RunOptions()
            static["binding"] = b
        return static

    def _reset_decode_mask(self, batch: int) -> None:
        state = self._decode_state(batch)
        host_mask = state["host_mask"]
        host_mask[:] = 0
        host_mask[np.arange(self.capacity)[None, :] < self._lengths[:, None]] = 1

    def _next_host_inputs(self, state: dict, ids: np.ndarray) -> None:
        """The right-padded layout's next step on the host: row b's new token sits at index len_b, which is its
        position and the mask entry that turns on."""
        state["host_ids"][:] = ids
        state["host_pos"][:, 0] = self._lengths
        state["host_mask"][np.arange(self._batch), self._lengths] = 1
        self._lengths += 1

    def _decode_shared(self, ids: np.ndarray) -> dict:
        state = self._decode_state(self._batch)
        if self.right_pad:
            self._next_host_inputs(state, ids)
            state["inputs"].update_inplace(state["host_inputs"])
        else:
            state["ids"].update_inplace(ids)
            state["pos"].update_inplace(np.ascontiguousarray(self._positions))
            self._feeds = []
            state["binding"].bind_ortvalue_input("attention_mask", self._ortvalue(self._mask))
        self.session.run_with_iobinding(state["binding"], state["run_options"])
        return {name: state[name] for name in ("logits", "next_token") if name in state}

    # ---- pipelined greedy decode ------------------------------------------------------------------

    def greedy_tokens(self, token_ids: np.ndarray, steps: int):
        """Yield the greedy next tokens of `steps` decode steps, [batch] each, as Runner.greedy_tokens does.

        With the pipeline on (describe()'s greedy_pipeline), up to PIPELINE_DEPTH steps are queued on the device
        ahead of the one whose token the host reads: a step's input ids are copied on the device from the step
        before's next_token output, its positions and mask come from a page-locked host slot of its own, and ONNX
        Runtime returns without waiting for the GPU (run option disable_synchronize_execution_providers). The GPU
        then runs steps back to back instead of waiting for the host between them. A caller that stops early
        (closes the generator) gets the runner back as if only the steps it read had run."""
        if not self.pipelined:
            yield from super().greedy_tokens(token_ids, steps)
            return
        if self._total == 0:
            raise RuntimeError("decode before prefill")
        batch, d, stream = self._batch, self._driver, self._stream
        state = self._decode_state(batch)
        pipe = self._pipeline_state(batch, state)
        allowed = max(0, min(steps, self.max_sequence - self._total))
        first = np.asarray(token_ids, dtype=np.int64).reshape(batch)
        inputs_ptr, token_ptr = state["inputs"].data_ptr(), state["next_token"].data_ptr()
        launched = consumed = 0
        try:
            while consumed < allowed:
                while launched < allowed and launched - consumed < PIPELINE_DEPTH:
                    slot = pipe["slots"][launched % PIPELINE_DEPTH]
                    self._next_host_inputs(state, first.reshape(batch, 1) if launched == 0 else 0)
                    self._total += 1
                    np.copyto(slot["inputs"], state["host_inputs"])
                    d.copy(inputs_ptr, slot["inputs"].ctypes.data, slot["inputs"].nbytes, stream)
                    if launched > 0:  # this step's ids: the step before's greedy tokens, still on the device
                        d.copy(inputs_ptr, token_ptr, 8 * batch, stream)
                    self.session.run_with_iobinding(state["binding"], pipe["run_options"])
                    d.copy(slot["tokens"].ctypes.data, token_ptr, 8 * batch, stream)
                    d.record(slot["event"], stream)
                    launched += 1
                slot = pipe["slots"][consumed % PIPELINE_DEPTH]
                d.wait(slot["event"])
                consumed += 1
                yield slot["tokens"].copy()
        finally:
            if launched > consumed:  # stopped early: forget the steps nobody read (their cache entries are masked)
                d.sync(stream)
                self._lengths -= launched - consumed
                self._total -= launched - consumed
                self._reset_decode_mask(batch)
        if allowed < steps:
            raise InputError(f"sequence reached this bundle's limit of {self.max_sequence} tokens")

    def _pipeline_state(self, batch: int, state: dict) -> dict:
        """Page-locked host slots (inputs and tokens) and an event for each step in flight; made once per batch."""
        if "pipeline" not in state:
            d = self._driver
            run_options = self._run_options(self._graph_ids.get(batch, -1))
            run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            slots = [{"inputs": d.pinned(state["host_inputs"].size), "tokens": d.pinned(batch), "event": d.event()}
                     for _ in range(PIPELINE_DEPTH)]
            state["pipeline"] = {"run_options": run_options, "slots": slots}
        return state["pipeline"]

    def _release_stream(self) -> None:
        if self._stream is not None:
            self._driver.destroy_stream(self._stream)
        self._stream = None

    # ---- teardown ---------------------------------------------------------------------------------

    def peak_device_memory_mb(self) -> float | None:
        if self.memory is None or self.memory.handle is None:
            return None
        self.memory.sample()
        return round(self.memory.peak, 1)

    def release(self) -> None:
        if self._stream is not None:
            self._driver.sync(self._stream)
        for static in self._static.values():
            for slot in static.get("pipeline", {}).get("slots", []):
                self._driver.free_pinned(slot["inputs"])
                self._driver.free_pinned(slot["tokens"])
                self._driver.destroy_event(slot["event"])
        self._kv = []
        self._static = {}
        self._gather = None
        self._zeros = None
        self.session = None
        self._release_stream()
        if self.cublas_workspace:  # the next cuBLAS handles in this process (PyTorch's, say) get the user's setting
            restore_cublas_env()
