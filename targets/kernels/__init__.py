"""leptonc's own CUDA kernels for ONNX Runtime (`leptonc_cuda.cu`): a custom-op library built with nvcc
for one GPU architecture, shipped inside the bundle and registered by the runtime.

What it holds: `ai.leptonc.MatMulNBitsTiled`, the weight-only int4/int8 matmul of ONNX Runtime's
`com.microsoft.MatMulNBits` on weights that passes/use_kernels.py rearranges (layout.py) so that each
lane's 16-byte load is its tensor-core operands. It streams the weights once for up to 64 rows of
activations (16-row groups above 16 rows: decode at batch 17-64); the M > 64 path (prefill) dequantizes and
calls cuBLAS.

A single row (batch-1 decode) of a product of 3 MiB or more takes a second kernel, `tiled_gemv`, whose
warps issue every load of their K chunk at once. A merged gate|up product followed by SiLU(gate) x up
gets the SwiGLU epilogue (`activation` 1), so the Split, QuickGelu and Mul kernels go.

`ai.leptonc.MatMulF16` runs fp16 products with constant weights (fp16 graphs: every projection and the
LM head), weights stored [N, K]: one row of A streams them in 16-byte loads (`f16_gemv`), more rows go
to cuBLAS; the same SwiGLU epilogue. `ai.leptonc.SwiGLU` is the epilogue alone, for a product computed
at run time. `ai.leptonc.NormMatMulF16` is MatMulF16 with the SkipSimplifiedLayerNormalization in front
folded in (on by default; `--no-norm-prologue`, KernelOptions.norm_prologue, keeps the norm apart).
`ai.leptonc.NormMatMulNBitsTiled` is the same fold in front of MatMulNBitsTiled (on by default,
`--no-norm-prologue-nbits` at compile keeps the norm apart: llama-1b-shape int4 at batch 1 went 1,430 -> 1,442
tok/s on the H100 with the same greedy tokens (2026-11-24); it had measured slower before the o product ahead of
gate|up could overlap it).

`ai.leptonc.MaskLengths` (the attention's lengths from the mask) and `ai.leptonc.LogitsArgMax` (the LM head's fp16
rows to the float32 logits and the greedy token) are the decode step's first and last kernels, in place of six of
ONNX Runtime's and a copy (H100, 2026-11-24: checked against numpy and ONNX Runtime's ops, the same greedy
tokens; with the int4 norm fold, llama-1b-shape int4 went to 1.621-1.626x fp16 at batch 1).

`ai.leptonc.CachedAttention` (attention.cuh) replaces GroupQueryAttention in the GPU form: rotary, cache
append and attention in one decode kernel; prefill on tensor cores. On the H100 (2026-11-23): correct against
float64 and ONNX Runtime's op, the same greedy tokens, smollm2-135m fp16 1,217-1,235 tok/s at batch 1
against 1,097-1,145 with GroupQueryAttention in one call; on by default (`--no-attention-kernel` keeps
GroupQueryAttention).

When a bundle runs on sm_90 or later, the library launches the decode kernels with programmatic dependent launch
(common.cuh). One-row fp16 products choose rows a warp group and warps along K by shape
(f16_plan, from a sweep on the H100). On the H100 (2026-11-23), with the norms
folded, a decode layer runs only these kernels, and each launch overlaps the one before. llama-1b-shape fp16 gained
+5% at batch 1 in one call and 1.5% on average in the next; smollm2 gained 9%. The greedy tokens were the same.

Status (H100, 2026-11-23): MatMulF16 and SwiGLU are correct (relative error <= 9e-4 against
float64); llama-1b-shape fp16 745 tok/s at batch 1 against 676-684 on ONNX Runtime's ops, smollm2-135m
fp16 1,024 against 910, in one call, the same greedy tokens.
MatMulNBitsTiled (H100, 2026-11-23): correct (relative error <= 7e-4 against a float64 reference).
llama-1b-shape int4 with it: 1,035 and 985 tok/s at batch 1 in two calls (1.62x and 1.59x fp16 in the
same call) and 7,700 and 7,209 at batch 16 (1.20x and 1.17x). smollm2-135m int4: 1,130 and 12,637 tok/s against 861 and 6,949 with ONNX Runtime's
kernel, the same greedy tokens. The lowering is on by default for GPU targets (`--no-cuda-kernels` or
`--disable-pass use_leptonc_kernels` turns it off).

Building needs, on the compiling machine (no GPU needed there: a CPU-only CI runner cross-compiles):
  - nvcc (CUDA 12 or 13), found in this order: `CUDA_HOME` (or `CUDA_PATH`), `PATH`, the registry's CUDA
    compiler wheel in this Python environment (`pip install "leptonc[cuda]"` brings nvidia-cuda-nvcc, its
    crt, nvvm, runtime headers and cccl), then /usr/local/cuda;
  - nothing from ONNX Runtime or cuBLAS: the library builds against the project's own declarations of the part
    of their C ABIs it uses (abi/onnxruntime_c_api.h, abi/cublas_v2.h). Where no libcublas is installed the
    link takes a stub carrying only cuBLAS's soname; at load time the GPU machine's libcublas (ONNX Runtime's
    CUDA provider loads it) provides the symbols. `LEPTONC_ORT_INCLUDE` (optional, a build-environment
    setting) points at an ONNX Runtime release's `include/` folder to build against its header instead.
Where nvcc is missing the compile keeps ONNX Runtime's kernels and its report says why and what to install
(passes/use_kernels.py). Builds are cached by the hash of the source (with the .cuh files it includes), the
declarations or ONNX Runtime header, nvcc's version and the architecture.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from leptonc.graph_contract import KERNEL_OPS, LEPTONC_DOMAIN

SOURCE = Path(__file__).with_name("leptonc_cuda.cu")
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.cuh")))  # every kernel family SOURCE includes: part of the build's cache key
LIBRARY = "libleptonc_cuda.so"
DOMAIN = LEPTONC_DOMAIN
BUNDLE_DIR = "kernels"  # where the library goes inside a bundle
OPS = KERNEL_OPS  # every op the library registers, as the manifest lists them


class KernelsUnavailable(Exception):
    """The library cannot be built here; the message says what is missing and how to provide it."""


ABI_DIR = Path(__file__).with_name("abi")  # the project's own declarations of ONNX Runtime's and cuBLAS's C ABI subsets
ABI_HEADERS = (ABI_DIR / "onnxruntime_c_api.h", ABI_DIR / "cublas_v2.h")
CUBLAS_SYMBOLS = ("cublasCreate_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2", "cublasGemmEx")  # abi/cublas_v2.h
CUDA_INSTALL_HINT = ('`pip install "leptonc[cuda]"` brings the CUDA compiler from the registry\'s CUDA wheels; '
                     "or install the CUDA toolkit and set CUDA_HOME")


@dataclass(frozen=True)
class KernelLibrary:
    path: Path
    arch: str            # e.g. sm_90
    nvcc: str            # nvcc's release line, e.g. "13.0, V13.0.48"
    ort_api_version: int  # ORT_API_VERSION of the declarations or header it was built against
    source_sha256: str
    ort_header: str = "leptonc declarations"  # or the ONNX Runtime header's folder (LEPTONC_ORT_INCLUDE)
    cublas: str = ""     # the libcublas it links (its file name), or "stub:libcublas.so.N" where none was installed
    nvcc_found_by: str = ""  # CUDA_HOME, PATH, the nvidia-cuda-nvcc wheel or /usr/local/cuda

    def manifest(self) -> dict:
        return {"file": f"{BUNDLE_DIR}/{LIBRARY}", "domain": DOMAIN, "ops": list(OPS), "arch": self.arch,
                "nvcc": self.nvcc, "nvcc_found_by": self.nvcc_found_by, "ort_api_version": self.ort_api_version,
                "ort_header": self.ort_header, "cublas": self.cublas, "source_sha256": self.source_sha256}


@dataclass(frozen=True)
class CudaToolkit:
    """nvcc and the folders beside it that hold CUDA's headers and libraries."""

    nvcc: Path
    found_by: str

    @property
    def root(self) -> Path:
        return self.nvcc.resolve().parent.parent

    def _wheel_roots(self) -> list[Path]:
        """The registry's CUDA wheels keep one folder per CUDA major (nvidia/cu13) or, for CUDA 12, per package."""
        root = self.root
        if root.parent.name != "nvidia":
            return []
        return [root] + sorted(p for p in root.parent.iterdir() if p.is_dir() and p != root)

    def include_dirs(self) -> list[Path]:
        # A wheel's headers may sit in another site-packages of the same `nvidia` namespace (a virtual environment
        # layered on one that already has nvidia-cuda-runtime, say): every nvidia/cuNN of nvcc's CUDA major counts.
        same_major = [r for r in _cuda_wheel_roots() if r.name == self.root.name] if self._wheel_roots() else []
        roots = [self.root, self.root / "targets" / "x86_64-linux", *self._wheel_roots(), *same_major]
        return list(dict.fromkeys(r / "include" for r in roots if (r / "include").is_dir()))

    def lib_dirs(self) -> list[Path]:
        roots = [self.root, self.root / "targets" / "x86_64-linux", *self._wheel_roots(), *_cuda_wheel_roots()]
        dirs = [r / sub for r in roots for sub in ("lib64", "lib")]
        return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def _cuda_wheel_roots() -> list[Path]:
    """nvidia/cu13, nvidia/cu12, nvidia/cuda_nvcc, ... in this Python environment's site-packages."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    locations = list(spec.submodule_search_locations or []) if spec else []
    return [p for loc in locations for p in sorted(Path(loc).iterdir()) if p.is_dir()]


def find_toolkit() -> CudaToolkit | None:
    """nvcc from CUDA_HOME (or CUDA_PATH), PATH, the nvidia-cuda-nvcc wheel, then /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return CudaToolkit(Path(home) / "bin" / "nvcc", var)
    found = shutil.which("nvcc")
    if found:
        return CudaToolkit(Path(found), "PATH")
    for root in _cuda_wheel_roots():
        if (root / "bin" / "nvcc").is_file():
            return CudaToolkit(root / "bin" / "nvcc", "the nvidia-cuda-nvcc wheel")
    default = Path("/usr/local/cuda/bin/nvcc")
    return CudaToolkit(default, "/usr/local/cuda") if default.is_file() else None


def find_nvcc() -> Path | None:
    toolkit = find_toolkit()
    return toolkit.nvcc if toolkit else None


def find_ort_include() -> Path | None:
    """The optional override: an ONNX Runtime release's include/ folder named by LEPTONC_ORT_INCLUDE."""
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
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError as exc:
        raise KernelsUnavailable(f"{nvcc} does not run ({exc}); {CUDA_INSTALL_HINT}") from exc
    m = re.search(r"release ([^\n]+)", out)
    return m.group(1).strip() if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


def _cublas_link(toolkit: CudaToolkit, cuda_major: str, stub_dir: Path) -> tuple[list[str], str]:
    """Link flags for cuBLAS: the installed libcublas, else a stub with only its soname (written into stub_dir)."""
    soname = f"libcublas.so.{cuda_major}"
    for d in toolkit.lib_dirs():
        if (d / soname).exists() or (d / "libcublas.so").exists():
            name = soname if (d / soname).exists() else "libcublas.so"
            return [f"-L{d}", f"-l:{name}"], name
    stub = stub_dir / "libcublas.so"  # never shipped: the library records only the soname
    if not stub.is_file():
        stub_dir.mkdir(parents=True, exist_ok=True)
        empty = stub_dir / f"cublas_stub.{os.getpid()}.cpp"
        empty.write_text("// stands in for libcublas at link time: its soname and the symbols the library calls\n"
                         + "".join(f'extern "C" int {name}() {{ return 1; }}\n' for name in CUBLAS_SYMBOLS))
        tmp = stub_dir / f".libcublas.so.{os.getpid()}.tmp"
        cmd = [str(toolkit.nvcc), "-shared", "-cudart", "none", "-Xcompiler", "-fPIC", f"-Xlinker=-soname={soname}",
               str(empty), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        empty.unlink(missing_ok=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise KernelsUnavailable(f"nvcc could not link a cuBLAS stub ({soname}):\n{(proc.stderr or proc.stdout)[-800:]}")
        os.replace(tmp, stub)
    return [f"-L{stub_dir}", "-lcublas"], f"stub:{soname}"


def _explain_nvcc_failure(stderr: str) -> str:
    """The next step for the usual reasons nvcc fails on a fresh machine."""
    missing = re.search(r"fatal error: ([\w/.+-]+): No such file", stderr)
    if missing:
        header = missing.group(1)
        package = "nvidia-cuda-cccl" if header.startswith(("nv/", "cuda/", "cub/", "thrust/")) else "nvidia-cuda-runtime"
        return (f"the CUDA header {header} is not beside nvcc: install {package} (part of leptonc[cuda]) in this "
                "environment, or point CUDA_HOME at a full CUDA toolkit")
    if "cicc" in stderr and ("not found" in stderr or "No such file" in stderr):
        return "nvcc's cicc is missing: install nvidia-nvvm (part of leptonc[cuda]) or a full CUDA toolkit"
    if "cannot find -lcudart" in stderr:
        return "libcudart_static.a is not beside nvcc: install nvidia-cuda-runtime (part of leptonc[cuda])"
    return "see nvcc's message above"


def build_library(compute_capability, cache_dir: Path | None = None, kernels_dir: Path | None = None) -> KernelLibrary:
    """Build (or take from the cache) the kernel library for one GPU architecture. No GPU is needed. kernels_dir: the
    sources of another tree's targets/kernels (another commit's, to compare builds) instead of this one's."""
    source_file = (kernels_dir / SOURCE.name) if kernels_dir else SOURCE
    headers = tuple(sorted(kernels_dir.glob("*.cuh"))) if kernels_dir else HEADERS
    arch = arch_for(compute_capability)
    toolkit = find_toolkit()
    if toolkit is None:
        raise KernelsUnavailable("nvcc was not found (CUDA_HOME, PATH, the nvidia-cuda-nvcc wheel, /usr/local/cuda); "
                                 f"{CUDA_INSTALL_HINT}")
    override = find_ort_include()
    if os.environ.get("LEPTONC_ORT_INCLUDE") and override is None:
        raise KernelsUnavailable(f"LEPTONC_ORT_INCLUDE={os.environ['LEPTONC_ORT_INCLUDE']} holds no "
                                 "onnxruntime_c_api.h; unset it to build against leptonc's own declarations")
    ort_header = (override / "onnxruntime_c_api.h") if override else ABI_HEADERS[0]
    header = ort_header.read_bytes()
    m = re.search(rb"#define ORT_API_VERSION (\d+)", header)
    api_version = int(m.group(1)) if m else 0
    release = _nvcc_release(toolkit.nvcc)
    major = re.match(r"(\d+)", release)
    if major is None:
        raise KernelsUnavailable(f"{toolkit.nvcc} reports no CUDA release ({release!r}); {CUDA_INSTALL_HINT}")
    cuda_major = major.group(1)
    source = source_file.read_bytes() + b"".join(h.read_bytes() for h in headers)
    source_sha = hashlib.sha256(source).hexdigest()
    abi = header + b"".join(h.read_bytes() for h in ABI_HEADERS[1:])
    root = cache_dir or Path(os.environ.get("LEPTONC_CACHE") or Path.home() / ".cache" / "leptonc") / "kernels"
    link, cublas = _cublas_link(toolkit, cuda_major, root / f"cublas-stub-{cuda_major}")
    key = hashlib.sha256(b"\0".join([source, abi, release.encode(), arch.encode(), cublas.encode()])).hexdigest()[:20]
    out_dir = root / key
    lib = out_dir / LIBRARY
    if not lib.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{LIBRARY}.{os.getpid()}.tmp"
        # the declarations come first so that they, not a cuBLAS header installed beside nvcc, are what is built against
        includes = [f"-I{override}"] if override else []
        includes += [f"-I{ABI_DIR}", *[f"-I{d}" for d in toolkit.include_dirs()]]
        includes += [f"-isystem={d / 'cccl'}" for d in toolkit.include_dirs() if (d / "cccl").is_dir()]
        cmd = [str(toolkit.nvcc), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-arch={arch}", *includes,
               str(source_file), "-o", str(tmp), *[f"-L{d}" for d in toolkit.lib_dirs()], *link]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            tail = (proc.stderr or proc.stdout).strip()[-1500:]
            raise KernelsUnavailable(f"nvcc ({toolkit.nvcc}, found by {toolkit.found_by}) failed building leptonc's CUDA "
                                     f"kernels for {arch}:\n{tail}\n{_explain_nvcc_failure(tail)}")
        os.replace(tmp, lib)
    return KernelLibrary(lib, arch, release, api_version, source_sha, str(override) if override else "leptonc declarations",
                         cublas, toolkit.found_by)
