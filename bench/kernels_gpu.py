"""leptonc's product kernels alone on the GPU, op by op, under Nsight Compute's kernel timer: MatMulNBitsTiled (int4,
and the 8-bit LM head) beside MatMulF16 at llama-1b-shape's decode shapes, for each row count. No bundle is compiled:
one round of a kernel change is the library's build (about a minute) and this run, where `bench/gpu_suite.py` compiles
two bundles (about five).

    ncu --metrics gpu__time_duration.sum --csv --page raw python3 bench/kernels_gpu.py run --plan plan.json > ncu.csv
    python3 bench/kernels_gpu.py table ncu.csv --plan plan.json --out kernels.json

`build --ref REF --out L` builds the library of a commit's kernels on any machine with nvcc (no GPU), so that two
builds (main and a branch, say) travel to the GPU machine and `run --library L` times each in the same call.
`compare` does that in one command: each library's int4 products under ncu in turn (clocks left as they are), and
the fp16 kernels once, in one table with each library's speed over the first's and a decode step's products (16
layers and the LM head); `--check` first runs each library's numeric tests:

    python3 bench/kernels_gpu.py build --ref main --out libs/main.so       # here, before the GPU call
    python3 bench/kernels_gpu.py build --ref my-branch --out libs/branch.so
    python3 bench/kernels_gpu.py compare --check --library main=libs/main.so --library branch=libs/branch.so \\
        --out ab.json                                                       # on the GPU machine

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))
from ncu_summary import ncu_rows  # noqa: E402

# llama-1b-shape's products: (name, K, N, SwiGLU epilogue); the LM head runs at 8 bits (scales only) in int4 bundles
SHAPES = [("qkv", 2048, 3072, 0), ("o", 2048, 2048, 0), ("gate|up", 2048, 16384, 1), ("down", 8192, 2048, 0),
          ("lm head", 2048, 128256, 0)]
LAYERS = 16  # llama-1b-shape's decoder layers: a decode step runs the four layer products this many times
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


def plan(shapes: list, rows: list[int], kinds: tuple[str, ...] = ("quantized", "fp16")) -> list[dict]:
    """The sessions `run` makes, in order: int4 (the LM head int8) and fp16 for each shape, each row count; `kinds`
    takes "quantized", "fp16" or both."""
    out = []
    for name, k, n, act in shapes:
        quantized = "int8" if name == "lm head" else "int4"
        for kind in [quantized if wanted == "quantized" else wanted for wanted in kinds]:
            bits = {"int4": 4, "int8": 8, "fp16": 16}[kind]
            for m in rows:
                out.append(dict(shape=name, kind=kind, K=k, N=n, act=act, rows=m, weight_bytes=k * n * bits // 8))
    return out


def parse_rows(text: str, command: str) -> list[int]:
    """--rows: row counts from 1 to 128 (ROWS: the decode sweep's and one prefill's), comma-separated."""
    try:
        rows = [int(r) for r in text.split(",")]
    except ValueError:
        rows = []
    if not rows or any(not 1 <= m <= 128 for m in rows):
        raise SystemExit(f"kernels_gpu {command}: --rows {text!r}: give row counts from 1 to 128, e.g. 16,32,64")
    return rows


def parse_shapes(text: str, command: str) -> list[str] | None:
    """--shapes: a subset of SHAPES' names, comma-separated (None: all); an unknown name is named (exit 1)."""
    if not text:
        return None
    names, known = text.split(","), [s[0] for s in SHAPES]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"kernels_gpu {command}: --shapes: no shape {', '.join(map(repr, unknown))}; "
                         f"give some of {','.join(known)}")
    return names


def run(args) -> int:
    rows = parse_rows(args.rows, "run")
    wanted = parse_shapes(args.shapes, "run")
    kinds = tuple(args.kinds.split(","))
    if any(kind not in ("quantized", "fp16") for kind in kinds):
        raise SystemExit(f"kernels_gpu run: --kinds {args.kinds!r}: give quantized, fp16 or quantized,fp16")
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
    shapes = [s for s in SHAPES if wanted is None or s[0] in wanted]
    sessions = plan(shapes, rows, kinds)
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

    got = subprocess.run(["git", "-C", str(REPO), "archive", args.ref, "targets/kernels"], capture_output=True)
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


def results_of(sessions: list[dict], csv_text: str) -> list[dict]:
    """Each session of the plan with its median run's time (µs) from ncu's CSV: a session's kernels are those of its
    stream (streams in order of first appearance are the plan's sessions in order), added up run by run."""
    kernels = ncu_rows(csv_text)
    streams: dict[str, list] = {}
    for k in kernels:
        streams.setdefault(k["Stream"], []).append((k["Kernel Name"], k["us"]))
    groups = list(streams.values())  # dicts keep insertion order: streams by first kernel
    if len(groups) != len(sessions):
        raise SystemExit(f"kernels_gpu: {len(groups)} streams in the CSV against {len(sessions)} sessions in the "
                         "plan; profile the whole `run` (no --launch-count) with nothing else on the GPU")
    results = []
    for entry, group in zip(sessions, groups):
        per_run = len(group) // entry["repeats"]
        if per_run == 0 or per_run * entry["repeats"] != len(group):
            raise SystemExit(f"kernels_gpu: {len(group)} kernels for {entry['repeats']} runs of {entry}")
        runs = [sum(d for _, d in group[i * per_run:(i + 1) * per_run]) for i in range(entry["repeats"])]
        us = statistics.median(runs)
        results.append(dict(entry, us=round(us, 2), kernels=[n.split("(")[0][:80] for n, _ in group[:per_run]],
                            weight_gb_s=round(entry["weight_bytes"] / (us * 1e3), 1)))
    return results


def table(args) -> int:
    for path in (args.plan, args.csv):
        if not Path(path).is_file():
            raise SystemExit(f"kernels_gpu table: {path} does not exist: `run --plan` writes the plan, ncu the CSV")
    results = results_of(json.loads(Path(args.plan).read_text()), Path(args.csv).read_text(errors="replace"))
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


def _libraries(specs: list[str]) -> dict[str, Path]:
    """NAME=PATH pairs, in order; a bad pair, a repeated name or a missing file is named (exit 1)."""
    libs: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"kernels_gpu compare: --library {spec!r}: give NAME=PATH, e.g. main=libs/main.so")
        if name in libs or name == "fp16":
            raise SystemExit(f"kernels_gpu compare: the name {name!r} is taken; give each library its own name")
        if not Path(path).is_file():
            raise SystemExit(f"kernels_gpu compare: {path} is not a file: build it first "
                             "(bench/kernels_gpu.py build --ref REF --out PATH)")
        libs[name] = Path(path)
    if not libs:
        raise SystemExit("kernels_gpu compare: give at least one --library NAME=PATH")
    return libs


def step_totals(times: dict[tuple[str, int], float], rows: list[int]) -> dict[int, float | None]:
    """A decode step's products at each row count: LAYERS x (qkv + o + gate|up + down) + the LM head (None where one
    is missing)."""
    out: dict[int, float | None] = {}
    for m in rows:
        parts = [times.get((name, m)) for name, *_ in SHAPES]
        out[m] = (round(LAYERS * sum(parts[:4]) + parts[4], 1) if all(p is not None for p in parts) else None)
    return out


def compare_table(columns: dict[str, list[dict]], rows: list[int], shapes: list[str] | None = None
                  ) -> tuple[list[str], dict]:
    """The side-by-side table of named runs' results and its JSON form: µs per (shape, rows) for each name ("fp16":
    the fp16 kernels; a run that failed has no results, "-"), with each library's speed over the first library's in
    brackets, then the decode step's products at each row count. `shapes`: the rows of the table (default: all)."""
    times = {name: {(r["shape"], r["rows"]): r["us"] for r in res} for name, res in columns.items()}
    libs = [name for name in columns if name != "fp16"]
    base, names = libs[0], (["fp16"] if "fp16" in times else []) + libs
    keys = [(shape, m) for shape, *_ in SHAPES for m in rows if shapes is None or shape in shapes]
    totals = {name: step_totals(t, rows) for name, t in times.items()}

    def line(label: str, m: int, values: list, base_value) -> str:
        cells = [label, str(m)]
        for name, v in zip(names, values):
            speed = f" ({base_value / v:.2f}x)" if name not in ("fp16", base) and v and base_value else ""
            cells.append("-" if v is None else f"{v:.1f}{speed}")
        return "| " + " | ".join(cells) + " |"

    lines = ["| shape | rows | " + " | ".join(f"{n} µs" for n in names) + " |",
             "| --- | ---: |" + " ---: |" * len(names)]
    lines += [line(shape, m, [times[n].get((shape, m)) for n in names], times[base].get((shape, m)))
              for shape, m in keys]
    lines += [line(f"decode step ({LAYERS} layers + LM head)", m, [totals[n][m] for n in names], totals[base][m])
              for m in rows]
    record = dict(base=base, results={name: [dict(shape=k[0], rows=k[1], us=times[name][k]) for k in keys
                                             if k in times[name]] for name in names},
                  decode_step_us={name: totals[name] for name in names})
    return lines, record


def pytest_counts(output: str) -> dict[str, int]:
    """pytest's closing counts ("13 passed, 2 skipped in 40.1s" -> {"passed": 13, "skipped": 2})."""
    import re

    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}


def compare(args) -> int:
    import hashlib
    import shutil
    import subprocess
    import tempfile

    libs = _libraries(args.library)
    rows = parse_rows(args.rows, "compare")
    shapes = parse_shapes(args.shapes, "compare")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise SystemExit(f"kernels_gpu compare: --out {args.out}: its folder does not exist; make it or give another")
    ncu = shutil.which("ncu")
    if ncu is None:
        raise SystemExit("kernels_gpu compare: ncu (Nsight Compute) is not on PATH: it times each kernel; install it "
                         "with the CUDA toolkit, or run `run` under your own profiler")
    failed: dict[str, str] = {}  # name -> why (a run that failed, or numeric tests that did not all pass)
    checks: dict[str, dict] = {}
    if args.check:  # each library's int4/int8 products against float64 at every row count (tests/test_kernels_gpu.py)
        for name, path in libs.items():
            print(f"kernels_gpu compare: {name}'s numeric tests", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "tests" / "test_kernels_gpu.py"), "-m",
                                   "gpu", "-q", "-k", "nbits", "-p", "no:cacheprovider", "--kernels-library",
                                   str(path)], capture_output=True, text=True, cwd=REPO)
            checks[name] = dict(pytest_counts(proc.stdout), exit=proc.returncode)
            if proc.returncode != 0 or not checks[name].get("passed"):
                failed[name] = f"numeric tests: {proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ''}"
    runs = ([("fp16", "fp16", next(iter(libs.values())))] if args.fp16 else []) + \
        [(name, "quantized", path) for name, path in libs.items()]
    columns: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kinds, path) in enumerate(runs, 1):
            print(f"kernels_gpu compare: {name} ({i} of {len(runs)}): {path}", file=sys.stderr, flush=True)
            plan_path = Path(tmp) / f"{i}.plan.json"
            argv = [ncu, "--clock-control", args.clock_control, "--metrics", "gpu__time_duration.sum", "--csv",
                    "--page", "raw", sys.executable, __file__, "run", "--plan", str(plan_path),
                    "--rows", args.rows, "--kinds", kinds, "--repeats", str(args.repeats), "--library", str(path),
                    *(["--shapes", args.shapes] if args.shapes else [])]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0 or not plan_path.is_file():  # the others still run: one table, this column empty
                failed[name] = f"run failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}"
                columns[name] = []
                continue
            columns[name] = results_of(json.loads(plan_path.read_text()), proc.stdout)
    lines, record = compare_table(columns, rows, shapes)
    print("\n".join(lines))
    for name, why in failed.items():
        print(f"kernels_gpu compare: {name}: {why}", file=sys.stderr)
    if args.out:
        record.update(command="python3 bench/kernels_gpu.py compare " + " ".join(sys.argv[2:]),
                      clock_control=args.clock_control, checks=checks, failed=failed,
                      libraries={name: dict(path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest())
                                 for name, path in libs.items()})
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 1 if failed else 0


def _positive(text: str) -> int:
    """--repeats: a whole number >= 1 (argparse names the flag and exits 2 otherwise)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run every (op, shape, rows) session; profile this under ncu")
    p_run.add_argument("--plan", required=True, help="where to write the sessions' list (JSON)")
    p_run.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts, e.g. 1,16,32,64")
    p_run.add_argument("--shapes", default="", help="a subset of " + ", ".join(s[0] for s in SHAPES))
    p_run.add_argument("--kinds", default="quantized,fp16",
                       help="quantized (int4, the LM head int8), fp16 or both (default: both)")
    p_run.add_argument("--repeats", type=_positive, default=3)
    p_run.add_argument("--library", help="a kernel library built before (to compare builds); default: this tree's")
    p_build = sub.add_parser("build", help="build a commit's kernel library here (no GPU), for run --library")
    p_build.add_argument("--ref", default="HEAD", help="a commit, branch or tag (default: HEAD)")
    p_build.add_argument("--out", required=True, help="where to write the library, e.g. libs/main.so")
    p_table = sub.add_parser("table", help="ncu's CSV and the plan -> the table (and JSON)")
    p_table.add_argument("csv")
    p_table.add_argument("--plan", required=True)
    p_table.add_argument("--out", help="also write the results as JSON")
    p_cmp = sub.add_parser("compare", help="time several libraries under ncu, one after another: one table")
    p_cmp.add_argument("--library", action="append", default=[], metavar="NAME=PATH",
                       help="a library built before (build --out); repeat it; the first is the ratios' base")
    p_cmp.add_argument("--rows", default="32,64", help="row counts (default: 32,64)")
    p_cmp.add_argument("--shapes", default="", help="a subset of " + ", ".join(s[0] for s in SHAPES))
    p_cmp.add_argument("--repeats", type=_positive, default=3)
    p_cmp.add_argument("--no-fp16", dest="fp16", action="store_false", help="leave out the fp16 column")
    p_cmp.add_argument("--check", action="store_true",
                       help="first run each library's numeric tests (tests/test_kernels_gpu.py -k nbits); "
                            "a library that fails them is named and the exit code is 1")
    p_cmp.add_argument("--clock-control", default="none", choices=["none", "base"],
                       help="ncu's clocks: none leaves them as they are (default), base locks them")
    p_cmp.add_argument("--out", help="also write the table as JSON")
    args = parser.parse_args()
    return {"run": run, "build": build, "table": table, "compare": compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
