"""Sibling projections merged into one MatMul: Q/K/V (three MatMuls reading the same normalized
input, each optionally with a bias Add) and gate/up of a gated MLP. One wider GEMM reads the input
once and launches once; a Split (standard ONNX) hands each consumer its slice, so these passes are
also safe for TensorRT graphs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.passes.matching import add_node, const_value, detach, new_const, variable
from leptonc.passes.registry import PassContext, PassResult, register_pass


def _projection(node: gs.Node):
    """A MatMul with a constant [in, out] weight, and its bias Add if it has exactly one.
    Returns (matmul, weight, bias_add, bias) or None."""
    if node.op != "MatMul" or len(node.inputs) != 2:
        return None
    w = const_value(node.inputs[1])
    if w is None or w.ndim != 2:
        return None
    bias_add, bias = None, None
    users = node.outputs[0].outputs
    if len(users) == 1 and users[0].op == "Add":
        b = [const_value(t) for t in users[0].inputs]
        if b[1] is not None and b[1].ndim == 1 and b[1].shape[0] == w.shape[1] and users[0].inputs[0] is node.outputs[0]:
            bias_add, bias = users[0], b[1]
    return node, w, bias_add, bias


def _reaches(tensor: gs.Tensor, ops: tuple[str, ...], hops: int) -> list[gs.Node]:
    """Nodes of the given op types reachable downstream from `tensor` within `hops` nodes."""
    found, frontier = [], [tensor]
    for _ in range(hops):
        nxt = []
        for t in frontier:
            for n in t.outputs:
                if n.op in ops:
                    found.append(n)
                nxt += list(n.outputs)
        frontier = nxt
    return found


def _sibling_groups(graph: gs.Graph, size: int):
    groups = []
    for t in list(graph.tensors().values()):
        if isinstance(t, gs.Constant):
            continue
        projs = [p for p in (_projection(n) for n in t.outputs) if p is not None and p[0].inputs[0] is t]
        if len(projs) != size:
            continue
        dtypes = {p[1].dtype for p in projs}
        rows = {p[1].shape[0] for p in projs}
        has_bias = {p[2] is not None for p in projs}
        if len(dtypes) != 1 or len(rows) != 1 or len(has_bias) != 1:
            continue
        groups.append((t, projs))
    return groups


def _merge(graph: gs.Graph, x: gs.Tensor, projs: list, name: str) -> None:
    widths = [p[1].shape[1] for p in projs]
    weight = new_const(f"{name}.weight", np.concatenate([p[1] for p in projs], axis=1))
    dtype = projs[0][1].dtype
    lead = list(x.shape[:-1]) if x.shape is not None else None
    shape = lead + [sum(widths)] if lead is not None else None
    y = variable(graph, f"{name}/out", dtype=dtype, shape=shape)
    add_node(graph, "MatMul", [x, weight], [y], f"{name}/matmul")
    olds = []
    for mm, _, bias_add, _ in projs:
        olds.append((bias_add or mm).outputs[0])
    if projs[0][2] is not None:
        bias = new_const(f"{name}.bias", np.concatenate([p[3] for p in projs]))
        yb = variable(graph, f"{name}/bias_out", dtype=dtype, shape=shape)
        add_node(graph, "Add", [y, bias], [yb], f"{name}/bias")
        y = yb
    for t in olds:
        for p in list(t.inputs):
            p.outputs.remove(t)
    add_node(graph, "Split", [y, new_const(f"{name}/sizes", np.array(widths, np.int64))], olds, f"{name}/split",
             axis=-1)
    detach([n for p in projs for n in (p[0], p[2]) if n is not None])


@register_pass("merge_qkv", requires=("infer_shapes",))
def merge_qkv(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Q, K and V projections of one input -> one MatMul (+ bias) and a Split."""
    merged = 0
    heads = ("Reshape", "RotaryEmbedding", "GroupQueryAttention")
    for x, projs in _sibling_groups(graph, 3):
        if not all(_reaches((p[2] or p[0]).outputs[0], heads, 1) for p in projs):
            continue  # three projections that do not all feed attention heads: not Q/K/V
        _merge(graph, x, projs, f"qkv{merged}")
        merged += 1
    graph.cleanup()
    if not merged:
        return PassResult.skipped("no three sibling projections feeding attention")
    return PassResult(True, f"merged {merged} Q/K/V projection triples", {"merged": merged})


@register_pass("merge_gate_up", requires=("infer_shapes",))
def merge_gate_up(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Gate and up projections of a gated MLP -> one MatMul (+ bias) and a Split."""
    merged = 0
    for x, projs in _sibling_groups(graph, 2):
        a = {id(n) for n in _reaches((projs[0][2] or projs[0][0]).outputs[0], ("Mul",), 3)}
        b = {id(n) for n in _reaches((projs[1][2] or projs[1][0]).outputs[0], ("Mul",), 3)}
        if not a & b:
            continue  # the two products never meet in a Mul: not a gated MLP
        _merge(graph, x, projs, f"gate_up{merged}")
        merged += 1
    graph.cleanup()
    if not merged:
        return PassResult.skipped("no gated-MLP projection pair (plain MLP or already merged)")
    return PassResult(True, f"merged {merged} gate/up projection pairs", {"merged": merged})
