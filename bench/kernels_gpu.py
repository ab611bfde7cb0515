"""leptonc's product kernels alone on the GPU, op by op, under Nsight Compute's kernel timer: MatMulNBitsTiled (int4,
and the 8-bit LM head) beside MatMulF16 at llama-1b-shape's decode shapes, for each row count. No bundle is compiled:
one round of a kernel change is the library's build (about a minute) and this run, where `bench/gpu_suite.py` compiles
two bundles (about five).

    ncu --metrics gpu__time_duration.sum --csv --page raw python3 bench/kernels_gpu.py run --plan plan.json > ncu.csv
    python3 bench/kernels_gpu.py table ncu.csv --plan plan.json --out kernels.json

`build --ref REF --out L` builds the library of a commit's kernels on any machine with nvcc (no GPU), so that two
builds (main and a branch, say) travel to the GPU machine and `run --library L` times each in the same call.

`run` builds the kernel library (or takes `--library L`, one built before: two builds compared in one device call),
then makes one single-node session for each (op, shape, rows) on a CUDA stream of its own (ONNX Runtime's
user_compute_stream) and runs it `--repeats` times; the plan lists them in that order.
`table` reads ncu's CSV, takes each session's kernels by their stream (streams in order of first appearance are the
plan's sessions in order), adds up the kernels of each run, and prints the median run of each (µs), the weights'
bandwidth and int4's speed over fp16's. ncu flushes the caches before each kernel (its default), so the weights come
from device memory, as in a decode step; its clocks are locked to base, so read the ratios. Needs onnxruntime-gpu,
nvcc (for the library) and ncu; no PyTorch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from ncu_summary import ncu_rows  # noqa: E402

# llama-1b-shape's products: (name, K, N, SwiGLU epilogue); the LM head runs at 8 bits (scales only) in int4 bundles
SHAPES = [("qkv", 2048, 3072, 0), ("o", 2048, 2048, 0), ("gate|up", 2048, 16384, 1), ("down", 8192, 2048, 0),
          ("lm head", 2048, 128256, 0)]
ROWS = (1, 16, 32, 64, 128)
INT4_BLOCK = 128  # the gpu suite's int4 bundles (--int4-block 128)


def _nbits_model(k: int, n: int, act: int, bits: int, rng):
    from onnx import TensorProto, helper, numpy_helper

    from leptonc.targets.kernels.layout import interleave_gate_up, tile_nbits

    block = INT4_BLOCK
    blocks = -(-k // block)
    codes = rng.integers(0, 2 ** bits, size=(n, blocks * block), dtype=np.uint8)
    packed = ((codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, blocks, block // 2) if bits == 4
              else codes.reshape(n, blocks, block)).astype(np.uint8)
    scales = (rng.random((n, blocks)) * 0.01 + 0.001).astype(np.float16).reshape(-1)
    zeros = None
    if bits == 4:
        z = rng.integers(0, 16, size=(n, blocks + blocks % 2), dtype=np.uint8)
        zeros = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    if act:
        packed, scales, zeros = interleave_gate_up(packed, scales, zeros, n)
    symmetric = bits == 8
    tiled, sz = tile_nbits(packed, scales, zeros, k, n, bits, block, scales_only=symmetric)
    node = helper.make_node("MatMulNBitsTiled", ["x", "b", "sz"], ["y"], domain="ai.leptonc", K=k, N=n, bits=bits,
                            block_size=block, **({"activation": 1} if act else {}),
                            **({"symmetric": 1} if symmetric else {}))
    return node, [numpy_helper.from_array(tiled, "b"), numpy_helper.from_array(sz, "sz")], TensorProto.FLOAT16


def _f16_model(k: int, n: int, act: int, rng):
    from onnx import TensorProto, helper, numpy_helper

    w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float16)
    node = helper.make_node("MatMulF16", ["x", "w"], ["y"], domain="ai.leptonc", K=k, N=n, activation=act)
    return node, [numpy_helper.from_array(w, "w")], TensorProto.FLOAT16


def _model_bytes(node, inits, dtype, k: int, out_n: int) -> bytes:
    from onnx import helper

    graph = helper.make_graph([node], "kernel", [helper.make_tensor_value_info("x", dtype, ["M", k])],
                              [helper.make_tensor_value_info("y", dtype, ["M", out_n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.leptonc", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def plan(shapes: list, rows: list[int]) -> list[dict]:
    """The sessions `run` makes, in order: int4 (the LM head int8) and fp16 for each shape, each row count."""
    out = []
    for name, k, n, act in shapes:
        quantized = "int8" if name == "lm head" else "int4"
        for kind in (quantized, "fp16"):
            bits = {"int4": 4, "int8": 8, "fp16": 16}[kind]
            for m in rows:
                out.append(dict(shape=name, kind=kind, K=k, N=n, act=act, rows=m, weight_bytes=k * n * bits // 8))
    return out


def run(args) -> int:
    if args.library and not Path(args.library).is_file():
        raise SystemExit(f"kernels_gpu run: --library {args.library} is not a file: give a libleptonc_cuda.so built "
                         "before (leptonc.targets.kernels.build_library), or leave it out to build this tree's")
    import onnxruntime as ort

    from leptonc.runtime.cuda_driver import CudaDriver
    from leptonc.targets.kernels import build_library

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("kernels_gpu: onnxruntime has no CUDA provider here (install onnxruntime-gpu)", file=sys.stderr)
        return 2
    library = args.library or str(build_library((9, 0)).path)
    driver = CudaDriver(0)
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes.split(",")]
    sessions = plan(shapes, [int(r) for r in args.rows.split(",")])
    rng = np.random.default_rng(0)
    models: dict = {}
    streams = []  # kept until the end, so that no two sessions' streams can share an id in ncu's record
    for entry in sessions:
        key = (entry["shape"], entry["kind"])
        if key not in models:
            models.clear()  # one shape's weights at a time on the host
            k, n, act = entry["K"], entry["N"], entry["act"]
            node, inits, dtype = (_f16_model(k, n, act, rng) if entry["kind"] == "fp16"
                                  else _nbits_model(k, n, act, 4 if entry["kind"] == "int4" else 8, rng))
            models[key] = _model_bytes(node, inits, dtype, k, n // 2 if act else n)
        stream = driver.stream()
        streams.append(stream)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.register_custom_ops_library(library)
        providers = [("CUDAExecutionProvider", {"device_id": "0", "user_compute_stream": str(stream),
                                                "do_copy_in_default_stream": "0"})]
        sess = ort.InferenceSession(models[key], so, providers=providers)
        x = (rng.standard_normal((entry["rows"], entry["K"])) * 0.5).astype(np.float16)
        binding = sess.io_binding()
        binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output("y", "cuda", 0)
        for _ in range(args.repeats):
            sess.run_with_iobinding(binding)
        driver.sync(stream)
        entry["repeats"] = args.repeats
        del binding, sess
        print(f"kernels_gpu: {entry['kind']} {entry['shape']} rows {entry['rows']}: {args.repeats} runs",
              file=sys.stderr, flush=True)
    for stream in streams:
        driver.destroy_stream(stream)
    Path(args.plan).write_text(json.dumps(sessions, indent=1))
    return 0


def build(args) -> int:
    import io
    import shutil
    import subprocess
    import tarfile
    import tempfile

    from leptonc.targets.kernels import KernelsUnavailable, build_library

    repo = Path(__file__).resolve().parents[1]
    got = subprocess.run(["git", "-C", str(repo), "archive", args.ref, "targets/kernels"], capture_output=True)
    if got.returncode != 0:
        raise SystemExit(f"kernels_gpu build: git has no targets/kernels at {args.ref!r} "
                         f"({got.stderr.decode(errors='replace').strip()}); "
                         "give a commit, branch or tag of this repository")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(got.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        try:
            lib = build_library((9, 0), kernels_dir=Path(tmp) / "targets" / "kernels")
        except KernelsUnavailable as exc:
            raise SystemExit(f"kernels_gpu build: {exc}") from None
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib.path, args.out)
    except OSError as exc:
        raise SystemExit(f"kernels_gpu build: cannot write {args.out} ({exc.strerror}); give a writable path") from None
    print(f"{args.out}: the kernels of {args.ref} (sources {lib.source_sha256[:12]}), {lib.arch}, nvcc {lib.nvcc}")
    return 0


def table(args) -> int:
    for path in (args.plan, args.csv):
        if not Path(path).is_file():
            raise SystemExit(f"kernels_gpu table: {path} does not exist: `run --plan` writes the plan, ncu the CSV")
    sessions = json.loads(Path(args.plan).read_text())
    kernels = ncu_rows(Path(args.csv).read_text(errors="replace"))
    streams: dict[str, list] = {}
    for k in kernels:
        streams.setdefault(k["Stream"], []).append((k["Kernel Name"], k["us"]))
    groups = list(streams.values())  # dicts keep insertion order: streams by first kernel
    if len(groups) != len(sessions):
        raise SystemExit(f"kernels_gpu table: {len(groups)} streams in the CSV against {len(sessions)} sessions in the "
                         "plan; profile the whole `run` (no --launch-count) with nothing else on the GPU")
    results = []
    for entry, group in zip(sessions, groups):
        per_run = len(group) // entry["repeats"]
        if per_run == 0 or per_run * entry["repeats"] != len(group):
            raise SystemExit(f"kernels_gpu table: {len(group)} kernels for {entry['repeats']} runs of {entry}")
        runs = [sum(d for _, d in group[i * per_run:(i + 1) * per_run]) for i in range(entry["repeats"])]
        us = statistics.median(runs)
        results.append(dict(entry, us=round(us, 2), kernels=[n.split("(")[0][:80] for n, _ in group[:per_run]],
                            weight_gb_s=round(entry["weight_bytes"] / (us * 1e3), 1)))
    fp16 = {(r["shape"], r["rows"]): r["us"] for r in results if r["kind"] == "fp16"}
    print("| shape | rows | kind | µs | weights GB/s | fp16 µs | speed over fp16 |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        if r["kind"] == "fp16":
            continue
        base = fp16.get((r["shape"], r["rows"]))
        r["over_fp16"] = round(base / r["us"], 2) if base else None
        print(f"| {r['shape']} | {r['rows']} | {r['kind']} | {r['us']:.1f} | {r['weight_gb_s']:.0f} | "
              f"{base if base is not None else '-'} | {str(r['over_fp16']) + 'x' if r['over_fp16'] else '-'} |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(command="ncu --metrics gpu__time_duration.sum --csv --page raw "
                                                  "python3 bench/kernels_gpu.py run", results=results), indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run every (op, shape, rows) session; profile this under ncu")
    p_run.add_argument("--plan", required=True, help="where to write the sessions' list (JSON)")
    p_run.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts, e.g. 1,16,32,64")
    p_run.add_argument("--shapes", default="", help="a subset of " + ", ".join(s[0] for s in SHAPES))
    p_run.add_argument("--repeats", type=int, default=3)
    p_run.add_argument("--library", help="a kernel library built before (to compare builds); default: this tree's")
    p_build = sub.add_parser("build", help="build a commit's kernel library here (no GPU), for run --library")
    p_build.add_argument("--ref", default="HEAD", help="a commit, branch or tag (default: HEAD)")
    p_build.add_argument("--out", required=True, help="where to write the library, e.g. libs/main.so")
    p_table = sub.add_parser("table", help="ncu's CSV and the plan -> the table (and JSON)")
    p_table.add_argument("csv")
    p_table.add_argument("--plan", required=True)
    p_table.add_argument("--out", help="also write the results as JSON")
    args = parser.parse_args()
    return {"run": run, "build": build, "table": table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
