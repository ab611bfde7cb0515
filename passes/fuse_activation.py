"""GELU fusions for ONNX Runtime (gpt2-style graphs):
    exact:  Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)                        -> Gelu
    tanh:   Mul(Mul(x, Add(Tanh(Mul(Add(x, Mul(Pow(x, 3), 0.044715)), sqrt(2/pi))), 1)), 0.5)
                                                                                 -> FastGelu
SiLU fusion (llama-style gated MLPs):
    Mul(x, Sigmoid(x))                                                           -> QuickGelu(alpha=1)
    (ONNX Runtime's QuickGelu is x * sigmoid(alpha * x): with alpha 1 it is SiLU, one kernel not two)
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.passes.matching import (MS_DOMAIN, add_node, detach, is_safe_to_fuse, is_scalar, other_input, producer,
                                     scalar, take_outputs)
from leptonc.passes.registry import PassContext, PassResult, register_pass


def _const_side(node: gs.Node, value: float, rtol: float = 1e-3):
    """For a binary node with a constant `value` on one side: the other input."""
    if node is None or len(node.inputs) != 2:
        return None
    for i in (0, 1):
        if is_scalar(node.inputs[i], value, rtol):
            return node.inputs[1 - i]
    return None


def _match_gelu(graph: gs.Graph, out_mul: gs.Node):
    if out_mul.op != "Mul":
        return None
    half = _const_side(out_mul, 0.5)
    mul = producer(half) if half is not None else None
    if mul is None or mul.op != "Mul":
        return None
    for xi in (0, 1):
        x, add1 = mul.inputs[xi], producer(mul.inputs[1 - xi])
        if add1 is None or add1.op != "Add":
            continue
        inner = _const_side(add1, 1.0)
        fn = producer(inner) if inner is not None else None
        if fn is None:
            continue
        if fn.op == "Erf":
            div = producer(fn.inputs[0])
            if div is None or div.op != "Div" or div.inputs[0] is not x or not is_scalar(div.inputs[1], np.sqrt(2.0)):
                continue
            nodes = [out_mul, mul, add1, fn, div]
            return ("Gelu", x, nodes) if is_safe_to_fuse(graph, nodes, [out_mul.outputs[0]]) else "unsafe"
        if fn.op == "Tanh":
            s = producer(fn.inputs[0])
            inner_sum = _const_side(s, np.sqrt(2.0 / np.pi)) if s is not None and s.op == "Mul" else None
            a = producer(inner_sum) if inner_sum is not None else None
            if a is None or a.op != "Add":
                continue
            cube_t = other_input(a, x)
            c = producer(cube_t) if cube_t is not None else None
            cube = producer(_const_side(c, 0.044715)) if c is not None and c.op == "Mul" and _const_side(c, 0.044715) is not None else None
            if cube is None or cube.op != "Pow" or cube.inputs[0] is not x or scalar(cube.inputs[1]) != 3.0:
                continue
            nodes = [out_mul, mul, add1, fn, s, a, c, cube]
            return ("FastGelu", x, nodes) if is_safe_to_fuse(graph, nodes, [out_mul.outputs[0]]) else "unsafe"
    return None


@register_pass("fuse_gelu", requires=("infer_shapes",))
def fuse_gelu(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Exact (erf) GELU -> Gelu; tanh-approximated GELU -> FastGelu (ONNX Runtime contrib ops)."""
    counts = {"Gelu": 0, "FastGelu": 0, "left_alone": 0}
    for node in list(graph.nodes):
        if node.op != "Mul" or not node.outputs or not node.inputs:
            continue
        m = _match_gelu(graph, node)
        if m is None:
            continue
        if m == "unsafe":
            counts["left_alone"] += 1
            continue
        op, x, nodes = m
        new = add_node(graph, op, [x], [], f"{node.name}/{op.lower()}", domain=MS_DOMAIN)
        take_outputs(new, [node.outputs[0]])
        detach(nodes)
        counts[op] += 1
    graph.cleanup()
    fused = counts["Gelu"] + counts["FastGelu"]
    tail = f"; {counts['left_alone']} left alone (intermediate read elsewhere)" if counts["left_alone"] else ""
    if not fused:
        return PassResult(False, "no GELU pattern found" + tail, counts)
    parts = [f"{counts[k]} {k}" for k in ("Gelu", "FastGelu") if counts[k]]
    return PassResult(True, f"fused {' and '.join(parts)}{tail}", counts)


@register_pass("fuse_silu", requires=("infer_shapes",))
def fuse_silu(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """x * Sigmoid(x) -> QuickGelu(x, alpha=1.0) (ONNX Runtime contrib op: SiLU in one kernel)."""
    fused = left = 0
    for node in list(graph.nodes):
        if node.op != "Sigmoid" or len(node.outputs) != 1 or not node.inputs:
            continue
        x, s = node.inputs[0], node.outputs[0]
        users = list(s.outputs)
        mul = users[0] if len(users) == 1 and users[0].op == "Mul" else None
        if mul is None or len(mul.inputs) != 2 or other_input(mul, s) is not x:
            continue
        if not is_safe_to_fuse(graph, [node, mul], [mul.outputs[0]]):
            left += 1
            continue
        new = add_node(graph, "QuickGelu", [x], [], f"{mul.name}/silu", domain=MS_DOMAIN, alpha=1.0)
        take_outputs(new, [mul.outputs[0]])
        detach([node, mul])
        fused += 1
    graph.cleanup()
    tail = f"; {left} left alone (intermediate read elsewhere)" if left else ""
    if not fused:
        return PassResult(False, "no SiLU pattern found" + tail, {"fused": 0, "left_alone": left})
    return PassResult(True, f"fused {fused} SiLU -> QuickGelu{tail}", {"fused": fused, "left_alone": left})
