"""Logits only where they are read: a `logits_positions` input selects the positions the LM head runs on.

The export computes logits for every position: [B, S, vocab]. Generation reads one row per sequence
after the prompt, so a 1,024-token prefill of a 128k-vocabulary model spends a [1024, hidden] x
[hidden, vocab] GEMM and writes 0.5 GB of fp32 logits to use 0.5 MB of them. This pass puts a
GatherND between the final norm and the LM head:

    h [B, S, H] -> GatherND(h, Unsqueeze(logits_positions [B, K], -1), batch_dims=1) -> [B, K, H]
      -> LM head -> logits [B, K, vocab]

The runtime passes each row's last real position after a prompt (K = 1), 0 in a decode step, and
0..S-1 when every position is wanted (perplexity, verification), so the outputs are the same numbers
as before for the positions asked for.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.graph_contract import INPUT_IDS, LOGITS, LOGITS_POSITIONS
from leptonc.passes.matching import add_node, const_ints, new_const, producer, variable
from leptonc.passes.registry import PassContext, PassResult, register_pass

INPUT = LOGITS_POSITIONS


def _match_head(graph: gs.Graph):
    """logits = Reshape(Cast?(Gemm|MatMul*(Reshape(h, [-1, H]))), Concat(Shape(input_ids), [V])) ->
    (the flatten Reshape, the Concat, its Shape input index) or a reason string."""
    out = next((t for t in graph.outputs if t.name == LOGITS), None)
    if out is None:
        return "the graph has no 'logits' output"
    unflatten = producer(out)
    if unflatten is None or unflatten.op != "Reshape":
        return "logits are not reshaped from a flat LM head"
    shape = producer(unflatten.inputs[1])
    if shape is None or shape.op != "Concat" or len(shape.inputs) != 2:
        return "the logits shape is not Concat(Shape(input_ids), [vocab])"
    bs = producer(shape.inputs[0])
    if bs is None or bs.op != "Shape" or bs.inputs[0].name != INPUT_IDS or bs.attrs.get("start", 0) != 0:
        return "the logits shape does not come from input_ids"
    cur = unflatten.inputs[0]
    for _ in range(3):  # Cast (fp16 graphs) and the head itself (Gemm, or MatMul/MatMulNBits after quantization)
        node = producer(cur)
        if node is None:
            return "no LM head found above the logits"
        if node.op == "Reshape" and const_ints(node.inputs[1]) is not None and const_ints(node.inputs[1])[0] == -1:
            return node, shape
        cur = node.inputs[0]
    return "no flatten Reshape below the LM head"


@register_pass("select_logits", requires=("infer_shapes",))
def select_logits(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """LM head on the requested positions only (a `logits_positions` [B, K] input)."""
    if any(t.name == INPUT for t in graph.inputs):
        return PassResult.skipped(f"the graph already has a {INPUT} input")
    m = _match_head(graph)
    if isinstance(m, str):
        return PassResult.skipped(m)
    flatten, shape = m
    positions = gs.Variable(INPUT, dtype=np.int64, shape=["batch", "logits_sequence"])
    graph.inputs.append(positions)
    index = variable(graph, "select_logits/index", np.int64, ["batch", "logits_sequence", 1])
    add_node(graph, "Unsqueeze", [positions, new_const("select_logits/axes", np.array([-1], np.int64))], [index],
             "select_logits/index")
    h = flatten.inputs[0]
    picked = variable(graph, "select_logits/hidden", h.dtype, ["batch", "logits_sequence", (h.shape or [None] * 3)[-1]])
    add_node(graph, "GatherND", [h, index], [picked], "select_logits/gather", batch_dims=1)
    flatten.inputs[0] = picked
    bk = variable(graph, "select_logits/batch_positions", np.int64, [2])
    add_node(graph, "Shape", [positions], [bk], "select_logits/shape")
    shape.inputs[0] = bk
    out = next(t for t in graph.outputs if t.name == LOGITS)
    if out.shape is not None and len(out.shape) == 3:
        out.shape = [out.shape[0], "logits_sequence", out.shape[2]]
    graph.cleanup()
    return PassResult(True, "LM head runs on the positions in logits_positions (prefill: the last one)",
                      {"inputs_added": 1})
