"""leptonc's CUDA kernel library (targets/kernels/) and the pass that lowers MatMulNBits to it.

The kernels themselves run only on a GPU: their numerics and speed are checked on the device by
bench/device_kernels.py (BENCHMARKS.md). Here: the lowering rule, the build's preconditions and messages,
and, where nvcc and the ONNX Runtime header are present, that the library builds and registers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from leptonc.errors import InputError
from leptonc.passes import PassContext
from leptonc.passes.use_kernels import use_leptonc_kernels
from leptonc.targets import kernels


def _nbits_graph(dtype=np.float16, bits=4, block=128, extra_inputs=0) -> gs.Graph:
    k, n = 256, 64
    x = gs.Variable("x", dtype=dtype, shape=[1, 3, k])
    y = gs.Variable("y", dtype=dtype, shape=[1, 3, n])
    blocks = k // block
    inputs = [x, gs.Constant("b", np.zeros((n, blocks, block * bits // 8), np.uint8)),
              gs.Constant("s", np.ones(n * blocks, dtype))]
    if bits == 4:
        inputs.append(gs.Constant("z", np.full(n * ((blocks + 1) // 2), 0x88, np.uint8)))
    inputs += [gs.Constant(f"extra{i}", np.zeros(n, dtype)) for i in range(extra_inputs)]
    node = gs.Node("MatMulNBits", "mm", domain="com.microsoft",
                   attrs={"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 4},
                   inputs=inputs, outputs=[y])
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=17)


def _ctx(**kernel_info) -> PassContext:
    return PassContext(backend="onnxruntime", precision="int4", options={"cuda_kernels": kernel_info})


def test_lowering_moves_fp16_matmulnbits_to_the_leptonc_domain():
    graph = _nbits_graph()
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.applied and result.counts == {"lowered": 1, "left_alone": 0}
    node = graph.nodes[0]
    assert node.domain == "ai.leptonc" and node.op == "MatMulNBits"
    assert "accuracy_level" not in node.attrs and node.attrs["bits"] == 4 and node.attrs["block_size"] == 128
    model = gs.export_onnx(graph)  # the exporter declares the new domain
    assert {o.domain for o in model.opset_import} >= {"", "ai.leptonc"}


@pytest.mark.parametrize("graph, why", [
    (lambda: _nbits_graph(dtype=np.float32), "activations are not fp16"),
    (lambda: _nbits_graph(bits=4, block=128, extra_inputs=2), "g_idx or bias input"),
])
def test_lowering_leaves_what_the_kernel_cannot_run(graph, why):
    g = graph()
    result = use_leptonc_kernels(g, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert not result.applied and why in result.detail
    assert g.nodes[0].domain == "com.microsoft"


def test_lowering_is_skipped_with_the_build_reason():
    g = _nbits_graph()
    result = use_leptonc_kernels(g, _ctx(unavailable="nvcc was not found"))
    assert not result.applied and "nvcc was not found" in result.detail and "ONNX Runtime's kernel" in result.detail
    assert g.nodes[0].domain == "com.microsoft"


def test_gpu_pipeline_lowers_only_when_asked(monkeypatch):
    from leptonc.targets import get_target
    from leptonc.targets import onnxruntime as ort_backend

    h100, cpu = get_target("h100"), get_target("cpu")
    monkeypatch.delenv("LEPTONC_CUDA_KERNELS", raising=False)
    assert "use_leptonc_kernels" not in ort_backend.pipeline(h100, "int4")
    monkeypatch.setenv("LEPTONC_CUDA_KERNELS", "1")
    assert ort_backend.pipeline(h100, "int4")[-1] == "use_leptonc_kernels"  # last: after quantize_int4
    assert "use_leptonc_kernels" not in ort_backend.pipeline(cpu, "int4")


def test_arch_for_compute_capability():
    assert kernels.arch_for((9, 0)) == "sm_90" and kernels.arch_for("8.6") == "sm_86"
    with pytest.raises(kernels.KernelsUnavailable, match="sm_70"):
        kernels.arch_for((6, 1))


def test_build_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "find_nvcc", lambda: None)
    with pytest.raises(kernels.KernelsUnavailable, match="nvcc was not found"):
        kernels.build_library((9, 0), cache_dir=tmp_path)
    monkeypatch.setattr(kernels, "find_nvcc", lambda: Path("/usr/bin/true"))
    monkeypatch.delenv("LEPTONC_ORT_INCLUDE", raising=False)
    with pytest.raises(kernels.KernelsUnavailable, match="LEPTONC_ORT_INCLUDE"):
        kernels.build_library((9, 0), cache_dir=tmp_path)


def test_cpu_runner_refuses_a_bundle_with_cuda_kernels(tmp_path):
    from leptonc.runtime.ort_cuda import OrtCudaRunner

    io = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "kv_dtype": "float16", "vocab_size": 10}
    model = tmp_path / "model.onnx"
    onnx.save(gs.export_onnx(_nbits_graph()), model)
    with pytest.raises(InputError, match="CUDA provider"):
        OrtCudaRunner(model, io, {"custom_ops_library": "kernels/libleptonc_cuda.so"}, device_type="cpu")


@pytest.mark.skipif(kernels.find_nvcc() is None or kernels.find_ort_include() is None,
                    reason="needs nvcc and LEPTONC_ORT_INCLUDE (the ONNX Runtime C API header) to build the library")
def test_library_builds_and_registers(tmp_path):
    import onnxruntime as ort

    lib = kernels.build_library((9, 0), cache_dir=tmp_path)
    assert lib.path.is_file() and lib.arch == "sm_90" and lib.ort_api_version > 0
    again = kernels.build_library((9, 0), cache_dir=tmp_path)  # cached: same file, not rebuilt
    assert again.path == lib.path and again.path.stat().st_mtime == lib.path.stat().st_mtime
    so = ort.SessionOptions()
    try:
        so.register_custom_ops_library(str(lib.path))
    except Exception as exc:  # noqa: BLE001 - only a missing CUDA runtime library here is a skip
        if "libcublas" not in str(exc):
            raise
        pytest.skip(f"the library builds; loading it needs cuBLAS on LD_LIBRARY_PATH: {exc}")
