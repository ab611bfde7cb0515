"""Normalization fusions for ONNX Runtime: RMSNorm -> SimplifiedLayerNormalization, residual Add +
RMSNorm -> SkipSimplifiedLayerNormalization, residual Add + LayerNormalization -> SkipLayerNormalization.

RMSNorm as export writes it (fp16 graphs add the two Casts, so the math runs in fp32):
    [Cast(fp32)] -> Pow(x, 2) -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, .)
                 -> [Cast(fp16)] -> Mul(., weight)
Also accepted: Mul(x, x) for the square, Div(1, Sqrt) for the reciprocal, Div(x, Sqrt) for the scaling.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.passes.matching import (MS_DOMAIN, add_node, axes_of, const_value, detach, is_safe_to_fuse,
                                     is_scalar, other_input, parent, producer, scalar, take_outputs)
from leptonc.passes.registry import PassContext, PassResult, register_pass


def _match_rmsnorm(graph: gs.Graph, mul_w: gs.Node):
    """Match an RMSNorm ending at `mul_w` (the weight multiply). Returns (x, weight, eps, nodes) or a
    reason string saying where it stopped matching."""
    if mul_w.op != "Mul" or len(mul_w.inputs) != 2:
        return "not a Mul"
    weight_idx = [i for i, t in enumerate(mul_w.inputs) if const_value(t) is not None]
    if len(weight_idx) != 1:
        return "weight is not a constant"
    weight = mul_w.inputs[weight_idx[0]]
    if len(weight.shape) != 1:
        return "weight is not 1-D"
    y = mul_w.inputs[1 - weight_idx[0]]
    nodes = [mul_w]
    cast_out = producer(y)
    has_cast_out = cast_out is not None and cast_out.op == "Cast"
    if has_cast_out:
        nodes.append(cast_out)
        y = cast_out.inputs[0]
    scale = producer(y)
    if scale is None or scale.op not in ("Mul", "Div") or len(scale.inputs) != 2:
        return "no normalizing Mul/Div"
    nodes.append(scale)
    if scale.op == "Mul":
        # One input is x, the other 1/sqrt(mean(x^2) + eps).
        for xi in (0, 1):
            inv = parent(scale, 1 - xi, ("Reciprocal", "Div"))
            if inv is not None:
                break
        else:
            return "no Reciprocal"
        x = scale.inputs[xi]
        if inv.op == "Div":
            if not is_scalar(inv.inputs[0], 1.0):
                return "Div is not 1/sqrt"
            sqrt = parent(inv, 1, "Sqrt")
        else:
            sqrt = parent(inv, 0, "Sqrt")
        nodes.append(inv)
    else:
        x = scale.inputs[0]
        sqrt = parent(scale, 1, "Sqrt")
    if sqrt is None:
        return "no Sqrt"
    nodes.append(sqrt)
    add = parent(sqrt, 0, "Add")
    if add is None:
        return "no epsilon Add"
    eps_t = [t for t in add.inputs if scalar(t) is not None]
    if len(eps_t) != 1:
        return "epsilon is not a constant"
    eps = scalar(eps_t[0])
    mean = producer(other_input(add, eps_t[0]))
    if mean is None or mean.op != "ReduceMean" or axes_of(mean) != [-1] and axes_of(mean) != [len(x.shape or []) - 1]:
        return "no ReduceMean over the last axis"
    if mean.attrs.get("keepdims", 1) != 1:
        return "ReduceMean drops the axis"
    sq = producer(mean.inputs[0])
    if sq is None:
        return "no square"
    if sq.op == "Pow":
        if sq.inputs[0] is not x or not is_scalar(sq.inputs[1], 2.0, 0):
            return "Pow is not x^2 of the normalized input"
    elif sq.op == "Mul":
        if not (sq.inputs[0] is x and sq.inputs[1] is x):
            return "Mul is not x*x of the normalized input"
    else:
        return "no square"
    nodes += [add, mean, sq]
    cast_in = producer(x)
    x_in = x
    if has_cast_out and (cast_in is None or cast_in.op != "Cast"):
        return "a Cast out of the norm without a Cast in"
    if has_cast_out:
        # fp16 graph: the norm ran in fp32 between two Casts; the fused op reads fp16 and computes in fp32.
        x_in = cast_in.inputs[0]
        ids = {id(n) for n in nodes}
        if all(id(c) in ids for c in x.outputs):
            nodes.append(cast_in)
    if not is_safe_to_fuse(graph, nodes, [mul_w.outputs[0]]):
        return "an intermediate result is read elsewhere"
    return x_in, weight, eps, nodes


@register_pass("fuse_rmsnorm", requires=("infer_shapes",))
def fuse_rmsnorm(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """RMSNorm subgraphs -> SimplifiedLayerNormalization (ONNX Runtime, computes in fp32)."""
    fused, near = 0, []
    for node in list(graph.nodes):
        if node.op != "Mul" or not node.outputs:
            continue
        m = _match_rmsnorm(graph, node)
        if isinstance(m, str):
            # A near-match: got as far as the Sqrt of an epsilon Add but was not safe or not exact.
            if m == "an intermediate result is read elsewhere":
                near.append(node.name)
            continue
        x, weight, eps, nodes = m
        out = node.outputs[0]
        detach(nodes[1:])
        new = add_node(graph, "SimplifiedLayerNormalization", [x, weight], [], f"{node.name}/sln",
                       axis=-1, epsilon=float(eps), stash_type=1)
        take_outputs(new, [out])
        node.inputs.clear()
        fused += 1
    graph.cleanup()
    counts = {"fused": fused, "left_alone": len(near)}
    if not fused:
        return PassResult(False, "no RMSNorm pattern found" + (f" ({len(near)} left alone: intermediate read elsewhere)"
                                                                if near else ""), counts)
    tail = f"; left {len(near)} alone (intermediate read elsewhere)" if near else ""
    return PassResult(True, f"fused {fused} RMSNorm{tail}", counts)


def _residual_add(graph: gs.Graph, x: gs.Tensor, hidden: int) -> gs.Node | None:
    """The Add producing `x` when it is a residual add of two same-shaped [.., hidden] activations."""
    add = producer(x)
    if add is None or add.op != "Add" or len(add.inputs) != 2:
        return None
    a, b = add.inputs
    if const_value(a) is not None or const_value(b) is not None:
        return None
    if a.shape is None or b.shape is None or len(a.shape) != 3 or list(a.shape) != list(b.shape):
        return None  # shapes must be known equal: the fused op does not broadcast
    if a.shape[-1] != hidden:
        return None
    if a.dtype is not None and b.dtype is not None and np.dtype(a.dtype) != np.dtype(b.dtype):
        return None
    return add


def _fuse_skip(graph: gs.Graph, norm_op: str, fused_op: str, n_params: int) -> tuple[int, int]:
    fused = unknown = 0
    for norm in list(graph.nodes):
        if norm.op != norm_op or not norm.inputs:
            continue
        if norm_op == "LayerNormalization" and norm.attrs.get("axis", -1) not in (-1, len(norm.inputs[0].shape or []) - 1):
            continue
        weight = norm.inputs[1]
        if const_value(weight) is None or len(weight.shape) != 1:
            continue
        add = _residual_add(graph, norm.inputs[0], weight.shape[0])
        if add is None:
            unknown += producer(norm.inputs[0]) is not None and producer(norm.inputs[0]).op == "Add"
            continue
        total = add.outputs[0]
        others = [c for c in total.outputs if c is not norm]
        in_outputs = any(t is total for t in graph.outputs)
        outputs = [norm.outputs[0], gs.Variable.empty(), gs.Variable.empty()]
        if others or in_outputs:
            outputs.append(total)  # input_skip_bias_sum: the residual stream the next layer reads
        params = list(norm.inputs[1:1 + n_params])
        new = add_node(graph, fused_op, [add.inputs[0], add.inputs[1], *params], [], f"{norm.name}/skip",
                       domain=MS_DOMAIN, epsilon=float(norm.attrs.get("epsilon", 1e-5)))
        take_outputs(new, outputs[:1])
        if len(outputs) == 4:
            add.outputs.clear()
            new.outputs.extend(outputs[1:])
        detach([norm, add])
        fused += 1
    graph.cleanup()
    return fused, unknown


@register_pass("fuse_skip_rmsnorm", requires=("fuse_rmsnorm",))
def fuse_skip_rmsnorm(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Residual Add + SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization (the sum
    stays available as its fourth output)."""
    fused, unknown = _fuse_skip(graph, "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", 1)
    if not fused:
        return PassResult(False, "no residual Add feeds a fused RMSNorm", {"fused": 0})
    return PassResult(True, f"fused {fused} residual Add + RMSNorm" +
                      (f"; {unknown} Add left alone (operand shapes not known equal)" if unknown else ""),
                      {"fused": fused, "left_alone": unknown})


@register_pass("fuse_skip_layernorm", requires=("infer_shapes",))
def fuse_skip_layernorm(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Residual Add + LayerNormalization -> SkipLayerNormalization (gpt2-style graphs)."""
    if not any(n.op == "LayerNormalization" for n in graph.nodes):
        return PassResult(False, "no LayerNormalization in the graph (RMSNorm model)")
    fused, unknown = _fuse_skip(graph, "LayerNormalization", "SkipLayerNormalization", 2)
    if not fused:
        return PassResult(False, "no residual Add feeds a LayerNormalization", {"fused": 0})
    return PassResult(True, f"fused {fused} residual Add + LayerNorm" +
                      (f"; {unknown} Add left alone (operand shapes not known equal)" if unknown else ""),
                      {"fused": fused, "left_alone": unknown})
