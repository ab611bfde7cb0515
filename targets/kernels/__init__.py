"""leptonc's own CUDA kernels for ONNX Runtime (`leptonc_cuda.cu`): a custom-op library built with nvcc
for one GPU architecture, shipped inside the bundle and registered by the runtime.

What it holds: `ai.leptonc.MatMulNBitsTiled`, the weight-only int4/int8 matmul of ONNX Runtime's
`com.microsoft.MatMulNBits` on weights that passes/use_kernels.py rearranges (layout.py) so that each
lane's 16-byte load is its tensor-core operands. It streams the weights once for up to 16 rows of
activations; the M > 16 path dequantizes and calls cuBLAS.

A single row (batch-1 decode) of a product of 3 MiB or more takes a second kernel, `tiled_gemv`, whose
warps issue every load of their K chunk at once. A merged gate|up product followed by SiLU(gate) x up
gets the SwiGLU epilogue (`activation` 1), so the Split, QuickGelu and Mul kernels go.

`ai.leptonc.MatMulF16` runs fp16 products with constant weights (fp16 graphs: every projection and the
LM head), weights stored [N, K]: one row of A streams them in 16-byte loads (`f16_gemv`), more rows go
to cuBLAS; the same SwiGLU epilogue. `ai.leptonc.SwiGLU` is the epilogue alone, for a product computed
at run time. `ai.leptonc.NormMatMulF16` is MatMulF16 with the SkipSimplifiedLayerNormalization in front
folded in (on by default, LEPTONC_NORM_PROLOGUE=0 keeps the norm apart; see below).
`ai.leptonc.NormMatMulNBitsTiled` is the same fold in front of MatMulNBitsTiled (on by default since session 20,
LEPTONC_NORM_PROLOGUE_NBITS=0 at compile keeps the norm apart: llama-1b-shape int4 at batch 1 went 1,430 -> 1,442
tok/s on the H100 with the same greedy tokens; session 17 had measured it slower, before the o product ahead of
gate|up could overlap it, BENCHMARKS.md).

`ai.leptonc.MaskLengths` (the attention's lengths from the mask) and `ai.leptonc.LogitsArgMax` (the LM head's fp16
rows to the float32 logits and the greedy token) are the decode step's first and last kernels, in place of six of
ONNX Runtime's and a copy (session 20 on the H100: checked against numpy and ONNX Runtime's ops, the same greedy
tokens; with the int4 norm fold, llama-1b-shape int4 went to 1.621-1.626x fp16 at batch 1).

`ai.leptonc.CachedAttention` (attention.cuh) replaces GroupQueryAttention in the GPU form: rotary, cache
append and attention in one decode kernel; prefill on tensor cores. Session 15 on the H100: correct against
float64 and ONNX Runtime's op, the same greedy tokens, smollm2-135m fp16 1,217-1,235 tok/s at batch 1
against 1,097-1,145 with GroupQueryAttention in one call; on by default (LEPTONC_ATTENTION_KERNEL=0 keeps
GroupQueryAttention).

When a bundle runs on sm_90 or later, the library launches the decode kernels with programmatic dependent launch
(common.cuh; LEPTONC_PDL=0 turns it off). One-row fp16 products choose rows a warp group and warps along K by shape
(f16_plan; LEPTONC_F16_SPLIT=0 gives the launch from before session 16). Session 16 on the H100: with the norms
folded, a decode layer runs only these kernels, and each launch overlaps the one before. llama-1b-shape fp16 gained
+5% at batch 1 in one call and 1.5% on average in the next; smollm2 gained 9%. The greedy tokens were the same.

Status (H100, BENCHMARKS.md "Session 12"): MatMulF16 and SwiGLU are correct (relative error <= 9e-4 against
float64); llama-1b-shape fp16 745 tok/s at batch 1 against 676-684 on ONNX Runtime's ops, smollm2-135m
fp16 1,024 against 910, in one call, the same greedy tokens.
Session 11, MatMulNBitsTiled: correct (relative error <= 7e-4 against a float64 reference).
llama-1b-shape int4 with it: 1,035 and 985 tok/s at batch 1 in two calls (1.62x and 1.59x fp16 in the
same call) and 7,700 and 7,209 at batch 16 (1.20x and 1.17x). smollm2-135m int4: 1,130 and 12,637 tok/s against 861 and 6,949 with ONNX Runtime's
kernel, the same greedy tokens. The lowering is on by default for GPU targets (LEPTONC_CUDA_KERNELS=0 or
`--disable-pass use_leptonc_kernels` turns it off).

Building needs, on the compiling machine (no GPU needed there):
  - nvcc (CUDA 12 or 13): `CUDA_HOME`, then `PATH`, then /usr/local/cuda;
  - the ONNX Runtime C API header `onnxruntime_c_api.h` (and the headers it includes), which the
    onnxruntime wheels do not ship: point `LEPTONC_ORT_INCLUDE` at the `include/` folder of the ONNX
    Runtime release archive for your version (or any older one: the header's API version must not be
    newer than the runtime's).
Without them the compile keeps ONNX Runtime's kernel and its report says why (passes/use_kernels.py).
Builds are cached by the hash of the source (with the .cuh files it includes), the ONNX Runtime header, nvcc's
version and the architecture.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("leptonc_cuda.cu")
HEADERS = tuple(Path(__file__).with_name(n) for n in ("common.cuh", "attention.cuh"))  # included by SOURCE: part of the build's cache key
LIBRARY = "libleptonc_cuda.so"
DOMAIN = "ai.leptonc"
BUNDLE_DIR = "kernels"  # where the library goes inside a bundle
OPS = ("MatMulNBitsTiled", "SwiGLU", "MatMulF16", "NormMatMulF16", "NormMatMulNBitsTiled", "CachedAttention")


class KernelsUnavailable(Exception):
    """The library cannot be built here; the message says what is missing and how to provide it."""


@dataclass(frozen=True)
class KernelLibrary:
    path: Path
    arch: str            # e.g. sm_90
    nvcc: str            # nvcc's release line, e.g. "13.0, V13.0.48"
    ort_api_version: int  # ORT_API_VERSION of the header it was built against
    source_sha256: str

    def manifest(self) -> dict:
        return {"file": f"{BUNDLE_DIR}/{LIBRARY}", "domain": DOMAIN, "ops": list(OPS), "arch": self.arch,
                "nvcc": self.nvcc, "ort_api_version": self.ort_api_version, "source_sha256": self.source_sha256}


def find_nvcc() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.is_file() else None


def find_ort_include() -> Path | None:
    value = os.environ.get("LEPTONC_ORT_INCLUDE")
    if not value:
        return None
    root = Path(value).expanduser()
    for candidate in (root, root / "onnxruntime", root / "onnxruntime" / "core" / "session"):
        if (candidate / "onnxruntime_c_api.h").is_file():
            return candidate
    return None


def arch_for(compute_capability) -> str:
    """(9, 0) or '9.0' -> 'sm_90'. The kernels use WMMA on fp16, which needs sm_70 or newer."""
    if isinstance(compute_capability, (tuple, list)):
        compute_capability = ".".join(map(str, compute_capability))
    major, _, minor = str(compute_capability or "").partition(".")
    if not major.isdigit() or int(major) < 7:
        raise KernelsUnavailable(f"compute capability {compute_capability!r}: leptonc's CUDA kernels need sm_70 or newer")
    return f"sm_{int(major)}{int(minor or 0)}"


def _nvcc_release(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release ([^\n]+)", out)
    return m.group(1).strip() if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


def _cuda_lib_dirs(nvcc: Path) -> list[Path]:
    """Where libcublas may be: the toolkit's lib64 or lib (pip's nvidia-cu13 layout keeps it in lib)."""
    root = nvcc.resolve().parent.parent
    return [d for d in (root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib") if d.is_dir()]


def _cublas_flag(dirs: list[Path]) -> list[str]:
    for d in dirs:
        if (d / "libcublas.so").exists():
            return ["-lcublas"]
        versioned = sorted(d.glob("libcublas.so.*"))
        if versioned:
            return [f"-l:{versioned[0].name}"]
    raise KernelsUnavailable("cuBLAS (libcublas.so) was not found beside nvcc; install the CUDA toolkit's cuBLAS "
                             "(or the nvidia-cublas wheel) and set CUDA_HOME")


def build_library(compute_capability, cache_dir: Path | None = None) -> KernelLibrary:
    """Build (or take from the cache) the kernel library for one GPU architecture."""
    arch = arch_for(compute_capability)
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelsUnavailable("nvcc was not found (CUDA_HOME, PATH, /usr/local/cuda); install the CUDA toolkit "
                                 "to build leptonc's CUDA kernels")
    include = find_ort_include()
    if include is None:
        raise KernelsUnavailable("the ONNX Runtime C API header was not found: set LEPTONC_ORT_INCLUDE to the include/ "
                                 "folder of the ONNX Runtime release archive for your version (the wheels ship no "
                                 "headers)")
    header = (include / "onnxruntime_c_api.h").read_bytes()
    m = re.search(rb"#define ORT_API_VERSION (\d+)", header)
    api_version = int(m.group(1)) if m else 0
    release = _nvcc_release(nvcc)
    source = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    source_sha = hashlib.sha256(source).hexdigest()
    key = hashlib.sha256(b"\0".join([source, header, release.encode(), arch.encode()])).hexdigest()[:20]
    root = cache_dir or Path(os.environ.get("LEPTONC_CACHE") or Path.home() / ".cache" / "leptonc") / "kernels"
    out_dir = root / key
    lib = out_dir / LIBRARY
    if not lib.is_file():
        dirs = _cuda_lib_dirs(nvcc)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{LIBRARY}.{os.getpid()}.tmp"
        cmd = [str(nvcc), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-arch={arch}",
               f"-I{include}", str(SOURCE), "-o", str(tmp), *[f"-L{d}" for d in dirs], *_cublas_flag(dirs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            tail = (proc.stderr or proc.stdout).strip()[-1500:]
            raise KernelsUnavailable(f"nvcc failed building leptonc's CUDA kernels for {arch}:\n{tail}")
        os.replace(tmp, lib)
    return KernelLibrary(lib, arch, release, api_version, source_sha)
