"""Export: a `DecoderSpec` plus its weights -> one ONNX decoder graph for prefill and decode.

The graph is written node by node from the architecture description (as ONNX Runtime GenAI's model
builder and TensorRT-LLM do) rather than traced, so that it is fast, deterministic, and streams the
weights: each tensor is written to the external-data file as soon as it is read from the source
module, so host memory holds the source model plus one tensor, whatever the model's size.

The plain export uses standard ONNX operators only (opset 17); `passes/` then fuses it per backend.

I/O (names and dynamic axes as in DESIGN.md):
  inputs   input_ids [batch, sequence] int64, attention_mask [batch, total_sequence] int64,
           position_ids [batch, sequence] int64,
           past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim]
  outputs  logits [batch, sequence, vocab] float32,
           present.{i}.key / .value [batch, kv_heads, total_sequence, head_dim]
`attention_mask` covers past and new tokens (1 = attend, 0 = padding); total = past + sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from leptonc.graph_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past_key, past_name, past_value, \
    present_key, present_name, present_value
from leptonc.models.spec import DecoderSpec, DecoderWeights

OPSET = 17
DATA_ALIGN = 4096  # page-aligned offsets let ONNX Runtime memory-map external weights
DTYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}


@dataclass(frozen=True)
class ExportResult:
    model_path: Path
    data_path: Path
    io: dict
    num_nodes: int
    weight_bytes: int
    dtype: str


def io_spec(spec: DecoderSpec, dtype: str = "fp32") -> dict:
    kv_shape = ["batch", spec.num_kv_heads, "past_sequence", spec.head_dim]
    present_shape = ["batch", spec.num_kv_heads, "total_sequence", spec.head_dim]
    inputs = [
        {"name": INPUT_IDS, "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": ATTENTION_MASK, "dtype": "int64", "shape": ["batch", "total_sequence"]},
        {"name": POSITION_IDS, "dtype": "int64", "shape": ["batch", "sequence"]},
    ]
    outputs = [{"name": LOGITS, "dtype": "float32", "shape": ["batch", "sequence", spec.vocab_size]}]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append({"name": past_name(i, kind), "dtype": _np_name(dtype), "shape": kv_shape})
            outputs.append({"name": present_name(i, kind), "dtype": _np_name(dtype), "shape": present_shape})
    return {"inputs": inputs, "outputs": outputs, "kv_dtype": _np_name(dtype), "num_layers": spec.num_layers,
            "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size}


def _np_name(dtype: str) -> str:
    return {"fp32": "float32", "fp16": "float16"}[dtype]


class GraphWriter:
    """Appends nodes, and streams large initializers to one external-data file."""

    def __init__(self, data_path: Path, dtype: str):
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.data_path = data_path
        self._data = open(data_path, "wb")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: dict[str, int] = {}
        self.weight_bytes = 0

    def close(self) -> None:
        self._data.close()

    def fresh(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def weight(self, name: str, array: np.ndarray, dtype: np.dtype | None = None) -> str:
        """A model weight, written to external data (converted to the graph's dtype unless given)."""
        array = np.ascontiguousarray(array, dtype=dtype or self.np_dtype)
        pad = (-self._data.tell()) % DATA_ALIGN
        if pad:
            self._data.write(b"\0" * pad)
        offset = self._data.tell()
        # Write the array's own buffer (no `tobytes()` copy: the embedding of a 1B model is 1 GB).
        self._data.write(memoryview(array.reshape(-1)).cast("B"))
        length = array.nbytes
        self.weight_bytes += length
        tensor = TensorProto(name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def const(self, base: str, value, dtype=np.int64) -> str:
        """A small constant stored inline."""
        name = self.fresh(f"const.{base}")
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        node_name = self.fresh(name)
        outs = outputs if isinstance(outputs, list) else [f"{node_name}/out{i}" if outputs > 1 else f"{node_name}/out"
                                                           for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **attrs))
        return outs[0] if len(outs) == 1 else outs


def export_decoder(
    spec: DecoderSpec,
    weights: DecoderWeights,
    out_dir: Path,
    *,
    dtype: str = "fp32",
    model_name: str = "model.onnx",
    on_weight: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write `model.onnx` + `model.onnx.data` into out_dir and return where they are."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / model_name
    w = GraphWriter(out_dir / f"{model_name}.data", dtype)
    try:
        _build(spec, weights, w, dtype, on_weight or (lambda name: None))
    finally:
        w.close()
    io = io_spec(spec, dtype)
    to_vi = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
    graph = helper.make_graph(
        w.nodes,
        f"leptonc_{spec.architecture}_decoder",
        [helper.make_tensor_value_info(t["name"], to_vi[t["dtype"]], t["shape"]) for t in io["inputs"]],
        [helper.make_tensor_value_info(t["name"], to_vi[t["dtype"]], t["shape"]) for t in io["outputs"]],
        w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="leptonc")
    model.ir_version = 8  # readable by ONNX Runtime >= 1.14 and TensorRT 8.6+
    onnx.save_model(model, str(model_path))
    return ExportResult(model_path, w.data_path, io, len(w.nodes), w.weight_bytes, dtype)


def _build(spec: DecoderSpec, weights: DecoderWeights, w: GraphWriter, dtype: str, on_weight) -> None:
    def W(name: str, transpose: bool = False, **kw) -> str:
        array = weights(name)
        on_weight(name)
        return w.weight(name, array.T if transpose else array, **kw)

    fp16 = dtype == "fp16"
    neg = -30000.0 if fp16 else float(np.finfo(np.float32).min)

    # ---- shared prologue: sizes, attention bias, rotary tables --------------------------------
    seq = w.op("Shape", [INPUT_IDS], "shape_seq", start=1, end=2)
    total = w.op("Shape", [ATTENTION_MASK], "shape_total", start=1, end=2)
    seq_s = w.op("Squeeze", [seq], "seq_scalar")
    total_s = w.op("Squeeze", [total], "total_scalar")
    past_s = w.op("Sub", [total_s, seq_s], "past_scalar")
    one = w.const("one", 1)
    zero = w.const("zero", 0)
    q_pos = w.op("Range", [past_s, total_s, one], "query_positions")
    k_pos = w.op("Range", [zero, total_s, one], "key_positions")
    causal = w.op("LessOrEqual", [w.op("Unsqueeze", [k_pos, w.const("ax0", [0])], "k_pos_row"),
                                  w.op("Unsqueeze", [q_pos, w.const("ax1", [1])], "q_pos_col")], "causal")
    pad = w.op("Unsqueeze", [w.op("Cast", [ATTENTION_MASK], "mask_bool", to=TensorProto.BOOL),
                             w.const("ax12", [1, 2])], "mask_4d")
    allowed = w.op("And", [causal, pad], "allowed")
    bias = w.op("Where", [allowed, w.const("zero_f", 0.0, w.np_dtype), w.const("neg_f", neg, w.np_dtype)], "attn_bias")
    sliding_bias = None
    if spec.sliding_layers:  # HF's sliding_window_overlay: key visible iff key > query - window
        lower = w.op("Sub", [w.op("Unsqueeze", [q_pos, w.const("ax1", [1])], "q_pos_col_w"),
                             w.const("window", spec.sliding_window)], "window_start")
        in_window = w.op("Greater", [w.op("Unsqueeze", [k_pos, w.const("ax0", [0])], "k_pos_row_w"), lower], "in_window")
        sliding_bias = w.op("Where", [w.op("And", [allowed, in_window], "allowed_window"),
                                      w.const("zero_f", 0.0, w.np_dtype), w.const("neg_f", neg, w.np_dtype)],
                            "attn_bias_window")

    rope_tables: dict[str, tuple[str, str]] = {}  # "global" / "local" -> (cos, sin), each [B, 1, S, rotary_dim]
    if spec.position == "rope":
        pos_f = w.op("Unsqueeze", [w.op("Cast", [POSITION_IDS], "pos_f", to=TensorProto.FLOAT),
                                   w.const("ax_last", [-1])], "pos_col")

        def rope_table(inv: tuple[float, ...], scaling: float, tag: str) -> tuple[str, str]:
            inv_freq = w.const(f"rope_inv_freq{tag}", np.asarray(inv, np.float32), np.float32)
            freqs = w.op("Mul", [pos_f, inv_freq], f"rope_freqs{tag}")
            emb = w.op("Concat", [freqs, freqs], f"rope_emb{tag}", axis=-1)
            tables = []
            for fn in ("Cos", "Sin"):
                t = w.op(fn, [emb], f"rope_{fn.lower()}{tag}")
                if scaling != 1.0:
                    t = w.op("Mul", [t, w.const("rope_scale", scaling, np.float32)], f"rope_{fn.lower()}_scaled{tag}")
                if fp16:
                    t = w.op("Cast", [t], f"rope_{fn.lower()}_fp16{tag}", to=TensorProto.FLOAT16)
                tables.append(w.op("Unsqueeze", [t, w.const("ax1", [1])], f"rope_{fn.lower()}_4d{tag}"))
            return tables[0], tables[1]

        rope_tables["global"] = rope_table(spec.rope_inv_freq, spec.rope_attention_scaling, "")
        if spec.rope_local_inv_freq and spec.sliding_layers:
            rope_tables["local"] = rope_table(spec.rope_local_inv_freq, spec.rope_local_attention_scaling, "_local")

    # ---- embeddings ---------------------------------------------------------------------------
    embed = W("embed")
    h = w.op("Gather", [embed, INPUT_IDS], "embed_tokens")
    if spec.embed_scale != 1.0:  # in the graph's float type, as HF scales (gemma3: sqrt(hidden))
        h = w.op("Mul", [h, w.const("embed_scale", spec.embed_scale, w.np_dtype)], "embed_scale")
    if spec.position == "learned":
        h = w.op("Add", [h, w.op("Gather", [W("pos_embed"), POSITION_IDS], "embed_positions")], "embed_sum")

    def norm(x: str, prefix: str, axis_size_name: str | None = None) -> str:
        if spec.norm == "layer":
            return w.op("LayerNormalization", [x, W(f"{prefix}.weight"), W(f"{prefix}.bias")], prefix,
                        axis=-1, epsilon=spec.norm_eps)
        return rms_norm(x, W(f"{prefix}.weight"), prefix)

    def rms_norm(x: str, weight: str, prefix: str) -> str:
        xf = w.op("Cast", [x], f"{prefix}/cast_in", to=TensorProto.FLOAT) if fp16 else x
        sq = w.op("Pow", [xf, w.const("two", 2.0, np.float32)], f"{prefix}/pow")
        mean = w.op("ReduceMean", [sq], f"{prefix}/mean", axes=[-1], keepdims=1)
        var = w.op("Add", [mean, w.const("eps", spec.norm_eps, np.float32)], f"{prefix}/add_eps")
        inv = w.op("Reciprocal", [w.op("Sqrt", [var], f"{prefix}/sqrt")], f"{prefix}/rsqrt")
        y = w.op("Mul", [xf, inv], f"{prefix}/scale")
        if fp16:
            y = w.op("Cast", [y], f"{prefix}/cast_out", to=TensorProto.FLOAT16)
        return w.op("Mul", [y, weight], f"{prefix}/weight")

    def linear(x: str, prefix: str, bias: bool) -> str:
        y = w.op("MatMul", [x, W(f"{prefix}.weight", transpose=True)], f"{prefix}/matmul")
        if bias:
            y = w.op("Add", [y, W(f"{prefix}.bias")], f"{prefix}/bias")
        return y

    def activation(x: str, prefix: str) -> str:
        if spec.activation == "silu":
            return w.op("Mul", [x, w.op("Sigmoid", [x], f"{prefix}/sigmoid")], f"{prefix}/silu")
        if spec.activation == "gelu":  # exact (erf) GELU
            e = w.op("Erf", [w.op("Div", [x, w.const("sqrt2", np.sqrt(2.0), w.np_dtype)], f"{prefix}/div")], f"{prefix}/erf")
            half = w.op("Mul", [x, w.op("Add", [e, w.const("onef", 1.0, w.np_dtype)], f"{prefix}/add1")], f"{prefix}/mul")
            return w.op("Mul", [half, w.const("halff", 0.5, w.np_dtype)], f"{prefix}/gelu")
        if spec.activation == "gelu_tanh":
            x3 = w.op("Pow", [x, w.const("threef", 3.0, w.np_dtype)], f"{prefix}/cube")
            inner = w.op("Add", [x, w.op("Mul", [x3, w.const("c044", 0.044715, w.np_dtype)], f"{prefix}/c")], f"{prefix}/inner")
            t = w.op("Tanh", [w.op("Mul", [inner, w.const("s2pi", np.sqrt(2 / np.pi), w.np_dtype)], f"{prefix}/s")], f"{prefix}/tanh")
            half = w.op("Mul", [x, w.op("Add", [t, w.const("onef", 1.0, w.np_dtype)], f"{prefix}/add1")], f"{prefix}/mul")
            return w.op("Mul", [half, w.const("halff", 0.5, w.np_dtype)], f"{prefix}/gelu")
        if spec.activation == "relu":
            return w.op("Relu", [x], f"{prefix}/relu")
        raise ValueError(f"unknown activation {spec.activation}")

    def rotate(x: str, prefix: str, table: str) -> str:
        """Rotary embedding on [B, heads, S, head_dim] (rotate-half form, first rotary_dim dims)."""
        cos, sin = rope_tables[table]
        rot, rest = x, None
        if spec.rotary_dim != spec.head_dim:
            rot, rest = w.op("Split", [x, w.const("rot_split", [spec.rotary_dim, spec.head_dim - spec.rotary_dim])],
                             f"{prefix}/rot_split", outputs=2, axis=-1)
        half = spec.rotary_dim // 2
        x1, x2 = w.op("Split", [rot, w.const("half_split", [half, half])], f"{prefix}/half_split", outputs=2, axis=-1)
        rotated = w.op("Concat", [w.op("Neg", [x2], f"{prefix}/neg"), x1], f"{prefix}/rotate_half", axis=-1)
        y = w.op("Add", [w.op("Mul", [rot, cos], f"{prefix}/mul_cos"), w.op("Mul", [rotated, sin], f"{prefix}/mul_sin")],
                 f"{prefix}/rope")
        if rest is not None:
            y = w.op("Concat", [y, rest], f"{prefix}/rot_concat", axis=-1)
        return y

    H, KV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    rep = H // KV
    scale = spec.attention_scale if spec.attention_scale is not None else D ** -0.5

    def heads(x: str, n: int, prefix: str, qk_norm: str | None) -> str:
        x = w.op("Reshape", [x, w.const(f"shape_heads{n}", [0, 0, n, D])], f"{prefix}/split_heads")
        if qk_norm:
            x = rms_norm(x, W(f"{qk_norm}.weight"), qk_norm)
        return w.op("Transpose", [x], f"{prefix}/to_bhsd", perm=[0, 2, 1, 3])

    def attention(x: str, i: int) -> str:
        p = f"layers.{i}"
        q = heads(linear(x, f"{p}.q", spec.qkv_bias), H, f"{p}.q", f"{p}.q_norm" if spec.qk_norm else None)
        k = heads(linear(x, f"{p}.k", spec.qkv_bias), KV, f"{p}.k", f"{p}.k_norm" if spec.qk_norm else None)
        v = heads(linear(x, f"{p}.v", spec.qkv_bias), KV, f"{p}.v", None)
        if spec.position == "rope":
            table = "local" if "local" in rope_tables and i in spec.sliding_layers else "global"
            q, k = rotate(q, f"{p}.q", table), rotate(k, f"{p}.k", table)
        k = w.op("Concat", [past_key(i), k], f"{p}.k/cache", outputs=[present_key(i)], axis=2)
        v = w.op("Concat", [past_value(i), v], f"{p}.v/cache", outputs=[present_value(i)], axis=2)
        if rep > 1:  # grouped-query: repeat each kv head for its group of query heads
            expand = w.const("gqa_expand", [1, 1, rep, 1, 1])
            shape = w.const("gqa_shape", [0, H, -1, D])
            k = w.op("Reshape", [w.op("Expand", [w.op("Unsqueeze", [k, w.const("ax2", [2])], f"{p}.k/unsq"), expand],
                                      f"{p}.k/expand"), shape], f"{p}.k/repeat")
            v = w.op("Reshape", [w.op("Expand", [w.op("Unsqueeze", [v, w.const("ax2", [2])], f"{p}.v/unsq"), expand],
                                      f"{p}.v/expand"), shape], f"{p}.v/repeat")
        kt = w.op("Transpose", [k], f"{p}.attn/k_t", perm=[0, 1, 3, 2])
        layer_scale = spec.layer_attention_scales[i] if spec.layer_attention_scales else scale
        scores = w.op("Mul", [w.op("MatMul", [q, kt], f"{p}.attn/qk"), w.const("attn_scale", layer_scale, w.np_dtype)],
                      f"{p}.attn/scale")
        mask = sliding_bias if i in spec.sliding_layers else bias
        probs = w.op("Softmax", [w.op("Add", [scores, mask], f"{p}.attn/mask")], f"{p}.attn/softmax", axis=-1)
        ctx = w.op("Transpose", [w.op("MatMul", [probs, v], f"{p}.attn/pv")], f"{p}.attn/to_bshd", perm=[0, 2, 1, 3])
        ctx = w.op("Reshape", [ctx, w.const("merge_heads", [0, 0, H * D])], f"{p}.attn/merge_heads")
        return linear(ctx, f"{p}.o", spec.o_bias)

    def mlp(x: str, i: int) -> str:
        p = f"layers.{i}"
        if spec.mlp == "gated":
            g = activation(linear(x, f"{p}.gate", spec.mlp_bias), f"{p}.mlp")
            hidden = w.op("Mul", [g, linear(x, f"{p}.up", spec.mlp_bias)], f"{p}.mlp/gate_mul")
        else:
            hidden = activation(linear(x, f"{p}.up", spec.mlp_bias), f"{p}.mlp")
        return linear(hidden, f"{p}.down", spec.mlp_bias)

    # ---- decoder layers -----------------------------------------------------------------------
    for i in range(spec.num_layers):
        p = f"layers.{i}"
        if spec.parallel_residual:
            a = attention(norm(h, f"{p}.ln1"), i)
            m = mlp(norm(h, f"{p}.ln2"), i)
            h = w.op("Add", [w.op("Add", [h, a], f"{p}/residual_attn"), m], f"{p}/residual_mlp")
        else:
            a = attention(norm(h, f"{p}.ln1"), i)
            h = w.op("Add", [h, norm(a, f"{p}.post_attn_norm") if spec.post_norms else a], f"{p}/residual_attn")
            m = mlp(norm(h, f"{p}.ln2"), i)
            h = w.op("Add", [h, norm(m, f"{p}.post_mlp_norm") if spec.post_norms else m], f"{p}/residual_mlp")

    # ---- head: Gemm with transB reads the [vocab, hidden] matrix in place, so a tied embedding is
    # stored once and serves both the Gather and the LM head. -----------------------------------
    h = norm(h, "final_norm")
    head = embed if spec.tied_embeddings else W("lm_head")
    flat = w.op("Reshape", [h, w.const("flat", [-1, spec.hidden_size])], "lm_head/flatten")
    gemm_inputs = [flat, head] + ([W("lm_head.bias")] if "lm_head.bias" in weights.names else [])
    logits = w.op("Gemm", gemm_inputs, "lm_head/gemm", transB=1)
    out_shape = w.op("Concat", [w.op("Shape", [INPUT_IDS], "shape_bs"), w.const("vocab", [spec.vocab_size])],
                     "logits_shape", axis=0)
    if fp16:
        logits = w.op("Cast", [logits], "lm_head/cast", to=TensorProto.FLOAT)
    w.op("Reshape", [logits, out_shape], "lm_head/unflatten", outputs=[LOGITS])
