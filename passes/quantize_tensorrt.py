"""The quantization passes' forms for the TensorRT backend (`ctx.backend == "tensorrt"`): what
TensorRT's ONNX parser accepts in an explicitly quantized, strongly typed network. The passes
(`quantize_int8`, `quantize_fp8`, `quantize_int4` in quantize_qdq.py / quantize_nbits.py) call
these for TensorRT; the ONNX Runtime forms there are untouched.

TensorRT's rules (TensorRT "Explicit Quantization" guide; ONNX-TensorRT operator matrix), and how
they are met here:

  - quantization is symmetric: every zero point is 0, INT8 is signed (no uint8 / zero point 128);
  - activations are quantized per tensor, weights per channel along the output-channel axis
    (axis 1 of a MatMul's [K, N] weight, axis 0 of a transB Gemm's [N, K]) or, for INT4, per block;
  - a QuantizeLinear output feeds only DequantizeLinear (Q -> DQ -> MatMul, DQ(weight) -> MatMul);
  - strongly typed: the scales carry the graph's float type (fp16 here), so the DequantizeLinear
    outputs are fp16 like the activations they replace. Q/DQ with fp16 scales need opset 19
    (opset 13 allows fp32 scales only), so the graph is raised to 19;
  - INT4 is weight-only: INT4 weights, block-quantized along K, a DequantizeLinear with the
    opset-21 `block_size` attribute (no zero point) feeding the MatMul; the graph is raised to 21.

Formats:
  int8 W8A8:   SmoothQuant as for ONNX Runtime; activations per-tensor int8 (zero point 0) with the
               same scale (amax / 127) ONNX Runtime's uint8 form uses; weights per-channel int8. The
               tied LM head is a W8A8 Gemm like the other layers (its activation range comes from
               calibration) and the embedding Gather reads the head's dequantized int8 rows (one copy).
  int8 weight-only: per-channel int8 weights (DQ -> MatMul), fp16 activations.
  int4:        symmetric block-quantized int4 weights (scale = block amax / 7, codes -7..7), AWQ
               pre-scales as for ONNX Runtime; the block is --int4-block, halved until it divides K.
               The LM head (and --int4-8bit layers) are int8 per-channel weight-only, the embedding
               reads the head's rows: the 8-bit head of the ONNX Runtime form, in TensorRT's terms.
  fp8:         as int8 W8A8 with FLOAT8E4M3FN codes (zero point +0.0).

Scales come from calibration/scales.py (`compute_scales`, `scale_from_amax`, `block_quantize`).
Nothing here has been run by TensorRT (it cannot be installed on these machines); the forms are
checked by the lint in targets/backends/tensorrt_lint.py and by ONNX's strict type inference.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from leptonc.calibration.scales import block_quantize, compute_scales, fake_quant_fp8, fake_quant_int8, \
    quantize_int8 as int8_codes, to_fp8
from leptonc.passes.quantize_common import Linear, apply_prescale, find_embedding, keeps_8bit, kept_fp_detail, \
    plan_groups, qdq_group, quant_context, record_layer, smoothquant_detail, to_opset
from leptonc.passes.registry import PassResult

QDQ_OPSET = 19  # Q/DQ with fp16 scales, float8 types
INT4_OPSET = 21  # DequantizeLinear block_size, INT4
MIN_BLOCK = 16
INT4_QMAX = 7  # symmetric: codes -7..7 (TensorRT INT4 has no zero point)


# ---- int8 / fp8 W8A8 ------------------------------------------------------------------------------

def rewrite_w8a8(graph: gs.Graph, ctx, fmt: str) -> PassResult:
    """int8 or fp8: Q/DQ on each linear layer's activation (per tensor) and weight (per channel)."""
    settings, stats, report = quant_context(ctx)
    if stats is None:
        return PassResult.skipped(f"{fmt} activation quantization needs calibration statistics and none were supplied")
    counts = {"qdq_matmul": 0, "kept_fp": 0, "smooth_folded": 0, "smooth_mul": 0, "no_stats": 0}
    planned = plan_groups(graph, settings, stats, report)
    counts["kept_fp"] = len(report["kept_fp"])
    shared_head: dict[str, gs.Tensor] = {}
    for members, group in planned:
        names = [m.label for m in members]
        if group is None or group.amax <= 0:
            counts["no_stats"] += len(members)
            report["notes"].append(f"{', '.join(names)}: no calibration statistics; left in floating point")
            continue
        ftype = _float_type(members[0])
        s = group.prescale
        x = members[0].x
        tag = members[0].name.replace(".weight", "")
        if s is not None:
            x, how = apply_prescale(graph, x, s, tag, [m.node for m in members])
            _retype_prescale(graph, tag, ftype)
            counts["smooth_folded" if how == "folded" else "smooth_mul"] += 1
        qdq_group(members, group, s, x, fmt, tag, settings, report, shared_head, counts,
                  quantize_act=lambda v, sc, t: _quantize(graph, v, sc, fmt, ftype, t),
                  dequantize_weight=lambda lin, c, sc: _dequantize_per_channel(graph, lin, c, sc, fmt, ftype),
                  dequantize_act=lambda q, sc, n: _dequantize(graph, q, sc, fmt, ftype, n))
    emb_note = _embedding(graph, settings, report, shared_head, fmt, counts)
    _raise_opset(graph, QDQ_OPSET)
    parts = [f"{counts['qdq_matmul']} MatMul/Gemm with TensorRT {fmt} Q/DQ (activations per-tensor, weights "
             f"per-channel, symmetric, fp16 scales, opset {QDQ_OPSET})"]
    if counts.get("gptq_rounded"):
        parts.append(f"{counts['gptq_rounded']} weights rounded by GPTQ")
    parts.append(smoothquant_detail(settings, fmt, counts))
    if emb_note:
        parts.append(emb_note)
    if counts["no_stats"]:
        parts.append(f"{counts['no_stats']} left in floating point (no statistics)")
    if counts["kept_fp"]:
        parts.append(kept_fp_detail(settings, report, "floating point"))
    return PassResult(counts["qdq_matmul"] > 0, "; ".join(parts), counts)


# ---- weight-only: int4 (block) and int8 (per channel) -----------------------------------------------

def rewrite_weight_only(graph: gs.Graph, ctx, bits: int, block: int, awq: bool) -> PassResult:
    """INT4 weight-only (block-quantized INT4 DQ -> MatMul) or INT8 weight-only (per-channel DQ)."""
    settings, stats, report = quant_context(ctx)
    if awq and stats is None:
        return PassResult.skipped("AWQ needs calibration statistics and none were supplied")
    counts = {"int4_blocks": 0, "int8_channels": 0, "kept_fp": 0, "awq_folded": 0, "awq_mul": 0}
    planned = plan_groups(graph, settings, stats, report)
    counts["kept_fp"] = len(report["kept_fp"])
    shared_head: dict[str, gs.Tensor] = {}
    blocks_used: set[int] = set()
    for members, group in planned:
        is_head = any(m.kind == "gemm" for m in members)
        g_bits = 8 if is_head or (bits == 4 and keeps_8bit(settings, stats, members)) else bits
        ftype = _float_type(members[0])
        s = None
        if awq and g_bits == 4 and group is not None and group.prescale is not None:
            s = group.prescale
            tag = members[0].name.replace(".weight", "")
            _, how = apply_prescale(graph, members[0].x, s, tag, [m.node for m in members])
            _retype_prescale(graph, tag, ftype)
            counts["awq_folded" if how == "folded" else "awq_mul"] += 1
        for lin in members:
            w = lin.w_oi()
            ws = w * s[None, :] if s is not None else w
            b = _block_for(ws.shape[1], block) if g_bits == 4 else None
            if g_bits == 4 and b is not None:
                # block_quantize's symmetric 4-bit scale is amax / 8 (codes 0..15 around 8): x 8/7 makes
                # it amax / 7, so the signed codes are -7..7 and +amax is not clipped to 7/8 of itself
                q = block_quantize(ws, 4, b, symmetric=True,
                                   scale_multiplier=settings.break_scales * 8.0 / INT4_QMAX)
                wq = q.dequantize()
                signed = (q.codes.astype(np.int16) - q.zero_points.repeat(b, axis=1)).astype(np.int8)  # b divides K
                wdq = _dequantize_blocks(graph, lin, signed, q.scales, b, ftype)
                fmt = "int4" + ("-awq" if s is not None else "")
                counts["int4_blocks"] += 1
                blocks_used.add(b)
            else:
                scales = compute_scales(ws, "int8", "per_channel", axis=0) * np.float32(settings.break_scales)
                codes, wq = int8_codes(ws, scales, axis=0), fake_quant_int8(ws, scales, axis=0)
                wdq = _dequantize_per_channel(graph, lin, codes, scales, "int8", ftype)
                fmt = "int8"
                counts["int8_channels"] += 1
            if s is not None:
                wq = wq / s[None, :]
            record_layer(report, lin.label, fmt, w, wq, group.samples if group is not None else None)
            if lin.kind == "gemm" and s is None and g_bits == 8:
                shared_head[lin.weight.name] = wdq
            lin.node.inputs[1] = wdq
    emb_note = _embedding(graph, settings, report, shared_head, "int8", counts)
    opset = INT4_OPSET if counts["int4_blocks"] else QDQ_OPSET
    _raise_opset(graph, opset)
    parts = []
    if counts["int4_blocks"]:
        parts.append(f"{counts['int4_blocks']} MatMul with INT4 block-quantized weights (DequantizeLinear block_size "
                     f"{'/'.join(str(b) for b in sorted(blocks_used, reverse=True))}, symmetric, TensorRT weight-only, "
                     f"opset {opset})")
    if counts["int8_channels"]:
        parts.append(f"{counts['int8_channels']} MatMul/Gemm with INT8 per-channel weights (weight-only"
                     + (", LM head" if bits == 4 else "") + ")")
    if emb_note:
        parts.append(emb_note)
    if awq:
        parts.append(f"AWQ scales folded into {counts['awq_folded']} norms, {counts['awq_mul']} via Mul; int4 codes "
                     "rounded to nearest on TensorRT's symmetric grid (GPTQ rounding is ONNX Runtime's MatMulNBits path)")
    if counts["kept_fp"]:
        parts.append(f"{counts['kept_fp']} kept in floating point by --keep-fp")
    applied = counts["int4_blocks"] + counts["int8_channels"]
    return PassResult(applied > 0, "; ".join(parts), counts)


# ---- pieces -----------------------------------------------------------------------------------------

def _float_type(lin: Linear) -> np.dtype:
    return np.dtype(lin.weight.values.dtype)


def _block_for(k: int, block: int) -> int | None:
    """--int4-block, halved until it divides K (smollm2's K = 576 takes 64 for a requested 128)."""
    b = block
    while b >= MIN_BLOCK and k % b:
        b //= 2
    return b if b >= MIN_BLOCK else None


def _zero(fmt: str, shape=()) -> np.ndarray:
    return np.zeros(shape, np.int8) if fmt == "int8" else to_fp8(np.zeros(shape, np.float32))


def _quantize(graph: gs.Graph, x: gs.Tensor, scale, fmt: str, ftype, tag: str) -> gs.Tensor:
    q = gs.Variable(f"{x.name}/q_{tag}")
    graph.nodes.append(gs.Node("QuantizeLinear", f"{tag}/quantize_x",
                               inputs=[x, gs.Constant(f"{tag}/x_scale", np.asarray(scale, ftype).reshape(())),
                                       gs.Constant(f"{tag}/x_zero_point", _zero(fmt))], outputs=[q]))
    return q


def _dequantize(graph: gs.Graph, q: gs.Tensor, scale, fmt: str, ftype, name: str) -> gs.Tensor:
    out = gs.Variable(f"{name}/out", dtype=ftype)
    graph.nodes.append(gs.Node("DequantizeLinear", name,
                               inputs=[q, gs.Constant(f"{name}/scale", np.asarray(scale, ftype).reshape(())),
                                       gs.Constant(f"{name}/zero_point", _zero(fmt))], outputs=[out]))
    return out


def _dequantize_per_channel(graph: gs.Graph, lin: Linear, codes_oi: np.ndarray, scales: np.ndarray, fmt: str,
                            ftype) -> gs.Tensor:
    """DQ of a weight in the layout its node reads, scales along the output channels: [K, N] axis 1
    for MatMul, [N, K] axis 0 for a transB Gemm."""
    name = lin.weight.name
    codes, axis = (codes_oi.T, 1) if lin.kind == "matmul" else (codes_oi, 0)
    out = gs.Variable(f"{name}/dequantized", dtype=ftype)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}/dequantize", attrs={"axis": axis},
                               inputs=[gs.Constant(f"{name}/{fmt}", np.ascontiguousarray(codes)),
                                       gs.Constant(f"{name}/w_scale", scales.astype(ftype)),
                                       gs.Constant(f"{name}/w_zero_point", _zero(fmt, scales.shape))],
                               outputs=[out]))
    return out


def _int4_constant(name: str, codes: np.ndarray) -> gs.Constant:
    """An INT4 initializer. onnx_graphsurgeon cannot export an int4 numpy array itself; the tensor is
    built by onnx (two codes a byte, low nibble first, as TensorRT reads them) and handed over lazily."""
    import ml_dtypes

    return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(
        np.ascontiguousarray(codes).astype(ml_dtypes.int4), name)))


def _dequantize_blocks(graph: gs.Graph, lin: Linear, signed_oi: np.ndarray, scales_ob: np.ndarray, block: int,
                       ftype) -> gs.Tensor:
    """INT4 DQ with blocks along K: MatMul reads [K, N] (axis 0, scales [K/B, N]), a transB Gemm
    [N, K] (axis 1, scales [N, K/B]). No zero point: ONNX's default, 0, is TensorRT's only one."""
    name = lin.weight.name
    if lin.kind == "matmul":
        codes, scales, axis = signed_oi.T, scales_ob.T, 0
    else:
        codes, scales, axis = signed_oi, scales_ob, 1
    out = gs.Variable(f"{name}/dequantized", dtype=ftype)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}/dequantize", attrs={"axis": axis, "block_size": block},
                               inputs=[_int4_constant(f"{name}/int4", codes),
                                       gs.Constant(f"{name}/w_scale", np.ascontiguousarray(scales.astype(ftype)))],
                               outputs=[out]))
    return out


def _embedding(graph: gs.Graph, settings, report: dict, shared_head: dict, fmt: str, counts: dict) -> str:
    """The embedding Gather: reads the tied head's dequantized rows (one copy of the codes), else its
    own per-row (per-channel, axis 0) quantized table."""
    emb = find_embedding(graph)
    if emb is None:
        return ""
    name = emb.inputs[0].name
    if settings.keeps_fp("embed"):
        counts["kept_fp"] += 1
        report["kept_fp"].append("embed")
        return ""
    if name in shared_head:
        emb.inputs[0] = shared_head[name]
        return f"embedding reads the LM head's {fmt} rows (tied weights, one copy)"
    table = np.asarray(emb.inputs[0].values, np.float32)
    ftype = np.dtype(emb.inputs[0].values.dtype)
    scales = compute_scales(table, fmt, "per_channel", axis=0) * np.float32(settings.break_scales)
    if fmt == "int8":
        codes, tq = int8_codes(table, scales, axis=0), fake_quant_int8(table, scales, axis=0)
    else:
        codes, tq = to_fp8(table / scales[:, None]), fake_quant_fp8(table, scales, axis=0)
    record_layer(report, "embed", fmt, table, tq)
    out = gs.Variable(f"{name}/{fmt}_table", dtype=ftype)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{emb.name}/dequantize", attrs={"axis": 0},
                               inputs=[gs.Constant(f"{name}/{fmt}", codes),
                                       gs.Constant(f"{name}/{fmt}_scale", scales.astype(ftype)),
                                       gs.Constant(f"{name}/{fmt}_zero", _zero(fmt, scales.shape))],
                               outputs=[out]))
    emb.inputs[0] = out
    return f"embedding {fmt} per row"


def _retype_prescale(graph: gs.Graph, tag: str, ftype) -> None:
    """apply_prescale's inserted Mul carries an fp32 constant; a strongly typed fp16 graph needs fp16."""
    for node in graph.nodes:
        if node.op == "Mul" and node.name == f"prescale_{tag}":
            c = node.inputs[1]
            if isinstance(c, gs.Constant) and c.values.dtype != ftype:
                node.inputs[1] = gs.Constant(c.name, np.asarray(c.values).astype(ftype))


def _raise_opset(graph: gs.Graph, opset: int) -> None:
    to_opset(graph, opset)
