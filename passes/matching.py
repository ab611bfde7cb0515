"""Shared matchers for fusion passes on onnx-graphsurgeon graphs, and the one safety rule.

A fusion finds an anchor node, walks up its producers with `parent` / `match_parent_path`, checks the
constants it needs, and asks `is_safe_to_fuse` before rewriting: a node may only be removed when
every output it has is read by nothing but other removed nodes (and is not a graph output). The
fused node then takes over the anchor's output tensor(s), and `graph.cleanup()` drops the old nodes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import itertools

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.graph_contract import MS_DOMAIN

_NAMES = itertools.count()


# ---- walking the graph ---------------------------------------------------------------------------

def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that writes `tensor` (None for graph inputs and constants)."""
    return tensor.inputs[0] if tensor is not None and len(tensor.inputs) == 1 else None


def parent(node: gs.Node, index: int, op: str | Sequence[str] | None = None) -> gs.Node | None:
    """The producer of `node.inputs[index]`, if it exists and has the given op type."""
    if index >= len(node.inputs):
        return None
    p = producer(node.inputs[index])
    if p is None:
        return None
    if op is not None and p.op not in ((op,) if isinstance(op, str) else tuple(op)):
        return None
    return p


def match_parent_path(node: gs.Node, path: Sequence[tuple[str, int | None]]) -> list[gs.Node] | None:
    """Follow (op, input index) steps upwards from `node`; index None tries every input.
    Returns the matched nodes (nearest first) or None."""
    out: list[gs.Node] = []
    cur = node
    for op, index in path:
        indices = range(len(cur.inputs)) if index is None else (index,)
        nxt = None
        for i in indices:
            nxt = parent(cur, i, op)
            if nxt is not None:
                break
        if nxt is None:
            return None
        out.append(nxt)
        cur = nxt
    return out


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def only_consumer(tensor: gs.Tensor) -> gs.Node | None:
    outs = tensor.outputs
    return outs[0] if len(outs) == 1 else None


def other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """For a binary node with `tensor` as one input, the other input."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is tensor:
        return b
    if b is tensor:
        return a
    return None


# ---- constants -----------------------------------------------------------------------------------

def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (an initializer or a Constant node's output), else None."""
    if isinstance(tensor, gs.Constant):
        from leptonc.passes.graph_io import read_values

        return read_values(tensor)
    p = producer(tensor)
    if p is not None and p.op == "Constant" and "value" in p.attrs:
        value = p.attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    return None


def is_const(tensor: gs.Tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        return True
    p = producer(tensor)
    return p is not None and p.op == "Constant" and "value" in p.attrs


def scalar(tensor: gs.Tensor) -> float | None:
    """A constant holding a single number (any shape of size 1)."""
    v = const_value(tensor)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(-1)[0])


def is_scalar(tensor: gs.Tensor, value: float, rtol: float = 1e-3) -> bool:
    s = scalar(tensor)
    return s is not None and abs(s - value) <= rtol * max(1.0, abs(value))


def const_ints(tensor: gs.Tensor) -> list[int] | None:
    v = const_value(tensor)
    if v is None or v.dtype.kind not in "iu":
        return None
    return [int(x) for x in v.reshape(-1)]


def const_input(node: gs.Node) -> tuple[int, np.ndarray] | None:
    """For a binary node with exactly one constant input: (its index, value)."""
    found = [(i, const_value(t)) for i, t in enumerate(node.inputs)]
    found = [(i, v) for i, v in found if v is not None]
    return found[0] if len(found) == 1 else None


def new_const(name: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(value))


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def axes_of(node: gs.Node) -> list[int] | None:
    """Reduce/Squeeze/Unsqueeze axes, given as an attribute (older opsets) or a constant input."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1:
        return const_ints(node.inputs[1])
    return None


def is_last_axis(axis: int, tensor: gs.Tensor) -> bool:
    if axis == -1:
        return True
    rank = len(tensor.shape) if tensor.shape is not None else None
    return rank is not None and axis == rank - 1


# ---- the safety rule -----------------------------------------------------------------------------

def is_safe_to_fuse(graph: gs.Graph, removed: Iterable[gs.Node], kept_outputs: Iterable[gs.Tensor]) -> bool:
    """True when every output of every node in `removed` is read only by nodes in `removed` and is
    not a graph output, except the tensors in `kept_outputs`, which the fused node will produce."""
    removed = list(removed)
    ids = {id(n) for n in removed}
    kept = {id(t) for t in kept_outputs}
    graph_outputs = {id(t) for t in graph.outputs}
    for node in removed:
        for out in node.outputs:
            if id(out) in kept:
                continue
            if id(out) in graph_outputs:
                return False
            if any(id(c) not in ids for c in out.outputs):
                return False
    return True


def detach(nodes: Iterable[gs.Node]) -> None:
    """Disconnect replaced nodes so `graph.cleanup()` removes them."""
    for node in nodes:
        node.outputs.clear()
        node.inputs.clear()


def take_outputs(new: gs.Node, old_outputs: Sequence[gs.Tensor]) -> None:
    """Make `new` the producer of tensors that an old node wrote (their consumers stay attached)."""
    for t in old_outputs:
        for p in list(t.inputs):
            p.outputs.remove(t)
    new.outputs.extend(old_outputs)


def reset_names() -> None:
    """Restart generated names, so the same pipeline on the same graph gives the same bytes."""
    global _NAMES
    _NAMES = itertools.count()


def fresh_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not used in the graph yet (export never writes "/lc<n>" suffixes)."""
    return f"{base}/lc{next(_NAMES)}"


def variable(graph: gs.Graph, base: str, dtype=None, shape=None) -> gs.Variable:
    return gs.Variable(fresh_name(graph, base), dtype=dtype, shape=shape)


def add_node(graph: gs.Graph, op: str, inputs: list, outputs: list, name: str, domain: str | None = None,
             **attrs) -> gs.Node:
    node = gs.Node(op, fresh_name(graph, name), attrs, inputs, outputs, domain=domain)
    graph.nodes.append(node)
    return node


def float_dtype(tensor: gs.Tensor):
    """The numpy float dtype of a tensor, when known."""
    dt = getattr(tensor, "dtype", None)
    if dt is None:
        return None
    try:
        return np.dtype(dt)
    except TypeError:
        from onnx import helper

        return np.dtype(helper.tensor_dtype_to_np_dtype(dt))


def count_ops(graph: gs.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.nodes:
        counts[n.op] = counts.get(n.op, 0) + 1
    return counts
