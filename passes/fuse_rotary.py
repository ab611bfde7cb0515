"""Rotary fusion for ONNX Runtime.

fuse_rotary: export's rotate-half rotary on [B, heads, S, head_dim]
    Split(x) -> Neg, Concat(-x2, x1) ; Add(Mul(x, cos), Mul(rotated, sin))      (partial rotary: a
    Split/Concat around it), with cos/sin = Unsqueeze(Cos/Sin(Concat(f, f)) [* scale] [-> fp16]),
    f = Cast(position_ids) * inv_freq
  -> com.microsoft RotaryEmbedding on the [B, S, heads*head_dim] form, reading position_ids and a
     cos/sin cache precomputed from inv_freq (so left-padded rows keep their own positions).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.passes.head_layout import as_bsh
from leptonc.passes.matching import (MS_DOMAIN, add_node, attr, axes_of, const_ints, const_value, detach,
                                     is_safe_to_fuse, new_const, parent, producer, scalar, take_outputs, variable)
from leptonc.passes.registry import PassContext, PassResult, register_pass


def _rope_table(graph: gs.Graph, t: gs.Tensor):
    """cos/sin [B, 1, S, R] as export computes them -> (fn, inv_freq, scale, position_ids, dtype)."""
    u = producer(t)
    if u is None or u.op != "Unsqueeze" or axes_of(u) != [1]:
        return None
    cur = u.inputs[0]
    dtype = np.float32
    n = producer(cur)
    if n is not None and n.op == "Cast":
        dtype = np.float16 if attr(n, "to") == 10 else None
        if dtype is None:
            return None
        cur = n.inputs[0]
        n = producer(cur)
    scale = 1.0
    if n is not None and n.op == "Mul":
        s = [scalar(i) for i in n.inputs]
        if s[1] is None:
            return None
        scale, cur = s[1], n.inputs[0]
        n = producer(cur)
    if n is None or n.op not in ("Cos", "Sin"):
        return None
    emb = parent(n, 0, "Concat")
    if emb is None or len(emb.inputs) != 2 or emb.inputs[0] is not emb.inputs[1]:
        return None
    freqs = parent(emb, 0, "Mul")
    if freqs is None:
        return None
    inv, pos = None, None
    for i in (0, 1):
        v = const_value(freqs.inputs[i])
        if v is not None:
            inv, pos = v.astype(np.float32).reshape(-1), freqs.inputs[1 - i]
    if inv is None:
        return None
    unsq = producer(pos)
    if unsq is None or unsq.op != "Unsqueeze" or axes_of(unsq) != [-1]:
        return None
    cast = parent(unsq, 0, "Cast")
    if cast is None or not any(cast.inputs[0] is t for t in graph.inputs):
        return None
    return n.op, inv, scale, cast.inputs[0], dtype


def _match_rotary(graph: gs.Graph, add: gs.Node):
    """Match export's rotate-half at its final Add. Returns a dict or a reason string."""
    muls = [producer(t) for t in add.inputs]
    if len(muls) != 2 or any(m is None or m.op != "Mul" for m in muls):
        return "not Mul + Mul"
    tables, others = {}, {}
    for m in muls:
        for i in (0, 1):
            info = _rope_table(graph, m.inputs[i])
            if info is not None:
                tables[info[0]] = info
                others[info[0]] = (m, m.inputs[1 - i])
    if set(tables) != {"Cos", "Sin"}:
        return "cos/sin tables not recognized"
    (mul_cos, rot), (mul_sin, rotated) = others["Cos"], others["Sin"]
    cat = producer(rotated)
    if cat is None or cat.op != "Concat" or len(cat.inputs) != 2:
        return "no rotate-half Concat"
    neg = parent(cat, 0, "Neg")
    split = producer(cat.inputs[1])
    if neg is None or split is None or split.op != "Split" or producer(neg.inputs[0]) is not split:
        return "no rotate-half Split/Neg"
    if split.inputs[0] is not rot or neg.inputs[0] is not split.outputs[1] or cat.inputs[1] is not split.outputs[0]:
        return "rotate-half halves crossed"
    sizes = const_ints(split.inputs[1]) if len(split.inputs) > 1 else None
    if sizes is None or len(sizes) != 2 or sizes[0] != sizes[1]:
        return "uneven halves"
    rd = 2 * sizes[0]
    if rd != 2 * tables["Cos"][1].size or not np.array_equal(tables["Cos"][1], tables["Sin"][1]):
        return "tables do not match the rotated width"
    if tables["Cos"][2] != tables["Sin"][2] or tables["Cos"][3] is not tables["Sin"][3]:
        return "cos and sin tables differ in scale or positions"
    nodes = [add, mul_cos, mul_sin, cat, neg, split]
    out_node, x = add, rot
    partial = None
    p = producer(rot)
    if p is not None and p.op == "Split" and p.outputs[0] is rot:
        psizes = const_ints(p.inputs[1]) if len(p.inputs) > 1 else None
        final = add.outputs[0].outputs[0] if len(add.outputs[0].outputs) == 1 else None
        if (psizes and psizes[0] == rd and final is not None and final.op == "Concat"
                and len(final.inputs) == 2 and final.inputs[0] is add.outputs[0] and final.inputs[1] is p.outputs[1]):
            partial, x, out_node = rd, p.inputs[0], final
            nodes += [p, final]
    if not is_safe_to_fuse(graph, nodes, [out_node.outputs[0]]):
        return "an intermediate result is read elsewhere"
    fn, inv, scale, positions, dtype = tables["Cos"]
    return {"x": x, "out": out_node.outputs[0], "nodes": nodes, "inv": inv, "scale": scale,
            "positions": positions, "dtype": dtype, "partial": partial}


@register_pass("fuse_rotary", requires=("infer_shapes",))
def fuse_rotary(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Rotate-half rotary embeddings -> RotaryEmbedding (ONNX Runtime) with a cos/sin cache."""
    spec = ctx.spec
    if spec is None or not getattr(spec, "max_positions", 0):
        return PassResult.skipped("no model spec: the cos/sin cache size (max positions) is unknown")
    caches: dict[tuple, tuple[gs.Constant, gs.Constant]] = {}
    fused, reasons = 0, {}
    for node in list(graph.nodes):
        if node.op != "Add" or not node.outputs or not node.inputs:
            continue
        m = _match_rotary(graph, node)
        if isinstance(m, str):
            if m not in ("not Mul + Mul", "cos/sin tables not recognized"):
                reasons[m] = reasons.get(m, 0) + 1
            continue
        bsh = as_bsh(graph, m["x"], node.name)
        if bsh is None:
            reasons["rotated tensor is not a head split"] = reasons.get("rotated tensor is not a head split", 0) + 1
            continue
        x3, n, d = bsh
        key = (m["inv"].tobytes(), m["scale"], np.dtype(m["dtype"]).str)
        if key not in caches:
            pos = np.arange(spec.max_positions, dtype=np.float32)[:, None] * m["inv"][None, :]
            cos = (np.cos(pos) * np.float32(m["scale"])).astype(m["dtype"])
            sin = (np.sin(pos) * np.float32(m["scale"])).astype(m["dtype"])
            caches[key] = (new_const(f"rotary.cos_cache{len(caches)}", cos), new_const(f"rotary.sin_cache{len(caches)}", sin))
        cos_c, sin_c = caches[key]
        y3 = variable(graph, f"{node.name}/rotary", dtype=x3.dtype, shape=list(x3.shape))
        attrs = {"num_heads": n, "interleaved": 0}
        if m["partial"]:
            attrs["rotary_embedding_dim"] = m["partial"]
        add_node(graph, "RotaryEmbedding", [x3, m["positions"], cos_c, sin_c], [y3], f"{node.name}/rotary",
                 domain=MS_DOMAIN, **attrs)
        z = variable(graph, f"{node.name}/rotary_heads", dtype=x3.dtype, shape=[x3.shape[0], x3.shape[1], n, d])
        add_node(graph, "Reshape", [y3, new_const(f"{node.name}/heads_shape", np.array([0, 0, n, d], np.int64))], [z],
                 f"{node.name}/rotary_heads")
        t = add_node(graph, "Transpose", [z], [], f"{node.name}/rotary_bnsh", perm=[0, 2, 1, 3])
        take_outputs(t, [m["out"]])
        detach(m["nodes"])
        fused += 1
    graph.cleanup()
    left = "; ".join(f"{v} left alone: {k}" for k, v in reasons.items())
    if not fused:
        return PassResult(False, "no rotary pattern found" + (f" ({left})" if left else ""), {"fused": 0})
    return PassResult(True, f"fused {fused} rotary" + (f"; {left}" if left else ""),
                      {"fused": fused, "left_alone": sum(reasons.values())})
