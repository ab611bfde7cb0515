"""Weight-only quantization for ONNX Runtime: `MatMulNBits` (com.microsoft; bits 4 or 8, block-wise
along K, B stored [N, blocks, block_bytes]) for the linear layers, and `GatherBlockQuantized` for the
embedding. A tied embedding / LM head is quantized once: the Gather and the head's MatMulNBits read
the same uint8 codes (8-bit, symmetric, zero point 128, the default of both ops).

  int4 (`--int4`): layers 4-bit asymmetric, block `--int4-block` (default 64), RTN or AWQ scales; the most
                   sensitive groups 8-bit within `--int4-bits-budget` (calibration/sensitivity.py);
                   with AWQ the codes are GPTQ's (calibration/gptq.py, on the grid this pass would
                   choose: AWQ's clip search and refit) unless --int4-rounding nearest;
                   embedding and LM head 8-bit block 64 (a 4-bit head costs far more accuracy than
                   the 14 MB it would save on smollm2-135m).
  int8 weight-only (`--int8 --int8-mode weight-only`): everything 8-bit symmetric, block 64; on the CPU the
                   activations are rounded to int8 by the kernel (accuracy_level 4) unless --activations fp32.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.calibration.awq import awq_grid
from leptonc.calibration.scales import BlockQuantized, block_quantize
from leptonc.passes.quantize_common import HEAD_BITS, HEAD_BLOCK, Linear, apply_prescale, find_embedding, \
    keeps_8bit, plan_groups, quant_context, quantize_embedding_nbits, record_layer, replace_with_nbits
from leptonc.passes.registry import PassResult

DEFAULT_ACCURACY_LEVEL = 4  # int8 compute of the activations inside MatMulNBits: ORT CPU's fast path
FP32_ACCURACY_LEVEL = 1  # fp32 activations (--int8-mode weight-only --activations fp32): ONNX Runtime 1.32's CPU kernel
# has no 8-bit fp32 path and dequantizes the weight at every call (gemma-3-270m: 0.09x fp32 decode; BENCHMARKS.md)
AWQ_FOLD_UP = True  # AWQ's scales folded into the up projection's; tests turn it off to compare with the Mul


def rewrite_weight_only(graph: gs.Graph, ctx, bits: int, block: int, awq: bool) -> PassResult:
    settings, stats, report = quant_context(ctx)
    level = int(ctx.options.get("accuracy_level", DEFAULT_ACCURACY_LEVEL))
    fmt = f"int{bits}-{'awq' if awq else ('rtn' if bits == 4 else 'weight-only')}"
    if settings.dynamic_activations:
        level = DEFAULT_ACCURACY_LEVEL  # the int8 compute that quantizes the activations per token
        fmt = "int8-w8a8, activations dynamic per token in blocks of the same size"
    elif settings.activations == "fp32":
        level = FP32_ACCURACY_LEVEL
        fmt += ", activations fp32"
    elif bits == 8:
        fmt += ", activations rounded to int8 per block by the CPU kernel"
    counts = {"matmulnbits": 0, "kept_fp": 0, "awq_folded": 0, "awq_mul": 0, "embedding": 0, "gptq": 0, "gptq_missing": 0}
    if awq and stats is None:
        return PassResult.skipped("AWQ needs calibration statistics and none were supplied")

    planned = plan_groups(graph, settings, stats, report)
    counts["kept_fp"] = len(report["kept_fp"])
    shared_head: dict[str, tuple] = {}  # weight name -> (codes constant, BlockQuantized) of an 8-bit head
    deferred: list = []  # (up projection's output, AWQ scales, members) of a down projection (_gated_up_product)

    def prescale(members, s) -> None:  # x / s for these linears: folded into a norm, else an explicit Mul
        _, how = apply_prescale(graph, members[0].x, s, members[0].name.replace(".weight", ""),
                                [m.node for m in members])
        counts["awq_folded" if how == "folded" else "awq_mul"] += 1
    for members, group in planned:
        is_head = any(m.kind == "gemm" for m in members)
        g_bits, g_block = (HEAD_BITS, HEAD_BLOCK) if is_head else (bits, block)
        if bits == 4 and keeps_8bit(settings, stats, members):
            g_bits, g_block = HEAD_BITS, HEAD_BLOCK  # a sensitive layer kept at 8 bits (measured, or --int4-8bit)
            counts["int8_layers"] = counts.get("int8_layers", 0) + len(members)
        s = None
        if awq and g_bits == 4 and group is not None and group.prescale is not None:
            s = group.prescale
            up = _gated_up_product(members[0].x, [m.node for m in members]) \
                if AWQ_FOLD_UP else None
            if up is not None:  # folded into the up projection's scales once that is quantized (below)
                deferred.append((up, s, members))
            else:
                prescale(members, s)
        for lin in members:
            w = lin.w_oi()
            ws = w * s[None, :] if s is not None else w
            q = None
            if s is not None and g_bits == 4 and settings.int4_rounding == "gptq":
                q = _gptq_rounding(lin, group, ws, g_block, settings)
                counts["gptq" if q is not None else "gptq_missing"] += 1
            rounding = "-gptq" if q is not None else ""
            if q is None and s is not None and g_bits == 4:
                q = awq_grid(ws, g_block, group.samples / s[None, :], settings.break_scales)
            elif q is None:
                q = block_quantize(ws, g_bits, g_block, symmetric=g_bits == 8, scale_multiplier=settings.break_scales)
            wq = q.dequantize() / (s[None, :] if s is not None else 1.0)
            x = group.samples if group is not None else None
            record_layer(report, lin.label, f"int{g_bits}" + ("-awq" if s is not None else "") + rounding, w, wq, x)
            codes = gs.Constant(f"{lin.weight.name}/q{g_bits}", q.packed())
            if is_head:
                shared_head[lin.weight.name] = (codes, q)
            replace_with_nbits(graph, lin, q, codes, level)
            counts["matmulnbits"] += 1

    for (tensor, offset), s, members in deferred:
        if _scale_rows(tensor, offset, 1.0 / s):
            counts["awq_up"] = counts.get("awq_up", 0) + 1
        else:  # the up projection is not a MatMulNBits after all (e.g. kept in fp32)
            prescale(members, s)

    emb = find_embedding(graph)
    if emb is not None:
        name = emb.inputs[0].name
        if settings.keeps_fp("embed"):
            counts["kept_fp"] += 1
            report["kept_fp"].append("embed")
        elif quantize_embedding_nbits(graph, emb, shared_head.get(name), settings, report):
            counts["embedding"] = 1
    parts = [f"{counts['matmulnbits']} MatMul -> MatMulNBits ({fmt}, block {block}"
             + (", LM head 8-bit block 64" if bits == 4 else "") + f", accuracy_level {level})"]
    if counts["embedding"]:
        parts.append("embedding -> GatherBlockQuantized" + (" sharing the head's codes" if shared_head else ""))
    if awq:
        parts.append(f"AWQ scales folded into {counts['awq_folded']} norms, "
                     + (f"{counts['awq_up']} up-projection scales, " if counts.get("awq_up") else "")
                     + f"{counts['awq_mul']} via Mul")
        if settings.int4_rounding == "gptq":
            parts.append(f"GPTQ rounding on AWQ's grid for {counts['gptq']} int4 MatMulNBits")
            if counts["gptq_missing"]:
                note = (f"{counts['gptq_missing']} AWQ layers had no GPTQ codes from calibration that fit their "
                        "graph weight and were rounded to nearest")
                parts.append(note)
                report["notes"].append(note)
        else:
            parts.append("codes rounded to nearest (--int4-rounding nearest)")
    if counts.get("int8_layers"):
        why = [f"--int4-8bit {' '.join(settings.int4_8bit)}"] if settings.int4_8bit else []
        if stats is not None and stats.eight_bit:
            why.append(f"measured sensitivity under --int4-bits-budget {settings.int4_bits_budget:g}")
        parts.append(f"{counts['int8_layers']} layers at 8-bit block 64 by {' and '.join(why)}")
    if counts["kept_fp"]:
        parts.append(f"{counts['kept_fp']} kept in fp32 by --keep-fp")
    detail = "; ".join(parts)
    return PassResult(counts["matmulnbits"] > 0, detail, counts)


def _gated_up_product(x: gs.Tensor, consumers: list[gs.Node]):
    """Where `x` (a down projection's input, read only by `consumers`) is act(gate) * up and `up` is a
    linear's output (whole, or one slice of a merged gate|up Split along the last axis), returns
    (that linear's output tensor, the slice's first row): x / s is then exactly that linear with its
    output rows scaled by 1 / s, which for a block-quantized weight is its scales' rows (codes and zero
    points unchanged). AutoAWQ folds the down projection's scales into the up projection the same way.
    None where the pattern does not hold."""
    mul = x.inputs[0] if len(x.inputs) == 1 else None
    if mul is None or mul.op != "Mul" or {id(n) for n in x.outputs} - {id(n) for n in consumers}:
        return None
    for up in mul.inputs:
        if len(up.outputs) != 1 or len(up.inputs) != 1 or up is x:
            continue
        producer = up.inputs[0]
        if producer.op == "Split" and len(producer.inputs[0].outputs) == 1:
            sizes = _split_sizes(producer)
            axis = producer.attrs.get("axis", 0)
            shape = producer.inputs[0].shape
            last = shape is not None and axis in (-1, len(shape) - 1)
            if sizes is None or not last:
                continue
            index = next(i for i, t in enumerate(producer.outputs) if t is up)
            return producer.inputs[0], int(sum(sizes[:index]))
        if producer.op in ("MatMul", "MatMulNBits"):
            return up, 0
    return None


def _split_sizes(split: gs.Node):
    if len(split.inputs) > 1 and isinstance(split.inputs[1], gs.Constant):
        return [int(v) for v in np.asarray(split.inputs[1].values).reshape(-1)]
    if "split" in split.attrs:
        return [int(v) for v in split.attrs["split"]]
    return None


def _scale_rows(tensor: gs.Tensor, offset: int, factor: np.ndarray) -> bool:
    """Multiply the output rows [offset, offset + len(factor)) of the MatMulNBits producing `tensor` by
    `factor`, through its scales. False (nothing changed) where `tensor` is not such a node's output."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None or node.op != "MatMulNBits" or not isinstance(node.inputs[2], gs.Constant):
        return False
    n = int(node.attrs["N"])
    if offset + len(factor) > n:
        return False
    old = node.inputs[2]
    scales = np.asarray(old.values).reshape(n, -1)
    new = scales.astype(np.float32)
    new[offset:offset + len(factor)] *= np.asarray(factor, np.float32)[:, None]
    node.inputs[2] = gs.Constant(f"{old.name}/awq_down", new.astype(scales.dtype).reshape(np.asarray(old.values).shape))
    return True


def _gptq_rounding(lin: Linear, group, ws: np.ndarray, block: int, settings):
    """The calibration's GPTQ codes for this linear (rows of its members, in the order a fusion merged
    them), as one BlockQuantized of W * s; None where there are none or they do not fit this weight."""
    rounded = group.rounded
    names = lin.label.split("+")
    if not rounded or any(n not in rounded for n in names):
        return None
    parts = [rounded[n] for n in names]
    if any(p.block_size != block or p.k != ws.shape[1] for p in parts):
        return None
    q = BlockQuantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                       np.concatenate([p.zero_points for p in parts]), 4, block, ws.shape[1])
    if q.codes.shape[0] != ws.shape[0]:
        return None
    # the codes were chosen for the PyTorch weights; a graph weight they do not belong to (an fp16 copy
    # rounds differently, but by far less than 4 bits) would show as an error near the weight itself
    if np.linalg.norm(q.dequantize() - ws) > 0.5 * np.linalg.norm(ws):
        return None
    if settings.break_scales != 1.0:
        q.scales = (q.scales * np.float32(settings.break_scales)).astype(np.float32)
    return q
