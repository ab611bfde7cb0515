"""Quantized compiles end to end on tiny-llama (fast) and one on smollm2-135m (slow): each format's
graph holds the kernels ONNX Runtime runs natively, every quantized layer's SQNR clears a stated
floor, the accuracy gate runs (and trips on a deliberately broken quantization, leaving no bundle),
and the CLI refuses flags it cannot honour with exit code 2."""

from __future__ import annotations

import json

import pytest

from conftest import assert_clean_error, run_cli

# Per-layer SQNR floors on tiny-llama (output SQNR on calibration rows; torchao's rule of thumb is
# > 20 dB for 8-bit). Measured minima: int8 weight-only ~44 dB, W8A8 ~33 dB, fp8 ~28 dB, int4 ~19 dB.
FORMATS = {
    "int8-w8a8": ("int8", {}, 38.0, {"MatMulNBits", "GatherBlockQuantized"}),  # dynamic per-token activations (CPU)
    "int8-w8a8-static": ("int8", {"activations": "static"}, 25.0,
                         {"QuantizeLinear", "DequantizeLinear", "MatMulNBits", "GatherBlockQuantized"}),
    "int8-weight-only": ("int8", {"int8_mode": "weight-only"}, 38.0, {"MatMulNBits", "GatherBlockQuantized"}),
    "int4-rtn": ("int4", {"int4_method": "rtn"}, 15.0, {"MatMulNBits", "GatherBlockQuantized"}),
    "int4-awq": ("int4", {"int4_method": "awq", "int4_block": 32}, 15.0, {"MatMulNBits", "GatherBlockQuantized"}),
    "fp8": ("fp8", {}, 22.0, {"DequantizeLinear", "Cast"}),  # per-token activations (CPU): Cast to float8 by row
    "fp8-static": ("fp8", {"activations": "static"}, 22.0, {"QuantizeLinear", "DequantizeLinear"}),
}
SMALL = {"calib_samples": 4, "calib_seq_len": 64, "check_tokens": 512}


def _compile(tmp_path, name, precision, options, **kw):
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    return compile_model(CompileConfig(source="tiny-llama", target="cpu", output=str(tmp_path / f"{name}.lepton"),
                                       precision=precision, quantization={**SMALL, **options}, **kw))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import os

    path = tmp_path_factory.mktemp("calib-cache")
    old = os.environ.get("LEPTONC_CACHE")
    os.environ["LEPTONC_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LEPTONC_CACHE", None)
    else:
        os.environ["LEPTONC_CACHE"] = old


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_compiles_with_native_ops_sqnr_floor_and_gate(tmp_path, cache, fmt):
    precision, options, floor, ops = FORMATS[fmt]
    bundle = _compile(tmp_path, fmt, precision, options)
    report, manifest = bundle.report(), bundle.manifest
    q = report["quantization"]
    static = fmt in ("int8-w8a8-static", "fp8", "fp8-static")  # Q/DQ forms: MatMuls stay
    fmt = fmt.removesuffix("-static")
    assert q["format"] == fmt
    op_counts = report["graph"]["op_counts"]
    assert ops <= set(op_counts), op_counts
    assert "MatMul" not in op_counts or static  # MatMulNBits forms: every MatMul became MatMulNBits
    layers = q["layers"]
    # every linear (2 layers x {qkv, o, gate_up, down} + head) and the embedding has an SQNR; fp8 keeps
    # the head and the embedding tied to it in fp32 by default (ModelOpt's FP8 recipe), and says so
    assert len(layers) >= 2 * 4 + (fmt != "fp8"), layers
    if fmt == "fp8":
        assert {"lm_head", "embed"} <= set(q["kept_fp"]) and not {"lm_head", "embed"} & {r["name"] for r in layers}
        assert any("--fp8-lm-head" in n and "lm_head" in n for n in q["notes"]), q["notes"]
        fp8_pass = next(p["detail"] for p in manifest["passes"] if p["name"] == "quantize_fp8")
        assert "--fp8-lm-head" in fp8_pass and "SmoothQuant (alpha 0.5)" in fp8_pass  # the fp8 default alpha
        assert manifest["calibration"]["smoothquant_alpha"] == 0.5
    low = [r for r in layers if r["sqnr_db"] < floor]
    assert not low, f"{fmt}: layers below {floor} dB: {low}"
    gate = manifest["verification"]["accuracy_gate"]
    assert gate["status"] == "passed" and gate["scored_tokens"] >= 500
    assert abs(gate["ppl_increase_pct"]) < 5 and gate["top1_agreement"] > 0.8
    cal = manifest["calibration"]
    assert cal["format"] == fmt and cal["tokens"] == 4 * 64
    if fmt == "fp8":
        assert q["simulated"] and "simulated" in q["note"] and manifest["precision_mode"] == "simulated"
    else:
        assert not q["simulated"] and manifest["precision_mode"] == "native"
    if fmt == "int8-w8a8":
        assert any("SmoothQuant" in p["detail"] for p in manifest["passes"]) == static
    if fmt in ("int8-w8a8", "int8-weight-only") and not static:  # the CPU's block of 32 (activations rounded per block)
        import onnx

        blocks = {a.i for n in onnx.load(str(bundle.model_path), load_external_data=False).graph.node
                  if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
        assert 32 in blocks and manifest["config"]["quantization"]["int8_block"] == 32, blocks
    if fmt == "int4-awq":
        assert any("AWQ scales folded" in p["detail"] for p in manifest["passes"])


def test_int8_block_is_32_on_the_cpu_and_64_elsewhere(tmp_path):
    """ONNX Runtime's CPU kernel rounds the activations per block of the weight's: the CPU's int8 default is block 32
    (chosen on the tuning splits), the GPU targets' 64, and --int8-block overrides both."""
    from leptonc.config import CompileConfig

    def block(**kw):
        return CompileConfig(source="tiny-llama", output=str(tmp_path / "x.lepton"), precision="int8", **kw) \
            .quantization.int8_block

    assert block(target="cpu") == 32 and block(target="a100", backend="onnxruntime") == 64
    assert block(target="cpu", quantization={"int8_block": 64}) == 64
    assert block(target="cpu", quantization={"int8_mode": "weight-only"}) == 32


def test_fp16_gpu_int8_qdq_is_opset_19_with_fp16_scales_and_runs_on_the_cpu(tmp_path, cache):
    """A GPU target's fp16 graph: Q/DQ of fp16 activations need fp16 scales and opset 19 (before 19,
    QuantizeLinear takes float32 only and ONNX Runtime refuses the model). The graph before the lowering to
    leptonc's CUDA kernels is the bundle's here: it passes ONNX's full check, ONNX Runtime's CPU provider
    loads it, and the cross-compile's accuracy gate runs on it instead of waiting for a GPU."""
    import onnx
    import onnxruntime as ort

    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    bundle = compile_model(CompileConfig(source="tiny-llama", target="a100", backend="onnxruntime", precision="int8",
                                         output=str(tmp_path / "a100-int8.lepton"), quantization=SMALL,
                                         disabled_passes=("use_leptonc_kernels",)))
    assert bundle.report()["export"]["dtype"] == "fp16"
    model = onnx.load(str(bundle.model_path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 19
    scales = {i.name: i.data_type for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == 8 * 3 and all(scales[n.input[1]] == onnx.TensorProto.FLOAT16 for n in qdq)
    for node in model.graph.node:  # ONNX Runtime's op in the default domain, unknown to onnx's checker
        if node.op_type == "SimplifiedLayerNormalization":
            node.domain = "com.microsoft"
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    assert {i.name: i.type for i in session.get_outputs()}["logits"] == "tensor(float)"
    gate = bundle.manifest["verification"]["accuracy_gate"]
    assert gate["status"] == "passed" and gate["scored_tokens"] >= 500, gate
    assert bundle.manifest["verification"]["status"] != "pending_gpu"
    notes = bundle.report()["quantization"]["notes"]
    assert any("opset raised to 19 for Q/DQ with fp16 scales" in n for n in notes), notes


def test_keep_fp_keeps_matching_layers_including_merged_projections(tmp_path, cache):
    bundle = _compile(tmp_path, "keep", "int4", {"int4_method": "rtn", "keep_fp": ["layers.0.*", "lm_head"]})
    q = bundle.report()["quantization"]
    kept = q["kept_fp"]
    assert "lm_head" in kept and "layers.0.o.weight" in kept
    assert any("layers.0.q.weight" in k for k in kept)  # q/k/v were merged by merge_qkv: kept as one
    assert not any(r["name"].startswith("layers.0.") or r["name"] == "lm_head" for r in q["layers"])
    assert "embed" in [r["name"] for r in q["layers"]]  # the embedding is still quantized on its own


def test_fp8_lm_head_flag_quantizes_the_head_and_embedding(tmp_path, cache):
    bundle = _compile(tmp_path, "fp8head", "fp8", {"fp8_lm_head": True})
    q = bundle.report()["quantization"]
    names = {r["name"]: r for r in q["layers"]}
    assert "lm_head" in names and names["lm_head"]["format"] == "fp8" and names["lm_head"]["sqnr_db"] >= 22.0
    assert not q["kept_fp"] and not any("--fp8-lm-head" in n for n in q["notes"])
    assert "embed" in names and names["embed"]["format"] == "fp8"  # the embedding is fp8 as well


def test_gate_trips_on_broken_scales_and_leaves_no_bundle(tmp_path, cache):
    from leptonc.calibration.gate import default_heldout_text
    from leptonc.errors import VerificationError

    out = tmp_path / "broken.lepton"
    # Every weight scale x 1e-3 collapses the weights to ~0: the random tiny model's logits go flat
    # (perplexity -> vocab size, ~+2.4% on the WikiText tuning text; a sound int4 compile of it moves by < 0.5%),
    # so the limit is 1% for this model. On the default gate text (Python docs) the random model is already
    # nearly flat (+0.2%), so this test gates on the WikiText text.
    with pytest.raises(VerificationError) as info:
        _compile(tmp_path, "broken", "int4", {"int4_method": "rtn", "break_scales": 1e-3, "max_ppl_increase": 1.0,
                                              "check_data": str(default_heldout_text())})
    assert info.value.exit_code == 6
    assert "accuracy gate failed" in str(info.value) and "no bundle was written" in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".leptonc-tmp")]


def test_no_check_skips_the_gate_and_says_so(tmp_path, cache):
    bundle = _compile(tmp_path, "nocheck", "int8", {"int8_mode": "weight-only", "check": False}, verify=False)
    gate = bundle.manifest["verification"]["accuracy_gate"]
    assert gate["status"] == "skipped" and "--no-check" in gate["reason"]
    assert bundle.report()["quantization"]["accuracy_gate"]["status"] == "skipped"


@pytest.mark.parametrize("args,needle", [
    (["--calib-samples", "4"], "--calib-samples only applies to a quantized compile"),
    (["--int4", "--int4-block", "100"], "--int4-block 100"),
    (["--int4", "--int4-method", "gptq"], "--int4-method"),
    (["--int8", "--int8-mode", "w4a8"], "--int8-mode"),
    (["--int4", "--kv-cache", "int8"], "--kv-cache int8 is not supported"),
    (["--int8", "--calib-method", "mse"], "--calib-method"),
    (["--int8", "--no-passes"], "--no-passes"),
    (["--int4", "--fp8-lm-head"], "--fp8-lm-head only applies to --fp8"),
    (["--int4", "--calib-data", "/nonexistent.txt"], "does not exist"),
    (["--int4", "--int4-method", "rtn", "--int4-rounding", "gptq"], "--int4-rounding gptq rounds on AWQ's grid"),
    (["--int4", "--int4-rounding", "best"], "--int4-rounding 'best'"),
    (["--int8", "--int4-rounding", "gptq"], "--int4-rounding gptq"),
    (["--int4", "--gptq-samples", "0"], "--gptq-samples must be >= 1"),
    (["--int4", "--int4-rounding", "nearest", "--gptq-samples", "64"], "--gptq-samples only applies to GPTQ rounding"),
    (["--int8", "--activations", "fast"], "--activations 'fast'"),
    (["--int4", "--activations", "dynamic"], "--activations dynamic applies to --int8 W8A8 and --fp8 only"),
    (["--int8", "--target", "h100", "--activations", "dynamic"], "static is the default here"),
    (["--int4", "--int4-bits-budget", "-1"], "--int4-bits-budget is bits per weight"),
    (["--int8", "--gptq-act-order"], "--gptq-act-order only applies to GPTQ rounding"),
    (["--int4", "--fp8-rounding", "gptq"], "--fp8-rounding only applies to --fp8"),
    (["--int8", "--int8-block", "48"], "--int8-block 48"),
    (["--int4", "--int8-block", "32"], "--int8-block only applies to --int8"),
    (["--fp8", "--fp8-rounding", "best"], "--fp8-rounding 'best'"),
    (["--fp8", "--fp8-rounding", "nearest", "--gptq-samples", "64"], "--gptq-samples only applies to GPTQ rounding"),
])
def test_cli_refuses_bad_quantization_flags(tmp_path, args, needle):
    proc = run_cli("compile", "tiny-llama", "-o", tmp_path / "x.lepton", *args, timeout=300)
    assert_clean_error(proc, 2)
    assert needle in " ".join(proc.stderr.split()), proc.stderr
    assert not (tmp_path / "x.lepton").exists()


def test_cli_int4_compile_reports_accuracy_and_cache_hit(tmp_path, cache):
    args = ["compile", "tiny-llama", "--int4", "--int4-method", "awq", "--calib-samples", "4", "--calib-seq-len", "64",
            "--check-tokens", "256", "--max-ppl-increase", "3", "--json"]
    env = {"LEPTONC_CACHE": str(cache)}
    first = run_cli(*args, "-o", tmp_path / "a.lepton", env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli(*args, "-o", tmp_path / "b.lepton", env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    m1, m2 = json.loads(first.stdout)["manifest"], json.loads(second.stdout)["manifest"]
    assert m2["calibration"]["cache"]["hit"] and m1["calibration"]["cache"]["key"] == m2["calibration"]["cache"]["key"]
    assert m1["verification"]["accuracy_gate"]["rule"] == "perplexity increase <= 3%"
    assert m1["calibration"]["settings"]["int4_method"] == "awq"


@pytest.mark.slow
def test_smollm2_int4_awq_meets_size_and_gate(tmp_path, cache, smollm2_bundle):
    """The real model: int4 AWQ block 64 (with GPTQ rounding, the default) is under 22% of the fp32
    bundle, every int4 layer but the few the bit budget sends to 8 bits carries GPTQ's codes, and the gate's
    perplexity increase on its text (the Python docs) stays under 15% (measured +7.9% with the default 16
    calibration sequences: BENCHMARKS.md `## Quantization`)."""
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    bundle = compile_model(CompileConfig(source="smollm2-135m", target="cpu", output=str(tmp_path / "s4.lepton"),
                                         precision="int4", verify=False,
                                         quantization={"calib_samples": 8, "calib_seq_len": 256, "check_tokens": 1024,
                                                  "max_ppl_increase": 15.0}))
    fp32 = json.loads((smollm2_bundle / "manifest.json").read_text())
    size = sum(f["bytes"] for f in bundle.manifest["files"].values())
    size32 = sum(f["bytes"] for f in fp32["files"].values())
    assert size / size32 <= 0.22, (size, size32)
    rounding = bundle.manifest["calibration"]["rounding"]
    assert rounding["rounding"] == "gptq" and rounding["output_error_vs_nearest"]["linears"] == 30 * 7
    assert rounding["tokens"] == 128 * 256  # GPTQ_SAMPLES sequences of the shipped calibration text (it holds 144)
    detail = next(p["detail"] for p in bundle.manifest["passes"] if p["name"] == "quantize_int4")
    mixed = bundle.manifest["calibration"]["mixed_precision"]  # the most sensitive groups at 8 bits, within 4.5 bits
    assert mixed["effective_bits"] <= 4.5 and mixed["effective_bits"] >= mixed["uniform_int4_bits"]
    int4 = 120 - len(mixed["eight_bit_groups"])  # 4 merged linears a layer (qkv, o, gate_up, down) x 30
    assert f"GPTQ rounding on AWQ's grid for {int4} int4 MatMulNBits" in detail, detail
    gate = bundle.manifest["verification"]["accuracy_gate"]
    assert gate["status"] == "passed" and gate["ppl_increase_pct"] <= 15 and gate["top1_agreement"] > 0.75


@pytest.mark.parametrize("method,noted", [("percentile", True), ("entropy", True), ("minmax", False)])
def test_fp8_compile_notes_that_clipping_observers_hurt(method, noted, tmp_path, capsys, monkeypatch):
    """`--fp8 --calib-method percentile|entropy` prints a note before any work (they multiplied
    smollm2-135m's perplexity); the default minmax does not."""
    import leptonc.compiler
    from leptonc.cli import main
    from leptonc.errors import InputError

    def stop(*_a, **_k):
        raise InputError("stopped before compiling")

    monkeypatch.setattr(leptonc.compiler, "compile_model", stop)
    with pytest.raises(SystemExit) as exit_:
        main(["compile", "tiny-llama", "--fp8", "--calib-method", method, "-o", str(tmp_path / "b.lepton")])
    out = capsys.readouterr().err.replace("\n", " ")
    assert exit_.value.code != 0 and "stopped before compiling" in out
    assert ("clips activation outliers" in out) == noted


def test_int8_weight_only_rounds_activations_only_where_asked(tmp_path, cache):
    """On the CPU, ONNX Runtime's fast 8-bit MatMulNBits path (accuracy_level 4) rounds the activations to int8;
    --activations fp32 keeps them unrounded (accuracy_level 1) and the manifest says which one a bundle runs."""
    import onnx

    from leptonc.calibration.quantize import QuantSettings
    from leptonc.errors import UnsupportedRequestError

    levels = {}
    for name, options in (("kernel", {}), ("fp32", {"activations": "fp32"})):
        bundle = _compile(tmp_path, f"w8-{name}", "int8", {"int8_mode": "weight-only", **options})
        path = next(bundle.path / f for f in bundle.manifest["files"] if f.endswith(".onnx"))
        nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
        levels[name] = {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"}
        said = bundle.manifest["calibration"]["activations"]
        assert ("fp32 (MatMulNBits accuracy_level 1)" in said) == (name == "fp32"), said
    assert levels == {"kernel": {4}, "fp32": {1}}, levels
    for bad in ({"activations": "fp32"}, {"int8_mode": "weight-only", "activations": "dynamic"}):
        with pytest.raises(UnsupportedRequestError):
            QuantSettings("int8", **bad)
