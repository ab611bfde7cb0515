"""Shared fixtures: bundles compiled once per test session, the reference HF model, a CLI runner.

`tiny-llama` (random, 2 layers) is for speed; `smollm2-135m` (real weights) is for truth.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
LEPTONC = [sys.executable, "-m", "leptonc"]


def pytest_addoption(parser):
    parser.addoption("--kernels-library", default="",
                     help="the GPU kernel tests run this libleptonc_cuda.so, built before "
                          "(bench/kernels_gpu.py build), instead of building this tree's")


def run_cli(*args: str, timeout: float = 900, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `leptonc ARGS` in a subprocess, capturing text output."""
    return subprocess.run([*LEPTONC, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


def assert_clean_error(proc: subprocess.CompletedProcess, code: int) -> None:
    """A user error: the documented exit code, a message, and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert "error" in proc.stderr.lower() or "usage" in proc.stderr.lower(), proc.stderr


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny.cpu.lepton"
    compile_model(CompileConfig(source="tiny-llama", target="cpu", output=str(out)))
    return out


@pytest.fixture(scope="session")
def right_padded_bundle(tmp_path_factory) -> Path:
    """tiny-llama with the GPU targets' attention contract (lengths from the mask's contents, right padding:
    what CUDA bundles are served with), run here on ONNX Runtime's CPU provider."""
    import leptonc.passes.fuse_gqa as fuse_gqa
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny.right-padded.lepton"
    with pytest.MonkeyPatch.context() as patch:  # the contract a GPU target picks, forced on a CPU compile
        patch.setattr(fuse_gqa, "lengths_contract", lambda ctx: "mask_sum")
        compile_model(CompileConfig(source="tiny-llama", target="cpu", output=str(out)))
    return out


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory) -> Path:
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    out = tmp_path_factory.mktemp("bundles") / "smollm2.cpu.lepton"
    compile_model(CompileConfig(source="smollm2-135m", target="cpu", output=str(out)))
    return out


@pytest.fixture(scope="session")
def smollm2_hf():
    """The reference: SmolLM2-135M in Hugging Face transformers (fp32), with its tokenizer."""
    from leptonc.models.intake import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not WIKITEXT.is_file():
        pytest.fail(f"{WIKITEXT} is missing: CI runs with ../shared beside the repository")
    return WIKITEXT


class HostMemoryDriver:
    """cuda_driver.CudaDriver's calls on host memory, done at once: ONNX Runtime's CPU provider keeps its buffers
    there, so the GPU's pipelined steps and queued prefills run on the CPU with their real bookkeeping. Copies are
    counted."""

    def __init__(self):
        self.copies = 0

    def make_current(self):
        pass

    def pinned(self, count, dtype=None):
        import numpy as np

        return np.zeros(count, dtype or np.int64)

    def copy(self, dst, src, nbytes, stream):
        import ctypes

        ctypes.memmove(dst, src, nbytes)
        self.copies += 1

    def event(self):
        return 0

    def record(self, event, stream):
        pass

    def wait(self, event):
        pass

    def sync(self, stream):
        pass

    def free_pinned(self, array):
        pass

    def destroy_event(self, event):
        pass

    def destroy_stream(self, stream):
        pass
