"""The host CPU target: ONNX Runtime's CPU provider. FP32 is the reference; INT8 (QDQ) and INT4
weight-only (MatMulNBits) run natively; FP16/BF16/FP8 are accepted as simulated (accuracy only)."""

from __future__ import annotations

from leptonc.targets.hardware.base import Target

CPU = Target(
    name="cpu",
    description="Host CPU (ONNX Runtime CPU provider)",
    family="cpu",
    compute_capability=None,
    memory_gb=0,
    native=("fp32", "int8", "int4"),
    simulated=("fp16", "bf16", "fp8"),
    default_backend="onnxruntime",
    backends=("onnxruntime",),
    default_precision="fp32",
)
