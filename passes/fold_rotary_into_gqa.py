"""fold_rotary_into_gqa (GPU graphs, mask-sum lengths): GroupQueryAttention(RotaryEmbedding(q),
RotaryEmbedding(k), v) over one packed Q/K/V projection's Split -> GroupQueryAttention(packed, do_rotary=1).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from leptonc.passes.matching import (MS_DOMAIN, add_node, attr, detach, producer, take_outputs)
from leptonc.passes.registry import PassContext, PassResult, register_pass


def _match_packed_rotary(node: gs.Node):
    """GQA(query=RotaryEmbedding(q), key=RotaryEmbedding(k), value=v) with q, k, v the three outputs of
    one Split of a packed [B, S, (H + 2 KVH) D] projection, both rotaries sharing one cos/sin cache and
    rotating the full head -> (packed, cos, sin, nodes to drop), else a reason string."""
    if len(node.inputs) > 10 and node.inputs[10].name:
        return "attention has a bias (lengths from the mask's length): positions would count padding"
    if attr(node, "do_rotary", 0):
        return "already rotates"
    q_rot, k_rot = producer(node.inputs[0]), producer(node.inputs[1])
    if q_rot is None or k_rot is None or q_rot.op != "RotaryEmbedding" or k_rot.op != "RotaryEmbedding":
        return "query/key are not RotaryEmbedding outputs"
    if attr(q_rot, "rotary_embedding_dim", 0) or attr(k_rot, "rotary_embedding_dim", 0):
        return "partial rotary"
    if attr(q_rot, "interleaved", 0) or attr(k_rot, "interleaved", 0):
        return "interleaved rotary"
    if q_rot.inputs[2] is not k_rot.inputs[2] or q_rot.inputs[3] is not k_rot.inputs[3]:
        return "query and key use different cos/sin caches"
    split = producer(q_rot.inputs[0])
    if (split is None or split.op != "Split" or len(split.outputs) != 3 or producer(k_rot.inputs[0]) is not split
            or split.outputs[0] is not q_rot.inputs[0] or split.outputs[1] is not k_rot.inputs[0]
            or split.outputs[2] is not node.inputs[2]):
        return "query/key/value are not one packed projection's Split"
    if any(len(t.outputs) != 1 for t in split.outputs) or any(len(r.outputs[0].outputs) != 1 for r in (q_rot, k_rot)):
        return "a Q/K/V slice is read elsewhere"
    return split.inputs[0], q_rot.inputs[2], q_rot.inputs[3], [q_rot, k_rot, split]


@register_pass("fold_rotary_into_gqa", requires=("fuse_gqa",))
def fold_rotary_into_gqa(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """GPU graphs with the mask-sum length contract: GroupQueryAttention takes the packed QKV projection
    and rotates Q and K itself (do_rotary), so the two RotaryEmbedding nodes and the Split per layer go.
    Its own positions are past_length + i per row, which equal position_ids exactly when prompts are
    right-padded (the runtime's side of that contract); graphs with an attention bias are left alone."""
    fused, reasons = 0, {}
    for node in list(graph.nodes):
        if node.op != "GroupQueryAttention":
            continue
        m = _match_packed_rotary(node)
        if isinstance(m, str):
            reasons[m] = reasons.get(m, 0) + 1
            continue
        packed, cos, sin, drop = m
        e = gs.Variable.empty
        inputs = [packed, e(), e(), node.inputs[3], node.inputs[4], node.inputs[5], node.inputs[6], cos, sin]
        new = add_node(graph, "GroupQueryAttention", inputs, [], node.name + "/packed", domain=MS_DOMAIN,
                       **{**node.attrs, "do_rotary": 1, "rotary_interleaved": 0})
        take_outputs(new, list(node.outputs))
        detach([node, *drop])
        fused += 1
    graph.cleanup()
    left = "; ".join(f"{v} left alone: {k}" for k, v in reasons.items())
    if not fused:
        return PassResult(False, "nothing folded" + (f" ({left})" if left else ""), {"fused": 0})
    return PassResult(True, f"folded rotary and packed Q/K/V into {fused} GroupQueryAttention"
                      + (f"; {left}" if left else ""), {"fused": fused, "left_alone": sum(reasons.values())})
