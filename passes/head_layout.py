"""Attention's head layouts: [B, N, S, D] (heads split, as export writes q/k/v) <-> [B, S, N*D] (what
ONNX Runtime's RotaryEmbedding and GroupQueryAttention read). Shared by fuse_rotary and fuse_gqa.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.passes.matching import (add_node, attr, const_ints, new_const, producer, variable)


def bnsh_source(x: gs.Tensor):
    """For x = Transpose(z, perm=[0, 2, 1, 3]) with z [B, S, N, D]: (z, N, D), else None."""
    t = producer(x)
    if t is None or t.op != "Transpose" or list(attr(t, "perm", [])) != [0, 2, 1, 3]:
        return None
    z = t.inputs[0]
    if z.shape is None or len(z.shape) != 4 or not all(isinstance(d, int) for d in z.shape[2:]):
        return None
    return z, z.shape[2], z.shape[3]


def as_bsh(graph: gs.Graph, x: gs.Tensor, name: str):
    """A [B, S, N*D] tensor equal to x ([B, N, S, D], a Transpose of [B, S, N, D]), reusing the
    3-D tensor the head split came from when there is one. Returns (tensor, N, D) or None."""
    src = bnsh_source(x)
    if src is None:
        return None
    z, n, d = src
    r = producer(z)
    if r is not None and r.op == "Reshape" and const_ints(r.inputs[1]) == [0, 0, n, d]:
        w = r.inputs[0]
        if w.shape is not None and len(w.shape) == 3 and w.shape[-1] == n * d:
            return w, n, d
    out = variable(graph, f"{name}/bsh", dtype=z.dtype, shape=[z.shape[0], z.shape[1], n * d])
    add_node(graph, "Reshape", [z, new_const(f"{name}/bsh_shape", np.array([0, 0, n * d], np.int64))], [out],
             f"{name}/to_bsh")
    return out, n, d
