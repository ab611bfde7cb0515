"""End to end with TensorRT: build an engine for this machine's GPU, run it from the bundle and as a
bare .plan. These need the TensorRT builder and an NVIDIA GPU; where `import tensorrt` fails (every
machine of this project so far) they skip and say so."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


def _tensorrt_or_skip():
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or bindings that cannot load the TensorRT libraries
        pytest.skip(f"needs TensorRT: import tensorrt failed ({type(exc).__name__}: {exc})")
    return trt


def _local_target_or_skip():
    from leptonc.targets import TARGETS
    from leptonc.targets.backends.tensorrt import local_compute_capability

    cc = local_compute_capability()
    if cc is None:
        pytest.skip("needs an NVIDIA GPU visible to torch")
    for t in TARGETS.values():
        if t.compute_capability == cc:
            return t.name
    pytest.skip(f"no leptonc target has this GPU's compute capability {cc}")


pytestmark = pytest.mark.tensorrt


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    trt = _tensorrt_or_skip()
    target = _local_target_or_skip()
    root = tmp_path_factory.mktemp("trt")
    cache = root / "timing.cache"
    out = root / f"tiny.{target}.lepton"
    proc = run_cli("compile", "tiny-llama", "--target", target, "--fp16", "--max-batch", "4", "--max-seq", "256",
                   "--timing-cache", cache, "-o", out, "--json", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cache, trt, json.loads(proc.stdout)


def test_engine_bundle_records_profiles_io_and_versions(trt_bundle):
    out, cache, trt, result = trt_bundle
    m = result["manifest"]
    engine = m["engine"]
    assert m["backend"] == "tensorrt" and engine["format"] == "tensorrt-plan" and (out / engine["file"]).is_file()
    assert engine["tensorrt_version"] == trt.__version__
    assert [p["name"] for p in engine["profiles"]] == ["prefill", "decode"]
    io = {t["name"]: t for t in engine["engine_io"]}
    assert io["input_ids"]["profiles"][0][2] == [4, 256]  # prefill max
    assert io["input_ids"]["profiles"][1][2] == [4, 1]  # decode: one token
    assert io["logits"]["dtype"] == "FLOAT"
    assert m["verification"]["status"] == "passed"
    assert cache.is_file() and cache.stat().st_size > 0  # the timing cache was written


def test_engine_generates_from_bundle_and_bare_plan(trt_bundle):
    out, _, _, result = trt_bundle
    proc = run_cli("run", out, "--prompt", "The capital of France is", "-n", "8", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    bundled = json.loads(proc.stdout)["outputs"][0]["token_ids"]
    plan = out / result["manifest"]["engine"]["file"]
    proc = run_cli("run", plan, "--tokenizer", out / "tokenizer", "--prompt", "The capital of France is", "-n", "8",
                   "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outputs"][0]["token_ids"] == bundled


def test_engine_from_another_version_is_refused(trt_bundle):
    from leptonc.errors import BundleError
    from leptonc.targets.backends.tensorrt import check_engine_toolchain

    _, _, trt, result = trt_bundle
    manifest = dict(result["manifest"])
    check_engine_toolchain(manifest)  # the version that built it: accepted
    manifest["engine"] = {**manifest["engine"], "tensorrt_version": "9.0.0.1", "version_compatible": False}
    with pytest.raises(BundleError, match="9.0.0.1") as exc:
        check_engine_toolchain(manifest)
    assert trt.__version__ in str(exc.value)
