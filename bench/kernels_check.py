"""Correctness of leptonc's MatMulNBitsTiled kernel without ONNX Runtime: random MatMulNBits weights
(bench/device_kernels.py's cases) tiled by targets/kernels/layout.py, multiplied on the GPU by
bench/kernels_microbench.cu's --check mode (the bundle's kernel source, both the M <= 16 streaming
kernel and the M > 16 dequantize + cuBLAS path), compared with a float64 numpy reference.

    nvcc -O3 -std=c++17 -arch=sm_90 -I$LEPTONC_ORT_INCLUDE bench/kernels_microbench.cu -lcublas -o /tmp/mb
    python3 bench/kernels_check.py /tmp/mb OUT.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from device_kernels import CASES, quantized  # noqa: E402

from leptonc.targets.kernels.layout import interleave_gate_up, tile_nbits  # noqa: E402

CHECK_M = (1, 3, 8, 9, 16, 17, 128)
# the decode kernel the shape picks (auto), and each one forced: the M <= 16 streaming kernel, the
# few-rows kernel with its default, 4 and 16 steps a warp, and its rolling window (gemv:8:4: 4 of 8 steps in flight)
VARIANTS = ("auto", "stream", "gemv", "gemv:4", "gemv:16", "gemv:8:4")
# the SwiGLU epilogue (activation 1) over merged gate|up weights: llama-1b's and smollm2's shapes, block 32
SWIGLU_CASES = [("llama gate_up swiglu", 2048, 16384, 4, 128, True), ("smollm2 gate_up swiglu", 576, 3072, 4, 128, True),
                ("block 32 swiglu", 608, 200, 4, 32, True)]
# 8 bits without zero points as the pass lowers them: SZ the scales alone (symmetric = 1), (name, K, N, bits, block,
# zero points, activation, symmetric), at M 1 (gemv; stream forced), 4 and 16 (stream) and 128 (dequantize + cuBLAS)
SYMMETRIC_CASES = [("llama head int8 symmetric", 2048, 128256, 8, 64, False, 0, 1),
                   ("int8 symmetric, K 600 block 32, N 1540 (padded)", 600, 1540, 8, 32, False, 0, 1),
                   ("int8 symmetric swiglu", 576, 3072, 8, 128, False, 1, 1)]
SYMMETRIC_M = (1, 4, 16, 128)
LIMIT = 5e-3  # relative max error; fp16 output rounding alone is ~5e-4


def main() -> int:
    binary, out = sys.argv[1], Path(sys.argv[2])
    rng = np.random.default_rng(0)
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cases = [c + (0, 0) for c in CASES] + [c + (1, 0) for c in SWIGLU_CASES] + SYMMETRIC_CASES
        for name, k, n, bits, block, zp, act, sym in cases:
            packed, scales, zeros, w = quantized(rng, k, n, bits, block, zp)
            if act:  # gate = rows 0..F-1 of w, up = F..2F-1; the kernel takes them in (gate, up) pairs
                packed, scales, zeros = interleave_gate_up(packed, scales, zeros, n)
            tiled, sz = tile_nbits(packed, scales, zeros, k, n, bits, block, scales_only=bool(sym))
            tiled.tofile(d / "b.bin")
            sz.tofile(d / "sz.bin")
            variants = VARIANTS if k * n <= 64 << 20 else VARIANTS[:2]  # the LM head: auto and stream only
            for m, variant in [(m, v) for m in (SYMMETRIC_M if sym else CHECK_M)
                               for v in (variants if m <= 8 else ("auto",))]:
                x = (rng.standard_normal((m, k)) * 0.5).astype(np.float16)
                x.tofile(d / "a.bin")
                proc = subprocess.run([binary, "--check", str(k), str(n), str(bits), str(block), str(m), str(d),
                                       variant, str(act), str(sym)], capture_output=True, text=True)
                row = {"case": name, "K": k, "N": n, "bits": bits, "block": block, "M": m, "variant": variant,
                       "activation": act, "symmetric": sym}
                if proc.returncode == 3:  # the forced kernel does not apply to this shape
                    continue
                if proc.returncode != 0:
                    row["error"] = proc.stderr[-400:]
                    ok = False
                else:
                    y = np.fromfile(d / "y.bin", np.float16).reshape(m, n // 2 if act else n).astype(np.float64)
                    ref = x.astype(np.float64) @ w.T
                    if act:
                        gate, up = ref[:, :n // 2], ref[:, n // 2:]
                        ref = gate / (1.0 + np.exp(-gate)) * up
                    row["rel_err"] = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-9))
                    ok &= row["rel_err"] <= LIMIT
                rows.append(row)
                print(json.dumps(row), flush=True)
    out.write_text(json.dumps({"check_ok": ok, "limit": LIMIT, "rows": rows}, indent=1))
    print(f"check ok: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
