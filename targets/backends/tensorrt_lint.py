"""A TensorRT compatibility lint for ONNX graphs that needs no TensorRT.

`lint_model(path) -> dict` checks every node of the graph a TensorRT build would be handed against
what TensorRT's ONNX parser accepts, and reports offending nodes by name:

- the operator is in TensorRT's ONNX operator support matrix (and not marked unsupported there);
- the node's data types are ones the matrix lists for that operator;
- the restrictions the matrix states for the operator (constant `axes`, unsupported attributes and
  outputs, ...);
- the opset of the default domain is one TensorRT's parser reads, and the operator exists at it;
- no operator from a contrib domain (`com.microsoft`: ONNX Runtime only) or another custom domain;
- explicit quantization follows TensorRT's rules for Q/DQ graphs: zero points are zero (symmetric),
  scales are build-time constants, activations are quantized per tensor, block quantization only for
  INT4/FP4 weights, per-channel weight scales along the output-channel axis, FP8 is E4M3FN, and every
  QuantizeLinear output is read by DequantizeLinear nodes only (a quantized tensor feeds nothing else).

The support matrix below is data, transcribed from the ONNX-TensorRT operator table
(onnx/onnx-tensorrt, docs/operators.md) as published for TensorRT 10.15 (opsets 9 to 24), and the
Q/DQ rules from TensorRT's "Explicit Quantization" guide and its Quantize/Dequantize operator pages.
When TensorRT publishes a newer table, update `MATRIX_VERSION` and the entries that changed.

Nothing here imports tensorrt; the lint needs only `onnx`.
"""

from __future__ import annotations

from pathlib import Path

MATRIX_VERSION = "10.15"
MATRIX_SOURCE = "ONNX-TensorRT docs/operators.md for TensorRT 10.15; TensorRT explicit-quantization guide"
OPSET_RANGE = (9, 24)  # inclusive, default ("" / "ai.onnx") domain

# ---- the operator support matrix ------------------------------------------------------------------
# Type codes: f = FP32, FP16, BF16; i = INT32, INT64; b = BOOL; plus explicit names for the rest.
_F = ("FP32", "FP16", "BF16")
_I = ("INT32", "INT64")
_B = ("BOOL",)


def _types(code: str, *extra: str) -> tuple[str, ...]:
    out: list[str] = []
    for c in code:
        out += {"f": _F, "i": _I, "b": _B}[c]
    return (*out, *extra)


SUPPORTED: dict[str, tuple[str, ...]] = {
    **{op: _types("f") for op in (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Ceil", "Celu",
        "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum", "Elu", "Erf", "Exp", "Floor",
        "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GroupNormalization", "GRU", "HardSigmoid",
        "HardSwish", "Hardmax", "ImageScaler", "InstanceNormalization", "IsInf", "LayerNormalization", "LeakyRelu",
        "Log", "LogSoftmax", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "MaxPool",
        "MeanVarianceNormalization", "ParametricSoftplus", "PRelu", "QuantizeLinear", "RandomNormal",
        "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Reciprocal", "Resize", "RMSNormalization", "RNN",
        "RotaryEmbedding", "Round", "ScaledTanh", "Scan", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus",
        "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Upsample")},
    **{op: _types("fi") for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual", "IsNaN",
        "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Pow", "Range", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
        "ReduceSumSquare", "Relu", "Scatter", "ScatterElements", "ScatterND", "Shrink", "Sign", "SpaceToDepth", "Sub",
        "Sum", "TopK")},
    **{op: _types("fib") for op in (
        "Concat", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "If", "Loop",
        "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Slice", "Split", "Squeeze", "Tile", "Transpose",
        "Trilu", "Unsqueeze", "Where")},
    **{op: _B for op in ("And", "Not", "Or", "Xor")},
    **{op: ("FP32", "FP16") for op in (
        "BlackmanWindow", "DeformConv", "GridSample", "HammingWindow", "HannWindow", "Mish", "NonMaxSuppression",
        "NonZero", "RoiAlign")},
    "Attention": _types("f", "INT8", "FP8"),
    "Cast": _types("fi", "UINT8", "BOOL"),
    "CastLike": _types("fi", "UINT8", "BOOL"),
    "Constant": _types("fib", "FP8", "FP4", "INT4"),
    "ConstantOfShape": _types("fib", "FP8", "FP4", "INT4"),
    "DequantizeLinear": ("INT8", "FP8", "FP4", "INT4"),
    "Gelu": _types("fi", "INT8"),
    "Mean": _types("fi", "FP8"),
    "STFT": ("FP32",),
    "TensorScatter": _types("f", "INT32"),
}

# Marked "N" (not supported) in the matrix. An operator in neither table is not in the matrix at all.
UNSUPPORTED = frozenset((
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
))

# Which tensors carry the type the matrix talks about: input indices (and "out0" for the output).
# Default: input 0. Where's condition is BOOL by definition; Cast is checked on both sides.
_TYPED_INPUTS: dict[str, tuple] = {
    "Where": (1, 2), "Cast": (0, "out0"), "CastLike": (0, "out0"), "Constant": ("out0",),
    "ConstantOfShape": ("out0",), "RandomNormal": ("out0",), "RandomUniform": ("out0",),
    "EyeLike": ("out0",), "QuantizeLinear": (0,), "DequantizeLinear": (0,),
}

# TensorRT's runtime data types, by ONNX TensorProto element type.
ONNX_TO_TRT = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8", 3: "INT8",
               17: "FP8", 22: "INT4", 23: "FP4", 11: "DOUBLE"}
_FP8_OTHER = {18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ"}
QUANTIZED = ("INT8", "FP8", "INT4", "FP4")
IO_TYPES = ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL", "UINT8", "INT8", "FP8")
CONTRIB_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.microsoft.experimental", "ai.onnx.contrib")


# ---- entry points ---------------------------------------------------------------------------------

def lint_model(path: str | Path) -> dict:
    """Lint an ONNX file (external data is read only for the few small tensors a rule needs)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return lint_onnx(model, base_dir=path.parent, source=str(path))


def lint_onnx(model, base_dir: Path | None = None, source: str = "<model>") -> dict:
    """Lint an in-memory `onnx.ModelProto`. Returns {"issues": [...], "warnings": [...], ...};
    each finding names the node, its operator, the rule and what to do."""
    return _Linter(model, base_dir).run(source)


def format_issues(result: dict, limit: int = 12) -> str:
    lines = [f"{i['node']} ({i['op']}): {i['message']}" for i in result["issues"][:limit]]
    more = len(result["issues"]) - limit
    if more > 0:
        lines.append(f"... and {more} more")
    return "\n".join(lines)


# ---- the linter -------------------------------------------------------------------------------------

class _Linter:
    def __init__(self, model, base_dir: Path | None):
        import onnx

        self.onnx = onnx
        self.model = model
        self.base_dir = base_dir
        self.issues: list[dict] = []
        self.warnings: list[dict] = []
        self.opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
        self.opset = self.opsets.get("ai.onnx", 0)
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants: dict[str, object] = {}  # output name -> Constant node
        self.producer: dict[str, object] = {}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self.constants[node.output[0]] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.types = self._infer_types()

    # -- helpers --
    def _infer_types(self) -> dict[str, int]:
        types: dict[str, int] = {}
        try:
            inferred = self.onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        except Exception:  # a graph shape inference cannot read: types from the declared value infos only
            inferred = self.model
        g = inferred.graph
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        types[node.output[0]] = a.t.data_type
        return types

    def _name(self, node, index: int) -> str:
        return node.name or f"{node.op_type}#{index} (output {node.output[0] if node.output else '?'})"

    def _report(self, node, index, rule: str, message: str, warning: bool = False) -> None:
        entry = {"node": self._name(node, index), "op": node.op_type, "domain": node.domain or "ai.onnx",
                 "rule": rule, "message": message}
        (self.warnings if warning else self.issues).append(entry)

    def _attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return self.onnx.helper.get_attribute_value(a)
        return default

    def _is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def _const_value(self, name: str):
        """The numpy value of an initializer or Constant output (reads external data for that tensor)."""
        from onnx import numpy_helper

        if name in self.initializers:
            t = self.initializers[name]
            if t.data_location == self.onnx.TensorProto.EXTERNAL:
                if self.base_dir is None:
                    return None
                t2 = self.onnx.TensorProto()
                t2.CopyFrom(t)
                self.onnx.external_data_helper.load_external_data_for_tensor(t2, str(self.base_dir))
                t = t2
            return numpy_helper.to_array(t)
        if name in self.constants:
            value = self._attr(self.constants[name], "value")
            return numpy_helper.to_array(value) if value is not None else None
        return None

    def _shape(self, name: str):
        if name in self.initializers:
            return list(self.initializers[name].dims)
        if name in self.constants:
            value = self._attr(self.constants[name], "value")
            return list(value.dims) if value is not None else None
        return None

    def _trt_type(self, tensor: str) -> str | None:
        t = self.types.get(tensor)
        if t is None:
            return None
        return ONNX_TO_TRT.get(t) or _FP8_OTHER.get(t) or self.onnx.helper.tensor_dtype_to_string(t).split(".")[-1]

    # -- the run --
    def run(self, source: str) -> dict:
        g = self.model.graph
        if not OPSET_RANGE[0] <= self.opset <= OPSET_RANGE[1]:
            self.issues.append({"node": "<model>", "op": "-", "domain": "ai.onnx", "rule": "opset",
                                "message": f"default-domain opset {self.opset} is outside TensorRT {MATRIX_VERSION}'s "
                                           f"range {OPSET_RANGE[0]}..{OPSET_RANGE[1]}; re-export at opset 17"})
        for vi in (*g.input, *g.output):
            t = self._trt_type(vi.name)
            if t is not None and t not in IO_TYPES:
                rule_msg = (f"graph {'input' if vi in g.input else 'output'} {vi.name!r} has type {t}, which TensorRT "
                            f"engines cannot bind (I/O types: {', '.join(IO_TYPES)})")
                self.issues.append({"node": vi.name, "op": "<io>", "domain": "ai.onnx", "rule": "dtype",
                                    "message": rule_msg})
        untyped = 0
        for index, node in enumerate(g.node):
            untyped += self._check_node(node, index)
        return {
            "source": source,
            "tensorrt_matrix": MATRIX_VERSION,
            "reference": MATRIX_SOURCE,
            "opset": self.opset,
            "nodes": len(g.node),
            "nodes_without_type_info": untyped,
            "issues": self.issues,
            "warnings": self.warnings,
            "clean": not self.issues,
        }

    def _check_node(self, node, index: int) -> int:
        domain = node.domain or "ai.onnx"
        op = node.op_type
        if domain != "ai.onnx":
            if domain in CONTRIB_DOMAINS:
                self._report(node, index, "contrib-op",
                             f"{domain}::{op} is an ONNX Runtime contrib operator; TensorRT's parser has no importer "
                             "for it. Use the TensorRT pipeline (standard ONNX operators) for this graph")
            else:
                self._report(node, index, "custom-op",
                             f"{domain}::{op} is a custom-domain operator; TensorRT imports it only through a plugin "
                             "registered under that name, which leptonc does not ship")
            return 0
        if op in UNSUPPORTED:
            self._report(node, index, "unsupported-op",
                         f"{op} is marked unsupported in TensorRT {MATRIX_VERSION}'s ONNX operator matrix")
            return 0
        if op not in SUPPORTED:
            self._report(node, index, "unsupported-op",
                         f"{op} is not in TensorRT {MATRIX_VERSION}'s ONNX operator matrix")
            return 0
        try:
            self.onnx.defs.get_schema(op, self.opset, "")
        except Exception:
            self._report(node, index, "opset",
                         f"{op} is not defined at opset {self.opset} (the model's default-domain opset)")
        untyped = self._check_types(node, index)
        rule = _RESTRICTIONS.get(op)
        if rule is not None:
            rule(self, node, index)
        return untyped

    def _check_types(self, node, index: int) -> int:
        allowed = SUPPORTED[node.op_type]
        positions = _TYPED_INPUTS.get(node.op_type, (0,))
        untyped = 0
        for pos in positions:
            if pos == "out0":
                tensor = node.output[0] if node.output else ""
            else:
                tensor = node.input[pos] if pos < len(node.input) else ""
            if not tensor:
                continue
            t = self._trt_type(tensor)
            if t is None:
                untyped = 1
                continue
            if t == "DOUBLE" and "FP32" in allowed:
                self._report(node, index, "dtype", f"{tensor!r} is DOUBLE; TensorRT casts it down to FP32 "
                             "(clamping to +-FLT_MAX)", warning=True)
            elif t not in allowed:
                self._report(node, index, "dtype",
                             f"{node.op_type} on {t} ({tensor!r}) is not supported by TensorRT {MATRIX_VERSION}; "
                             f"it accepts {', '.join(allowed)}")
        return untyped


# ---- per-operator restrictions from the matrix ----------------------------------------------------------

def _axes_constant(input_index: int, since_opset: int, what: str = "axes"):
    def check(lint: _Linter, node, index: int) -> None:
        if lint.opset >= since_opset and len(node.input) > input_index and node.input[input_index]:
            if not lint._is_constant(node.input[input_index]):
                lint._report(node, index, "restriction",
                             f"{node.op_type}: `{what}` must be a build-time constant (an initializer) for TensorRT")
    return check


def _no_extra_outputs(keep: int, what: str):
    def check(lint: _Linter, node, index: int) -> None:
        for i, out in enumerate(node.output):
            if i >= keep and out and (out in lint.consumers or out in lint.graph_outputs):
                lint._report(node, index, "restriction", f"{node.op_type}: {what}")
                return
    return check


def _check_topk(lint: _Linter, node, index: int) -> None:
    if lint._attr(node, "sorted", 1) != 1:
        lint._report(node, index, "attribute", "TopK: `sorted` must be 1 for TensorRT")
    k = node.input[1] if len(node.input) > 1 else ""
    if k and not lint._is_constant(k):
        lint._report(node, index, "restriction", "TopK: `K` must be a build-time constant for TensorRT")
    elif k:
        value = lint._const_value(k)
        if value is not None and int(value.reshape(-1)[0]) >= 3840:
            lint._report(node, index, "restriction", f"TopK: K={int(value.reshape(-1)[0])} must be less than 3840")


def _check_dropout(lint: _Linter, node, index: int) -> None:
    if len(node.input) > 2 and node.input[2]:
        value = lint._const_value(node.input[2]) if lint._is_constant(node.input[2]) else None
        if value is None or bool(value.reshape(-1)[0]):
            lint._report(node, index, "restriction", "Dropout: `is_training` must be a constant False")


def _check_constant(lint: _Linter, node, index: int) -> None:
    for name in ("sparse_value", "value_string", "value_strings"):
        if lint._attr(node, name) is not None:
            lint._report(node, index, "attribute", f"Constant: attribute `{name}` is not supported by TensorRT")


def _check_scatternd(lint: _Linter, node, index: int) -> None:
    reduction = lint._attr(node, "reduction", b"none")
    if (reduction.decode() if isinstance(reduction, bytes) else reduction) != "none":
        lint._report(node, index, "attribute", "ScatterND: only reduction='none' is supported by TensorRT")


def _check_lstm(lint: _Linter, node, index: int) -> None:
    if lint._attr(node, "input_forget", 0) != 0 or lint._attr(node, "layout", 0) != 0:
        lint._report(node, index, "attribute", "LSTM: `input_forget` and `layout` must be 0 for TensorRT")


def _check_resize(lint: _Linter, node, index: int) -> None:
    def s(name, default):
        v = lint._attr(node, name, default)
        return v.decode() if isinstance(v, bytes) else v

    if s("mode", "nearest") not in ("nearest", "linear"):
        lint._report(node, index, "attribute", f"Resize: mode {s('mode', '')!r} is not supported (nearest, linear)")
    ctm = s("coordinate_transformation_mode", "half_pixel")
    if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
        lint._report(node, index, "attribute", f"Resize: coordinate_transformation_mode {ctm!r} is not supported")
    if lint._attr(node, "antialias", 0):
        lint._report(node, index, "attribute", "Resize: antialiasing is not supported by TensorRT")
    if s("keep_aspect_ratio_policy", "stretch") != "stretch":
        lint._report(node, index, "attribute", "Resize: only keep_aspect_ratio_policy='stretch' is supported")


def _check_attention(lint: _Linter, node, index: int) -> None:
    for i, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if len(node.input) > i and node.input[i]:
            lint._report(node, index, "restriction", f"Attention: input `{what}` is not supported by TensorRT; "
                         "concatenate the cache before the Attention node")
    for i, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
        if len(node.output) > i and node.output[i]:
            lint._report(node, index, "restriction", f"Attention: output `{what}` is not supported by TensorRT")
    for attr in ("qk_matmul_output_mode", "softcap"):
        if lint._attr(node, attr) not in (None, 0, 0.0):
            lint._report(node, index, "attribute", f"Attention: attribute `{attr}` is not supported by TensorRT")


def _check_tensorscatter(lint: _Linter, node, index: int) -> None:
    if lint._attr(node, "axis", -2) != -2:
        lint._report(node, index, "attribute", "TensorScatter: `axis` must be -2 for TensorRT")


def _check_rotary(lint: _Linter, node, index: int) -> None:
    if len(node.input) > 3 and node.input[3]:
        t = lint._trt_type(node.input[3])
        if t is not None and t != "INT64":
            lint._report(node, index, "dtype", f"RotaryEmbedding: `position_ids` must be INT64, not {t}")


# ---- explicit quantization (Q/DQ) rules ----------------------------------------------------------------

def _qdq_common(lint: _Linter, node, index: int, quantized_tensor: str) -> str | None:
    """Scale constant, zero point zero, FP8 flavour. Returns the quantized type name, if known."""
    op = node.op_type
    scale = node.input[1] if len(node.input) > 1 else ""
    if scale and not lint._is_constant(scale):
        lint._report(node, index, "qdq", f"{op}: the scale must be a build-time constant (an initializer); "
                     f"{scale!r} is computed in the graph")
    zp = node.input[2] if len(node.input) > 2 else ""
    qtype = None
    if zp:
        qtype = lint._trt_type(zp)
        if lint._is_constant(zp):
            value = lint._const_value(zp)
            if value is not None and value.size and bool((value.astype("float64") != 0).any()):
                lint._report(node, index, "qdq", f"{op}: zero point {zp!r} is non-zero; TensorRT quantization is "
                             "symmetric (zero point 0)")
        else:
            lint._report(node, index, "qdq", f"{op}: the zero point must be a constant zero")
    if qtype is None:
        qtype = lint._trt_type(quantized_tensor)
    if qtype in _FP8_OTHER.values():
        lint._report(node, index, "qdq", f"{op}: {qtype} is not a TensorRT type; FP8 must be E4M3FN (FLOAT8E4M3FN)")
    elif qtype is not None and qtype not in QUANTIZED:
        lint._report(node, index, "qdq", f"{op}: quantized type {qtype} is not supported; use INT8, FP8, INT4 or FP4")
    block = lint._attr(node, "block_size", 0)
    if block and qtype not in ("INT4", "FP4"):
        lint._report(node, index, "qdq", f"{op}: block quantization (block_size={block}) is supported only for "
                     f"INT4 and FP4, not {qtype}")
    return qtype


def _check_quantize(lint: _Linter, node, index: int) -> None:
    qtype = _qdq_common(lint, node, index, node.output[0] if node.output else "")
    x = node.input[0] if node.input else ""
    scale = node.input[1] if len(node.input) > 1 else ""
    shape = lint._shape(scale) if scale else None
    per_tensor = shape is not None and (len(shape) == 0 or (len(shape) == 1 and shape[0] == 1))
    if x and not lint._is_constant(x):  # an activation
        if shape is not None and not per_tensor:
            lint._report(node, index, "qdq", "QuantizeLinear on an activation must be per-tensor (a scalar scale); "
                         "TensorRT quantizes only weights per channel or per block")
        if qtype in ("INT4",):
            lint._report(node, index, "qdq", "INT4 is weight-only in TensorRT: quantize weights (constants), "
                         "not activations")
    out = node.output[0] if node.output else ""
    readers = lint.consumers.get(out, [])
    bad = [r for r in readers if r.op_type != "DequantizeLinear"]
    if bad:
        names = ", ".join(r.name or r.op_type for r in bad[:3])
        lint._report(node, index, "qdq", f"the quantized output of QuantizeLinear is read by {names}; in TensorRT "
                     "a quantized tensor may feed only DequantizeLinear (place a DQ right after each Q)")
    if out in lint.graph_outputs:
        lint._report(node, index, "qdq", "a QuantizeLinear output is a graph output; pair it with a DequantizeLinear")


def _check_dequantize(lint: _Linter, node, index: int) -> None:
    x = node.input[0] if node.input else ""
    qtype = _qdq_common(lint, node, index, x)
    scale = node.input[1] if len(node.input) > 1 else ""
    shape = lint._shape(scale) if scale else None
    src = lint.producer.get(x)
    weight = lint._is_constant(x)
    if not weight and (src is None or src.op_type != "QuantizeLinear"):
        what = "a graph input" if src is None else f"{src.op_type} {src.name!r}"
        lint._report(node, index, "qdq", f"DequantizeLinear reads {what}; TensorRT needs its input to be a "
                     "QuantizeLinear output or a quantized constant (weights)")
    per_tensor = shape is not None and (len(shape) == 0 or (len(shape) == 1 and shape[0] == 1))
    block = lint._attr(node, "block_size", 0)
    if not weight and shape is not None and not per_tensor:
        lint._report(node, index, "qdq", "DequantizeLinear on an activation must be per-tensor (a scalar scale)")
    if block:
        xshape = lint._shape(x) if weight else None
        if not weight:
            lint._report(node, index, "qdq", "block quantization is for weights only (a constant input)")
        elif xshape is not None and len(xshape) != 2:
            lint._report(node, index, "qdq", f"block-quantized weights must be 2-D; {x!r} has shape {xshape}")
        return
    if weight and shape is not None and len(shape) == 1 and shape[0] > 1:
        _check_channel_axis(lint, node, index, x)


def _check_channel_axis(lint: _Linter, node, index: int, weight: str) -> None:
    """A per-channel weight scale must run along the GEMM's output channels, where it can be folded."""
    out = node.output[0]
    wshape = lint._shape(weight) or []
    rank = len(wshape)
    axis = lint._attr(node, "axis", 1)
    if rank and axis < 0:
        axis += rank
    for reader in lint.consumers.get(out, []):
        if reader.op_type == "MatMul" and len(reader.input) > 1 and reader.input[1] == out:
            want = rank - 1
        elif reader.op_type == "Gemm" and len(reader.input) > 1 and reader.input[1] == out:
            want = 0 if lint._attr(reader, "transB", 0) else 1
        else:
            continue
        if rank and axis != want:
            lint._report(node, index, "qdq", f"per-channel weight scale on axis {axis} of {weight!r}, but "
                         f"{reader.op_type} {reader.name!r} has its output channels on axis {want}; TensorRT needs "
                         "per-channel weight scales along the output-channel axis")


_RESTRICTIONS = {
    **{op: _axes_constant(1, 18) for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSumSquare")},
    "ReduceSum": _axes_constant(1, 13),
    "Squeeze": _axes_constant(1, 13),
    "Unsqueeze": _axes_constant(1, 13),
    "CumSum": _axes_constant(1, 0, "axis"),
    "OneHot": _axes_constant(1, 0, "depth"),
    "LayerNormalization": _no_extra_outputs(1, "only the first output (Y) is supported by TensorRT"),
    "MaxPool": _no_extra_outputs(1, "the `Indices` output is not supported by TensorRT"),
    "TopK": _check_topk,
    "Dropout": _check_dropout,
    "Constant": _check_constant,
    "ScatterND": _check_scatternd,
    "LSTM": _check_lstm,
    "Resize": _check_resize,
    "Attention": _check_attention,
    "TensorScatter": _check_tensorscatter,
    "RotaryEmbedding": _check_rotary,
    "QuantizeLinear": _check_quantize,
    "DequantizeLinear": _check_dequantize,
}
