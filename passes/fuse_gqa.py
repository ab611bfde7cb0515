"""Attention fusion for ONNX Runtime.

fuse_gqa: Softmax(Q K^T * scale + bias) V over the KV cache (Concat(past, new) = present, with the
    grouped-query Unsqueeze/Expand/Reshape repeat of K and V)
  -> com.microsoft GroupQueryAttention. The graph's own attention bias (causal, padding and sliding
     window, [B, 1, S, T]) is passed as `attention_bias`; `seqlens_k` is T-1 for every row and
     `total_sequence_length` is T, both computed in the graph from attention_mask. Every row then
     keeps its full cache (padding included) and padding is masked by the bias, which is what makes
     left padding correct: GroupQueryAttention's own per-row lengths assume right padding.

  On GPU targets the lengths follow the mask's *contents* instead ("mask_sum", the contract ONNX
  Runtime GenAI uses): `seqlens_k = ReduceSum(attention_mask) - 1` per row, `total_sequence_length`
  = the mask's length, no attention bias (GroupQueryAttention's own causal mask), and no
  `query_seqlens`. The runtime then right-pads prompts and decodes against a fixed [B, capacity] mask,
  so a decode step has the same shapes and addresses every time and ONNX Runtime can capture it in a
  CUDA graph. The lengths are computed on the device (ReduceSum), and the only host-side shape
  arithmetic feeds GroupQueryAttention's CPU-resident `total_sequence_length` input, so no Memcpy node
  is placed in the graph (ONNX Runtime refuses capture when there is one). Models with sliding-window
  layers keep the mask-length contract: their window is part of the bias.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.graph_contract import ATTENTION_MASK, INPUT_IDS
from leptonc.passes.head_layout import as_bsh
from leptonc.passes.matching import (MS_DOMAIN, add_node, attr, axes_of, const_ints, const_value, detach,
                                     float_dtype, is_safe_to_fuse, new_const, parent, producer, scalar, take_outputs,
                                     variable)
from leptonc.passes.registry import PassContext, PassResult, register_pass


def _kv_cache(graph: gs.Graph, t: gs.Tensor, rep: int):
    """K or V as attention reads it -> (cache Concat node, repeat nodes) ; undoes the GQA repeat."""
    nodes = []
    n = producer(t)
    if rep > 1:
        if n is None or n.op != "Reshape":
            return None
        e = parent(n, 0, "Expand")
        u = parent(e, 0, "Unsqueeze") if e is not None else None
        if u is None or axes_of(u) != [2] or const_ints(e.inputs[1]) != [1, 1, rep, 1, 1]:
            return None
        nodes += [n, e, u]
        n = producer(u.inputs[0])
    if n is None or n.op != "Concat" or attr(n, "axis") not in (2, -2) or len(n.inputs) != 2:
        return None
    if not any(n.inputs[0] is t for t in graph.inputs):
        return None
    return n, nodes


def _match_attention(graph: gs.Graph, softmax: gs.Node):
    if attr(softmax, "axis", -1) not in (-1, 3):
        return "softmax not over keys"
    mask_add = parent(softmax, 0, "Add")
    if mask_add is None:
        return "no mask Add"
    scale_mul, bias = None, None
    for i in (0, 1):
        p = parent(mask_add, i, "Mul")
        if p is not None and const_value(mask_add.inputs[1 - i]) is None:
            scale_mul, bias = p, mask_add.inputs[1 - i]
    if scale_mul is None or bias.shape is None or len(bias.shape) != 4 or bias.shape[1] != 1:
        return "no scaled scores + [B, 1, S, T] bias"
    qk, scale = None, None
    for i in (0, 1):
        s = scalar(scale_mul.inputs[1 - i])
        p = parent(scale_mul, i, "MatMul")
        if s is not None and p is not None:
            qk, scale = p, s
    if qk is None:
        return "no Q K^T MatMul"
    kt = parent(qk, 1, "Transpose")
    if kt is None or list(attr(kt, "perm", [])) != [0, 1, 3, 2]:
        return "K is not transposed"
    out_users = softmax.outputs[0].outputs
    pv = out_users[0] if len(out_users) == 1 and out_users[0].op == "MatMul" else None
    if pv is None or pv.inputs[0] is not softmax.outputs[0]:
        return "no probs x V MatMul"
    users = pv.outputs[0].outputs
    tr = users[0] if len(users) == 1 and users[0].op == "Transpose" else None
    if tr is None or list(attr(tr, "perm", [])) != [0, 2, 1, 3]:
        return "output not transposed back"
    users = tr.outputs[0].outputs
    merge = users[0] if len(users) == 1 and users[0].op == "Reshape" else None
    q = qk.inputs[0]
    if q.shape is None or len(q.shape) != 4 or not isinstance(q.shape[1], int) or not isinstance(q.shape[3], int):
        return "query shape unknown"
    heads, dim = q.shape[1], q.shape[3]
    if merge is None or const_ints(merge.inputs[1]) != [0, 0, heads * dim]:
        return "heads not merged"
    k_cat = _kv_cache(graph, kt.inputs[0], 1)
    rep = 1
    if k_cat is None:
        r = producer(kt.inputs[0])
        shape = const_ints(r.inputs[1]) if r is not None and r.op == "Reshape" else None
        e = parent(r, 0, "Expand") if r is not None else None
        reps = const_ints(e.inputs[1]) if e is not None else None
        if not shape or not reps or len(reps) != 5:
            return "K is not a KV cache Concat"
        rep = reps[2]
        k_cat = _kv_cache(graph, kt.inputs[0], rep)
    v_cat = _kv_cache(graph, pv.inputs[1], rep)
    if k_cat is None or v_cat is None:
        return "K/V are not KV cache Concats"
    (kc, k_rep), (vc, v_rep) = k_cat, v_cat
    kv_heads = heads // rep
    nodes = [softmax, mask_add, scale_mul, qk, kt, pv, tr, merge, kc, vc, *k_rep, *v_rep]
    if not is_safe_to_fuse(graph, nodes, [merge.outputs[0], kc.outputs[0], vc.outputs[0]]):
        return "an intermediate result is read elsewhere"
    return {"q": q, "k_new": kc.inputs[1], "v_new": vc.inputs[1], "past_k": kc.inputs[0], "past_v": vc.inputs[0],
            "present_k": kc.outputs[0], "present_v": vc.outputs[0], "out": merge.outputs[0], "bias": bias,
            "scale": scale, "heads": heads, "kv_heads": kv_heads, "dim": dim, "nodes": nodes}


def _total_length(graph: gs.Graph, mask: gs.Tensor):
    """The mask's length T as int32: [1] (for arithmetic) and the scalar GQA's total_sequence_length takes.
    Shape arithmetic on the host, read only where ONNX Runtime wants a CPU-side value."""
    total64 = variable(graph, "gqa/total64", np.int64, [1])
    add_node(graph, "Shape", [mask], [total64], "gqa/total_shape", start=1, end=2)
    total32 = variable(graph, "gqa/total32", np.int32, [1])
    add_node(graph, "Cast", [total64], [total32], "gqa/total_cast", to=6)
    total = variable(graph, "gqa/total_sequence_length", np.int32, [])
    add_node(graph, "Squeeze", [total32], [total], "gqa/total_scalar")
    return total32, total


def _lengths(graph: gs.Graph):
    """seqlens_k [B] int32 = T - 1, total_sequence_length int32 = T (from attention_mask) and
    query_seqlens [B] int32 = S (from input_ids)."""
    inputs = {t.name: t for t in graph.inputs}
    mask, ids = inputs.get(ATTENTION_MASK), inputs.get(INPUT_IDS)
    if mask is None or ids is None:
        return None
    total32, total = _total_length(graph, mask)
    last = variable(graph, "gqa/last_index", np.int32, [1])
    add_node(graph, "Sub", [total32, new_const("gqa/one", np.array([1], np.int32))], [last], "gqa/last_index")
    batch = variable(graph, "gqa/batch", np.int64, [1])
    add_node(graph, "Shape", [ids], [batch], "gqa/batch_shape", start=0, end=1)
    seqlens = variable(graph, "gqa/seqlens_k", np.int32, ["batch"])
    add_node(graph, "Expand", [last, batch], [seqlens], "gqa/seqlens_k")
    # query_seqlens = S for every row (no right padding): with it the CPU kernel accepts a multi-token
    # step over a non-empty cache at batch > 1 (a chunked prefill), which it refuses otherwise.
    seq64 = variable(graph, "gqa/seq64", np.int64, [1])
    add_node(graph, "Shape", [ids], [seq64], "gqa/seq_shape", start=1, end=2)
    seq32 = variable(graph, "gqa/seq32", np.int32, [1])
    add_node(graph, "Cast", [seq64], [seq32], "gqa/seq_cast", to=6)
    query_lens = variable(graph, "gqa/query_seqlens", np.int32, ["batch"])
    add_node(graph, "Expand", [seq32, batch], [query_lens], "gqa/query_seqlens")
    return seqlens, total, query_lens


def _lengths_from_mask_contents(graph: gs.Graph):
    """The mask-sum contract: seqlens_k [B] int32 = ReduceSum(attention_mask) - 1 (on the device) and
    total_sequence_length int32 = the mask's length (host-side scalar, read by GQA from CPU memory)."""
    inputs = {t.name: t for t in graph.inputs}
    mask = inputs.get(ATTENTION_MASK)
    if mask is None:
        return None
    count = variable(graph, "gqa/valid_tokens", np.int64, ["batch"])
    add_node(graph, "ReduceSum", [mask, new_const("gqa/axis1", np.array([1], np.int64))], [count],
             "gqa/valid_tokens", keepdims=0)
    last = variable(graph, "gqa/last_index64", np.int64, ["batch"])
    add_node(graph, "Sub", [count, new_const("gqa/one64", np.array(1, np.int64))], [last], "gqa/last_index")
    seqlens = variable(graph, "gqa/seqlens_k", np.int32, ["batch"])
    add_node(graph, "Cast", [last], [seqlens], "gqa/seqlens_k", to=6)
    _, total = _total_length(graph, mask)
    return seqlens, total, None


def lengths_contract(ctx: PassContext) -> str:
    """"mask_sum" (GPU targets, CUDA-graph ready) or "mask_length" (CPU; keeps left padding in-graph)."""
    forced = (ctx.options or {}).get("gqa_lengths")
    if forced:
        return forced
    sliding = bool(getattr(ctx.spec, "sliding_layers", None))
    on_gpu = bool(getattr(ctx.target, "is_gpu", False))
    return "mask_sum" if on_gpu and not sliding else "mask_length"


def _ort_version() -> tuple[int, int]:
    import importlib.metadata as md

    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            major, minor = md.version(dist).split(".")[:2]
            return int(major), int(minor)
        except (md.PackageNotFoundError, ValueError):
            continue
    return (0, 0)


# query_seqlens lets the CPU kernel run a multi-token step over a non-empty cache at batch > 1 (a
# chunked prefill). leptonc's runtime never does that (prefill starts from an empty cache), so on an
# older ONNX Runtime the input is simply left out and the bundle still loads there.
_ORT_HAS_QUERY_SEQLENS = _ort_version() >= (1, 32)


@register_pass("fuse_gqa", requires=("infer_shapes",))
def fuse_gqa(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Attention over the KV cache (grouped-query, masked) -> GroupQueryAttention (ONNX Runtime)."""
    matches, reasons = [], {}
    for node in list(graph.nodes):
        if node.op != "Softmax":
            continue
        m = _match_attention(graph, node)
        if isinstance(m, str):
            reasons[m] = reasons.get(m, 0) + 1
        else:
            matches.append(m)
    contract = lengths_contract(ctx)
    if contract not in ("mask_sum", "mask_length"):
        raise ValueError(f"gqa_lengths {contract!r}: use 'mask_sum' or 'mask_length'")
    make_lengths = _lengths_from_mask_contents if contract == "mask_sum" else _lengths
    lengths = make_lengths(graph) if matches else None
    if matches and lengths is None:
        return PassResult.skipped("the graph has no attention_mask/input_ids inputs to derive sequence lengths")
    fused = 0
    for m in matches:
        q = as_bsh(graph, m["q"], m["out"].name + "/q")
        k = as_bsh(graph, m["k_new"], m["out"].name + "/k")
        v = as_bsh(graph, m["v_new"], m["out"].name + "/v")
        if q is None or k is None or v is None:
            reasons["q/k/v are not head splits of [B, S, hidden] tensors"] = reasons.get(
                "q/k/v are not head splits of [B, S, hidden] tensors", 0) + 1
            continue
        dtype = float_dtype(m["q"])
        bias = m["bias"]
        if dtype is not None and float_dtype(bias) not in (None, dtype):
            reasons["bias dtype differs from the query's"] = reasons.get("bias dtype differs from the query's", 0) + 1
            continue
        seqlens, total, query_lens = lengths
        e = gs.Variable.empty
        # inputs: query key value past_key past_value seqlens_k total_sequence_length cos_cache sin_cache
        # position_ids attention_bias head_sink k_scale v_scale q_norm_weight k_norm_weight query_seqlens
        gqa_inputs = [q[0], k[0], v[0], m["past_k"], m["past_v"], seqlens, total, e(), e(), e(),
                      bias if contract == "mask_length" else e(), e(), e(), e(), e(), e()]
        if _ORT_HAS_QUERY_SEQLENS and query_lens is not None:  # new in ONNX Runtime 1.32; 1.31 rejects it
            gqa_inputs.append(query_lens)
        while gqa_inputs and gqa_inputs[-1] is not None and gqa_inputs[-1].name == "":
            gqa_inputs.pop()  # trailing optional inputs left out: older ONNX Runtime counts them
        new = add_node(graph, "GroupQueryAttention", gqa_inputs,
                       [], m["out"].name + "/gqa", domain=MS_DOMAIN, num_heads=m["heads"], kv_num_heads=m["kv_heads"],
                       scale=float(m["scale"]), do_rotary=0)
        take_outputs(new, [m["out"], m["present_k"], m["present_v"]])
        detach(m["nodes"])
        fused += 1
    graph.cleanup()
    left = "; ".join(f"{v} left alone: {k}" for k, v in reasons.items())
    if not fused:
        return PassResult(False, "no attention pattern fused" + (f" ({left})" if left else ""), {"fused": 0})
    return PassResult(True, f"fused {fused} attention -> GroupQueryAttention (lengths: {contract})"
                      + (f"; {left}" if left else ""),
                      {"fused": fused, "left_alone": sum(reasons.values()), "mask_sum": int(contract == "mask_sum")})
