"""GPU bundles out of the box on a machine without a GPU: --backend auto, cross-compiling an h100 bundle with
leptonc's sm_90 kernel library, and the GPU check's decision logic (what a GPU runs at first load)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leptonc import gpu_check
from leptonc.bundle import load_bundle
from leptonc.targets import kernels
from leptonc.targets.backends.selection import choose_backend, tensorrt_builder_missing
from leptonc.targets import get_target

needs_nvcc = pytest.mark.skipif(kernels.find_nvcc() is None, reason='needs nvcc (pip install "leptonc[nvcc]")')
no_tensorrt = pytest.mark.skipif(tensorrt_builder_missing() is None, reason="TensorRT's builder is installed here")


def _cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _compile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leptonc", "compile", *args], capture_output=True, text=True,
                          timeout=1200)


def test_auto_prefers_tensorrt_only_where_its_builder_imports(monkeypatch):
    from leptonc.targets.backends import selection

    h100, cpu = get_target("h100"), get_target("cpu")
    monkeypatch.setattr(selection, "tensorrt_builder_missing", lambda: None)
    assert choose_backend(h100, None).backend == "tensorrt"
    monkeypatch.setattr(selection, "tensorrt_builder_missing", lambda: "TensorRT is not installed")
    choice = choose_backend(h100, "auto")
    assert choice.backend == "onnxruntime" and "TensorRT is not installed" in choice.reason
    assert choose_backend(cpu, None).backend == "onnxruntime"
    assert choose_backend(h100, "tensorrt").backend == "tensorrt"  # named: used as asked (its preflight exits 5)


@no_tensorrt
@needs_nvcc
def test_a100_int8_compiles_with_the_default_backend(tmp_path):
    proc = _compile("tiny-llama", "--target", "a100", "--int8", "-o", str(tmp_path / "a100.lepton"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "TensorRT is not installed" in said and "chose ONNX Runtime" in said
    manifest = json.loads((tmp_path / "a100.lepton" / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and "TensorRT is not installed" in manifest["backend_choice"]
    assert manifest["config"]["backend_choice"] == manifest["backend_choice"]
    # the fp16 graph's Q/DQ (fp16 scales, opset 19) load on ONNX Runtime's CPU provider: the accuracy gate and
    # the verification ran here on the graph before use_leptonc_kernels, not deferred to a GPU
    verification = manifest["verification"]
    assert verification["accuracy_gate"]["status"] == "passed", verification["accuracy_gate"]
    assert verification["status"] != "pending_gpu" and verification["scope"].startswith("cpu: the graph before")
    assert "pending_gpu" not in said and "cannot run it" not in said


@no_tensorrt
def test_explicit_tensorrt_without_it_exits_5(tmp_path):
    proc = _compile("tiny-llama", "--target", "h100", "--backend", "tensorrt", "-o", str(tmp_path / "x.lepton"))
    assert proc.returncode == 5, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def h100_bundle(tmp_path_factory) -> Path:
    if kernels.find_nvcc() is None:
        pytest.skip('needs nvcc (pip install "leptonc[nvcc]")')
    out = tmp_path_factory.mktemp("gpu") / "tiny.h100.lepton"
    proc = _compile("tiny-llama", "--target", "h100", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_h100_cross_compile_ships_the_sm90_library(h100_bundle):
    bundle = load_bundle(h100_bundle)  # every file hashed, the kernel library and the GPU reference included
    engine = bundle.engine
    assert engine["kernels"]["arch"] == "sm_90" and engine["session"]["custom_ops_library"] == engine["kernels"]["file"]
    assert engine["kernels"]["ort_header"] == "leptonc declarations"
    assert engine["kernels"]["file"] in bundle.manifest["files"] and gpu_check.REFERENCE_FILE in bundle.manifest["files"]
    verification = bundle.manifest["verification"]
    assert verification["status"] == "passed" and verification["scope"].startswith("cpu: the graph before use_leptonc")
    assert [c["name"] for c in gpu_check.pending_checks(bundle.manifest)] == ["gpu_parity"]


def test_serve_runs_the_engine_of_a_cuda_bundle_in_its_own_process_unless_told(h100_bundle, tiny_bundle, tmp_path):
    from leptonc.server.cli import engine_apart_by_default

    # the manifest's session provider decides, --device overrides it; --engine-process/--engine-in-server set it
    assert engine_apart_by_default(str(h100_bundle), None) is True
    assert engine_apart_by_default(str(h100_bundle), "cpu") is False
    assert engine_apart_by_default(str(tiny_bundle), None) is False
    assert engine_apart_by_default(str(tiny_bundle), "cuda") is True
    # an unreadable bundle is loaded in the server's process, which reports what is wrong with it
    assert engine_apart_by_default(str(tmp_path / "missing.lepton"), None) is False


@pytest.mark.skipif(_cuda_provider(), reason="this onnxruntime has the CUDA provider: the bundle would be served")
@pytest.mark.parametrize("where", [(), ("--engine-in-server",)], ids=["engine-process-by-default", "engine-in-server"])
def test_serving_a_cuda_bundle_without_the_cuda_provider_exits_5_with_the_next_step(h100_bundle, where):
    # by default the engine's own process loads the bundle and the server reports its error, as the server's process does
    proc = subprocess.run([sys.executable, "-m", "leptonc", "serve", str(h100_bundle), "--port", "0", *where],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "lacks" in proc.stderr and "next step: pip uninstall -y onnxruntime" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


class ReplayRunner:
    """Not a GPU: a runner that answers with given logits rows, to test what the check decides from them."""

    def __init__(self, rows: list[np.ndarray]):
        self.rows, self.calls = rows, 0

    def _take(self, n: int) -> np.ndarray:
        out = np.stack(self.rows[self.calls:self.calls + n])
        self.calls += n
        return out

    def prefill(self, ids, mask):
        return self._take(ids.shape[1])[None]

    def decode(self, tokens):
        return self._take(1)


def _rows(reference: dict, vocab: int, agree: bool) -> list[np.ndarray]:
    rows = []
    for ids, vals in zip(reference["top_ids"], reference["top_logits"]):
        row = np.full(vocab, -1e4, np.float32)
        row[ids] = vals
        if not agree:
            row[(ids[0] + 1) % vocab] = vals[0] + 10.0
        rows.append(row)
    return rows


def test_gpu_check_records_a_pass_and_refuses_a_failure_with_exit_6(h100_bundle, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("LEPTONC_CACHE", str(tmp_path / "cache"))
    bundle = load_bundle(h100_bundle)
    reference = json.loads((bundle.path / gpu_check.REFERENCE_FILE).read_text())
    vocab = bundle.manifest["model"].get("vocab_size") or 1 + max(max(t) for t in reference["top_ids"])

    good = ReplayRunner(_rows(reference, vocab, agree=True))
    result = gpu_check.ensure_checked(bundle, "test-gpu", good)
    assert result["status"] == "passed" and (bundle.path / gpu_check.SIDECAR).is_file()
    assert load_bundle(h100_bundle).path  # the sidecar is outside the hashed set: the bundle still loads verified
    again = ReplayRunner([])
    assert gpu_check.ensure_checked(bundle, "test-gpu", again)["status"] == "passed" and again.calls == 0

    failing = tmp_path / "failing.lepton"
    shutil.copytree(h100_bundle, failing)
    (failing / gpu_check.SIDECAR).unlink()
    broken = load_bundle(failing)
    with pytest.raises(gpu_check.GpuCheckFailed, match="gpu_parity") as err:
        gpu_check.ensure_checked(broken, "test-gpu", ReplayRunner(_rows(reference, vocab, agree=False)))
    assert err.value.exit_code == 6 and "--no-verify" in err.value.hint
    with pytest.raises(gpu_check.GpuCheckFailed):  # recorded: refused again without running
        gpu_check.ensure_checked(broken, "test-gpu", ReplayRunner([]))
    assert gpu_check.recorded_result(failing, "other-gpu") is None  # per GPU


def test_no_verify_skips_the_gpu_check(h100_bundle):
    bundle = load_bundle(h100_bundle, verify=False)
    assert bundle.verified is False  # open_bundle_runner runs the GPU check only for verified loads


def test_toolchain_check_compares_the_runtime_that_runs_the_graph(monkeypatch):
    """A GPU bundle cross-compiled on a CPU machine records that machine's CPU onnxruntime, which never runs it: the
    GPU machine's onnxruntime-gpu (here an older minor) must accept it, while a bundle built by a newer
    onnxruntime-gpu, or a CPU bundle built by a newer onnxruntime, is refused with exit 7."""
    from leptonc import bundle
    from leptonc.errors import BundleError

    monkeypatch.setattr(bundle, "_runtime_version", lambda: "1.31.1")
    h100 = {"backend": "onnxruntime", "target": {"name": "h100"}}
    bundle.check_toolchain({**h100, "toolchain": {"onnxruntime": "1.32.0"}})  # cross-compiled: accepted
    bundle.check_toolchain({**h100, "toolchain": {"onnxruntime-gpu": "1.31.0"}})
    for manifest in ({**h100, "toolchain": {"onnxruntime-gpu": "1.32.0"}},
                     {"backend": "onnxruntime", "target": {"name": "cpu"}, "toolchain": {"onnxruntime": "1.32.0"}}):
        with pytest.raises(BundleError) as err:
            bundle.check_toolchain(manifest)
        assert err.value.exit_code == 7 and "1.32.0" in str(err.value)
