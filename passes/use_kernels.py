"""Lower ONNX Runtime contrib ops to leptonc's own CUDA kernels (targets/kernels/), where they are faster.

    com.microsoft.MatMulNBits (fp16 A, bits 4 or 8, block a multiple of 32, K a multiple of 8, constant weights,
    no g_idx or bias input)
        -> ai.leptonc.MatMulNBitsTiled (A, B tiled for the kernel's mma operands, SZ = scale and zero
           point pairs, or the scales alone with symmetric = 1 for 8 bits without zero points;
           targets/kernels/layout.py)

    ... -> Split(last axis, halves) -> QuickGelu(alpha 1) on one half, Mul with the other (SiLU(gate) x up)
        -> one ai.leptonc.MatMulNBitsTiled with activation = 1 (columns interleaved in (gate, up) pairs;
           the kernel writes SiLU(gate) x up: three kernels and the gate|up product's round trip go)

    MatMul (fp16 A, constant fp16 weights [K, N], K a multiple of 8), and Gemm of that kind (the LM head:
    no bias, alpha 1, A not transposed)
        -> ai.leptonc.MatMulF16 (A, W = the weights as [N, K], rows are outputs): one row of A (batch-1
           decode) streams W in 16-byte loads; more rows go to cuBLAS. The SwiGLU behind a merged gate|up
           product folds in as above (activation 1, W's rows in (gate, up) pairs).

    SkipSimplifiedLayerNormalization(A, skip, gamma) whose normalized output only a MatMulF16 reads
        -> ai.leptonc.NormMatMulF16(A, skip, gamma, W) -> (Y, A + skip): at one row the norm is the product kernel's
           prologue (each block normalizes the row it stages; block 0 writes the sum), so the norm kernel goes;
           more rows run a norm kernel, then cuBLAS. Two of a llama layer's seven decode kernels. The compile asks
           for it (KernelOptions.norm_prologue, on unless --no-norm-prologue). Alone
           it was no faster on the H100. But once it has run, a decode layer is only leptonc's
           kernels, and with programmatic dependent launch each one overlaps the one before it. That gave
           llama-1b-shape fp16 +5% at batch 1, with the same greedy tokens (H100, 2026-11-23).

    SkipSimplifiedLayerNormalization(A, skip, gamma) whose normalized output only a MatMulNBitsTiled reads
        -> ai.leptonc.NormMatMulNBitsTiled(A, skip, gamma, B, SZ) -> (Y, A + skip): the same fold for int4/int8
           weights. At one row where the few-rows kernel serves the shape (llama's qkv and gate|up), the norm is
           its prologue. Otherwise a norm kernel runs, then the product. The compile asks for it
           (KernelOptions.norm_prologue_nbits, on unless --no-norm-prologue-nbits):
           llama-1b-shape int4 +0.8% at batch 1 on the H100, the same greedy tokens (2026-11-24).

    any other fp16 product -> the same Split, QuickGelu and Mul
        -> ai.leptonc.SwiGLU(product, gate_first): one kernel instead of three

    com.microsoft.GroupQueryAttention in the GPU form (passes/fuse_gqa.py, fold_rotary_into_gqa.py: packed fp16 Q/K/V, rotary folded
    in over the whole head, head size 64 or 128, at most 8 query heads a KV head, no window or softcap)
        -> ai.leptonc.CachedAttention(qkv, past_key, past_value, seqlens_k, total_sequence_length, cos, sin):
           the rotary, the cache append and the attention in one decode kernel (two with split keys) instead
           of ONNX Runtime's three to five; prefill on tensor cores. On by default since it
           ran on the H100 (2026-11-23): the same greedy tokens, smollm2-135m fp16 1,217-1,235 tok/s at
           batch 1 against 1,097-1,145 with GroupQueryAttention in one call. `--no-attention-kernel` at
           compile (KernelOptions.attention_kernel) keeps GroupQueryAttention.

    seqlens_k = Cast(Sub(ReduceSum(attention_mask), 1), int32) feeding CachedAttention
        -> ai.leptonc.MaskLengths(attention_mask): one kernel for three at the start of every step. It launches
           without programmatic dependent launch, so the decode attention may still read seqlens_k before its own
           dependency wait (attention.cuh).

    head (fp16 [R, V]) -> Cast(float) -> Reshape -> logits -> ArgMax -> next_token (select_logits, greedy_token)
        -> ai.leptonc.LogitsArgMax(head, logits_positions) -> (logits, next_token): the float32 logits and the
           greedy token in one kernel, where ONNX Runtime ran the Cast, a copy into the bound output and ArgMax.

The library must have been built for the target (targets/backends/onnxruntime.py builds it before the pipeline
and puts it in `ctx.kernel_library`); when it could not be, the pass is skipped with the reason
and the graph keeps ONNX Runtime's kernel.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from leptonc.graph_contract import ATTENTION_MASK, LEPTONC_DOMAIN, LOGITS
from leptonc.passes.matching import MS_DOMAIN, attr, const_ints, detach, is_last_axis, is_safe_to_fuse, producer
from leptonc.passes.greedy_token import OUTPUT as TOKEN_OUTPUT
from leptonc.passes.registry import PassContext, PassResult, register_pass
from leptonc.passes.select_logits import INPUT as POSITIONS_INPUT
from leptonc.targets.kernels.layout import gate_up_pairs, interleave_gate_up, tile_nbits



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
    """MatMulNBits -> leptonc's CUDA kernel (streams int4/int8 weights once for up to 16 rows); fp16 MatMul/Gemm
    with constant weights -> MatMulF16; the SiLU(gate) x up of any other fp16 product -> its SwiGLU kernel;
    GroupQueryAttention -> CachedAttention unless ctx.kernels.attention_kernel is off (module doc)."""
    nodes = [n for n in graph.nodes if n.op == "MatMulNBits" and n.domain == MS_DOMAIN]
    attention = [n for n in graph.nodes if n.op == "GroupQueryAttention" and n.domain == MS_DOMAIN] \
        if ctx.kernels.attention_kernel else []
    dense = [(n, w) for n in graph.nodes if n.op in ("MatMul", "Gemm") and (w := _f16_weights(n)) is not None]
    splits = [n for n in graph.nodes if n.op == "Split" and len(n.outputs) == 2]
    if not nodes and not dense and not attention and not any(_match_swiglu(graph, n.inputs[0]) for n in splits):
        return PassResult.skipped("no MatMulNBits, fp16 product with constant weights or SiLU(gate) x up in the graph")
    kernels = ctx.kernel_library or {}
    if not kernels.get("file"):
        return PassResult.skipped(f"leptonc's CUDA kernels were not built: {kernels.get('unavailable', 'not requested')}; "
                                  "ONNX Runtime's kernels run the graph")
    counts = {"lowered": 0, "left_alone": 0, "swiglu": 0, "nbits_norm": 0, "f16": 0, "f16_swiglu": 0, "f16_norm": 0,
              "swiglu_op": 0, "attention": 0, "mask_lengths": 0, "logits_argmax": 0}
    reasons: dict[str, int] = {}
    for node in nodes:
        why = _lowerable(node)
        if why is not None:
            counts["left_alone"] += 1
            reasons[why] = reasons.get(why, 0) + 1
            continue
        swiglu = _match_swiglu(graph, node.outputs[0], int(node.attrs["N"]))
        _lower(node, swiglu)
        counts["lowered"] += 1
        counts["swiglu"] += swiglu is not None
        if ctx.kernels.norm_prologue_nbits:
            counts["nbits_norm"] += _fold_norm(graph, node, "NormMatMulNBitsTiled")
    for node, weights in dense:  # fp16 products with constant weights, as [N, K]
        swiglu = _match_swiglu(graph, node.outputs[0], weights.shape[0])
        _lower_f16(node, weights, swiglu)
        counts["f16"] += 1
        counts["f16_swiglu"] += swiglu is not None
        if ctx.kernels.norm_prologue:
            counts["f16_norm"] += _fold_norm(graph, node, "NormMatMulF16")
    for node in attention:
        why = _attention_lowerable(node)
        if why is not None:
            reasons[f"attention: {why}"] = reasons.get(f"attention: {why}", 0) + 1
            continue
        _lower_attention(node)
        counts["attention"] += 1
    if counts["attention"]:
        counts["mask_lengths"] = _lower_mask_lengths(graph)
    counts["logits_argmax"] = _lower_logits_argmax(graph)
    # Then SiLU(gate) x up behind any other product (a MatMulNBits left alone above, a product computed at run time).
    for split in splits:
        y = split.inputs[0] if split.inputs else None
        match = _match_swiglu(graph, y) if y is not None and y.dtype is not None and np.dtype(y.dtype) == np.float16 else None
        if match is None or y.shape is None or not isinstance(y.shape[-1], int) or y.shape[-1] % 16:
            continue
        gate_first, mul, drop = match
        out = mul.outputs[0]
        detach(drop)
        graph.nodes.append(gs.Node("SwiGLU", f"{split.name}/swiglu", {"gate_first": int(gate_first)}, [y], [out],
                                   domain=LEPTONC_DOMAIN))
        counts["swiglu_op"] += 1
    graph.cleanup()
    if not counts["lowered"] and not counts["swiglu_op"] and not counts["f16"] and not counts["attention"]:
        why = ("nothing could be lowered: " + ", ".join(f"{k} ({v})" for k, v in reasons.items()) if reasons
               else "no SiLU(gate) x up the SwiGLU kernel runs (it needs fp16 and a last axis of 2F, F a multiple of 8)")
        return PassResult(False, why, counts)
    parts = []
    if counts["lowered"]:
        parts.append(f"{counts['lowered']} MatMulNBits -> {LEPTONC_DOMAIN}.MatMulNBitsTiled ({kernels.get('arch')})"
                     + (f", {counts['swiglu']} of them with the SwiGLU epilogue (Split, QuickGelu and Mul folded in)"
                        if counts["swiglu"] else "")
                     + (f", {counts['nbits_norm']} with the SkipSimplifiedLayerNormalization in front folded in "
                        "(NormMatMulNBitsTiled)" if counts["nbits_norm"] else ""))
    if counts["f16"]:
        parts.append(f"{counts['f16']} fp16 MatMul/Gemm -> {LEPTONC_DOMAIN}.MatMulF16 ({kernels.get('arch')})"
                     + (f", {counts['f16_swiglu']} of them with the SwiGLU epilogue" if counts["f16_swiglu"] else "")
                     + (f", {counts['f16_norm']} with the SkipSimplifiedLayerNormalization in front folded in "
                        "(NormMatMulF16)" if counts["f16_norm"] else ""))
    if counts["swiglu_op"]:
        parts.append(f"{counts['swiglu_op']} Split + QuickGelu + Mul -> {LEPTONC_DOMAIN}.SwiGLU ({kernels.get('arch')})")
    if counts["attention"]:
        parts.append(f"{counts['attention']} GroupQueryAttention -> {LEPTONC_DOMAIN}.CachedAttention ({kernels.get('arch')})")
    if counts["mask_lengths"]:
        parts.append(f"seqlens_k's ReduceSum, Sub and Cast -> {LEPTONC_DOMAIN}.MaskLengths")
    if counts["logits_argmax"]:
        parts.append(f"the logits' Cast and Reshape and the greedy ArgMax -> {LEPTONC_DOMAIN}.LogitsArgMax")
    detail = "; ".join(parts)
    if reasons:
        detail += "; left on ONNX Runtime's kernel: " + ", ".join(f"{k} ({v})" for k, v in reasons.items())
    return PassResult(True, detail, counts)


def _match_swiglu(graph: gs.Graph, y: gs.Tensor, n: int | None = None):
    """(gate_first, Mul node, nodes to drop) when the product `y` (last axis n wide, when known) has one
    reader, Split(last axis, two halves) -> QuickGelu(alpha 1) on one half x the other half, else None."""
    if n is None:
        n = y.shape[-1] if y.shape is not None and len(y.shape) and isinstance(y.shape[-1], int) else None
        if n is None:
            return None
    if n % 8 or len(y.outputs) != 1 or y in graph.outputs:
        return None
    split = y.outputs[0]
    if split.op != "Split" or len(split.outputs) != 2 or not is_last_axis(attr(split, "axis", 0), y):
        return None
    sizes = const_ints(split.inputs[1]) if len(split.inputs) > 1 else None
    if sizes is not None and list(sizes) != [n // 2, n // 2]:
        return None
    if sizes is None and len(split.inputs) == 1 and attr(split, "split") not in (None, [n // 2, n // 2]):
        return None
    for gate_i in (0, 1):
        gate, up = split.outputs[gate_i], split.outputs[1 - gate_i]
        if len(gate.outputs) != 1 or len(up.outputs) != 1:
            return None
        act = gate.outputs[0]
        if act.op != "QuickGelu" or act.domain != MS_DOMAIN or abs(float(attr(act, "alpha", 1.702)) - 1.0) > 1e-6:
            continue
        if len(act.outputs[0].outputs) != 1:
            return None
        mul = act.outputs[0].outputs[0]
        if mul.op != "Mul" or up.outputs[0] is not mul or len(mul.inputs) != 2:
            return None
        drop = [split, act, mul]
        if not is_safe_to_fuse(graph, drop, [mul.outputs[0]]):
            return None
        return gate_i == 0, mul, drop
    return None


def _f16_weights(node: gs.Node) -> np.ndarray | None:
    """The weights of an fp16 product that MatMulF16 runs, as [N, K] (rows are outputs), else None."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant) or isinstance(node.inputs[0], gs.Constant):
        return None
    a, b = node.inputs[0], node.inputs[1]
    if a.dtype is None or np.dtype(a.dtype) != np.float16 or b.values.dtype != np.float16 or b.values.ndim != 2:
        return None
    if node.op == "Gemm":
        if (len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name) or attr(node, "transA", 0) \
                or float(attr(node, "alpha", 1.0)) != 1.0:
            return None
        w = b.values if attr(node, "transB", 0) else b.values.T
    else:
        w = b.values.T
    return w if w.shape[1] % 8 == 0 else None


def _lower_f16(node: gs.Node, weights: np.ndarray, swiglu=None) -> None:
    n, k = weights.shape
    w = gate_up_pairs(weights, n, gate_first=swiglu[0]) if swiglu is not None else weights
    if w is node.inputs[1].values:  # a Gemm's [N, K] weights as stored: shared, not copied
        constant = node.inputs[1]
    else:
        constant = gs.Constant(f"{node.inputs[1].name}/nk", np.ascontiguousarray(w))
    node.inputs = [node.inputs[0], constant]
    node.op, node.domain = "MatMulF16", LEPTONC_DOMAIN
    node.attrs = {"K": int(k), "N": int(n)}
    if swiglu is not None:
        _take_swiglu(node, swiglu)


def _fold_norm(graph: gs.Graph, node: gs.Node, op: str) -> bool:
    """A MatMulF16 or MatMulNBitsTiled `node` takes the SkipSimplifiedLayerNormalization in front of it (-> `op`:
    NormMatMulF16 or NormMatMulNBitsTiled, inputs A, skip, gamma and then the product's own weights) when the norm
    has no bias, an fp16 gamma constant of K values, and its normalized output is read by `node` alone."""
    norm = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if norm is None or norm.op != "SkipSimplifiedLayerNormalization" or norm.domain != MS_DOMAIN:
        return False
    k = int(node.attrs["K"])
    ins = norm.inputs
    if len(ins) < 3 or (len(ins) > 3 and ins[3].name) or not isinstance(ins[2], gs.Constant):
        return False
    gamma = ins[2].values
    if gamma.dtype != np.float16 or gamma.shape != (k,):
        return False
    if any(t.dtype is None or np.dtype(t.dtype) != np.float16 for t in ins[:2]):
        return False
    if any(t.shape is None or list(t.shape) != list(ins[0].shape) for t in ins[:2]):
        return False  # the op reads skip row by row with A's shape: no broadcasting
    normed = norm.outputs[0]
    if len(normed.outputs) != 1 or normed.outputs[0] is not node or any(t is normed for t in graph.outputs):
        return False
    if any(t.name and (t.outputs or any(t is o for o in graph.outputs)) for t in norm.outputs[1:3]):
        return False  # its mean or inverse standard deviation is read
    total = norm.outputs[3] if len(norm.outputs) > 3 and norm.outputs[3].name else \
        gs.Variable(f"{norm.name}/sum", np.float16, ins[0].shape)  # unread; the op writes it anyway
    a, skip, gamma_t = ins[0], ins[1], ins[2]
    eps = float(norm.attrs.get("epsilon", 1e-5))
    detach([norm])
    node.inputs = [a, skip, gamma_t, *node.inputs[1:]]
    node.op = op
    node.attrs["epsilon"] = eps
    node.outputs.append(total)
    return True


def _take_swiglu(node: gs.Node, swiglu) -> None:
    """The product writes SiLU(gate) x up itself (activation 1): it takes the Mul's output, and the Split,
    QuickGelu and Mul are detached."""
    _, mul, drop = swiglu
    out = mul.outputs[0]
    detach(drop)
    node.outputs.clear()
    node.outputs.append(out)
    node.attrs["activation"] = 1


def _lower(node: gs.Node, swiglu=None) -> None:
    k, n, bits, block = (int(node.attrs[a]) for a in ("K", "N", "bits", "block_size"))
    b, scales = node.inputs[1], node.inputs[2]
    zp = node.inputs[3].values if len(node.inputs) > 3 else None
    codes, scale_values = b.values, scales.values
    if swiglu is not None:
        codes, scale_values, zp = interleave_gate_up(codes, scale_values, zp, n, gate_first=swiglu[0])
    symmetric = bits == 8 and zp is None  # every zero point 128: SZ holds the scales alone (layout.py)
    tiled, sz = tile_nbits(codes, scale_values, zp, k, n, bits, block, scales_only=symmetric)
    name = b.name
    node.inputs = [node.inputs[0], gs.Constant(f"{name}/tiled", tiled), gs.Constant(f"{name}/sz", sz)]
    node.op, node.domain = "MatMulNBitsTiled", LEPTONC_DOMAIN
    node.attrs = {"K": k, "N": n, "bits": bits, "block_size": block}  # accuracy_level is ONNX Runtime's CPU setting
    if symmetric:
        node.attrs["symmetric"] = 1
    if swiglu is not None:
        _take_swiglu(node, swiglu)


# GroupQueryAttention attributes CachedAttention serves: what passes/fuse_gqa.py and fold_rotary_into_gqa.py write for GPU graphs.
_ATTENTION_ATTRS = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved", "local_window_size",
                    "softcap", "smooth_softmax"}


def _attention_lowerable(node: gs.Node) -> str | None:
    """None when ai.leptonc.CachedAttention runs this GroupQueryAttention, else why not."""
    extra = sorted(set(node.attrs) - _ATTENTION_ATTRS)
    if extra:
        return "attribute " + ", ".join(extra)
    if not attr(node, "do_rotary", 0) or attr(node, "rotary_interleaved", 0):
        return "rotary not folded in (rotate-half)"
    if attr(node, "local_window_size", -1) != -1:
        return "sliding window"
    if float(attr(node, "softcap", 0.0)) != 0.0 or attr(node, "smooth_softmax", 0):
        return "softcap or smooth softmax"
    ins = node.inputs
    if len(ins) < 9 or any(t.name for t in ins[9:]) or ins[1].name or ins[2].name:
        return "not the packed form (separate key/value, or position ids, bias or other extra inputs)"
    if len(node.outputs) != 3:
        return "not three outputs"
    qkv, cos, sin = ins[0], ins[7], ins[8]
    if qkv.dtype is None or np.dtype(qkv.dtype) != np.float16:
        return "not fp16"
    if not isinstance(cos, gs.Constant) or not isinstance(sin, gs.Constant) or cos.values.dtype != np.float16 \
            or cos.values.ndim != 2 or cos.values.shape != sin.values.shape:
        return "rotary tables are not fp16 constants [positions, head size / 2]"
    d = 2 * cos.values.shape[1]
    h, kvh = int(attr(node, "num_heads", 0)), int(attr(node, "kv_num_heads", 0))
    if d not in (64, 128):
        return f"head size {d}"
    if kvh <= 0 or h % kvh or h // kvh > 8:
        return f"{h} query heads over {kvh} KV heads"
    width = qkv.shape[-1] if qkv.shape is not None and len(qkv.shape) else None
    if isinstance(width, int) and width != (h + 2 * kvh) * d:
        return "packed width does not match the heads"
    return None


def _lower_attention(node: gs.Node) -> None:
    ins = node.inputs
    node.inputs = [ins[0], ins[3], ins[4], ins[5], ins[6], ins[7], ins[8]]
    node.op, node.domain = "CachedAttention", LEPTONC_DOMAIN
    attrs = {"num_heads": int(attr(node, "num_heads")), "kv_num_heads": int(attr(node, "kv_num_heads"))}
    if attr(node, "scale", 0.0):
        attrs["scale"] = float(attr(node, "scale"))
    node.attrs = attrs


def _lower_mask_lengths(graph: gs.Graph) -> int:
    """CachedAttention's seqlens_k = Cast(Sub(ReduceSum(attention_mask, axis 1, keepdims 0), 1), int32), as
    passes/fuse_gqa.py writes it for GPU graphs -> ai.leptonc.MaskLengths(attention_mask): one kernel for
    ONNX Runtime's three at the start of every step. 1 where it was replaced, else 0."""
    users = [n for n in graph.nodes if n.op == "CachedAttention" and n.domain == LEPTONC_DOMAIN]
    seqlens = {id(n.inputs[3]): n.inputs[3] for n in users}
    done = 0
    for lengths in seqlens.values():
        cast = producer(lengths)
        if cast is None or cast.op != "Cast" or attr(cast, "to") != 6:
            continue
        sub = producer(cast.inputs[0])
        if sub is None or sub.op != "Sub" or const_ints(sub.inputs[1]) != [1]:
            continue
        total = producer(sub.inputs[0])
        if total is None or total.op != "ReduceSum" or attr(total, "keepdims", 1) != 0:
            continue
        mask = total.inputs[0]
        if mask.name != ATTENTION_MASK or not any(t is mask for t in graph.inputs) or mask.dtype is None \
                or np.dtype(mask.dtype) != np.int64 or (mask.shape is not None and len(mask.shape) != 2):
            continue
        axes = const_ints(total.inputs[1]) if len(total.inputs) > 1 else attr(total, "axes")
        if axes is None or [a % 2 for a in axes] != [1]:
            continue
        if not is_safe_to_fuse(graph, [total, sub, cast], [lengths]):
            continue
        detach([total, sub, cast])
        graph.nodes.append(gs.Node("MaskLengths", f"{cast.name}/mask_lengths", {}, [mask], [lengths],
                                   domain=LEPTONC_DOMAIN))
        done += 1
    return done


def _lower_logits_argmax(graph: gs.Graph) -> int:
    """The end of a GPU graph after select_logits and greedy_token,
        head (fp16 [R, V]) -> Cast(float) -> Reshape(Concat(Shape(logits_positions), [V])) -> logits -> ArgMax
        -> next_token,
    -> ai.leptonc.LogitsArgMax(head, logits_positions) -> (logits, next_token): one kernel instead of ONNX Runtime's
    Cast, the copy of the Reshape into the bound output, and ArgMax. 1 where it was replaced, else 0."""
    outputs = {t.name: t for t in graph.outputs}
    logits, token = outputs.get(LOGITS), outputs.get(TOKEN_OUTPUT)
    positions = next((t for t in graph.inputs if t.name == POSITIONS_INPUT), None)
    if logits is None or token is None or positions is None:
        return 0
    argmax, reshape = producer(token), producer(logits)
    if argmax is None or argmax.op != "ArgMax" or argmax.inputs[0] is not logits or attr(argmax, "keepdims", 1) != 0 \
            or attr(argmax, "select_last_index", 0) or attr(argmax, "axis", 0) not in (-1, 2):
        return 0
    if reshape is None or reshape.op != "Reshape":
        return 0
    cast = producer(reshape.inputs[0])
    if cast is None or cast.op != "Cast" or attr(cast, "to") != 1:
        return 0
    head = cast.inputs[0]
    if head.dtype is None or np.dtype(head.dtype) != np.float16 or head.shape is None or len(head.shape) != 2:
        return 0
    concat = producer(reshape.inputs[1])
    if concat is None or concat.op != "Concat" or len(concat.inputs) != 2:
        return 0
    shape = producer(concat.inputs[0])
    if shape is None or shape.op != "Shape" or shape.inputs[0] is not positions or attr(shape, "start", 0) \
            or attr(shape, "end") not in (None, 2):
        return 0
    vocab = const_ints(concat.inputs[1])
    if vocab is None or len(vocab) != 1 or (isinstance(head.shape[1], int) and head.shape[1] != vocab[0]):
        return 0
    if not is_safe_to_fuse(graph, [cast, reshape, argmax], [logits, token]):
        return 0
    detach([cast, reshape, argmax])
    graph.nodes.append(gs.Node("LogitsArgMax", "greedy_token/logits_argmax", {}, [head, positions], [logits, token],
                               domain=LEPTONC_DOMAIN))
    return 1
