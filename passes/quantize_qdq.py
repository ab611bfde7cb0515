"""Static activation + weight quantization as explicit QuantizeLinear/DequantizeLinear pairs.

  int8 W8A8 (`--int8`, the default int8 mode): SmoothQuant factors folded into the preceding norm
      (or a Mul), activations per-tensor static uint8 (zero point 128, range from the observer),
      weights per-channel symmetric int8. ONNX Runtime's CPU optimizer turns DQ -> MatMul <- DQ into
      integer kernels (MatMulIntegerToFloat). The tied embedding / LM head run 8-bit weight-only
      (GatherBlockQuantized + MatMulNBits on one copy of the codes): a QDQ head would need its own
      transposed int8 copy of the 28M-parameter matrix.
  fp8 (`--fp8`): weights float8 E4M3FN per channel, activations float8 E4M3FN per tensor, as Q/DQ
      (opset 19, where float8 Q/DQ exist). ONNX Runtime's CPU provider runs these ops but has no FP8
      matrix kernels: the MatMuls run in fp32 on dequantized values, so this is simulated
      (accuracy only), and the report says so. SmoothQuant with a fixed alpha (0.5 unless
      --smoothquant-alpha; chosen on tuning text, calibration/quantize.py FP8_DEFAULT_ALPHA), and, as in
      NVIDIA ModelOpt's default FP8 recipe, the LM head and the embedding tied to it stay in fp32 unless
      --fp8-lm-head (the fp8 head is smollm2-135m's lowest-SQNR layer).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.calibration.scales import compute_scales, fake_quant_fp8, to_fp8
from leptonc.passes.quantize_common import Linear, apply_prescale, find_embedding, plan_groups, qdq_group, \
    quant_context, record_layer, smoothquant_detail
from leptonc.passes.quantize_nbits import HEAD_BLOCK, HEAD_BITS, _quantize_embedding, _replace_with_nbits, \
    rewrite_weight_only
from leptonc.passes.registry import PassResult, register_pass

FP8_OPSET = 19


@register_pass("quantize_int8")
def quantize_int8(graph: gs.Graph, ctx) -> PassResult:
    """INT8: W8A8 with SmoothQuant as Q/DQ, or weight-only MatMulNBits bits=8 (--int8-mode)."""
    settings, _, _ = quant_context(ctx)
    if ctx.backend == "tensorrt":  # TensorRT's explicit-quantization forms: passes/quantize_tensorrt.py
        from leptonc.passes import quantize_tensorrt as trt

        if settings.int8_mode == "weight-only":
            return trt.rewrite_weight_only(graph, ctx, bits=8, block=settings.int8_block, awq=False)
        return trt.rewrite_w8a8(graph, ctx, "int8")
    if settings.int8_mode == "weight-only":
        return rewrite_weight_only(graph, ctx, bits=8, block=settings.int8_block, awq=False)
    return rewrite_qdq(graph, ctx, "int8")


@register_pass("quantize_fp8")
def quantize_fp8(graph: gs.Graph, ctx) -> PassResult:
    """FP8 E4M3: per-channel weights, per-tensor activations, as float8 Q/DQ (simulated on CPU)."""
    if ctx.backend == "tensorrt":  # fp16 scales for a strongly typed fp16 graph: passes/quantize_tensorrt.py
        from leptonc.passes import quantize_tensorrt as trt

        return trt.rewrite_w8a8(graph, ctx, "fp8")
    return rewrite_qdq(graph, ctx, "fp8")


def smooth_only(graph: gs.Graph, ctx) -> PassResult:
    """SmoothQuant's rewrite without rounding (x / s folded or multiplied in, W * s): the function
    must stay the same up to float error. Used by the tests; not a pipeline pass."""
    return rewrite_qdq(graph, ctx, "fp8" if ctx.precision == "fp8" else "int8", rounding=False)


def rewrite_qdq(graph: gs.Graph, ctx, fmt: str, rounding: bool = True) -> PassResult:

    settings, stats, report = quant_context(ctx)
    if stats is None:
        return PassResult.skipped(f"{fmt} activation quantization needs calibration statistics and none were supplied")
    counts = {"qdq_matmul": 0, "kept_fp": 0, "smooth_folded": 0, "smooth_mul": 0, "no_stats": 0, "head_nbits": 0}
    planned = plan_groups(graph, settings, stats, report)
    counts["kept_fp"] = len(report["kept_fp"])
    shared_head = {}
    for members, group in planned:
        names = [m.label for m in members]
        is_head = any(m.kind == "gemm" for m in members)
        if is_head and not rounding:  # the head has no smoothing factors
            continue
        if is_head and fmt == "int8":
            from leptonc.calibration.scales import block_quantize

            for lin in members:
                w = lin.w_oi()
                q = block_quantize(w, HEAD_BITS, HEAD_BLOCK, symmetric=True, scale_multiplier=settings.break_scales)
                x = group.samples if group is not None else None
                record_layer(report, lin.label, "int8-weight-only", w, q.dequantize(), x)
                codes = gs.Constant(f"{lin.weight.name}/q8", q.packed())
                shared_head[lin.weight.name] = (codes, q)
                _replace_with_nbits(graph, lin, q, codes, int(ctx.options.get("accuracy_level", 4)))
                counts["head_nbits"] += 1
            continue
        if group is None or group.amax <= 0:
            counts["no_stats"] += len(members)
            report["notes"].append(f"{', '.join(names)}: no calibration statistics; left in fp32")
            continue
        s = group.prescale
        x = members[0].x
        tag = members[0].name.replace(".weight", "")
        if s is not None:
            x, how = apply_prescale(graph, x, s, tag, [m.node for m in members])
            counts["smooth_folded" if how == "folded" else "smooth_mul"] += 1
        if not rounding:  # SmoothQuant alone: same function, only the weights and norms change
            for lin in members:
                ws = lin.w_oi() * s[None, :]
                lin.node.inputs[1] = gs.Constant(f"{lin.weight.name}/smoothed", np.ascontiguousarray(
                    (ws.T if lin.kind == "matmul" else ws).astype(lin.weight.values.dtype)))
            continue
        qdq_group(members, group, s, x, fmt, tag, settings, report, shared_head, counts,
                  quantize_act=lambda v, sc, t: _quantize_activation(graph, v, sc, fmt, t),
                  dequantize_weight=lambda lin, c, sc: _dequantize_weight(graph, lin, c, sc, fmt),
                  dequantize_act=lambda q, sc, n: _dequantize(graph, q, sc, fmt, n))

    if not rounding:
        return PassResult(True, f"smoothed {counts['smooth_folded'] + counts['smooth_mul']} groups (no rounding)", counts)
    emb = find_embedding(graph)
    if emb is not None and not settings.keeps_fp("embed"):
        if fmt == "int8":
            _quantize_embedding(graph, emb, shared_head.get(emb.inputs[0].name), settings, report)
        elif shared_head.get(emb.inputs[0].name) is not None:  # tied: Gather reads the head's dequantized rows
            emb.inputs[0] = shared_head[emb.inputs[0].name]
            report["notes"].append("fp8: the embedding reads the LM head's fp8 rows (tied weights, one copy)")
        else:
            _fp8_embedding(graph, emb, settings, report)
    elif emb is not None:
        counts["kept_fp"] += 1
        report["kept_fp"].append("embed")
    if fmt == "fp8":
        upgraded = _to_opset(graph, FP8_OPSET)
        report["notes"].append(f"fp8: graph opset raised to {FP8_OPSET} for float8 Q/DQ ({upgraded} Reduce nodes "
                               "moved axes to an input); simulated on the CPU (fp32 MatMuls on dequantized values)")
    parts = [f"{counts['qdq_matmul']} MatMul with {fmt} Q/DQ (activations per-tensor static, weights per-channel)"]
    parts.append(smoothquant_detail(settings, fmt, counts))
    if counts["head_nbits"]:
        parts.append("LM head + embedding 8-bit weight-only (MatMulNBits / GatherBlockQuantized, shared codes)")
    if counts["no_stats"]:
        parts.append(f"{counts['no_stats']} left in fp32 (no statistics)")
    if counts["kept_fp"]:
        parts.append(kept_fp_detail(settings, report, "fp32"))
    return PassResult(counts["qdq_matmul"] > 0, "; ".join(parts), counts)


def kept_fp_detail(settings, report: dict, float_type: str) -> str:
    """The pass detail for kept layers: how many --keep-fp kept, and the layers the format keeps by
    default (the fp8 LM head and embedding) with how to quantize them (also a report note)."""
    default = [n for n in report["kept_fp"] if n in settings.default_keep_fp and not _matches_user(settings, n)]
    user = len(report["kept_fp"]) - len(default)
    parts = [f"{user} kept in {float_type} by --keep-fp"] if user else []
    if default:
        note = (f"{settings.precision}: {' and '.join(default)} kept in {float_type} by default (NVIDIA ModelOpt's "
                "FP8 recipe also leaves *lm_head* unquantized); --fp8-lm-head quantizes them too")
        if note not in report["notes"]:
            report["notes"].append(note)
        parts.append(note)
    return "; ".join(parts)


def _matches_user(settings, name: str) -> bool:
    from leptonc.calibration.quantize import _matches

    return _matches(name, settings.keep_fp)


def _zero_point(fmt: str, name: str) -> gs.Constant:
    if fmt == "int8":
        return gs.Constant(name, np.asarray(128, np.uint8))
    return gs.Constant(name, to_fp8(np.zeros((), np.float32)))


def _quantize_activation(graph: gs.Graph, x: gs.Tensor, scale: np.ndarray, fmt: str, tag: str) -> gs.Tensor:
    q = gs.Variable(f"{x.name}/q_{tag}")
    graph.nodes.append(gs.Node("QuantizeLinear", f"{tag}/quantize_x",
                               inputs=[x, gs.Constant(f"{tag}/x_scale", np.asarray(scale, np.float32).reshape(())),
                                       _zero_point(fmt, f"{tag}/x_zero_point")], outputs=[q]))
    return q


def _dequantize(graph: gs.Graph, q: gs.Tensor, scale: np.ndarray, fmt: str, name: str) -> gs.Tensor:
    out = gs.Variable(f"{name}/out", dtype=np.float32)
    graph.nodes.append(gs.Node("DequantizeLinear", name,
                               inputs=[q, gs.Constant(f"{name}/scale", np.asarray(scale, np.float32).reshape(())),
                                       _zero_point(fmt, f"{name}/zero_point")], outputs=[out]))
    return out


def _dequantize_weight(graph: gs.Graph, lin: Linear, codes_oi: np.ndarray, scales: np.ndarray, fmt: str) -> gs.Tensor:
    """DequantizeLinear of the weight in the layout its node reads ([K, N] for MatMul, axis 1)."""
    name = lin.weight.name
    codes, axis = (codes_oi.T, 1) if lin.kind == "matmul" else (codes_oi, 0)
    zero = np.zeros(scales.shape, np.int8) if fmt == "int8" else to_fp8(np.zeros(scales.shape, np.float32))
    out = gs.Variable(f"{name}/dequantized", dtype=np.float32)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}/dequantize", attrs={"axis": axis},
                               inputs=[gs.Constant(f"{name}/{fmt}", np.ascontiguousarray(codes)),
                                       gs.Constant(f"{name}/w_scale", scales.astype(np.float32)),
                                       gs.Constant(f"{name}/w_zero_point", zero)], outputs=[out]))
    return out


def _fp8_embedding(graph: gs.Graph, emb: gs.Node, settings, report) -> None:
    table = np.asarray(emb.inputs[0].values, np.float32)
    scales = compute_scales(table, "fp8", "per_channel", axis=0) * np.float32(settings.break_scales)
    codes = to_fp8(table / scales[:, None])
    record_layer(report, "embed", "fp8", table, fake_quant_fp8(table, scales, axis=0))
    out = gs.Variable(f"{emb.inputs[0].name}/fp8_table", dtype=np.float32)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{emb.name}/dequantize", attrs={"axis": 0},
                               inputs=[gs.Constant(f"{emb.inputs[0].name}/fp8", codes),
                                       gs.Constant(f"{emb.inputs[0].name}/fp8_scale", scales),
                                       gs.Constant(f"{emb.inputs[0].name}/fp8_zero", to_fp8(np.zeros(scales.shape, np.float32)))],
                               outputs=[out]))
    emb.inputs[0] = out


_REDUCE_AXES_TO_INPUT = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                         "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def _to_opset(graph: gs.Graph, opset: int) -> int:
    """Raise the default-domain opset to `opset` (>= 18): the only operators whose form changes
    between 17 and 19 are the Reduce* family (axes attribute -> input); the rest only gained types."""
    moved = 0
    if graph.opset >= opset:
        return 0
    for node in graph.nodes:
        if node.op in _REDUCE_AXES_TO_INPUT and node.domain in ("", "ai.onnx") and "axes" in node.attrs:
            axes = node.attrs.pop("axes")
            node.inputs.append(gs.Constant(f"{node.name}/axes", np.asarray(axes, np.int64)))
            moved += 1
    graph.opset = opset
    if graph.import_domains is not None:  # the exporter writes these opset imports as they are
        import onnx

        graph.import_domains = [d for d in graph.import_domains if d.domain not in ("", "ai.onnx")]
        graph.import_domains.append(onnx.helper.make_opsetid("", opset))
    return moved
