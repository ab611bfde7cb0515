"""The quantize passes and the one table that picks each (precision, backend)'s rewrite.

A pipeline names `quantize_int8`, `quantize_fp8` or `quantize_int4`; the rewrite it runs depends on the
backend the graph is for: ONNX Runtime's forms (MatMulNBits in quantize_nbits.py, Q/DQ with uint8
activations in quantize_qdq.py) or TensorRT's explicit quantization (quantize_tensorrt.py: symmetric,
fp16 scales, block-quantized INT4 DequantizeLinear). The rewrites themselves know nothing of backends.
"""

from __future__ import annotations

from typing import Callable

import onnx_graphsurgeon as gs

from leptonc.errors import UnsupportedRequestError
from leptonc.passes import quantize_nbits, quantize_qdq, quantize_tensorrt
from leptonc.passes.quantize_common import quant_context
from leptonc.passes.registry import PassResult, register_pass

Rewrite = Callable[[gs.Graph, object], PassResult]


def _int8(weight_only: Callable, w8a8: Callable) -> Rewrite:
    """int8: W8A8 with SmoothQuant (static per-tensor activations), W8A8 with dynamic per-token activations (the
    8-bit MatMulNBits form: at accuracy_level 4 ONNX Runtime's CPU kernel quantizes each row of the input to int8
    per block of K and multiplies in integers), or weight-only at 8 bits (--int8-mode weight-only; the same
    kernel on the CPU)."""
    def rewrite(graph: gs.Graph, ctx) -> PassResult:
        settings, _, _ = quant_context(ctx)
        if settings.int8_mode == "weight-only" or settings.dynamic_activations:
            return weight_only(graph, ctx, bits=8, block=settings.int8_block_size, awq=False)
        return w8a8(graph, ctx, "int8")
    return rewrite


def _int4(weight_only: Callable) -> Rewrite:
    def rewrite(graph: gs.Graph, ctx) -> PassResult:
        settings, _, _ = quant_context(ctx)
        return weight_only(graph, ctx, bits=4, block=settings.int4_block, awq=settings.int4_method == "awq")
    return rewrite


QUANTIZERS: dict[tuple[str, str], Rewrite] = {
    ("int8", "onnxruntime"): _int8(quantize_nbits.rewrite_weight_only, quantize_qdq.rewrite_qdq),
    ("fp8", "onnxruntime"): lambda graph, ctx: quantize_qdq.rewrite_qdq(graph, ctx, "fp8"),
    ("int4", "onnxruntime"): _int4(quantize_nbits.rewrite_weight_only),
    ("int8", "tensorrt"): _int8(quantize_tensorrt.rewrite_weight_only, quantize_tensorrt.rewrite_w8a8),
    ("fp8", "tensorrt"): lambda graph, ctx: quantize_tensorrt.rewrite_w8a8(graph, ctx, "fp8"),
    ("int4", "tensorrt"): _int4(quantize_tensorrt.rewrite_weight_only),
}


def quantizer_for(precision: str, backend: str) -> Rewrite:
    """The rewrite for (precision, backend); a pair without one is refused with the pairs that exist."""
    rewrite = QUANTIZERS.get((precision, backend))
    if rewrite is None:
        pairs = sorted(f"{p} on {b}" for p, b in QUANTIZERS)
        raise UnsupportedRequestError(f"no {precision} quantizer for the {backend} backend",
                                      hint="leptonc quantizes " + ", ".join(pairs))
    return rewrite


@register_pass("quantize_int8")
def quantize_int8(graph: gs.Graph, ctx) -> PassResult:
    """INT8: W8A8 with SmoothQuant as Q/DQ, or weight-only (--int8-mode), in the backend's form."""
    return quantizer_for("int8", ctx.backend)(graph, ctx)


@register_pass("quantize_fp8")
def quantize_fp8(graph: gs.Graph, ctx) -> PassResult:
    """FP8 E4M3: per-channel weights, per-tensor activations, as float8 Q/DQ (simulated on CPU)."""
    return quantizer_for("fp8", ctx.backend)(graph, ctx)


@register_pass("quantize_int4")
def quantize_int4(graph: gs.Graph, ctx) -> PassResult:
    """INT4 weight-only (RTN or AWQ), embedding/LM head 8-bit, in the backend's form."""
    return quantizer_for("int4", ctx.backend)(graph, ctx)
