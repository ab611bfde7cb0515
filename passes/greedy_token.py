"""The greedy next token in the graph (on the device for GPU bundles): a `next_token` output, ArgMax of the
logits over the vocabulary.

Greedy generation reads one number per row from each step's [B, K, vocab] logits. Copying the logits
to the host to find it moves B x vocab values a step (256 KiB at batch 1 for a 128k vocabulary in
fp16, 4 MiB at batch 16) and converts them to float32 there, which costs more than the step's
attention on a GPU. This pass adds

    logits [B, K, vocab] -> ArgMax(axis=-1, keepdims=0) -> next_token [B, K] (int64)

as a second graph output. The runtime binds it next to the logits and copies only it when the caller
asks for greedy tokens (`Runner.decode_tokens`); sampling still reads the logits. ArgMax returns the
first index of the maximum, as numpy's argmax does on the host.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.graph_contract import LOGITS, NEXT_TOKEN
from leptonc.passes.matching import add_node
from leptonc.passes.registry import PassContext, PassResult, register_pass

OUTPUT = NEXT_TOKEN


@register_pass("greedy_token")
def greedy_token(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """A `next_token` output: the argmax of the logits over the vocabulary, computed in the graph."""
    if any(t.name == OUTPUT for t in graph.outputs):
        return PassResult.skipped(f"the graph already has a {OUTPUT} output")
    logits = next((t for t in graph.outputs if t.name == LOGITS), None)
    if logits is None:
        return PassResult.skipped("the graph has no 'logits' output")
    shape = list(logits.shape) if logits.shape is not None and len(logits.shape) == 3 else ["batch", "sequence", None]
    token = gs.Variable(OUTPUT, dtype=np.int64, shape=shape[:2])
    add_node(graph, "ArgMax", [logits], [token], "greedy_token/argmax", axis=-1, keepdims=0)
    graph.outputs.append(token)
    return PassResult(True, f"greedy token computed in the graph ({OUTPUT} = ArgMax of the logits)",
                      {"outputs_added": 1})
