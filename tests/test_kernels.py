"""leptonc's CUDA kernel library (targets/kernels/) and the pass that lowers MatMulNBits to it.

The kernels themselves run only on a GPU: their numerics and speed are checked on the device by
tests/test_kernels_gpu.py (the `gpu` marker). Here: the lowering rule, the build's preconditions and messages,
and, where nvcc and the ONNX Runtime header are present, that the library builds and registers."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from leptonc.config import KernelOptions
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


def _ctx(norm_prologue=False, norm_prologue_nbits=False, **kernel_info) -> PassContext:
    return PassContext(backend="onnxruntime", precision="int4", kernel_library=kernel_info,
                       kernels=KernelOptions(norm_prologue=norm_prologue, norm_prologue_nbits=norm_prologue_nbits))


def test_lowering_moves_fp16_matmulnbits_to_the_leptonc_domain():
    graph = _nbits_graph()
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.applied and result.counts == {"lowered": 1, "left_alone": 0, "swiglu": 0, "nbits_norm": 0, "f16": 0,
                                               "f16_swiglu": 0, "f16_norm": 0, "swiglu_op": 0, "attention": 0,
                                               "mask_lengths": 0, "logits_argmax": 0}
    node = graph.nodes[0]
    assert node.domain == "ai.leptonc" and node.op == "MatMulNBitsTiled"
    assert node.attrs == {"K": 256, "N": 64, "bits": 4, "block_size": 128}  # no accuracy_level (ORT's CPU setting)
    b, sz = node.inputs[1].values, node.inputs[2].values
    assert b.dtype == np.uint8 and b.shape == (8, 2, 32, 16)  # 8 tiles of 8 columns, 2 steps of 128
    assert sz.dtype == np.float16 and sz.shape == (8, 2, 8, 2)
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


def _quantized(rng, k, n, bits, block, zp):
    """Random MatMulNBits inputs and the float64 weight they stand for."""
    blocks = -(-k // block)
    codes = rng.integers(0, 2 ** bits, size=(n, blocks * block), dtype=np.uint8)
    b = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8) if bits == 4 else codes
    scales = (rng.random((n, blocks)) * 0.02 + 0.002).astype(np.float16)
    zeros = rng.integers(0, 2 ** bits, size=(n, blocks), dtype=np.uint8) if zp else None
    z = zeros.astype(np.float64) if zp else np.full((n, blocks), 2 ** (bits - 1), np.float64)
    w = ((codes.reshape(n, blocks, block) - z[..., None]) * scales.astype(np.float64)[..., None]).reshape(n, -1)[:, :k]
    if zp and bits == 4:
        zz = np.concatenate([zeros, np.zeros((n, blocks % 2), np.uint8)], axis=1)
        zeros = (zz[:, 0::2] | (zz[:, 1::2] << 4)).astype(np.uint8)
    return b.reshape(n, blocks, -1), scales.reshape(-1), zeros, w


def _kernel_weights(tiled, sz, k, n, bits, block):
    """What the CUDA kernel's lanes compute from the tiled layout, step by step as leptonc_cuda.cu does it
    (the words' bit fields, the 0x6400 exponent trick, the exact fp16 subtraction, the fp32 scale), placed
    where the mma.m16n8k16 B fragment says each lane's registers sit (lane 4g + t: column g, slots 2t,
    2t+1 in b0 and 2t+8, 2t+9 in b1 of each product) and at the k the kernel's A loads give those slots:
    32 (c // 2) + 8t + 4 (c % 2) + slot order 0..3 within the step."""
    words = tiled.view("<u4").reshape(tiled.shape[0], tiled.shape[1], 32, 4)
    step_k = 128 if bits == 4 else 64
    n_tiles, steps = words.shape[:2]
    w = np.zeros((n_tiles * 8, steps * step_k), np.float32)
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4

    def halves(u):  # a 32-bit register read as two fp16
        return np.ascontiguousarray(u.astype("<u4")).view(np.float16).reshape(*u.shape, 2)

    for tile in range(n_tiles):
        for step in range(steps):
            for c in range(step_k // 16):
                if bits == 4:
                    word = words[tile, step, :, c // 2].astype(np.uint32)
                    q0 = ((word >> (8 * (c % 2))) & 0x000F000F) | 0x64006400
                    q1 = ((word >> (8 * (c % 2) + 4)) & 0x000F000F) | 0x64006400
                else:
                    word = words[tile, step, :, c].astype(np.uint32)
                    q0 = (word & 0xFF) | ((word >> 8) & 0xFF) << 16 | 0x64006400
                    q1 = ((word >> 16) & 0xFF) | (word >> 24) << 16 | 0x64006400
                k0 = step * step_k + 32 * (c // 2) + 8 * t + 4 * (c % 2)  # per lane
                blk = (step * step_k + 32 * (c // 2)) // block
                if sz.ndim == 3:  # scales alone (symmetric 8 bits): the kernel's zero half is 1152 = 1024 + 128
                    s, zz = sz[tile, blk, g].astype(np.float32), np.float16(1152.0)
                else:
                    s, zz = sz[tile, blk, g, 0].astype(np.float32), sz[tile, blk, g, 1]
                for regs, slots in ((halves(q0), (0, 1)), (halves(q1), (2, 3))):
                    for h, slot in enumerate(slots):
                        w[tile * 8 + g, k0 + slot] = (regs[:, h] - zz).astype(np.float32) * s
    return w[:n, :k]


@pytest.mark.parametrize("k, n, bits, block, zp", [
    (2048, 24, 4, 128, True),   # llama's K: whole steps and blocks
    (576, 20, 4, 128, True),    # smollm2's K: the last block and step padded; N not a whole tile
    (608, 16, 4, 32, True),     # several blocks a step; an odd block count
    (576, 8, 4, 64, False),     # no zero points: 8
    (2048, 8, 8, 64, False),    # the int8 LM head's layout
    (1024, 12, 8, 128, True),   # int8 with zero points, a block spanning two steps
])
def test_tiled_layout_gives_the_kernel_the_right_weights(k, n, bits, block, zp):
    from leptonc.targets.kernels.layout import tile_nbits

    b, scales, zeros, w = _quantized(np.random.default_rng(k + n + bits), k, n, bits, block, zp)
    tiled, sz = tile_nbits(b, scales, zeros, k, n, bits, block)
    got = _kernel_weights(tiled, sz, k, n, bits, block).astype(np.float64)
    # the kernel multiplies the exact integer q - z by the fp16 scale in fp32: exact up to fp32 rounding
    np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("k, n, block", [
    (2048, 24, 64),   # the int8 LM head's layout
    (600, 20, 32),    # K padded to a whole step (a block past MatMulNBits' last), N not a whole tile
    (1024, 12, 128),  # a block spanning two steps
])
def test_scales_only_layout_is_the_pairs_first_halves(k, n, block):
    """8 bits without zero points: SZ holds the scales alone, exactly the pairs' first halves (whose second halves
    are all 1024 + 128), and the kernel's view of the weights is bit for bit the pairs' and MatMulNBits' own."""
    from leptonc.targets.kernels.layout import tile_nbits

    b, scales, _, w = _quantized(np.random.default_rng(k + n), k, n, 8, block, False)
    tiled, pairs = tile_nbits(b, scales, None, k, n, 8, block)
    tiled_s, sz = tile_nbits(b, scales, None, k, n, 8, block, scales_only=True)
    np.testing.assert_array_equal(tiled_s, tiled)
    assert sz.dtype == np.float16 and sz.shape == pairs.shape[:-1] and sz.flags.c_contiguous
    np.testing.assert_array_equal(sz, pairs[..., 0])
    blocks = -(-k // block)
    real = pairs.transpose(0, 2, 1, 3).reshape(-1, pairs.shape[1], 2)[:n, :blocks]  # [column, block, pair]
    assert np.all(real[..., 1] == 1152.0)
    assert not sz.transpose(0, 2, 1).reshape(-1, sz.shape[1])[n:].any()  # padding columns: scale 0
    got = _kernel_weights(tiled_s, sz, k, n, 8, block)
    np.testing.assert_array_equal(got, _kernel_weights(tiled, pairs, k, n, 8, block))
    np.testing.assert_allclose(got.astype(np.float64), w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bits, zp", [(4, False), (4, True), (8, True)])
def test_scales_only_needs_8_bits_without_zero_points(bits, zp):
    from leptonc.targets.kernels.layout import tile_nbits

    b, scales, zeros, _ = _quantized(np.random.default_rng(3), 256, 16, bits, 64, zp)
    with pytest.raises(ValueError, match="scales_only needs 8 bits and no zero-point input"):
        tile_nbits(b, scales, zeros, 256, 16, bits, 64, scales_only=True)


def _nbits_node_graph(b, scales, zeros, k, n, bits, block) -> gs.Graph:
    """x -> MatMulNBits(B, scales[, zero points]) -> y."""
    x = gs.Variable("x", dtype=np.float16, shape=[1, 3, k])
    y = gs.Variable("y", dtype=np.float16, shape=[1, 3, n])
    inputs = [x, gs.Constant("b", b), gs.Constant("s", scales)] + ([gs.Constant("z", zeros)] if zeros is not None else [])
    node = gs.Node("MatMulNBits", "mm", domain="com.microsoft",
                   attrs={"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 4},
                   inputs=inputs, outputs=[y])
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=17)


@pytest.mark.parametrize("bits, block, zp, symmetric", [
    (8, 64, False, True),    # the int8 LM head: SZ the scales alone, symmetric = 1
    (8, 128, True, False),   # zero points given: pairs
    (4, 128, False, False),  # 4 bits: pairs, even without zero points
    (4, 128, True, False),
])
def test_lowering_stores_scales_alone_for_8_bits_without_zero_points(bits, block, zp, symmetric):
    k, n = 576, 20
    b, scales, zeros, w = _quantized(np.random.default_rng(5), k, n, bits, block, zp)
    graph = _nbits_node_graph(b, scales, zeros, k, n, bits, block)
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.applied and result.counts["lowered"] == 1
    node = graph.nodes[0]
    assert node.op == "MatMulNBitsTiled"
    assert node.attrs == {"K": k, "N": n, "bits": bits, "block_size": block, **({"symmetric": 1} if symmetric else {})}
    tiled, sz = node.inputs[1].values, node.inputs[2].values
    assert sz.dtype == np.float16 and sz.shape == (3, -(-k // block), 8) + (() if symmetric else (2,))
    got = _kernel_weights(tiled, sz, k, n, bits, block).astype(np.float64)
    np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-9)
    model = gs.export_onnx(graph)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attrs.get("symmetric") == (1 if symmetric else None)


def test_norm_fold_keeps_the_symmetric_attribute():
    """NormMatMulNBitsTiled takes MatMulNBitsTiled's attributes: symmetric = 1 and the scales-only SZ stay, and its
    contract from the lowered node's inputs matches ONNX Runtime's CPU result for the original graph."""
    graph = _norm_nbits_graph(bits=8, block=64)
    # the CPU reference with A unquantized (accuracy_level 4 rounds A to int8: ~1% off at these 8-bit weights' sums)
    next(nd for nd in graph.nodes if nd.op == "MatMulNBits").attrs["accuracy_level"] = 0
    a, skip, expected = _ort_cpu_on_random_rows(graph, (1, 1, 256), seed=13)
    ctx = _ctx(norm_prologue_nbits=True, file="kernels/libleptonc_cuda.so", arch="sm_90")
    result = use_leptonc_kernels(graph, ctx)
    assert result.counts["lowered"] == 1 and result.counts["nbits_norm"] == 1
    node = graph.nodes[0]
    assert node.op == "NormMatMulNBitsTiled" and node.attrs["symmetric"] == 1 and node.attrs["bits"] == 8
    sz = node.inputs[4].values
    assert sz.dtype == np.float16 and sz.shape == (8, 4, 8)
    w = _kernel_weights(node.inputs[3].values, sz, 256, 64, 8, 64).astype(np.float64)
    total = (a.astype(np.float32) + skip.astype(np.float32)).astype(np.float16).astype(np.float64)
    xn = total / np.sqrt((total ** 2).mean(-1, keepdims=True) + node.attrs["epsilon"]) * node.inputs[2].values
    np.testing.assert_allclose(xn @ w.T, expected[0], atol=2e-2, rtol=2e-2)


def _gated_graph(b, scales, zeros, k, n, gate_first=True, extra_reader=False) -> gs.Graph:
    """x -> MatMulNBits (merged gate|up, N = 2F) -> Split -> QuickGelu(gate) x up, as the fused passes leave
    a llama MLP; `extra_reader` also makes the up half a graph output."""
    f = n // 2
    x = gs.Variable("x", dtype=np.float16, shape=[1, 3, k])
    y = gs.Variable("gate_up", dtype=np.float16, shape=[1, 3, n])
    halves = [gs.Variable(name, dtype=np.float16, shape=[1, 3, f]) for name in ("h0", "h1")]
    gate, up = halves if gate_first else halves[::-1]
    silu = gs.Variable("silu", dtype=np.float16, shape=[1, 3, f])
    out = gs.Variable("out", dtype=np.float16, shape=[1, 3, f])
    mm = gs.Node("MatMulNBits", "mm", domain="com.microsoft",
                 attrs={"K": k, "N": n, "bits": 4, "block_size": 128, "accuracy_level": 4},
                 inputs=[x, gs.Constant("b", b), gs.Constant("s", scales), gs.Constant("z", zeros)], outputs=[y])
    split = gs.Node("Split", "split", attrs={"axis": -1}, inputs=[y, gs.Constant("sizes", np.array([f, f], np.int64))],
                    outputs=halves)
    act = gs.Node("QuickGelu", "act", domain="com.microsoft", attrs={"alpha": 1.0}, inputs=[gate], outputs=[silu])
    mul = gs.Node("Mul", "mul", inputs=[silu, up], outputs=[out])
    return gs.Graph(nodes=[mm, split, act, mul], inputs=[x], outputs=[out] + ([up] if extra_reader else []), opset=17)


@pytest.mark.parametrize("gate_first", [True, False])
def test_swiglu_folds_into_the_gate_up_kernel_with_columns_in_pairs(gate_first):
    k, n = 256, 48
    b, scales, zeros, w = _quantized(np.random.default_rng(7), k, n, 4, 128, True)
    graph = _gated_graph(b, scales, zeros, k, n, gate_first)
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.applied and result.counts["swiglu"] == 1 and "SwiGLU epilogue" in result.detail
    assert [nd.op for nd in graph.nodes] == ["MatMulNBitsTiled"]  # Split, QuickGelu and Mul are gone
    node = graph.nodes[0]
    assert node.attrs["activation"] == 1 and node.attrs["N"] == n and node.outputs[0].name == "out"
    # the kernel's column 2j is feature j's gate and 2j + 1 its up, wherever the graph had them
    got = _kernel_weights(node.inputs[1].values, node.inputs[2].values, k, n, 4, 128).astype(np.float64)
    gate_w, up_w = (w[:n // 2], w[n // 2:]) if gate_first else (w[n // 2:], w[:n // 2])
    np.testing.assert_allclose(got[0::2], gate_w, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got[1::2], up_w, rtol=1e-6, atol=1e-9)
    x = np.random.default_rng(1).standard_normal((3, k))
    g, u = x @ got[0::2].T, x @ got[1::2].T
    ref_g, ref_u = x @ gate_w.T, x @ up_w.T
    np.testing.assert_allclose(g / (1 + np.exp(-g)) * u, ref_g / (1 + np.exp(-ref_g)) * ref_u, rtol=1e-9, atol=1e-9)


def test_swiglu_is_not_folded_when_a_half_is_read_elsewhere():
    k, n = 256, 48
    b, scales, zeros, _ = _quantized(np.random.default_rng(7), k, n, 4, 128, True)
    graph = _gated_graph(b, scales, zeros, k, n, extra_reader=True)
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.applied and result.counts["swiglu"] == 0
    assert sorted(nd.op for nd in graph.nodes) == ["MatMulNBitsTiled", "Mul", "QuickGelu", "Split"]
    assert "activation" not in next(nd for nd in graph.nodes if nd.op == "MatMulNBitsTiled").attrs


def _fp16_gated_graph(f=32, gate_first=True, dtype=np.float16, extra_reader=False, const_weights=True) -> gs.Graph:
    """x -> MatMul (fp16 merged gate|up, 2F wide) -> Split -> QuickGelu(gate) x up: an fp16 llama MLP (with
    `const_weights` False, the weights are a graph input: a product computed at run time)."""
    k = 64
    x = gs.Variable("x", dtype=dtype, shape=[2, 3, k])
    y = gs.Variable("gate_up", dtype=dtype, shape=[2, 3, 2 * f])
    halves = [gs.Variable(name, dtype=dtype, shape=[2, 3, f]) for name in ("h0", "h1")]
    gate, up = halves if gate_first else halves[::-1]
    silu = gs.Variable("silu", dtype=dtype, shape=[2, 3, f])
    out = gs.Variable("out", dtype=dtype, shape=[2, 3, f])
    values = np.random.default_rng(0).standard_normal((k, 2 * f)).astype(dtype)
    w = gs.Constant("w", values) if const_weights else gs.Variable("w", dtype=dtype, shape=[k, 2 * f])
    mm = gs.Node("MatMul", "mm", inputs=[x, w], outputs=[y])
    split = gs.Node("Split", "split", attrs={"axis": 2}, inputs=[y, gs.Constant("sizes", np.array([f, f], np.int64))],
                    outputs=halves)
    act = gs.Node("QuickGelu", "act", domain="com.microsoft", attrs={"alpha": 1.0}, inputs=[gate], outputs=[silu])
    mul = gs.Node("Mul", "mul", inputs=[up, silu], outputs=[out])
    inputs = [x] if const_weights else [x, w]
    return gs.Graph(nodes=[mm, split, act, mul], inputs=inputs, outputs=[out] + ([up] if extra_reader else []), opset=17)


@pytest.mark.parametrize("gate_first", [True, False])
def test_fp16_gate_up_product_becomes_one_kernel_with_rows_in_pairs(gate_first):
    """An fp16 MatMul with constant weights -> ai.leptonc.MatMulF16 (weights as [N, K]); the SiLU(gate) x up
    behind a merged gate|up folds in, W's rows in (gate j, up j) pairs: the kernel's result equals the graph's."""
    graph = _fp16_gated_graph(gate_first=gate_first)
    w = graph.nodes[0].inputs[1].values.astype(np.float64)  # [K, 2F]
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.applied and result.counts["f16"] == 1 and result.counts["f16_swiglu"] == 1
    assert [nd.op for nd in graph.nodes] == ["MatMulF16"] and "MatMulF16" in result.detail
    node = graph.nodes[0]
    assert node.attrs == {"K": 64, "N": 64, "activation": 1} and node.outputs[0].name == "out"
    nk = node.inputs[1].values.astype(np.float64)
    assert nk.shape == (64, 64) and node.inputs[1].values.flags["C_CONTIGUOUS"]
    x = np.random.default_rng(3).standard_normal((5, 64))
    g, u = x @ nk[0::2].T, x @ nk[1::2].T  # what the kernel computes per output pair
    y = x @ w
    ref_g, ref_u = (y[:, :32], y[:, 32:]) if gate_first else (y[:, 32:], y[:, :32])
    np.testing.assert_allclose(g / (1 + np.exp(-g)) * u, ref_g / (1 + np.exp(-ref_g)) * ref_u, rtol=1e-9, atol=1e-9)


def test_fp16_product_whose_half_is_read_elsewhere_keeps_its_split():
    graph = _fp16_gated_graph(extra_reader=True)
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.applied and result.counts["f16"] == 1 and result.counts["f16_swiglu"] == 0
    assert sorted(nd.op for nd in graph.nodes) == ["MatMulF16", "Mul", "QuickGelu", "Split"]
    node = next(nd for nd in graph.nodes if nd.op == "MatMulF16")
    assert "activation" not in node.attrs and node.outputs[0].name == "gate_up"


@pytest.mark.parametrize("trans_b", [0, 1])
def test_lm_head_gemm_becomes_matmul_f16(trans_b):
    """The LM head's Gemm: [N, K] weights are used as stored (transB 1, no copy), [K, N] transposed; a Gemm
    with a bias stays."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((40, 16)).astype(np.float16)  # [N, K]
    stored = w if trans_b else np.ascontiguousarray(w.T)
    x = gs.Variable("h", dtype=np.float16, shape=[2, 16])
    y = gs.Variable("logits", dtype=np.float16, shape=[2, 40])
    const = gs.Constant("lm_head", stored)
    graph = gs.Graph(nodes=[gs.Node("Gemm", "head", {"transB": trans_b}, [x, const], [y])], inputs=[x], outputs=[y],
                     opset=17)
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    node = graph.nodes[0]
    assert result.applied and node.op == "MatMulF16" and node.attrs == {"K": 16, "N": 40}
    np.testing.assert_array_equal(node.inputs[1].values, w)
    assert (node.inputs[1] is const) == bool(trans_b)
    biased = gs.Graph(nodes=[gs.Node("Gemm", "head", {"transB": 1}, [x, gs.Constant("w2", w),
                                                                      gs.Constant("c", np.zeros(40, np.float16))], [y])],
                      inputs=[x], outputs=[y], opset=17)
    assert not use_leptonc_kernels(biased, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90")).applied


def _norm_graph(k=64, n=48, *, reader=False, mean_read=False, const_gamma=True, with_sum=True) -> gs.Graph:
    """SkipSimplifiedLayerNormalization(a, skip, gamma) -> MatMul(constant fp16 [K, N]) -> y; its sum a graph output."""
    rng = np.random.default_rng(5)
    a = gs.Variable("a", dtype=np.float16, shape=[2, 3, k])
    skip = gs.Variable("skip", dtype=np.float16, shape=[2, 3, k])
    gamma = gs.Constant("gamma", (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)) if const_gamma \
        else gs.Variable("gamma", dtype=np.float16, shape=[k])
    normed = gs.Variable("normed", dtype=np.float16, shape=[2, 3, k])
    mean = gs.Variable("mean", dtype=np.float32, shape=[2, 3, 1]) if mean_read else gs.Variable.empty()
    total = gs.Variable("sum", dtype=np.float16, shape=[2, 3, k])
    y = gs.Variable("y", dtype=np.float16, shape=[2, 3, n])
    w = gs.Constant("w", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float16))
    outs = [normed, mean, gs.Variable.empty()] + ([total] if with_sum else [])
    nodes = [gs.Node("SkipSimplifiedLayerNormalization", "norm", {"epsilon": 1e-6}, [a, skip, gamma], outs,
                     domain="com.microsoft"),
             gs.Node("MatMul", "mm", inputs=[normed, w], outputs=[y])]
    graph_outputs = [y] + ([total] if with_sum else []) + ([mean] if mean_read else [])
    if reader:
        extra = gs.Variable("extra", dtype=np.float16, shape=[2, 3, k])
        nodes.append(gs.Node("Relu", "other", inputs=[normed], outputs=[extra]))
        graph_outputs.append(extra)
    inputs = [a, skip] + ([] if const_gamma else [gamma])
    return gs.Graph(nodes=nodes, inputs=inputs, outputs=graph_outputs, opset=17)


def _ort_cpu_on_random_rows(graph: gs.Graph, shape, seed: int):
    """Random fp16 (a, skip) of `shape` and ONNX Runtime's CPU outputs of `graph` (left untouched) on them."""
    import onnxruntime as ort

    model = gs.export_onnx(graph.copy())
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    a, skip = (rng.standard_normal(shape).astype(np.float16) for _ in range(2))
    return a, skip, sess.run(None, {"a": a, "skip": skip})


@pytest.mark.parametrize("with_sum", [True, False])
def test_norm_in_front_of_an_fp16_product_folds_into_it(with_sum):
    """SkipSimplifiedLayerNormalization whose normalized output only a MatMulF16 reads -> NormMatMulF16(a, skip,
    gamma, W) with outputs (y, a + skip). Its contract, computed in numpy from the lowered node's own inputs and
    attributes, equals ONNX Runtime's CPU result for the original graph; the sum keeps its name and readers."""
    graph = _norm_graph(with_sum=with_sum)
    a, skip, expected = _ort_cpu_on_random_rows(graph, (2, 3, 64), seed=6)

    result = use_leptonc_kernels(graph, _ctx(True, file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.applied and result.counts["f16"] == 1 and result.counts["f16_norm"] == 1
    assert "1 with the SkipSimplifiedLayerNormalization in front folded in" in result.detail
    assert [nd.op for nd in graph.nodes] == ["NormMatMulF16"]
    node = graph.nodes[0]
    assert node.domain == "ai.leptonc" and [t.name for t in node.inputs][:3] == ["a", "skip", "gamma"]
    assert node.attrs["K"] == 64 and node.attrs["N"] == 48 and node.attrs["epsilon"] == pytest.approx(1e-6)
    assert node.outputs[0].name == "y" and len(node.outputs) == 2
    assert (node.outputs[1].name == "sum") == with_sum
    assert any(t is node.outputs[1] for t in graph.outputs) == with_sum
    gamma, w_nk = node.inputs[2].values.astype(np.float64), node.inputs[3].values.astype(np.float64)
    total = (a.astype(np.float32) + skip.astype(np.float32)).astype(np.float16).astype(np.float64)
    xn = total / np.sqrt((total ** 2).mean(-1, keepdims=True) + node.attrs["epsilon"]) * gamma
    np.testing.assert_allclose(xn @ w_nk.T, expected[0], atol=2e-2)
    if with_sum:
        np.testing.assert_array_equal(total, expected[1].astype(np.float64))
    gs.export_onnx(graph)  # still a valid graph


def _norm_nbits_graph(k=256, n=64, bits=4, block=128) -> gs.Graph:
    """SkipSimplifiedLayerNormalization(a, skip, gamma) -> MatMulNBits (random codes and scales, default zero points)
    -> y, the sum a graph output."""
    rng = np.random.default_rng(11)
    b, scales, _, _ = _quantized(rng, k, n, bits, block, zp=False)
    a = gs.Variable("a", dtype=np.float16, shape=[1, 1, k])
    skip = gs.Variable("skip", dtype=np.float16, shape=[1, 1, k])
    gamma = gs.Constant("gamma", (1 + 0.1 * rng.standard_normal(k)).astype(np.float16))
    normed = gs.Variable("normed", dtype=np.float16, shape=[1, 1, k])
    total = gs.Variable("sum", dtype=np.float16, shape=[1, 1, k])
    y = gs.Variable("y", dtype=np.float16, shape=[1, 1, n])
    nodes = [gs.Node("SkipSimplifiedLayerNormalization", "norm", {"epsilon": 1e-6}, [a, skip, gamma],
                     [normed, gs.Variable.empty(), gs.Variable.empty(), total], domain="com.microsoft"),
             gs.Node("MatMulNBits", "mm", domain="com.microsoft",
                     attrs={"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 4},
                     inputs=[normed, gs.Constant("b", b), gs.Constant("s", scales)], outputs=[y])]
    return gs.Graph(nodes=nodes, inputs=[a, skip], outputs=[y, total], opset=17)


def test_norm_in_front_of_an_int4_product_folds_into_it_when_asked():
    """With ctx.kernels.norm_prologue_nbits, SkipSimplifiedLayerNormalization -> MatMulNBits becomes
    NormMatMulNBitsTiled(a, skip, gamma, B, SZ) -> (y, a + skip). The contract, computed in numpy from the lowered
    node's own inputs (the kernel's view of the tiled weights), equals ONNX Runtime's CPU result for the original
    graph. Without the option the norm stays in front of a MatMulNBitsTiled."""
    graph = _norm_nbits_graph()
    a, skip, expected = _ort_cpu_on_random_rows(graph, (1, 1, 256), seed=12)

    plain = graph.copy()
    result = use_leptonc_kernels(plain, _ctx(True, file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.counts["lowered"] == 1 and result.counts["nbits_norm"] == 0
    assert sorted(nd.op for nd in plain.nodes) == ["MatMulNBitsTiled", "SkipSimplifiedLayerNormalization"]

    ctx = _ctx(norm_prologue_nbits=True, file="kernels/libleptonc_cuda.so", arch="sm_90")
    result = use_leptonc_kernels(graph, ctx)
    assert result.applied and result.counts["lowered"] == 1 and result.counts["nbits_norm"] == 1
    assert "1 with the SkipSimplifiedLayerNormalization in front folded in (NormMatMulNBitsTiled)" in result.detail
    assert [nd.op for nd in graph.nodes] == ["NormMatMulNBitsTiled"]
    node = graph.nodes[0]
    assert node.domain == "ai.leptonc" and [t.name for t in node.inputs][:3] == ["a", "skip", "gamma"]
    assert len(node.inputs) == 5 and node.inputs[3].values.dtype == np.uint8 and node.inputs[4].values.dtype == np.float16
    assert node.attrs["epsilon"] == pytest.approx(1e-6) and node.attrs["K"] == 256 and node.attrs["N"] == 64
    assert [t.name for t in node.outputs] == ["y", "sum"]
    gamma = node.inputs[2].values.astype(np.float64)
    w = _kernel_weights(node.inputs[3].values, node.inputs[4].values, 256, 64, 4, 128).astype(np.float64)
    total = (a.astype(np.float32) + skip.astype(np.float32)).astype(np.float16).astype(np.float64)
    xn = total / np.sqrt((total ** 2).mean(-1, keepdims=True) + node.attrs["epsilon"]) * gamma
    np.testing.assert_allclose(xn @ w.T, expected[0], atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(total, expected[1].astype(np.float64))
    gs.export_onnx(graph)  # still a valid graph


@pytest.mark.parametrize("case", ["normed read elsewhere", "mean read", "gamma computed"])
def test_norm_stays_when_the_product_cannot_take_it(case):
    graph = {"normed read elsewhere": lambda: _norm_graph(reader=True), "mean read": lambda: _norm_graph(mean_read=True),
             "gamma computed": lambda: _norm_graph(const_gamma=False)}[case]()
    result = use_leptonc_kernels(graph, _ctx(True, file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.applied and result.counts["f16"] == 1 and result.counts["f16_norm"] == 0
    assert sorted(nd.op for nd in graph.nodes if nd.op != "Relu") == ["MatMulF16", "SkipSimplifiedLayerNormalization"]


def test_norm_fold_needs_the_targets_option():
    graph = _norm_graph()
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.counts["f16_norm"] == 0 and sorted(nd.op for nd in graph.nodes) == ["MatMulF16",
                                                                                       "SkipSimplifiedLayerNormalization"]


@pytest.mark.parametrize("gate_first", [True, False])
def test_fp16_swiglu_becomes_one_kernel(gate_first):
    """A product computed at run time (no constant weights): Split, QuickGelu and Mul become one
    ai.leptonc.SwiGLU that reads the product and knows which half is the gate."""
    graph = _fp16_gated_graph(gate_first=gate_first, const_weights=False)
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert result.applied and result.counts["swiglu_op"] == 1 and result.counts["lowered"] == result.counts["f16"] == 0
    assert "SwiGLU" in result.detail
    assert sorted(nd.op for nd in graph.nodes) == ["MatMul", "SwiGLU"]
    node = next(nd for nd in graph.nodes if nd.op == "SwiGLU")
    assert node.domain == "ai.leptonc" and node.attrs == {"gate_first": int(gate_first)}
    assert node.inputs[0].name == "gate_up" and node.outputs[0].name == "out" and graph.outputs[0] is node.outputs[0]


@pytest.mark.parametrize("case", ["fp32", "half read elsewhere", "F not a multiple of 8"])
def test_fp16_swiglu_left_alone(case):
    graph = {"fp32": lambda: _fp16_gated_graph(dtype=np.float32), "half read elsewhere":
             lambda: _fp16_gated_graph(extra_reader=True, const_weights=False),
             "F not a multiple of 8": lambda: _fp16_gated_graph(f=12, const_weights=False)}[case]()
    result = use_leptonc_kernels(graph, _ctx(file="kernels/libleptonc_cuda.so", arch="sm_90"))
    assert not result.applied and "SiLU(gate) x up" in result.detail
    assert sorted(nd.op for nd in graph.nodes) == ["MatMul", "Mul", "QuickGelu", "Split"]


def test_lowering_is_skipped_with_the_build_reason():
    g = _nbits_graph()
    result = use_leptonc_kernels(g, _ctx(unavailable="nvcc was not found"))
    assert not result.applied and "nvcc was not found" in result.detail and "ONNX Runtime's kernel" in result.detail
    assert g.nodes[0].domain == "com.microsoft"


def test_gpu_pipeline_lowers_unless_turned_off(monkeypatch):
    from leptonc.targets import get_target
    from leptonc.targets.backends import onnxruntime as ort_backend

    h100, cpu = get_target("h100"), get_target("cpu")
    assert ort_backend.pipeline(h100, "int4")[-1] == "use_leptonc_kernels"  # last: after quantize_int4
    assert "use_leptonc_kernels" not in ort_backend.pipeline(cpu, "int4")
    assert "use_leptonc_kernels" not in ort_backend.pipeline(h100, "int4", KernelOptions(cuda_kernels=False))


def test_arch_for_compute_capability():
    assert kernels.arch_for((9, 0)) == "sm_90" and kernels.arch_for("8.6") == "sm_86"
    with pytest.raises(kernels.KernelsUnavailable, match="sm_70"):
        kernels.arch_for((6, 1))


def test_build_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "find_toolkit", lambda: None)
    with pytest.raises(kernels.KernelsUnavailable, match=r'nvcc was not found .*pip install "leptonc\[cuda\]"'):
        kernels.build_library((9, 0), cache_dir=tmp_path)
    monkeypatch.setattr(kernels, "find_toolkit", lambda: kernels.CudaToolkit(Path("/usr/bin/true"), "PATH"))
    monkeypatch.setenv("LEPTONC_ORT_INCLUDE", str(tmp_path))  # the optional override, pointing at no header
    with pytest.raises(kernels.KernelsUnavailable, match="holds no onnxruntime_c_api.h; unset it"):
        kernels.build_library((9, 0), cache_dir=tmp_path)
    failure = "leptonc_cuda.cu:3:10: fatal error: nv/target: No such file or directory"
    assert "install nvidia-cuda-cccl" in kernels._explain_nvcc_failure(failure)


def test_nvcc_found_in_the_cuda_wheel(monkeypatch, tmp_path):
    """Discovery order: CUDA_HOME, PATH, the registry's nvidia-cuda-nvcc wheel (nvidia/cu13/bin/nvcc), /usr/local/cuda."""
    wheel = tmp_path / "nvidia" / "cu13"
    (wheel / "bin").mkdir(parents=True)
    (wheel / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (wheel / "include").mkdir()
    monkeypatch.setattr(kernels, "_cuda_wheel_roots", lambda: [wheel])
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    found = kernels.find_toolkit()
    assert found.nvcc == wheel / "bin" / "nvcc" and found.found_by == "the nvidia-cuda-nvcc wheel"
    assert wheel / "include" in found.include_dirs()
    monkeypatch.setenv("CUDA_HOME", str(wheel))
    assert kernels.find_toolkit().found_by == "CUDA_HOME"


@pytest.mark.skipif(shutil.which("c++") is None or not os.environ.get("LEPTONC_ORT_INCLUDE"),
                    reason="compares leptonc's ABI declarations with an ONNX Runtime release header (LEPTONC_ORT_INCLUDE)")
def test_abi_declarations_match_a_release_header(tmp_path):
    """Each OrtApi slot, OrtCustomOp member and enum value the library uses, as the host compiler lays them out."""
    members = ["CreateStatus", "CreateCustomOpDomain", "CustomOpDomain_Add", "AddCustomOpDomain", "GetTensorMutableData",
               "GetDimensionsCount", "GetDimensions", "GetTensorTypeAndShape", "KernelInfoGetAttribute_float",
               "KernelInfoGetAttribute_int64", "KernelContext_GetInput", "KernelContext_GetOutput", "ReleaseStatus",
               "ReleaseTensorTypeAndShapeInfo", "KernelContext_GetGPUComputeStream"]
    op_members = ["version", "CreateKernel", "GetName", "GetInputMemoryType", "CreateKernelV2", "KernelComputeV2",
                  "InferOutputShapeFn", "GetStartVersion", "GetMayInplace", "GetAliasMap", "ReleaseAliasMap"]
    values = ["ORT_INVALID_ARGUMENT", "ORT_EP_FAIL", "ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16",
              "ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64", "OrtMemTypeCPUInput", "INPUT_OUTPUT_REQUIRED"]
    probe = tmp_path / "probe.cpp"
    probe.write_text("#include <onnxruntime_c_api.h>\n#include <cstddef>\n#include <cstdio>\nint main() {\n"
                     + "".join(f'std::printf("%zu\\n", offsetof(OrtApi, {m}));\n' for m in members)
                     + "".join(f'std::printf("%zu\\n", offsetof(OrtCustomOp, {m}));\n' for m in op_members)
                     + "".join(f'std::printf("%d\\n", int({v}));\n' for v in values) + "}\n")

    def layout(include: Path) -> str:
        exe = tmp_path / f"probe_{include.name}"
        subprocess.run(["c++", "-std=c++17", f"-I{include}", str(probe), "-o", str(exe)], check=True)
        return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout

    assert layout(kernels.ABI_DIR) == layout(kernels.find_ort_include())


def test_cpu_runner_refuses_a_bundle_with_cuda_kernels(tmp_path):
    from leptonc.runtime.ort_cuda import OrtCudaRunner

    io = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "kv_dtype": "float16", "vocab_size": 10}
    model = tmp_path / "model.onnx"
    onnx.save(gs.export_onnx(_nbits_graph()), model)
    with pytest.raises(InputError, match="CUDA provider"):
        OrtCudaRunner(model, io, {"custom_ops_library": "kernels/libleptonc_cuda.so"}, device_type="cpu")


@pytest.mark.skipif(kernels.find_nvcc() is None, reason='needs nvcc (pip install "leptonc[nvcc]") to build the library')
def test_library_builds_and_registers():
    import onnxruntime as ort

    lib = kernels.build_library((9, 0))  # the user cache: the h100 compile test builds the same library
    assert lib.path.is_file() and lib.arch == "sm_90" and lib.ort_api_version > 0
    assert "libcublas.so" in subprocess.run(["readelf", "-d", str(lib.path)], capture_output=True, text=True).stdout
    again = kernels.build_library((9, 0))  # cached: same file, not rebuilt
    assert again.path == lib.path and again.path.stat().st_mtime == lib.path.stat().st_mtime
    so = ort.SessionOptions()
    try:
        so.register_custom_ops_library(str(lib.path))
    except Exception as exc:  # noqa: BLE001 - only a missing CUDA runtime library here is a skip
        if "libcublas" not in str(exc):
            raise
        pytest.skip(f"the library builds; loading it needs cuBLAS on LD_LIBRARY_PATH: {exc}")


# ---- GroupQueryAttention -> ai.leptonc.CachedAttention (default; --no-attention-kernel keeps GQA) ---------

def _gqa_graph(h=8, kvh=2, d=64, dtype=np.float16, **attrs) -> gs.Graph:
    from attention_reference import gqa_graph

    return gqa_graph(h, kvh, d, np.ones((32, d // 2)), np.zeros((32, d // 2)), dtype, scale=0.125, **attrs)


def test_attention_lowers_by_default_and_not_when_switched_off():
    info = {"file": "kernels/libleptonc_cuda.so", "arch": "sm_90"}
    graph = _gqa_graph()
    ctx = PassContext(backend="onnxruntime", precision="fp16", kernel_library=info,
                      kernels=KernelOptions(attention_kernel=False))
    result = use_leptonc_kernels(graph, ctx)
    assert not result.applied and graph.nodes[0].op == "GroupQueryAttention"  # --no-attention-kernel

    result = use_leptonc_kernels(graph, PassContext(backend="onnxruntime", precision="fp16", kernel_library=info))
    assert result.applied and result.counts["attention"] == 1
    assert "1 GroupQueryAttention -> ai.leptonc.CachedAttention (sm_90)" in result.detail
    node = graph.nodes[0]
    assert (node.op, node.domain) == ("CachedAttention", "ai.leptonc")
    assert [t.name for t in node.inputs] == ["qkv", "past_key_values.0.key", "past_key_values.0.value", "gqa/seqlens_k",
                                             "gqa/total_sequence_length", "rotary.cos_cache0", "rotary.sin_cache0"]
    assert [t.name for t in node.outputs] == ["attn", "present.0.key", "present.0.value"]
    assert node.attrs == {"num_heads": 8, "kv_num_heads": 2, "scale": 0.125}
    model = gs.export_onnx(graph)
    assert {o.domain for o in model.opset_import} >= {"ai.leptonc"}


@pytest.mark.parametrize("kwargs, why", [
    ({"d": 96}, "head size 96"),
    ({"h": 18, "kvh": 2}, "18 query heads over 2 KV heads"),
    ({"dtype": np.float32}, "not fp16"),
    ({"local_window_size": 16}, "sliding window"),
    ({"softcap": 30.0}, "softcap"),
    ({"rotary_interleaved": 1}, "rotary not folded in"),
    ({"qk_output": 1}, "attribute qk_output"),
])
def test_attention_left_on_onnx_runtime_when_the_kernel_cannot_run_it(kwargs, why):
    graph = _gqa_graph(**kwargs)
    ctx = PassContext(backend="onnxruntime", precision="fp16", kernel_library={"file": "k.so", "arch": "sm_90"})
    result = use_leptonc_kernels(graph, ctx)
    assert not result.applied and why in result.detail
    assert graph.nodes[0].op == "GroupQueryAttention"


def test_runner_takes_cached_attention_as_a_shared_cache_graph(tmp_path):
    """A CachedAttention bundle keeps GroupQueryAttention's runtime contract (shared K/V block, right padding): the
    runner must not fall back to the growing layout, which would feed the kernel a cache of the wrong shape."""
    from leptonc.runtime.ort_cuda import CACHE_ATTENTION_OPS
    from leptonc.runtime.ort_cuda_session import graph_op_types

    graph = _gqa_graph()
    ctx = PassContext(backend="onnxruntime", precision="fp16", kernel_library={"file": "k.so", "arch": "sm_90"})
    use_leptonc_kernels(graph, ctx)
    model = tmp_path / "model.onnx"
    onnx.save(gs.export_onnx(graph), model)
    ops = graph_op_types(model)
    assert ops == {"CachedAttention"} and ops & CACHE_ATTENTION_OPS


def test_a_library_that_cannot_be_built_leaves_its_reason_for_the_pass(monkeypatch):
    from leptonc.targets import get_target
    from leptonc.targets.backends import onnxruntime as ort_backend

    h100 = get_target("h100")
    monkeypatch.setattr(kernels, "build_library", lambda cc: (_ for _ in ()).throw(kernels.KernelsUnavailable("no nvcc")))
    ctx = PassContext(backend="onnxruntime", precision="fp16", target=h100)
    assert ort_backend._prepare_kernels(ctx, ["use_leptonc_kernels"], ()) is None
    assert ctx.kernel_library == {"unavailable": "no nvcc"}


def _gqa_session(h, kvh, d, cos, sin):
    """ONNX Runtime's own GroupQueryAttention (CPU, float32) in the form CachedAttention replaces."""
    import onnxruntime as ort

    from attention_reference import gqa_graph

    model = gs.export_onnx(gqa_graph(h, kvh, d, cos, sin, np.float32))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_cached_attention_contract_matches_onnx_runtime_group_query_attention():
    """The numpy contract the CUDA kernels implement (tests/attention_reference.py) against ONNX Runtime's
    GroupQueryAttention, the op they replace: a right-padded first prompt into a shared cache, then two decode steps
    at different lengths per row. Outputs of real tokens and every cache entry they wrote must agree."""
    from attention_reference import cached_attention

    rng = np.random.default_rng(0)
    h, kvh, d, cap, positions = 6, 2, 64, 24, 64
    inv = 10000.0 ** (-np.arange(0, d, 2) / d)
    angles = np.arange(positions)[:, None] * inv[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    sess = _gqa_session(h, kvh, d, cos, sin)
    b, s = 2, 7
    lengths = np.array([7, 4])  # row 1 is right-padded
    k_ort = np.zeros((b, kvh, cap, d), np.float32)
    v_ort = np.zeros_like(k_ort)
    k_ref, v_ref = k_ort.astype(np.float64), v_ort.astype(np.float64)
    steps = [(rng.standard_normal((b, s, (h + 2 * kvh) * d)).astype(np.float32), lengths - 1, s)]
    for step in range(2):  # decode: each row's next token at its own length
        steps.append((rng.standard_normal((b, 1, (h + 2 * kvh) * d)).astype(np.float32), lengths + step, cap))
    for i, (qkv, seqlens, total) in enumerate(steps):
        feeds = {"qkv": qkv, "past_key_values.0.key": k_ort, "past_key_values.0.value": v_ort,
                 "gqa/seqlens_k": seqlens.astype(np.int32), "gqa/total_sequence_length": np.array(total, np.int32)}
        out_ort, k_ort, v_ort = sess.run(None, feeds)
        out_ref, k_ref, v_ref = cached_attention(qkv, k_ref, v_ref, seqlens, total, cos, sin, num_heads=h,
                                                 kv_num_heads=kvh)
        assert k_ort.shape == k_ref.shape == (b, kvh, cap, d)
        for row in range(b):
            real = lengths[row] if i == 0 else 1  # rows' padded positions are garbage on both sides
            np.testing.assert_allclose(out_ort[row, :real], out_ref[row, :real], atol=2e-5, err_msg=f"step {i} row {row}")
            end = int(seqlens[row]) + 1
            np.testing.assert_allclose(k_ort[row, :, :end], k_ref[row, :, :end], atol=2e-5)
            np.testing.assert_allclose(v_ort[row, :, :end], v_ref[row, :, :end], atol=2e-5)
        k_ref[:, :, :], v_ref[:, :, :] = k_ort, v_ort  # both continue from the same cache (padding included)


def test_h100_pipeline_lowers_every_attention_of_a_real_graph(tmp_path, monkeypatch):
    """The whole GPU pipeline on a small llama with head size 64 (5 query heads over 1 KV head, llama3 rotary):
    by default every GroupQueryAttention the fusions write becomes a CachedAttention whose
    rotary tables are the fused ones, and the bundle records what ran. (The library is not built here: a stand-in
    file takes its place; the graph is only written and type-checked, not run.)"""
    import leptonc.targets.backends.onnxruntime as ort_target
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig
    from tests.test_architectures import build_random_model

    model_dir = tmp_path / "llama64"
    build_random_model("llama", {"vocab_size": 320, "max_position_embeddings": 256, "bos_token_id": 1,
                                 "eos_token_id": 2, "hidden_size": 320, "intermediate_size": 256, "num_hidden_layers": 2,
                                 "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 64,
                                 "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 500000.0,
                                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
                       model_dir)
    stand_in = tmp_path / "libleptonc_cuda.so"
    stand_in.write_bytes(b"not a library: the graph is written, not run")
    library = kernels.KernelLibrary(stand_in, "sm_90", "13.0, V13.0.0", 29, "0" * 64)
    monkeypatch.setattr(ort_target, "check_available", lambda *a, **k: None)
    monkeypatch.setattr(kernels, "build_library", lambda cc: library)
    monkeypatch.setenv("LEPTONC_CACHE", str(tmp_path / "cache"))
    bundle = compile_model(CompileConfig(source=str(model_dir), target="h100", backend="onnxruntime", precision="fp16",
                                         output=str(tmp_path / "g.lepton"), verify=False))
    record = next(p for p in bundle.manifest["passes"] if p["name"] == "use_leptonc_kernels")
    assert "2 GroupQueryAttention -> ai.leptonc.CachedAttention" in record["detail"], record["detail"]
    ops = bundle.report()["graph"]["op_counts"]
    assert ops.get("CachedAttention") == 2 and "GroupQueryAttention" not in ops, ops
    # the residual norms fold into the products they feed (gate|up, the next layer's qkv); the last one feeds the
    # GatherND that picks each row's last position for the LM head, so it stays
    assert ops.get("NormMatMulF16") == 3 and ops.get("SkipSimplifiedLayerNormalization") == 1, ops
    assert "3 with the SkipSimplifiedLayerNormalization in front folded in" in record["detail"], record["detail"]
    model = onnx.load(str(bundle.model_path), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "CachedAttention")
    assert node.domain == "ai.leptonc" and len(node.input) == 7
    order = list(model.graph.node)
    # the decode kernel reads seqlens_k before its PDL wait (attention.cuh, above launch_decode): only MaskLengths, straight
    # from the graph's mask, may compute it; its kernel launches without PDL and never triggers early
    producer = {o: n for n in order for o in n.output}
    todo, feeding = [node.input[3]], []
    while todo:
        n = producer.get(todo.pop())
        if n is not None and n not in feeding:
            feeding.append(n)
            todo += list(n.input)
    assert [(n.op_type, n.domain, list(n.input)) for n in feeding] == [("MaskLengths", "ai.leptonc", ["attention_mask"])]
    source = (Path(kernels.__file__).with_name("step_ends.cuh")).read_text()
    launch = source[source.index("OrtStatus* ORT_API_CALL compute_mask_lengths"):]
    launch = launch[:launch.index("\n}\n")]
    assert "mask_lengths<<<" in launch and "launch_dependent" not in launch
    kernel = source[source.index("__global__ void __launch_bounds__(256) mask_lengths"):]
    assert "pdl_trigger" not in kernel[:kernel.index("\n}\n")]
    assert "seqlens_k's ReduceSum, Sub and Cast -> ai.leptonc.MaskLengths" in record["detail"], record["detail"]
    assert not {"ReduceSum", "Sub"} & set(ops), ops
    # the tail: the head's fp16 rows -> LogitsArgMax -> (logits, next_token); no Cast, Reshape copy or ArgMax
    tail = [n for n in order if n.op_type == "LogitsArgMax"]
    assert len(tail) == 1 and tail[0].domain == "ai.leptonc" and list(tail[0].output) == ["logits", "next_token"]
    assert tail[0].input[1] == "logits_positions" and producer[tail[0].input[0]].op_type == "MatMulF16"
    assert "ArgMax" not in ops and ops.get("Cast", 0) == 1, ops  # the one Cast left: total_sequence_length's
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs["logits"] == onnx.TensorProto.FLOAT and outputs["next_token"] == onnx.TensorProto.INT64
    assert {a.name: a.i for a in node.attribute if a.name != "scale"} == {"num_heads": 5, "kv_num_heads": 1}
    tables = {t.name: t for t in model.graph.initializer}
    cos = tables[node.input[5]]
    assert cos.data_type == onnx.TensorProto.FLOAT16 and list(cos.dims)[1] == 32  # [positions, head size / 2]
    # --no-norm-prologue keeps ONNX Runtime's norms in front of plain MatMulF16 products
    plain = compile_model(CompileConfig(source=str(model_dir), target="h100", backend="onnxruntime", precision="fp16",
                                        output=str(tmp_path / "plain.lepton"), verify=False,
                                        kernels=KernelOptions(norm_prologue=False)))
    ops = plain.report()["graph"]["op_counts"]
    assert "NormMatMulF16" not in ops and ops.get("SkipSimplifiedLayerNormalization") == 4, ops
    # int4 (RTN): the same norms fold into the int4 products unless --no-norm-prologue-nbits
    for fold, folded in ((True, 3), (False, 0)):
        q4 = compile_model(CompileConfig(source=str(model_dir), target="h100", backend="onnxruntime", precision="int4",
                                         output=str(tmp_path / f"q4{fold}.lepton"), verify=False,
                                         quantization={"int4_method": "rtn", "check": False},
                                         kernels=KernelOptions(norm_prologue_nbits=fold)))
        ops = q4.report()["graph"]["op_counts"]
        assert ops.get("NormMatMulNBitsTiled", 0) == folded, ops
        assert ops.get("SkipSimplifiedLayerNormalization") == 4 - folded, ops


def _greedy_tail_graph(v: int = 48, keepdims: int = 0, cast_read_elsewhere: bool = False) -> gs.Graph:
    """head [R, V] fp16 -> Cast -> Reshape(Concat(Shape(logits_positions), [V])) -> logits -> ArgMax -> next_token,
    as passes/select_logits.py and passes/greedy_token.py leave a GPU graph's end."""
    head = gs.Variable("head", np.float16, ["rows", v])
    positions = gs.Variable("logits_positions", np.int64, ["batch", "k"])
    cast, bk, shape = gs.Variable("cast", np.float32, ["rows", v]), gs.Variable("bk", np.int64, [2]), \
        gs.Variable("shape", np.int64, [3])
    logits, token = gs.Variable("logits", np.float32, ["batch", "k", v]), gs.Variable("next_token", np.int64, ["batch", "k"])
    nodes = [gs.Node("Cast", "cast", {"to": 1}, [head], [cast]),
             gs.Node("Shape", "bk", {}, [positions], [bk]),
             gs.Node("Concat", "shape", {"axis": 0}, [bk, gs.Constant("vocab", np.array([v], np.int64))], [shape]),
             gs.Node("Reshape", "unflatten", {}, [cast, shape], [logits]),
             gs.Node("ArgMax", "argmax", {"axis": -1, "keepdims": keepdims}, [logits], [token])]
    outputs = [logits, token] + ([cast] if cast_read_elsewhere else [])
    return gs.Graph(nodes=nodes, inputs=[head, positions], outputs=outputs, opset=17)


def test_greedy_tail_becomes_one_logits_argmax_and_keeps_its_outputs():
    """Cast + Reshape + ArgMax at a GPU graph's end -> LogitsArgMax(head, logits_positions) writing the same two graph
    outputs (float32 logits, int64 next_token); left alone where another reader needs the float rows or ArgMax
    keeps its axis."""
    from leptonc.passes.use_kernels import _lower_logits_argmax

    graph = _greedy_tail_graph()
    assert _lower_logits_argmax(graph) == 1
    graph.cleanup()
    assert [(n.op, n.domain) for n in graph.nodes] == [("LogitsArgMax", "ai.leptonc")]
    node = graph.nodes[0]
    assert [t.name for t in node.inputs] == ["head", "logits_positions"]
    assert [t.name for t in node.outputs] == [t.name for t in graph.outputs] == ["logits", "next_token"]
    model = gs.export_onnx(graph)
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]
    for kept in (_greedy_tail_graph(keepdims=1), _greedy_tail_graph(cast_read_elsewhere=True)):
        assert _lower_logits_argmax(kept) == 0
        assert sorted(n.op for n in kept.nodes) == ["ArgMax", "Cast", "Concat", "Reshape", "Shape"]


def _mask_lengths_graph(minus: int = 1, count_read_elsewhere: bool = False) -> gs.Graph:
    """seqlens_k = Cast(Sub(ReduceSum(attention_mask, [1], keepdims 0), minus), int32) read by a CachedAttention."""
    mask = gs.Variable("attention_mask", np.int64, ["batch", "total"])
    qkv = gs.Variable("qkv", np.float16, ["batch", 1, 384])
    count, last, seqlens = (gs.Variable("count", np.int64, ["batch"]), gs.Variable("last", np.int64, ["batch"]),
                            gs.Variable("seqlens_k", np.int32, ["batch"]))
    out = gs.Variable("out", np.float16, ["batch", 1, 256])
    nodes = [gs.Node("ReduceSum", "sum", {"keepdims": 0}, [mask, gs.Constant("axis", np.array([1], np.int64))], [count]),
             gs.Node("Sub", "sub", {}, [count, gs.Constant("one", np.array(minus, np.int64))], [last]),
             gs.Node("Cast", "cast", {"to": 6}, [last], [seqlens]),
             gs.Node("CachedAttention", "attn", {"num_heads": 4, "kv_num_heads": 1},
                     [qkv, gs.Variable("pk"), gs.Variable("pv"), seqlens], [out], domain="ai.leptonc")]
    outputs = [out] + ([count] if count_read_elsewhere else [])
    return gs.Graph(nodes=nodes, inputs=[mask, qkv], outputs=outputs, opset=17)


def test_seqlens_from_the_mask_become_one_mask_lengths():
    """ReduceSum, Sub 1 and Cast to int32 in front of CachedAttention's seqlens_k -> MaskLengths(attention_mask);
    left alone for another offset or where the count is read elsewhere."""
    from leptonc.passes.use_kernels import _lower_mask_lengths

    graph = _mask_lengths_graph()
    assert _lower_mask_lengths(graph) == 1
    graph.cleanup()
    assert sorted((n.op, n.domain) for n in graph.nodes) == [("CachedAttention", "ai.leptonc"), ("MaskLengths", "ai.leptonc")]
    lengths = next(n for n in graph.nodes if n.op == "MaskLengths")
    assert [t.name for t in lengths.inputs] == ["attention_mask"] and lengths.outputs[0].name == "seqlens_k"
    for kept in (_mask_lengths_graph(minus=2), _mask_lengths_graph(count_read_elsewhere=True)):
        assert _lower_mask_lengths(kept) == 0
        assert sorted(n.op for n in kept.nodes) == ["CachedAttention", "Cast", "ReduceSum", "Sub"]


def test_the_manifest_lists_every_op_the_library_registers():
    """The graph contract's kernel op list (what the manifest records) is the ops the CUDA source names."""
    import re

    from leptonc.graph_contract import KERNEL_OPS, LEPTONC_DOMAIN

    folder = Path(kernels.__file__).parent
    source = "".join(p.read_text() for p in sorted([*folder.glob("*.cu"), *folder.glob("*.cuh")]))
    registered = set(re.findall(r'_name\(const OrtCustomOp\*\) \{ return "(\w+)"; \}', source))
    assert registered == set(KERNEL_OPS), registered ^ set(KERNEL_OPS)
    assert kernels.DOMAIN == LEPTONC_DOMAIN and tuple(kernels.OPS) == KERNEL_OPS
