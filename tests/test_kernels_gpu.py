"""leptonc's CUDA kernels (targets/kernels/) on the GPU: each ai.leptonc op as one node on ONNX Runtime's CUDA provider,
against a float64 numpy reference, at every row count the throughput sweep uses (ROWS: batch 1 to 64).

Marked `gpu`: skipped, with the reason, where ONNX Runtime has no CUDA provider or the library cannot be built.
On the GPU machine (onnxruntime-gpu importable, nvcc for the library):

    python3 -m pytest tests/test_kernels_gpu.py -m gpu -q
    python3 -m pytest tests/test_kernels_gpu.py -m gpu -q --kernels-library libs/branch.so  # a build made before
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

ROWS = (1, 2, 4, 8, 16, 32, 64)  # the batch sizes of the throughput sweep: decode steps run this many rows
LIMIT = 5e-3  # products: relative max error; fp16 output rounding alone is ~5e-4
CUDA = [("CUDAExecutionProvider", {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"})]


@pytest.fixture(scope="module")
def ort():
    try:
        import onnxruntime
    except ImportError:
        pytest.skip("no CUDA device: onnxruntime is not installed")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDA device: onnxruntime CUDAExecutionProvider unavailable")
    if hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()
    return onnxruntime


@pytest.fixture(scope="module")
def library(ort, request) -> str:
    from leptonc.targets.kernels import KernelsUnavailable, build_library

    given = request.config.getoption("--kernels-library")
    if given:  # a build of other sources (a branch's, say), checked by the same tests
        assert Path(given).is_file(), f"--kernels-library {given} is not a file"
        return given
    try:
        return str(build_library((9, 0)).path)
    except KernelsUnavailable as exc:
        pytest.skip(f"leptonc's CUDA kernels cannot be built here: {exc}")


def _session(ort, library: str, nodes, inputs, outputs, inits=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "kernel", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.leptonc", 1)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=CUDA)


def _rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-9))


def _swiglu(ref: np.ndarray) -> np.ndarray:
    gate, up = np.split(ref, 2, axis=-1)
    return gate / (1.0 + np.exp(-gate)) * up


def _rms_norm(x: np.ndarray, skip: np.ndarray, gamma: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    total = x.astype(np.float64) + skip.astype(np.float64)
    return total / np.sqrt((total ** 2).mean(-1, keepdims=True) + eps) * gamma.astype(np.float64), total


# ---- MatMulNBitsTiled: int4 / int8 weights ------------------------------------------------------------------------

def _quantized(rng, k: int, n: int, bits: int, block: int, zero_points: bool):
    """MatMulNBits inputs (packed codes, scales, packed zero points or None) and the dequantized float64 weights [N, K]."""
    blocks = -(-k // block)
    codes = rng.integers(0, 2 ** bits, size=(n, blocks * block), dtype=np.uint8)
    packed = ((codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, blocks, block // 2) if bits == 4
              else codes.reshape(n, blocks, block)).astype(np.uint8)
    scales = (rng.random((n, blocks), dtype=np.float32) * 0.02 + 0.002).astype(np.float16)
    zeros = rng.integers(0, 2 ** bits, size=(n, blocks), dtype=np.uint8) if zero_points else None
    z = zeros.astype(np.float64) if zero_points else np.full((n, blocks), 2 ** (bits - 1), np.float64)
    w = ((codes.reshape(n, blocks, block) - z[..., None]) * scales.astype(np.float64)[..., None]).reshape(n, -1)[:, :k]
    if zero_points and bits == 4:
        zz = zeros if blocks % 2 == 0 else np.concatenate([zeros, np.full((n, 1), 8, np.uint8)], axis=1)
        zeros = (zz[:, 0::2] | (zz[:, 1::2] << 4)).astype(np.uint8)
    return packed, scales.reshape(-1), (zeros.reshape(-1) if zero_points else None), w


# MatMulNBitsTiled's row counts: the sweep's, with the paths' edges and part-filled row groups (1: tiled_gemv; up to
# 16: tiled_stream; 17-64: tiled_stream_groups, 4 groups of 8 rows up to 32, 8 above; 65 and more: dequantize and cuBLAS)
NBITS_ROWS = (1, 2, 4, 8, 16, 17, 24, 32, 33, 40, 48, 64, 65)

# (name, K, N, bits, block, zero points, SwiGLU epilogue): llama-1b-shape's decode products, smollm2's padded K,
# odd blocks, and int8 without zero points (scales alone, symmetric = 1) as the LM head is lowered
NBITS_CASES = [
    ("llama qkv int4", 2048, 3072, 4, 128, True, 0),
    ("llama gate|up int4 swiglu", 2048, 16384, 4, 128, True, 1),
    ("llama down int4", 8192, 2048, 4, 128, True, 0),
    ("smollm2 qkv int4 (K 576)", 576, 960, 4, 128, True, 0),
    ("block 32, odd blocks", 608, 200, 4, 32, True, 0),
    ("int8 with zero points", 1024, 520, 8, 128, True, 0),
    ("int8 symmetric", 2048, 4096, 8, 64, False, 0),
    ("int4 wide (4 tiles a warp)", 1024, 8192, 4, 64, True, 0),
    ("int8 symmetric, LM head width (8 warp columns, a part block)", 1024, 33288, 8, 128, False, 0),
    ("block 32 gate|up swiglu", 1024, 4096, 4, 32, True, 1),
]


@pytest.mark.parametrize("case", NBITS_CASES, ids=[c[0] for c in NBITS_CASES])
def test_matmul_nbits_tiled_matches_float64_at_every_batch(ort, library, case):
    from onnx import TensorProto, helper, numpy_helper

    from leptonc.targets.kernels.layout import interleave_gate_up, tile_nbits

    _, k, n, bits, block, zero_points, act = case
    rng = np.random.default_rng(0)
    packed, scales, zeros, w = _quantized(rng, k, n, bits, block, zero_points)
    if act:  # gate = rows 0..F-1, up = F..2F-1; the kernel takes them in (gate, up) pairs
        packed, scales, zeros = interleave_gate_up(packed, scales, zeros, n)
    symmetric = bits == 8 and zeros is None
    tiled, sz = tile_nbits(packed, scales, zeros, k, n, bits, block, scales_only=symmetric)
    node = helper.make_node("MatMulNBitsTiled", ["x", "b", "sz"], ["y"], domain="ai.leptonc", K=k, N=n, bits=bits,
                            block_size=block, **({"activation": 1} if act else {}),
                            **({"symmetric": 1} if symmetric else {}))
    out_n = n // 2 if act else n
    sess = _session(ort, library, [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["M", k])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["M", out_n])],
                    [numpy_helper.from_array(tiled, "b"), numpy_helper.from_array(sz, "sz")])
    for m in NBITS_ROWS:
        x = (rng.standard_normal((m, k)) * 0.5).astype(np.float16)
        ref = x.astype(np.float64) @ w.T
        y = sess.run(None, {"x": x})[0]
        err = _rel_err(y, _swiglu(ref) if act else ref)
        assert err <= LIMIT, f"M={m}: relative error {err:.2e}"
        # no order of addition that depends on timing: the same rows give the same bits (greedy decode relies on it)
        assert np.array_equal(sess.run(None, {"x": x})[0], y), f"M={m}: a second run gave other values"


# NormMatMulNBitsTiled as the lowering builds it in front of qkv and gate|up (NBITS_CASES' fields)
NORM_NBITS_CASES = [
    ("llama gate|up int4 swiglu", 2048, 16384, 4, 128, True, 1),
    ("llama qkv int4", 2048, 3072, 4, 128, True, 0),
    ("int8 symmetric", 1024, 2048, 8, 64, False, 0),
]


@pytest.mark.parametrize("case", NORM_NBITS_CASES, ids=[c[0] for c in NORM_NBITS_CASES])
def test_norm_matmul_nbits_tiled_matches_float64_at_every_batch(ort, library, case):
    """NormMatMulNBitsTiled: RMSNorm(x + skip) x gamma through the product, and the sum x + skip."""
    from onnx import TensorProto, helper, numpy_helper

    from leptonc.targets.kernels.layout import interleave_gate_up, tile_nbits

    _, k, n, bits, block, zero_points, act = case
    rng = np.random.default_rng(4)
    packed, scales, zeros, w = _quantized(rng, k, n, bits, block, zero_points)
    if act:
        packed, scales, zeros = interleave_gate_up(packed, scales, zeros, n)
    symmetric = bits == 8 and zeros is None
    tiled, sz = tile_nbits(packed, scales, zeros, k, n, bits, block, scales_only=symmetric)
    gamma = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
    node = helper.make_node("NormMatMulNBitsTiled", ["x", "skip", "gamma", "b", "sz"], ["y", "sum"],
                            domain="ai.leptonc", K=k, N=n, bits=bits, block_size=block, epsilon=1e-5,
                            **({"activation": 1} if act else {}), **({"symmetric": 1} if symmetric else {}))
    f16 = TensorProto.FLOAT16
    out_n = n // 2 if act else n
    inputs = [helper.make_tensor_value_info(name, f16, ["M", k]) for name in ("x", "skip")]
    outputs = [helper.make_tensor_value_info("y", f16, ["M", out_n]),
               helper.make_tensor_value_info("sum", f16, ["M", k])]
    inits = [numpy_helper.from_array(v, name) for v, name in ((gamma, "gamma"), (tiled, "b"), (sz, "sz"))]
    sess = _session(ort, library, [node], inputs, outputs, inits)
    for m in NBITS_ROWS:
        x = (rng.standard_normal((m, k)) * 0.5).astype(np.float16)
        skip = (rng.standard_normal((m, k)) * 0.5).astype(np.float16)
        a, total = _rms_norm(x, skip, gamma)
        y, got_sum = sess.run(None, {"x": x, "skip": skip})
        ref = a @ w.T
        err = _rel_err(y, _swiglu(ref) if act else ref)
        assert err <= LIMIT, f"M={m}: relative error {err:.2e}"
        np.testing.assert_allclose(got_sum.astype(np.float64), total, atol=4e-3, rtol=1e-3)


# ---- MatMulF16 and NormMatMulF16: fp16 weights -------------------------------------------------------------------

F16_CASES = [("llama qkv", 2048, 3072, 0), ("llama gate|up swiglu", 2048, 16384, 1), ("smollm2 down", 1536, 576, 0)]


@pytest.mark.parametrize("norm", [False, True], ids=["MatMulF16", "NormMatMulF16"])
@pytest.mark.parametrize("case", F16_CASES, ids=[c[0] for c in F16_CASES])
def test_matmul_f16_matches_float64_at_every_batch(ort, library, case, norm):
    from onnx import TensorProto, helper, numpy_helper

    _, k, n, act = case
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float16)
    gamma = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
    f16 = TensorProto.FLOAT16
    out_n = n // 2 if act else n
    inputs = [helper.make_tensor_value_info("x", f16, ["M", k])]
    outputs = [helper.make_tensor_value_info("y", f16, ["M", out_n])]
    # gate = rows 0..F-1, up = F..2F-1 (the reference's halves); the kernel takes them in (gate, up) pairs
    w_kernel = np.stack([w[: n // 2], w[n // 2:]], axis=1).reshape(n, k) if act else w
    inits = [numpy_helper.from_array(w_kernel, "w")]
    if norm:
        inputs.append(helper.make_tensor_value_info("skip", f16, ["M", k]))
        outputs.append(helper.make_tensor_value_info("sum", f16, ["M", k]))
        inits.append(numpy_helper.from_array(gamma, "gamma"))
        node = helper.make_node("NormMatMulF16", ["x", "skip", "gamma", "w"], ["y", "sum"], domain="ai.leptonc",
                                K=k, N=n, activation=act, epsilon=1e-5)
    else:
        node = helper.make_node("MatMulF16", ["x", "w"], ["y"], domain="ai.leptonc", K=k, N=n, activation=act)
    sess = _session(ort, library, [node], inputs, outputs, inits)
    for m in ROWS:
        x = (rng.standard_normal((m, k)) * 0.5).astype(np.float16)
        feeds = {"x": x}
        a = x.astype(np.float64)
        if norm:
            feeds["skip"] = skip = (rng.standard_normal((m, k)) * 0.5).astype(np.float16)
            a, total = _rms_norm(x, skip, gamma)
        got = sess.run(None, feeds)
        ref = a @ w.astype(np.float64).T
        err = _rel_err(got[0], _swiglu(ref) if act else ref)
        assert err <= LIMIT, f"M={m}: relative error {err:.2e}"
        if norm:  # the residual sum is fp16(x + skip), as ONNX Runtime's SkipSimplifiedLayerNormalization gives it
            np.testing.assert_allclose(got[1].astype(np.float64), total, atol=4e-3, rtol=1e-3)


# ---- CachedAttention ---------------------------------------------------------------------------------------------

def _attention_sessions(ort, library: str, h: int, kvh: int, d: int, cos, sin):
    import onnx_graphsurgeon as gs
    from attention_reference import gqa_graph

    from leptonc.passes import PassContext
    from leptonc.passes.use_kernels import use_leptonc_kernels

    graph = gqa_graph(h, kvh, d, cos, sin)
    result = use_leptonc_kernels(graph, PassContext(backend="onnxruntime", precision="fp16",
                                                    kernel_library={"file": "libleptonc_cuda.so", "arch": "sm_90"}))
    assert result.applied and graph.nodes[0].op == "CachedAttention", result.detail
    model = gs.export_onnx(graph)
    model.ir_version = 8
    so = ort.SessionOptions()
    so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=CUDA)


@pytest.mark.parametrize("heads, batch", [((32, 8, 64), b) for b in ROWS] + [((9, 3, 64), 2), ((32, 8, 128), 2)],
                         ids=[f"llama-b{b}" for b in ROWS] + ["9:3 heads-b2", "head 128-b2"])
def test_cached_attention_prefill_and_decode_match_the_reference(ort, library, heads, batch):
    """A right-padded prefill of rows of different lengths, then decode steps, with past and present bound to one
    device buffer as the runner binds them; output and cache against tests/attention_reference.py."""
    from attention_reference import cached_attention

    h, kvh, d = heads
    cap, s = 64, 16
    inv = 500000.0 ** (-np.arange(0, d, 2) / d)
    ang = np.arange(2048)[:, None] * inv[None, :]
    cos, sin = np.cos(ang).astype(np.float16), np.sin(ang).astype(np.float16)
    sess = _attention_sessions(ort, library, h, kvh, d, cos, sin)
    rng = np.random.default_rng(7)
    caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, kvh, cap, d), np.float16), "cuda", 0) for _ in range(2)]
    ref_k = ref_v = np.zeros((batch, kvh, cap, d))
    lengths = rng.integers(1, s + 1, size=batch)
    lengths[0] = s
    steps = [(rng.standard_normal((batch, s, (h + 2 * kvh) * d)).astype(np.float16), lengths - 1, s)]
    steps += [(rng.standard_normal((batch, 1, (h + 2 * kvh) * d)).astype(np.float16), lengths + i, cap)
              for i in range(3)]
    for i, (qkv, seqlens, total) in enumerate(steps):
        bind = sess.io_binding()
        bind.bind_ortvalue_input("qkv", ort.OrtValue.ortvalue_from_numpy(qkv, "cuda", 0))
        bind.bind_output("attn", "cuda", 0)
        for kind, value in zip(("key", "value"), caches):  # past and present: one buffer
            shape, ptr = [batch, kvh, cap, d], value.data_ptr()
            bind.bind_input(f"past_key_values.0.{kind}", "cuda", 0, np.float16, shape, ptr)
            bind.bind_output(f"present.0.{kind}", "cuda", 0, np.float16, shape, ptr)
        bind.bind_ortvalue_input("gqa/seqlens_k", ort.OrtValue.ortvalue_from_numpy(seqlens.astype(np.int32), "cuda", 0))
        bind.bind_cpu_input("gqa/total_sequence_length", np.array(total, np.int32))
        sess.run_with_iobinding(bind)
        out = bind.get_outputs()[0].numpy().astype(np.float64)
        ref_out, ref_k, ref_v = cached_attention(qkv, ref_k, ref_v, seqlens, total, cos, sin, num_heads=h,
                                                 kv_num_heads=kvh)
        k_ours, v_ours = (c.numpy().astype(np.float64) for c in caches)
        for row in range(batch):
            real, end = (int(lengths[row]) if i == 0 else 1), int(seqlens[row]) + 1
            step = "prefill" if i == 0 else f"decode {i}"
            assert np.abs(out[row, :real] - ref_out[row, :real]).max() < 2e-2, (step, row)
            assert np.abs(k_ours[row, :, :end] - ref_k[row, :, :end]).max() < 4e-3, (step, row)
            assert np.abs(v_ours[row, :, :end] - ref_v[row, :, :end]).max() < 4e-3, (step, row)
        ref_k, ref_v = k_ours.copy(), v_ours.copy()  # the reference continues from our cache (padding included)


# ---- the decode step's two ends: LogitsArgMax and MaskLengths ----------------------------------------------------

@pytest.mark.parametrize("vocab", [128256, 49152, 1001])  # llama's, smollm2's, and one off the vector path
def test_logits_argmax_gives_the_exact_logits_and_the_first_maximum(ort, library, vocab):
    from onnx import TensorProto, helper

    node = helper.make_node("LogitsArgMax", ["x", "logits_positions"], ["logits", "next_token"], domain="ai.leptonc")
    sess = _session(ort, library, [node],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["rows", vocab]),
                     helper.make_tensor_value_info("logits_positions", TensorProto.INT64, ["batch", "k"])],
                    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "k", vocab]),
                     helper.make_tensor_value_info("next_token", TensorProto.INT64, ["batch", "k"])])
    rng = np.random.default_rng(20)
    for b in ROWS:
        x = (rng.standard_normal((b, vocab)) * 3).astype(np.float16)
        x[0, [5, vocab - 3]] = np.float16(60.0)  # a tie: the lower index wins
        logits, token = sess.run(None, {"x": x, "logits_positions": np.zeros((b, 1), np.int64)})
        np.testing.assert_array_equal(logits.reshape(b, vocab), x.astype(np.float32))
        np.testing.assert_array_equal(token.reshape(b), np.argmax(x.astype(np.float32), axis=-1))


def test_mask_lengths_is_each_rows_count_less_one(ort, library):
    from onnx import TensorProto, helper

    node = helper.make_node("MaskLengths", ["attention_mask"], ["seqlens_k"], domain="ai.leptonc")
    sess = _session(ort, library, [node], [helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                                         ["batch", "total"])],
                    [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"])])
    rng = np.random.default_rng(3)
    for b in ROWS:
        for total in (1, 37, 4096):
            mask = (rng.random((b, total)) < 0.7).astype(np.int64)
            mask[:, 0] = 1
            got = sess.run(None, {"attention_mask": mask})[0]
            np.testing.assert_array_equal(got, (mask.sum(1) - 1).astype(np.int32))
