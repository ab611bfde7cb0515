"""Activation + weight quantization as explicit QuantizeLinear/DequantizeLinear pairs.

  int8 W8A8 static (`--int8 --activations static`, the GPU targets' default; the CPU's default is the
      dynamic per-token MatMulNBits form, quantize_nbits.py): SmoothQuant factors folded into the preceding norm
      (or a Mul), activations per-tensor static uint8 (zero point 128, range from the observer),
      weights per-channel symmetric int8. ONNX Runtime's CPU optimizer turns DQ -> MatMul <- DQ into
      integer kernels (MatMulIntegerToFloat). Scales carry the graph's float type: on GPU targets (fp16
      export) they are fp16, so the DequantizeLinear outputs are fp16 like the activations, and the graph
      is raised to opset 19 (QuantizeLinear takes fp16 input from 19 on; ONNX Runtime refuses it before).
      The tied embedding / LM head run 8-bit weight-only (GatherBlockQuantized + MatMulNBits on one copy
      of the codes): a QDQ head would need its own transposed int8 copy of the 28M-parameter matrix.
  fp8 (`--fp8`): weights float8 E4M3FN per channel, as Q/DQ (opset 19, where float8 Q/DQ exist), their codes
      chosen by GPTQ in calibration (--fp8-rounding gptq, the default; nearest rounds each alone);
      activations float8 E4M3FN per tensor (static, the GPU targets' default) or, on the CPU by default, per
      token (a scale per row from its max |x|, written as Casts: the Q/DQ ops take constant scales only). ONNX Runtime's CPU provider runs these ops but has no FP8
      matrix kernels: the MatMuls run in fp32 on dequantized values, so this is simulated
      (accuracy only), and the report says so. SmoothQuant with a fixed alpha (0.5 unless
      --smoothquant-alpha; chosen on tuning text, calibration/quantize.py FP8_DEFAULT_ALPHA), and, as in
      NVIDIA ModelOpt's default FP8 recipe, the LM head and the embedding tied to it stay in fp32 unless
      --fp8-lm-head (the fp8 head is smollm2-135m's lowest-SQNR layer).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from leptonc.calibration.scales import FP8_E4M3_MAX, compute_scales, fake_quant_fp8, to_fp8
from leptonc.passes.quantize_common import HEAD_BITS, HEAD_BLOCK, Linear, apply_prescale, find_embedding, \
    kept_fp_detail, plan_groups, qdq_group, quant_context, quantize_embedding_nbits, record_layer, \
    replace_with_nbits, smoothquant_detail, to_opset
from leptonc.passes.registry import PassResult

FP8_OPSET = 19
FP16_QDQ_OPSET = 19  # QuantizeLinear of fp16 input, DequantizeLinear to fp16 (fp16 scales); opset 13 takes fp32 only


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
    fp16_qdq = False  # Q/DQ with fp16 scales (an fp16 graph): they need opset 19
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
                replace_with_nbits(graph, lin, q, codes, int(ctx.options.get("accuracy_level", 4)))
                counts["head_nbits"] += 1
            continue
        if group is None or (not settings.dynamic_activations and group.amax <= 0):
            counts["no_stats"] += len(members)
            report["notes"].append(f"{', '.join(names)}: no calibration statistics; left in fp32")
            continue
        s = group.prescale
        x = members[0].x
        tag = members[0].name.replace(".weight", "")
        ftype = np.dtype(members[0].weight.values.dtype)  # the graph's float type: fp16 on GPUs, fp32 on the CPU
        if s is not None:
            x, how = apply_prescale(graph, x, s, tag, [m.node for m in members])
            counts["smooth_folded" if how == "folded" else "smooth_mul"] += 1
        if not rounding:  # SmoothQuant alone: same function, only the weights and norms change
            for lin in members:
                ws = lin.w_oi() * s[None, :]
                lin.node.inputs[1] = gs.Constant(f"{lin.weight.name}/smoothed", np.ascontiguousarray(
                    (ws.T if lin.kind == "matmul" else ws).astype(lin.weight.values.dtype)))
            continue
        if settings.dynamic_activations:  # fp8 here (dynamic int8 is the MatMulNBits form)
            qdq_group(members, group, s, x, fmt, tag, settings, report, shared_head, counts, dynamic=True,
                      quantize_act=lambda v, _, t: _fp8_per_token(graph, v, ftype, t),
                      dequantize_weight=lambda lin, c, sc: _dequantize_weight(graph, lin, c, sc, fmt, ftype),
                      dequantize_act=lambda q, _, n: q)
        else:
            qdq_group(members, group, s, x, fmt, tag, settings, report, shared_head, counts,
                      quantize_act=lambda v, sc, t: _quantize_activation(graph, v, sc, fmt, ftype, t),
                      dequantize_weight=lambda lin, c, sc: _dequantize_weight(graph, lin, c, sc, fmt, ftype),
                      dequantize_act=lambda q, sc, n: _dequantize(graph, q, sc, fmt, ftype, n))
        fp16_qdq = fp16_qdq or ftype == np.float16

    if not rounding:
        return PassResult(True, f"smoothed {counts['smooth_folded'] + counts['smooth_mul']} groups (no rounding)", counts)
    emb = find_embedding(graph)
    if emb is not None and not settings.keeps_fp("embed"):
        if fmt == "int8":
            quantize_embedding_nbits(graph, emb, shared_head.get(emb.inputs[0].name), settings, report)
        elif shared_head.get(emb.inputs[0].name) is not None:  # tied: Gather reads the head's dequantized rows
            emb.inputs[0] = shared_head[emb.inputs[0].name]
            report["notes"].append("fp8: the embedding reads the LM head's fp8 rows (tied weights, one copy)")
        else:
            _fp8_embedding(graph, emb, settings, report)
    elif emb is not None:
        counts["kept_fp"] += 1
        report["kept_fp"].append("embed")
    if fmt == "fp8":
        upgraded = to_opset(graph, FP8_OPSET)
        report["notes"].append(f"fp8: graph opset raised to {FP8_OPSET} for float8 Q/DQ ({upgraded} Reduce nodes "
                               "moved axes to an input); simulated on the CPU (fp32 MatMuls on dequantized values)")
    elif fp16_qdq:
        upgraded = to_opset(graph, FP16_QDQ_OPSET)
        report["notes"].append(f"int8: graph opset raised to {FP16_QDQ_OPSET} for Q/DQ with fp16 scales on the fp16 "
                               f"graph ({upgraded} Reduce nodes moved axes to an input)")
    acts = "per-token dynamic (simulated: Cast to float8 by each row's max)" if settings.dynamic_activations \
        else "per-tensor static"
    weights = "weights per-channel" + (f", {counts['gptq_rounded']} of them rounded by GPTQ"
                                       if counts.get("gptq_rounded") else "")
    parts = [f"{counts['qdq_matmul']} MatMul with {fmt} Q/DQ (activations {acts}, {weights})"]
    parts.append(smoothquant_detail(settings, fmt, counts))
    if counts["head_nbits"]:
        parts.append("LM head + embedding 8-bit weight-only (MatMulNBits / GatherBlockQuantized, shared codes)")
    if counts["no_stats"]:
        parts.append(f"{counts['no_stats']} left in fp32 (no statistics)")
    if counts["kept_fp"]:
        parts.append(kept_fp_detail(settings, report, "fp32"))
    return PassResult(counts["qdq_matmul"] > 0, "; ".join(parts), counts)


def _zero_point(fmt: str, name: str) -> gs.Constant:
    if fmt == "int8":
        return gs.Constant(name, np.asarray(128, np.uint8))
    return gs.Constant(name, to_fp8(np.zeros((), np.float32)))


def _quantize_activation(graph: gs.Graph, x: gs.Tensor, scale: np.ndarray, fmt: str, ftype, tag: str) -> gs.Tensor:
    """Scales carry the float type of `x` (QuantizeLinear's x and y_scale share one type)."""
    q = gs.Variable(f"{x.name}/q_{tag}")
    graph.nodes.append(gs.Node("QuantizeLinear", f"{tag}/quantize_x",
                               inputs=[x, gs.Constant(f"{tag}/x_scale", np.asarray(scale, ftype).reshape(())),
                                       _zero_point(fmt, f"{tag}/x_zero_point")], outputs=[q]))
    return q


def _fp8_per_token(graph: gs.Graph, x: gs.Tensor, ftype, tag: str) -> gs.Tensor:
    """x rounded to float8 E4M3 with a scale per row (token): s = max|x| over the last axis / 448, then
    Cast(Cast(x / s, float8e4m3fn), float) * s. Standard ops (opset 19 Cast with saturation); the float8 Q/DQ
    ops take constant scales only, so a per-token scale is written with Casts."""
    def var(name):
        return gs.Variable(f"{tag}/dyn_{name}", dtype=ftype)

    a, m, s0, s, xs, d, out = var("abs"), var("amax"), var("s0"), var("scale"), var("xs"), var("deq"), var("x_fp8")
    q = gs.Variable(f"{tag}/dyn_q", dtype=ml_dtypes.float8_e4m3fn)
    const = lambda n, v: gs.Constant(f"{tag}/dyn_{n}", np.asarray(v, ftype))  # noqa: E731
    graph.nodes += [
        gs.Node("Abs", f"{tag}/dyn_abs", inputs=[x], outputs=[a]),
        gs.Node("ReduceMax", f"{tag}/dyn_max", attrs={"keepdims": 1},
                inputs=[a, gs.Constant(f"{tag}/dyn_axes", np.asarray([-1], np.int64))], outputs=[m]),
        gs.Node("Div", f"{tag}/dyn_div_max", inputs=[m, const("fp8_max", FP8_E4M3_MAX)], outputs=[s0]),
        gs.Node("Max", f"{tag}/dyn_floor", inputs=[s0, const("tiny", 1e-12 if ftype == np.float32 else 1e-7)],
                outputs=[s]),
        gs.Node("Div", f"{tag}/dyn_scale_x", inputs=[x, s], outputs=[xs]),
        gs.Node("Cast", f"{tag}/dyn_to_fp8", attrs={"to": onnx.TensorProto.FLOAT8E4M3FN, "saturate": 1},
                inputs=[xs], outputs=[q]),
        gs.Node("Cast", f"{tag}/dyn_from_fp8", attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(ftype))},
                inputs=[q], outputs=[d]),
        gs.Node("Mul", f"{tag}/dyn_unscale", inputs=[d, s], outputs=[out]),
    ]
    return out


def _dequantize(graph: gs.Graph, q: gs.Tensor, scale: np.ndarray, fmt: str, ftype, name: str) -> gs.Tensor:
    out = gs.Variable(f"{name}/out", dtype=ftype)  # DequantizeLinear's output has its scale's type
    graph.nodes.append(gs.Node("DequantizeLinear", name,
                               inputs=[q, gs.Constant(f"{name}/scale", np.asarray(scale, ftype).reshape(())),
                                       _zero_point(fmt, f"{name}/zero_point")], outputs=[out]))
    return out


def _dequantize_weight(graph: gs.Graph, lin: Linear, codes_oi: np.ndarray, scales: np.ndarray, fmt: str,
                       ftype) -> gs.Tensor:
    """DequantizeLinear of the weight in the layout its node reads ([K, N] for MatMul, axis 1), to the
    float type the node reads."""
    name = lin.weight.name
    codes, axis = (codes_oi.T, 1) if lin.kind == "matmul" else (codes_oi, 0)
    zero = np.zeros(scales.shape, np.int8) if fmt == "int8" else to_fp8(np.zeros(scales.shape, np.float32))
    out = gs.Variable(f"{name}/dequantized", dtype=ftype)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}/dequantize", attrs={"axis": axis},
                               inputs=[gs.Constant(f"{name}/{fmt}", np.ascontiguousarray(codes)),
                                       gs.Constant(f"{name}/w_scale", scales.astype(ftype)),
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
