"""Cleanup passes every backend can run: shape inference, constant folding, dead-node removal, and
identical initializers stored once. They use only standard ONNX operators (safe for TensorRT)."""

from __future__ import annotations

import hashlib

import numpy as np
from onnx_graphsurgeon.ir.tensor import LazyValues
import onnx_graphsurgeon as gs

from leptonc.passes.graph_io import read_values
from leptonc.passes.matching import count_ops
from leptonc.passes.registry import PassContext, PassResult, register_pass

# Constants larger than this are hidden from shape inference (passed as typed graph inputs), so it
# never copies the weights; the small ones stay, since Reshape/Expand shapes are read from them.
_SHAPE_CONST_LIMIT = 4096


@register_pass("infer_shapes")
def infer_shapes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Annotate every intermediate tensor with its dtype and (symbolic) shape (onnx.shape_inference)."""
    import onnx

    swapped: list[tuple[gs.Node, int, gs.Constant]] = []
    stand_ins: dict[str, gs.Variable] = {}
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant):
                continue
            if int(np.prod(t.shape)) <= _SHAPE_CONST_LIMIT:
                if isinstance(t._values, LazyValues):  # small, still on disk (passes/graph_io.py): read it,
                    t.values = np.asarray(t.values)   # so ORT's symbolic engine sees every small value
                    t.data_location = None
                continue
            # large weights stand in as graph inputs (shape and dtype only)
            v = stand_ins.setdefault(t.name, gs.Variable(t.name, dtype=t.dtype, shape=list(t.shape)))
            swapped.append((node, i, t))
            node.inputs[i] = v
    graph_inputs = list(graph.inputs)
    graph.inputs = graph_inputs + list(stand_ins.values())
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for node, i, t in swapped:
            node.inputs[i] = t
        graph.inputs = graph_inputs
    inferred, engine = _infer(model)
    del model

    tensors = graph.tensors()
    annotated = 0
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = tensors.get(vi.name)
        if not isinstance(t, gs.Variable) or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        if t.shape is None:
            annotated += 1
        if t.dtype is None and tt.elem_type:
            t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        t.shape = shape
    known = sum(1 for t in tensors.values() if isinstance(t, gs.Variable) and t.shape is not None)
    return PassResult(True, f"annotated {annotated} tensors ({known} with known shapes; {engine} inference)",
                      {"annotated": annotated, "known": known})


def _infer(model):
    """ONNX Runtime's symbolic shape inference (it ties broadcast dims together, so residual operands
    are known to be the same shape); onnx's own inference where it fails."""
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        out = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        if out is not None:
            return out, "onnxruntime symbolic"
    except Exception:  # noqa: BLE001 - a gap in the symbolic engine: fall back to onnx's inference
        pass
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True), "onnx"



@register_pass("fold_constants", requires=("infer_shapes",))
def fold_constants(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Evaluate nodes whose inputs are all constants (onnx-graphsurgeon, run through ONNX Runtime)."""
    before = len(graph.nodes)
    graph.fold_constants(fold_shapes=True, error_ok=True, size_threshold=64 << 20).cleanup()
    folded = before - len(graph.nodes)
    return PassResult(True, f"folded {folded} nodes into constants", {"folded": folded})


@register_pass("remove_dead_nodes")
def remove_dead_nodes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Drop Identity nodes and every node that no graph output depends on."""
    graph_outputs = {id(t) for t in graph.outputs}
    identities = 0
    for node in list(graph.nodes):
        if node.op != "Identity" or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        src, out = node.inputs[0], node.outputs[0]
        if id(out) in graph_outputs:
            continue  # the output name is part of the I/O contract
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = src
        node.outputs.clear()
        node.inputs.clear()
        identities += 1
    before = len(graph.nodes)
    graph.cleanup()
    dead = before - len(graph.nodes) - identities
    ops = count_ops(graph)
    return PassResult(True, f"removed {dead} dead nodes and {identities} Identity nodes",
                      {"dead": dead, "identity": identities, "nodes": sum(ops.values())})


@register_pass("dedupe_initializers")
def dedupe_initializers(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Store identical constants once (same dtype, shape and bytes): every reader shares one tensor."""
    groups: dict[tuple, list[gs.Constant]] = {}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            groups.setdefault((np.dtype(t.dtype).str, tuple(t.shape)), []).append(t)
    merged = saved = 0
    for group in groups.values():
        if len(group) < 2:
            continue
        seen: dict[str, gs.Constant] = {}
        for t in group:
            values = np.ascontiguousarray(read_values(t))
            digest = hashlib.blake2b(values.tobytes(), digest_size=16).hexdigest()
            keep = seen.setdefault(digest, t)
            if keep is t:
                continue
            for node in list(t.outputs):
                for i, inp in enumerate(node.inputs):
                    if inp is t:
                        node.inputs[i] = keep
            merged += 1
            saved += values.nbytes
    if merged:
        graph.cleanup()
    return PassResult(True, f"shared {merged} duplicate initializers ({saved} bytes)",
                      {"merged": merged, "bytes_saved": saved})
