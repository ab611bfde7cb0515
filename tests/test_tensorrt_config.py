"""The TensorRT builder configuration derived per target and precision, checked without TensorRT:
`compile --dry-run --json` (subprocess and in-process), the Polygraphy loader chain it becomes, the
refusals (options, missing TensorRT, wrong build GPU, engine from another TensorRT version)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import assert_clean_error, run_cli
from leptonc.compiler import plan
from leptonc.config import CompileConfig, TensorRTOptions
from leptonc.errors import BackendUnavailableError, BundleError, UnsupportedRequestError
from leptonc.targets import PRECISIONS, TARGETS
from leptonc.targets.backends import tensorrt as trt_backend

GPUS = [t for t in TARGETS.values() if t.is_gpu]
TINY = {"layers": 2, "kv_heads": 2, "head_dim": 16}  # tiny-llama: hidden 64, 4 heads, 2 kv heads


def _have_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def _trt_plan(**kw) -> dict:
    return plan(CompileConfig(source="tiny-llama", backend="tensorrt", **kw))["tensorrt"]


# ---- every GPU target x every precision ----------------------------------------------------------

@pytest.mark.parametrize("target", GPUS, ids=lambda t: t.name)
def test_builder_config_for_every_target_and_precision(target):
    for precision in PRECISIONS:
        if not target.supports(precision):  # the target refuses it, naming what to use instead
            with pytest.raises(UnsupportedRequestError, match=precision.upper()):
                CompileConfig(source="tiny-llama", target=target.name, backend="tensorrt", precision=precision)
            continue
        if precision == "bf16":  # export writes fp32/fp16 graphs; a strongly typed network cannot be bf16
            with pytest.raises(UnsupportedRequestError, match="bf16"):
                CompileConfig(source="tiny-llama", target=target.name, backend="tensorrt", precision=precision)
            continue
        config = CompileConfig(source="tiny-llama", target=target.name, backend="tensorrt", precision=precision)
        p = plan(config)
        cfg = p["tensorrt"]
        assert p["export_dtype"] == ("fp32" if precision == "fp32" else "fp16")
        assert cfg["compute_capability"] == ".".join(map(str, target.compute_capability))
        assert cfg["network"]["strongly_typed"] is True
        assert cfg["precision"]["mode"] == target.mode(precision)
        # strongly typed: no weak-typing precision flags (TensorRT 11 removed them); TF32 off
        assert not any(cfg["precision"]["builder_flags"].values())
        assert cfg["memory_pool_limits"]["WORKSPACE"] == int(target.memory_gb * 0.25 * (1 << 30))
        assert cfg["hardware_compatibility_level"] == "NONE" and cfg["version_compatible"] is False
        assert cfg["sparse_weights"] is False and cfg["timing_cache"] == {"load": None, "save": None}
        assert cfg["builder_optimization_level"] == 3
        assert [pr["name"] for pr in cfg["profiles"]] == ["prefill", "decode"]
        quant = {"int8": "quantize_int8", "fp8": "quantize_fp8", "int4": "quantize_int4"}.get(precision)
        assert (quant in p["pipeline"]) == (quant is not None)
        assert not any(name.startswith("fuse_") for name in p["pipeline"])  # no contrib-op lowering for TensorRT


def test_profiles_cover_prefill_and_decode_for_every_input():
    cfg = _trt_plan(target="h100", max_batch=8, max_sequence=1024)
    prefill, decode = cfg["profiles"]
    names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(TINY["layers"]) for k in ("key", "value")]
    assert list(prefill["shapes"]) == names and list(decode["shapes"]) == names
    kv, hd = TINY["kv_heads"], TINY["head_dim"]
    assert prefill["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 128], "max": [8, 1024]}
    assert prefill["shapes"]["attention_mask"] == {"min": [1, 1], "opt": [1, 128], "max": [8, 1024]}
    assert prefill["shapes"]["past_key_values.1.value"] == {"min": [1, kv, 0, hd], "opt": [1, kv, 0, hd],
                                                            "max": [8, kv, 0, hd]}
    assert decode["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [8, 1]}
    assert decode["shapes"]["attention_mask"] == {"min": [1, 2], "opt": [1, 129], "max": [8, 1024]}
    assert decode["shapes"]["past_key_values.0.key"] == {"min": [1, kv, 1, hd], "opt": [1, kv, 128, hd],
                                                         "max": [8, kv, 1023, hd]}
    # every profile's min <= opt <= max, dimension by dimension
    for prof in cfg["profiles"]:
        for shape in prof["shapes"].values():
            assert all(a <= b <= c for a, b, c in zip(shape["min"], shape["opt"], shape["max"]))


def test_all_tensorrt_options_through_the_cli(tmp_path):
    cache = tmp_path / "timing.cache"
    proc = run_cli("compile", "tiny-llama", "--target", "a100", "--backend", "tensorrt", "--max-batch", "32",
                   "--max-seq", "4096", "--opt-batch", "4", "--opt-seq", "512", "--sparsity", "2:4", "--timing-cache", cache,
                   "--hardware-compat", "ampere+", "--version-compatible", "--builder-opt-level", "5",
                   "--dry-run", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["backend"] == "tensorrt" and out["precision"] == "fp16"
    cfg = out["tensorrt"]
    assert cfg["sparse_weights"] is True and "2:4" in cfg["sparsity_note"]
    assert cfg["timing_cache"] == {"load": str(cache.resolve()), "save": str(cache.resolve())}
    assert cfg["hardware_compatibility_level"] == "AMPERE_PLUS"
    assert cfg["version_compatible"] is True and "lean" in cfg["runtime"]
    assert cfg["builder_optimization_level"] == 5
    assert cfg["compute_capability"] == "8.0"
    prefill, decode = cfg["profiles"]
    assert prefill["shapes"]["input_ids"] == {"min": [1, 1], "opt": [4, 512], "max": [32, 4096]}
    assert decode["shapes"]["past_key_values.0.key"]["opt"] == [4, TINY["kv_heads"], 512, TINY["head_dim"]]
    assert cfg["tensorrt_installed_here"] == _have_tensorrt()
    assert not cache.exists()  # a dry run builds nothing and writes nothing


def test_quantized_plans_are_strongly_typed_qdq():
    for target, precision in (("h100", "fp8"), ("a100", "int8"), ("l4", "int4")):
        try:
            cfg = _trt_plan(target=target, precision=precision)
        except UnsupportedRequestError as exc:  # quantization not built into this leptonc
            pytest.skip(f"quantization unavailable: {exc}")
        assert cfg["network"]["strongly_typed"] is True
        assert "Q/DQ" in cfg["network"]["reason"]
        assert not cfg["precision"]["builder_flags"]["int8"] and not cfg["precision"]["builder_flags"]["fp8"]


def test_gguf_source_profiles_are_symbolic_until_build():
    cfg = plan(CompileConfig(source="smollm2-135m", target="h100", backend="tensorrt"))["tensorrt"]
    assert "shapes" not in cfg["profiles"][0]
    assert cfg["profiles"][1]["dims"]["past_sequence"] == {"min": 1, "opt": 128, "max": 2047}
    assert "resolved at build time" in cfg["profiles_note"]


# ---- the Polygraphy loader chain built from the configuration --------------------------------------

def test_polygraphy_loaders_carry_the_configuration(tmp_path):
    """The real Polygraphy loader objects (they import tensorrt only when called)."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    opts = TensorRTOptions(opt_batch=2, opt_seq=64, sparsity="2:4", timing_cache=str(tmp_path / "tc"),
                                       hardware_compat="ampere+", version_compatible=True, builder_opt_level=4)
    inputs = [{"name": "input_ids", "shape": ["batch", "sequence"]},
              {"name": "attention_mask", "shape": ["batch", "total_sequence"]},
              {"name": "position_ids", "shape": ["batch", "sequence"]},
              {"name": "past_key_values.0.key", "shape": ["batch", 2, "past_sequence", 16]},
              {"name": "past_key_values.0.value", "shape": ["batch", 2, "past_sequence", 16]}]
    settings = trt_backend.builder_config(TARGETS["h100"], "fp16", 8, 256, opts, inputs)
    save = trt_backend.engine_loaders(settings, tmp_path / "m.onnx", tmp_path / "engine.plan")
    assert isinstance(save, SaveEngine) and save.path == str(tmp_path / "engine.plan")
    build = save._engine
    assert isinstance(build, EngineFromNetwork)
    assert build.timing_cache_path == str((tmp_path / "tc").resolve())
    network = build._network
    assert isinstance(network, NetworkFromOnnxPath)
    assert network.path == str(tmp_path / "m.onnx") and network.strongly_typed is True
    create = build._config._config  # PostprocessConfig(CreateConfig, apply enum settings)
    assert isinstance(create, CreateConfig)
    assert not (create.fp16 or create.bf16 or create.int8 or create.fp8 or create.tf32)
    assert create.sparse_weights is True and create.version_compatible is True
    assert create.builder_optimization_level == 4
    assert create.timing_cache_path == str((tmp_path / "tc").resolve())
    assert len(create.profiles) == 2
    prefill, decode = create.profiles
    assert tuple(prefill["input_ids"].min) == (1, 1) and tuple(prefill["input_ids"].max) == (8, 256)
    assert tuple(prefill["input_ids"].opt) == (2, 64)
    assert tuple(decode["past_key_values.0.key"].max) == (8, 2, 255, 16)
    assert tuple(decode["attention_mask"].opt) == (2, 65)


def test_no_tensorrt_import_at_module_import():
    code = ("import sys\n"
            "import leptonc.cli, leptonc.compiler, leptonc.targets.backends.tensorrt, leptonc.targets.backends.tensorrt_lint\n"
            "import leptonc.runtime.trt\n"
            "from leptonc.config import TensorRTOptions\n"
            "from leptonc.targets import TARGETS; from leptonc.targets.backends import tensorrt as t\n"
            "t.builder_config(TARGETS['h100'], 'fp16', 4, 64, TensorRTOptions())\n"
            "print(sorted(m for m in ('tensorrt', 'tensorrt_lean', 'torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- refusals ----------------------------------------------------------------------------------

TRT = ["--backend", "tensorrt"]  # GPU targets default to --backend auto, which may pick ONNX Runtime


@pytest.mark.parametrize("args, needle", [
    (["--target", "h100", *TRT, "--opt-batch", "32"], "--opt-batch 32 must be between 1 and --max-batch 16"),
    (["--target", "h100", *TRT, "--opt-seq", "0"], "--opt-seq 0"),
    (["--target", "t4", *TRT, "--sparsity", "2:4"], "2:4 sparse tensor cores need sm80+"),
    (["--target", "h100", *TRT, "--sparsity", "1:2"], "only structured sparsity"),
    (["--target", "t4", *TRT, "--hardware-compat", "ampere+"], "Ampere and newer"),
    (["--target", "h100", *TRT, "--hardware-compat", "any"], "use ampere+ or same-cc"),
    (["--target", "h100", *TRT, "--builder-opt-level", "7"], "0..5"),
    (["--target", "h100", *TRT, "--timing-cache", "/nonexistent-dir/x.cache"], "does not exist"),
    (["--target", "h100", "--backend", "onnxruntime", "--version-compatible"], "only applies to --backend tensorrt"),
    (["--target", "cpu", "--opt-batch", "2"], "only applies to --backend tensorrt"),
    (["--target", "a100", *TRT, "--bf16"], "--bf16 with --backend onnxruntime"),
])
def test_bad_tensorrt_requests_exit_2(args, needle, capsys):
    """In-process through the CLI's entry point (the subprocess path is covered below)."""
    from leptonc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["compile", "tiny-llama", *args, "--dry-run", "--json"])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err and needle in " ".join(err.split()), err


@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here: --backend auto picks it")
def test_tensorrt_options_when_auto_picks_onnxruntime_exit_2(capsys):
    """Without TensorRT, --backend auto builds a GPU target on ONNX Runtime: its TensorRT-only options are
    refused, saying why that backend was chosen, not silently dropped."""
    from leptonc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["compile", "tiny-llama", "--target", "h100", "--opt-batch", "4", "--timing-cache", "tc", "--dry-run"])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2, err
    assert "--opt-batch, --timing-cache only apply to --backend tensorrt" in err
    assert "--backend auto: TensorRT is not installed" in err and "pass --backend tensorrt" in err


def test_bad_tensorrt_request_in_a_subprocess_exits_2():
    proc = run_cli("compile", "tiny-llama", "--target", "t4", "--backend", "tensorrt", "--sparsity", "2:4", "--dry-run",
                   "--json", timeout=300)
    assert_clean_error(proc, 2)
    assert "2:4 sparse tensor cores need sm80+" in " ".join(proc.stderr.split())


@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here: the compile would not stop at exit 5")
def test_compile_without_tensorrt_exits_5(tmp_path):
    out = tmp_path / "tiny.h100.lepton"
    proc = run_cli("compile", "tiny-llama", "--target", "h100", "--backend", "tensorrt", "-o", out, timeout=300)
    assert_clean_error(proc, 5)
    text = " ".join(proc.stderr.split())
    assert "TensorRT is not available here" in text and "--backend onnxruntime" in text and "pip install tensorrt" in text
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_build_gpu_must_match_the_target_unless_hardware_compatible():
    h100, a100, t4 = TARGETS["h100"], TARGETS["a100"], TARGETS["t4"]
    trt_backend.check_build_gpu(h100, None, (9, 0))  # same compute capability: fine
    with pytest.raises(BackendUnavailableError, match="no NVIDIA GPU"):
        trt_backend.check_build_gpu(h100, None, None)
    with pytest.raises(UnsupportedRequestError, match="this GPU is sm80 but target h100 is sm90") as exc:
        trt_backend.check_build_gpu(h100, None, (8, 0))
    assert "--hardware-compat ampere+" in exc.value.hint
    trt_backend.check_build_gpu(a100, "ampere+", (9, 0))  # Hopper builds an Ampere+ engine for an A100
    with pytest.raises(UnsupportedRequestError, match="same-cc only makes the engine portable"):
        trt_backend.check_build_gpu(a100, "same-cc", (9, 0))
    with pytest.raises(UnsupportedRequestError, match="Ampere or newer GPU on both sides"):
        trt_backend.check_build_gpu(t4, "ampere+", (9, 0))


def test_engine_from_another_tensorrt_version_is_refused_naming_both():
    assert trt_backend.compare_engine_versions("10.13.3.9", "10.13.3.9", False) is None
    reason = trt_backend.compare_engine_versions("10.13.3.9", "10.14.1.48", False)
    assert "10.13.3.9" in reason and "10.14.1.48" in reason and "exact version" in reason
    assert trt_backend.compare_engine_versions("10.13.3.9", "11.1.0.5", True) is None  # version-compatible: later ok
    reason = trt_backend.compare_engine_versions("11.1.0.5", "10.13.3.9", True)
    assert "11.1.0.5" in reason and "10.13.3.9" in reason


@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here")
def test_tensorrt_bundle_without_tensorrt_says_how_to_get_it():
    manifest = {"backend": "tensorrt", "engine": {"tensorrt_version": "10.13.3.9"}, "toolchain": {}}
    with pytest.raises(BackendUnavailableError, match="TensorRT 10.13.3.9 engine") as exc:
        trt_backend.check_engine_toolchain(manifest)
    assert "pip install tensorrt==10.13.3.9" in exc.value.hint
    with pytest.raises(BundleError, match="does not record the TensorRT version"):
        trt_backend.check_engine_toolchain({"backend": "tensorrt", "engine": {}, "toolchain": {}})


@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here")
def test_run_bare_plan_without_tensorrt_exits_5(tiny_bundle, tmp_path):
    plan_file = tmp_path / "engine.plan"
    plan_file.write_bytes(b"not an engine, and no TensorRT to read it anyway")
    proc = run_cli("run", plan_file, "--tokenizer", tiny_bundle / "tokenizer", "--prompt", "hi", timeout=300)
    assert_clean_error(proc, 5)
    assert "TensorRT runtime" in " ".join(proc.stderr.split())
