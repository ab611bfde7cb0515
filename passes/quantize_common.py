"""Shared pieces of the quantization rewrites: finding the linear layers of the graph, reading the
calibration statistics and settings from the pass context, applying per-input-channel pre-scales
(SmoothQuant / AWQ) to the graph, recording each layer's error (SQNR) for the report, and the pieces
more than one form uses (the 8-bit MatMulNBits head and GatherBlockQuantized embedding, the opset raise).

No pass is registered here: `quantizers.py` registers the quantize passes and picks the rewrite per
(precision, backend) from `quantize_nbits.py` (MatMulNBits), `quantize_qdq.py` (Q/DQ for ONNX Runtime)
and `quantize_tensorrt.py` (TensorRT's explicit quantization).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.calibration.scales import block_quantize, output_sqnr_db, sqnr_db
from leptonc.graph_contract import MS_DOMAIN

HEAD_BITS, HEAD_BLOCK = 8, 64  # the 8-bit LM head / embedding of the weight-only and int8 forms


@dataclass
class Linear:
    node: gs.Node
    kind: str  # "matmul" (x @ W, W [K, N]) or "gemm" (x @ W^T, transB=1, W [N, K])
    weight: gs.Constant
    name: str  # logical name: the initializer's, or "lm_head" for a head that reads the embedding
    label: str = ""  # the name the report uses (the merged members' names for a merged projection)

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    @property
    def x(self) -> gs.Tensor:
        return self.node.inputs[0]

    def w_oi(self) -> np.ndarray:
        """The weight in [out, in] layout, float32."""
        v = np.asarray(self.weight.values, np.float32)
        return v.T if self.kind == "matmul" else v


def find_linears(graph: gs.Graph) -> list[Linear]:
    out = []
    for node in graph.nodes:
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        w = node.inputs[1]
        if w.values.ndim != 2 or w.values.dtype not in (np.float32, np.float16):
            continue
        if node.op == "MatMul":
            out.append(Linear(node, "matmul", w, w.name))
        elif node.op == "Gemm" and node.attrs.get("transB", 0) == 1 and not node.attrs.get("transA", 0) \
                and node.attrs.get("alpha", 1.0) == 1.0 and node.attrs.get("beta", 1.0) == 1.0:
            out.append(Linear(node, "gemm", w, "lm_head" if w.name == "embed" else w.name))
    return out


def find_embedding(graph: gs.Graph) -> gs.Node | None:
    for node in graph.nodes:
        if node.op == "Gather" and isinstance(node.inputs[0], gs.Constant) and node.inputs[0].values.ndim == 2 \
                and node.attrs.get("axis", 0) == 0:
            return node
    return None


def keeps_8bit(settings, stats, members: list["Linear"]) -> bool:
    """--int4: these linears run at 8 bits, by --int4-8bit or by the calibration's sensitivity choice."""
    names = [n for m in members for n in m.label.split("+")]
    chosen = set(getattr(stats, "eight_bit", None) or ())
    return settings.precision == "int4" and any(settings.int4_uses_8bit(n) or n in chosen for n in names)


def quant_context(ctx):
    """(QuantSettings, ActivationStats or None, the report dict the compiler reads after the build)."""
    from leptonc.calibration.quantize import QuantSettings

    settings = ctx.quantization or QuantSettings(precision=ctx.precision)
    return settings, ctx.activation_stats, ctx.quant_report


def apply_prescale(graph: gs.Graph, x: gs.Tensor, s: np.ndarray, tag: str, consumers: list[gs.Node]) -> tuple[gs.Tensor, str]:
    """Make the consumers of `x` read x / s. Folded into the producer when it is a norm's weight
    multiply (Mul by a constant, or (Skip)SimplifiedLayerNormalization's gamma) and `x` feeds only
    the layers being scaled; otherwise an explicit Mul is inserted. Returns (tensor, how)."""
    inv = (1.0 / s).astype(np.float32)
    producer = x.inputs[0] if x.inputs else None
    only_these = {id(n) for n in x.outputs} <= {id(n) for n in consumers}
    if producer is not None and only_these and producer.outputs[0] is x:
        gamma_idx = None
        if producer.op == "Mul":
            consts = [i for i, t in enumerate(producer.inputs) if isinstance(t, gs.Constant)]
            if len(consts) == 1 and producer.inputs[consts[0]].values.shape[-1:] == s.shape:
                gamma_idx = consts[0]
        elif producer.op == "SimplifiedLayerNormalization" and isinstance(producer.inputs[1], gs.Constant):
            gamma_idx = 1
        elif producer.op == "SkipSimplifiedLayerNormalization" and isinstance(producer.inputs[2], gs.Constant):
            gamma_idx = 2
        if gamma_idx is not None:
            g = producer.inputs[gamma_idx]
            producer.inputs[gamma_idx] = gs.Constant(f"{g.name}/prescaled_{tag}",
                                                     (np.asarray(g.values, np.float32) * inv).astype(g.values.dtype))
            return x, "folded"
    out = gs.Variable(f"{x.name}/prescaled_{tag}", dtype=x.dtype, shape=x.shape)
    if x.dtype is not None and np.dtype(x.dtype) == np.float16:  # an fp16 graph (GPU targets): Mul needs one type
        inv = inv.astype(np.float16)
    graph.nodes.append(gs.Node("Mul", f"prescale_{tag}", inputs=[x, gs.Constant(f"prescale_{tag}/inv_s", inv)],
                               outputs=[out]))
    for node in consumers:
        node.inputs[0] = out
    return out, "mul"


def record_layer(report: dict, name: str, fmt: str, w_ref: np.ndarray, w_q: np.ndarray,
                 x: np.ndarray | None = None, x_q: np.ndarray | None = None) -> float:
    """SQNR of the layer's output on calibration rows when we have them, else of the weight (both computed
    in slices: a 262,144-token head's output on the calibration rows is never held whole)."""
    if x is not None:
        value, on = output_sqnr_db(x, w_ref, w_q, x_q), "output"
    else:
        value, on = sqnr_db(w_ref, w_q), "weight"
    report["layers"].append({"name": name, "format": fmt, "sqnr_db": round(float(value), 2), "on": on})
    return value


def resolve_group(stats, members: list[Linear]):
    """The calibration group that the linears reading one tensor correspond to: by logical name,
    or (for a projection merged by a fusion pass) by the weights' fingerprints. None if unknown."""
    if stats is None:
        return None
    names = {m.name for m in members}
    group = stats.group_of(members[0].name)
    if group is not None and names <= set(group.members):
        return group
    if len(members) == 1:
        return stats.group_of_weight(members[0].w_oi())
    return None


def plan_groups(graph: gs.Graph, settings, stats, report: dict) -> list[tuple[list[Linear], object]]:
    """The linears grouped by the tensor they read, each with its calibration group (or None), after
    --keep-fp: a linear is kept in fp32 when its name, or (for a projection merged by a fusion pass)
    any name merged into it, matches a pattern. Merged linears are labelled with their members'
    names (layers.0.q.weight+layers.0.k.weight+...) in the report."""
    by_input: dict[int, list[Linear]] = {}
    for lin in find_linears(graph):
        by_input.setdefault(id(lin.x), []).append(lin)
    planned = []
    for members in by_input.values():
        group = resolve_group(stats, members)
        kept = []
        for lin in members:
            if group is not None and lin.name not in group.members and len(members) == 1:
                lin.label = "+".join(group.members)
            names = lin.label.split("+")
            if any(settings.keeps_fp(n) for n in names):
                kept.append(lin)
                report["kept_fp"].append(lin.label)
        members = [m for m in members if m not in kept]
        if members:
            planned.append((members, group))
    return planned



def quantize_weight_per_channel(ws: np.ndarray, fmt: str, break_scales: float = 1.0):
    """[N, K] weight -> (codes, fake-quantized weight, per-output-channel scales) in int8 or fp8.
    The one place both the ONNX Runtime and the TensorRT Q/DQ forms round weights."""
    from leptonc.calibration.scales import compute_scales, fake_quant_fp8, fake_quant_int8, to_fp8
    from leptonc.calibration.scales import quantize_int8 as int8_codes

    w_scales = compute_scales(ws, fmt, "per_channel", axis=0) * np.float32(break_scales)
    if fmt == "int8":
        return int8_codes(ws, w_scales, axis=0), fake_quant_int8(ws, w_scales, axis=0), w_scales
    return to_fp8(ws / w_scales[:, None]), fake_quant_fp8(ws, w_scales, axis=0), w_scales


def fp8_gptq_rounding(lin: Linear, group, ws: np.ndarray, settings):
    """(codes, fake-quantized weight, per-row scales) from the calibration's GPTQ rounding of this linear
    (the rows of its members, in the order a fusion merged them); None where there is none, where it does not
    belong to this graph weight, or under the break_scales test hook (then the weight rounds to nearest)."""
    from leptonc.calibration.scales import Fp8Rows

    names = lin.label.split("+")
    if settings.break_scales != 1.0 or not group.rounded or \
            any(not isinstance(group.rounded.get(n), Fp8Rows) for n in names):
        return None
    rows = Fp8Rows(np.concatenate([group.rounded[n].codes for n in names]),
                   np.concatenate([group.rounded[n].scales for n in names]).astype(np.float32))
    if rows.codes.shape != ws.shape:
        return None
    wq = rows.dequantize()
    # the codes were chosen for the PyTorch weights; a graph weight they do not belong to would show as an
    # error near the weight itself (an fp16 copy differs from them by far less than E4M3's rounding)
    if np.linalg.norm(wq - ws) > 0.25 * np.linalg.norm(ws):
        return None
    return rows.codes, wq, rows.scales


def qdq_group(members: list[Linear], group, s, x: gs.Tensor, fmt: str, tag: str, settings, report: dict,
              shared_head: dict, counts: dict, *, quantize_act, dequantize_weight, dequantize_act,
              dynamic: bool = False) -> None:
    """One calibrated group's W8A8 Q/DQ (int8 or fp8): the shared input quantized once per tensor, each
    member's weight per output channel, both dequantized into its MatMul/Gemm. The backend supplies how
    a Q/DQ node is written (ONNX Runtime: uint8 activations; TensorRT: symmetric; both with scales in the
    graph's float type):
    quantize_act(x, scale, tag), dequantize_weight(lin, codes, scales), dequantize_act(q, scale, name)."""
    from leptonc.calibration.scales import fake_quant_fp8, fake_quant_int8, scale_from_amax

    x_rows = group.samples / (s if s is not None else 1.0)
    if dynamic:  # a scale per row (token), computed in the graph: quantize_act returns the rounded input
        a_scale = None
        row_scales = scale_from_amax(np.abs(x_rows).max(axis=1), fmt)
        x_q = fake_quant_int8(x_rows, row_scales, axis=0) if fmt == "int8" else fake_quant_fp8(x_rows, row_scales, axis=0)
    else:
        a_scale = scale_from_amax(group.amax, fmt)
        x_q = fake_quant_int8(x_rows, a_scale) if fmt == "int8" else fake_quant_fp8(x_rows, a_scale)
    qx = quantize_act(x, a_scale, tag)
    for lin in members:
        w = lin.w_oi()
        ws = w * s[None, :] if s is not None else w
        rounded = fp8_gptq_rounding(lin, group, ws, settings) if fmt == "fp8" else None
        codes, wq, w_scales = rounded or quantize_weight_per_channel(ws, fmt, settings.break_scales)
        counts["gptq_rounded"] = counts.get("gptq_rounded", 0) + (rounded is not None)
        record_layer(report, lin.label, f"{fmt}-w8a8" if fmt == "int8" else "fp8", w, wq, group.samples, x_q)
        wdq = dequantize_weight(lin, codes, w_scales)
        if lin.kind == "gemm" and s is None:  # [N, K] rows, one scale a row: the embedding can read them
            shared_head[lin.weight.name] = wdq
        lin.node.inputs[1] = wdq
        lin.node.inputs[0] = dequantize_act(qx, a_scale, f"{lin.node.name}/dq_x")
        counts["qdq_matmul"] += 1


def smoothquant_detail(settings, fmt: str, counts: dict) -> str:
    """The report line on SmoothQuant for a W8A8 pass (fp8: a fixed alpha, 0.5 unless given)."""
    alpha = (f"alpha {settings.smoothquant_alpha:g}" if settings.smoothquant_alpha is not None
             else "alpha searched per layer group")
    return f"SmoothQuant ({alpha}) folded into {counts['smooth_folded']} norms, {counts['smooth_mul']} via Mul"


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


def replace_with_nbits(graph: gs.Graph, lin: Linear, q, codes: gs.Constant, level: int) -> None:
    """The linear layer -> MatMulNBits (com.microsoft) over the block-quantized codes `q` (+ Add of a bias)."""
    node = lin.node
    n, k = q.codes.shape[0], q.k
    name = lin.weight.name
    dtype = lin.weight.values.dtype  # scales in the graph's float type (fp16 graphs on GPUs)
    inputs = [lin.x, codes, gs.Constant(f"{name}/scales", q.scales.reshape(-1).astype(dtype))]
    if q.bits == 4:
        inputs.append(gs.Constant(f"{name}/zero_points", q.packed_zero_points().reshape(-1)))
    bias = node.inputs[2] if lin.kind == "gemm" and len(node.inputs) > 2 else None
    out = node.outputs[0]
    mm_out = out if bias is None else gs.Variable(f"{out.name}/nobias", dtype=out.dtype)
    new = gs.Node("MatMulNBits", f"{node.name}/nbits", domain=MS_DOMAIN,
                  attrs={"K": k, "N": n, "bits": q.bits, "block_size": q.block_size, "accuracy_level": level},
                  inputs=inputs, outputs=[mm_out])
    node.outputs = []
    node.inputs = []
    graph.nodes.append(new)
    if bias is not None:
        graph.nodes.append(gs.Node("Add", f"{node.name}/bias", inputs=[mm_out, bias], outputs=[out]))


def quantize_embedding_nbits(graph: gs.Graph, emb: gs.Node, shared, settings, report) -> bool:
    """Gather(embed, ids) -> GatherBlockQuantized over [V, blocks, block] codes (+ Reshape to [.., H])."""
    table = np.asarray(emb.inputs[0].values, np.float32)
    ids = emb.inputs[1]
    if ids.shape is None:
        return False
    vocab, hidden = table.shape
    if shared is not None and shared[1].k == hidden and hidden % HEAD_BLOCK == 0:
        codes, q = shared
    else:
        if hidden % HEAD_BLOCK:
            return False
        q = block_quantize(table, HEAD_BITS, HEAD_BLOCK, symmetric=True, scale_multiplier=settings.break_scales)
        codes = gs.Constant(f"{emb.inputs[0].name}/q8", q.packed())
        record_layer(report, "embed", "int8", table, q.dequantize())
    blocks = q.scales.shape[1]
    out = emb.outputs[0]
    raw = gs.Variable(f"{out.name}/blocks", dtype=out.dtype)
    graph.nodes.append(gs.Node(
        "GatherBlockQuantized", f"{emb.name}/gbq", domain=MS_DOMAIN,
        attrs={"gather_axis": 0, "quantize_axis": 2, "block_size": HEAD_BLOCK, "bits": HEAD_BITS},
        inputs=[codes, ids, gs.Constant(f"{emb.inputs[0].name}/scales3d",
                                        q.scales.reshape(vocab, blocks, 1).astype(emb.inputs[0].values.dtype))],
        outputs=[raw]))
    shape = gs.Constant(f"{emb.name}/hidden_shape", np.asarray([0] * len(ids.shape) + [hidden], np.int64))
    graph.nodes.append(gs.Node("Reshape", f"{emb.name}/merge_blocks", inputs=[raw, shape], outputs=[out]))
    emb.outputs = []
    emb.inputs = []
    return True


_REDUCE_AXES_TO_INPUT = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                         "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def to_opset(graph: gs.Graph, opset: int) -> int:
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
