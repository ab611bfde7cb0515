"""ONNX Runtime's CUDA provider for the I/O-binding runner (leptonc/runtime/ort_cuda.py): importing it, the provider
options and the session (with its two fallbacks), the device-memory probe and the cuBLAS workspace setting.

- **device memory**: every cuBLAS handle (one per ONNX Runtime provider instance, and the kernel library's) takes a
  default workspace pool unless CUBLAS_WORKSPACE_CONFIG says otherwise. On the H100 that cost about 120 MiB per
  provider instance; the runner sets ":4096:1" (one 4 MiB buffer) where the user has not set the variable
  (`cublas_workspace_env`). `restore_cublas_env()` undoes the setting at release, so what runs after the runner
  (PyTorch in `bench --baseline hf`) gets the environment the user gave it.
- **pipelined greedy decode** needs ONNX Runtime to run on a stream of the runner's (`user_compute_stream`;
  leptonc/runtime/cuda_driver.py); `open_session` makes it and falls back to ONNX Runtime's own stream, and from a
  refused CUDA-graph capture to an uncaptured session, saying why in each case.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from leptonc.errors import BackendUnavailableError

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


def restore_cublas_env() -> None:
    """Take back the runner's CUBLAS_WORKSPACE_CONFIG (handles already made keep their pools)."""
    global _cublas_env_set
    if _cublas_env_set and os.environ.get("CUBLAS_WORKSPACE_CONFIG") == CUBLAS_WORKSPACE_CONFIG:
        del os.environ["CUBLAS_WORKSPACE_CONFIG"]
    _cublas_env_set = False


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
    return graph_facts(model_path)[0]


def graph_facts(model_path: Path) -> tuple[set[str], set[str]]:
    """The graph's op types, and its inputs that no node reads (a "mask_sum" graph with leptonc's attention takes
    position_ids but derives positions from the mask). ONNX Runtime copies an unread input to host memory when it is
    bound, and from the device that copy waits for everything queued on the stream: bound on the host, it costs
    nothing."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf/UTF-8 decode errors of a garbled file
        from leptonc.errors import BundleError

        raise BundleError(f"{Path(model_path).name} is not a readable ONNX model ({type(exc).__name__}); the file is "
                          "corrupt", hint="recompile the bundle (or re-export the model); check it was copied whole") from None
    read = {name for node in model.graph.node for name in node.input}
    for node in model.graph.node:  # inputs read inside a subgraph (If, Loop) count as read
        for attribute in node.attribute:
            for graph in [attribute.g, *attribute.graphs]:
                read |= {name for inner in graph.node for name in inner.input}
    return {n.op_type for n in model.graph.node}, {i.name for i in model.graph.input if i.name not in read}


class GpuMemory:
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



def set_kernel_buffer_sizes(library: Path, settings) -> None:
    """Hand the engine settings' buffer sizes to leptonc's CUDA kernel library through its exported setter
    (targets/kernels/: `leptonc_set_buffer_sizes(kernel_buffer_mib, cublas_workspace_mib)`). The library is
    already loaded by the session, so this finds the same copy; the sizes hold from its first step on."""
    lib = ctypes.CDLL(str(library))
    lib.leptonc_set_buffer_sizes.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.leptonc_set_buffer_sizes(settings.kernel_buffer_mb, settings.kernel_cublas_workspace_mb)


@dataclass
class ProviderSession:
    """The model's session and what opening it settled: whether decode steps are captured as CUDA graphs (and if
    not, why), the runner's own stream for the pipelined greedy decode (driver None where there is none, with the
    reason), and the provider list that the runner's one-node helper sessions use."""

    session: object
    helper_providers: list
    cuda_graph: bool
    cuda_graph_refusal: str | None
    driver: object | None
    stream: int | None
    pipeline_reason: str


def open_session(ort, model_path: Path, so, *, device_type: str, device_id: int, cuda_graph: bool) -> ProviderSession:
    """The model's InferenceSession on the CUDA provider (or the CPU provider for CPU checks of the same code)."""
    cuda_opts = {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested",
                 "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}
    if cuda_graph:
        cuda_opts["enable_cuda_graph"] = "1"
    # Pipelined greedy decode (greedy_tokens): ONNX Runtime runs on a stream of ours, so the next step's inputs
    # can be queued behind the step in flight.
    driver = stream = None
    refusal = None
    pipeline_reason = "off: needs captured decode steps (CUDA graphs)"
    if cuda_graph:
        from leptonc.runtime.cuda_driver import CudaDriver, CudaDriverError

        try:
            driver = CudaDriver(device_id)
            stream = driver.stream()
        except CudaDriverError as exc:
            driver, pipeline_reason = None, f"off: {exc}"
        else:
            cuda_opts["user_compute_stream"] = str(stream)
            cuda_opts["do_copy_in_default_stream"] = "0"  # every copy in the one stream's order
    providers = [("CUDAExecutionProvider", cuda_opts)] if device_type == "cuda" else ["CPUExecutionProvider"]
    try:
        try:
            session = ort.InferenceSession(str(model_path), so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - retried once without our stream, then handled as before
            if "user_compute_stream" not in cuda_opts:
                raise
            driver.destroy_stream(stream)
            driver = stream = None
            pipeline_reason = f"off: ONNX Runtime refused a stream of ours: {str(exc).strip()[-160:]}"
            cuda_opts.pop("user_compute_stream")
            cuda_opts["do_copy_in_default_stream"] = "1"
            session = ort.InferenceSession(str(model_path), so, providers=providers)
    except Exception as exc:  # noqa: BLE001 - only the capture refusal is handled; anything else re-raises
        if not (cuda_graph and "graph capture" in str(exc)):
            raise
        # Seen on the H100: a graph with shape arithmetic placed on the CPU provider cannot be captured.
        # Run it uncaptured (same results) and say so in describe(); never a silent downgrade.
        cuda_opts.pop("enable_cuda_graph")
        session = ort.InferenceSession(str(model_path), so, providers=[("CUDAExecutionProvider", cuda_opts)])
        cuda_graph = False
        refusal = ("off: ONNX Runtime refused to capture this graph (nodes placed on the CPU "
                   f"provider): {str(exc).strip()[-160:]}")
    # Helper sessions (K/V block allocator, last-position gather) run on the same provider, without graph capture.
    helpers = ([("CUDAExecutionProvider", {k: v for k, v in cuda_opts.items() if k != "enable_cuda_graph"})]
               if device_type == "cuda" else ["CPUExecutionProvider"])
    if device_type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise BackendUnavailableError("ONNX Runtime could not start its CUDA provider on this machine",
                                      hint="check the NVIDIA driver and that onnxruntime-gpu matches the CUDA version")
    return ProviderSession(session, helpers, cuda_graph, refusal, driver, stream, pipeline_reason)
