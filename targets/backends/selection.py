"""`--backend auto` (the default): which backend a compile uses when the user names none, and why.

GPU targets prefer TensorRT where its builder is installed (its engines are the target's fastest path), and
otherwise use ONNX Runtime's CUDA provider, with leptonc's own kernels: a GPU bundle then compiles anywhere,
a CPU-only CI runner included (targets/backends/onnxruntime.py cross-compiles). The CPU target runs on ONNX
Runtime. A backend named with --backend is used as asked; TensorRT's own preflight then refuses (exit 5) where
its builder is missing, naming the next step. The choice and its reason go to the compile's summary line, its
report and its manifest (`backend_choice`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

AUTO = "auto"


@dataclass(frozen=True)
class BackendChoice:
    backend: str    # the backend the compile uses
    requested: str  # "auto" or the backend the user named
    reason: str     # one line for the summary, the report and the manifest

    def to_dict(self) -> dict:
        return asdict(self)


def tensorrt_builder_missing() -> str | None:
    """None where TensorRT's builder imports here; otherwise what is missing. Cheap where tensorrt is absent."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    try:
        import tensorrt

        tensorrt.Builder  # noqa: B018 - the lean and dispatch runtimes have no builder
    except Exception as exc:  # noqa: BLE001 - bindings without their libraries raise all kinds of errors
        return f"TensorRT's builder does not import ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def choose_backend(target, requested: str | None) -> BackendChoice:
    """The backend for `target` when `requested` is None or "auto"; a named backend is returned as asked."""
    if requested and requested != AUTO:
        return BackendChoice(requested, requested, f"--backend {requested}")
    preferred = target.default_backend
    if preferred != "tensorrt":
        return BackendChoice(preferred, AUTO, f"the {target.name} target runs on {_label(preferred)}")
    missing = tensorrt_builder_missing()
    if missing is None:
        return BackendChoice("tensorrt", AUTO, "TensorRT's builder is installed")
    if "onnxruntime" not in target.backends:
        return BackendChoice("tensorrt", AUTO, f"the only backend of {target.name} ({missing})")
    return BackendChoice("onnxruntime", AUTO, f"{missing}: chose ONNX Runtime (CUDA provider); install TensorRT "
                                              "for its engines")


def _label(backend: str) -> str:
    return {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}.get(backend, backend)
