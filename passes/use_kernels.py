"""Lower ONNX Runtime contrib ops to leptonc's own CUDA kernels (targets/kernels/), where they are faster.

    com.microsoft.MatMulNBits (fp16 A, bits 4 or 8, block a multiple of 32, K a multiple of 8, constant weights,
    no g_idx or bias input)
        -> ai.leptonc.MatMulNBitsTiled (A, B tiled for the kernel's mma operands, SZ = scale and zero
           point pairs; targets/kernels/layout.py)

The library must have been built for the target (targets/onnxruntime.py builds it before the pipeline
and puts it in `ctx.options["cuda_kernels"]`); when it could not be, the pass is skipped with the reason
and the graph keeps ONNX Runtime's kernel.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.passes.matching import MS_DOMAIN
from leptonc.passes.registry import PassContext, PassResult, register_pass
from leptonc.targets.kernels.layout import tile_nbits

LEPTONC_DOMAIN = "ai.leptonc"


def _lowerable(node: gs.Node) -> str | None:
    """None when ai.leptonc.MatMulNBits runs this node, else why not."""
    if len(node.inputs) > 4:
        return "g_idx or bias input"
    a = node.inputs[0]
    if a.dtype is None or np.dtype(a.dtype) != np.float16:
        return "activations are not fp16"
    bits, block = node.attrs.get("bits"), node.attrs.get("block_size")
    if bits not in (4, 8):
        return f"bits {bits}"
    if not block or block % 32:
        return f"block {block}"
    if node.attrs.get("K", 1) % 8:
        return "K not a multiple of 8"
    if not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
        return "weights computed at run time"
    if len(node.inputs) == 4 and node.inputs[3].dtype is not None and np.dtype(node.inputs[3].dtype) != np.uint8:
        return "float zero points"
    return None


@register_pass("use_leptonc_kernels")
def use_leptonc_kernels(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """MatMulNBits -> leptonc's CUDA kernel (streams int4/int8 weights once for up to 16 rows)."""
    nodes = [n for n in graph.nodes if n.op == "MatMulNBits" and n.domain == MS_DOMAIN]
    if not nodes:
        return PassResult.skipped("no MatMulNBits in the graph")
    kernels = ctx.options.get("cuda_kernels") or {}
    if not kernels.get("file"):
        return PassResult.skipped(f"leptonc's CUDA kernels were not built: {kernels.get('unavailable', 'not requested')}; "
                                  "MatMulNBits stays on ONNX Runtime's kernel")
    counts = {"lowered": 0, "left_alone": 0}
    reasons: dict[str, int] = {}
    for node in nodes:
        why = _lowerable(node)
        if why is not None:
            counts["left_alone"] += 1
            reasons[why] = reasons.get(why, 0) + 1
            continue
        _lower(node)
        counts["lowered"] += 1
    if not counts["lowered"]:
        return PassResult(False, "no MatMulNBits could be lowered: " + ", ".join(f"{k} ({v})" for k, v in reasons.items()),
                          counts)
    detail = f"{counts['lowered']} MatMulNBits -> {LEPTONC_DOMAIN}.MatMulNBitsTiled ({kernels.get('arch')})"
    if reasons:
        detail += "; left on ONNX Runtime's kernel: " + ", ".join(f"{k} ({v})" for k, v in reasons.items())
    return PassResult(True, detail, counts)


def _lower(node: gs.Node) -> None:
    k, n, bits, block = (int(node.attrs[a]) for a in ("K", "N", "bits", "block_size"))
    b, scales = node.inputs[1], node.inputs[2]
    zp = node.inputs[3].values if len(node.inputs) > 3 else None
    tiled, sz = tile_nbits(b.values, scales.values, zp, k, n, bits, block)
    name = b.name
    node.inputs = [node.inputs[0], gs.Constant(f"{name}/tiled", tiled), gs.Constant(f"{name}/sz", sz)]
    node.op, node.domain = "MatMulNBitsTiled", LEPTONC_DOMAIN
    node.attrs = {"K": k, "N": n, "bits": bits, "block_size": block}  # accuracy_level is ONNX Runtime's CPU setting
