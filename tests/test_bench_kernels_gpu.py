"""bench/kernels_gpu.py's parts that need no GPU: `build` (a commit's kernel library, with nvcc), `compare`'s table
from ncu's CSV, its handling of runs and numeric tests that fail, and its messages for bad input. Its GPU runs are
the device's (BENCHMARKS.md, "Reproducing")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from leptonc.targets import kernels

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kernels_gpu.py"


def test_kernels_gpu_build_makes_a_commits_library(tmp_path):
    """bench/kernels_gpu.py build --ref: a ref git lacks is named (exit 1, no traceback); HEAD's kernels build into --out
    (with nvcc here; in a clean checkout they are this tree's, so one build serves this test and tests/test_kernels.py's
    through the build cache)."""
    bad = subprocess.run([sys.executable, str(SCRIPT), "build", "--ref", "no-such-ref", "--out", str(tmp_path / "x.so")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "'no-such-ref'" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "x.so").exists()
    if kernels.find_nvcc() is None:
        pytest.skip('building needs nvcc (pip install "leptonc[nvcc]"); the bad ref was checked')
    out = tmp_path / "libs" / "head.so"
    good = subprocess.run([sys.executable, str(SCRIPT), "build", "--ref", "HEAD", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert good.returncode == 0, good.stderr
    assert out.is_file() and "libcublas.so" in subprocess.run(["readelf", "-d", str(out)], capture_output=True,
                                                              text=True).stdout
    assert "the kernels of HEAD" in good.stdout and "sm_90" in good.stdout


def _kernels_gpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernels_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    spec.loader.exec_module(module)
    return module


def _ncu_csv(kernels: list[tuple[str, str, float]]) -> str:
    """ncu's --csv --page raw form: a line before the table, the header, the units row, then (stream, name, ns)."""
    lines = ['==PROF== Disconnected', '"ID","Stream","Kernel Name","gpu__time_duration.sum"', '"","","","nsecond"']
    lines += [f'"{i}","{stream}","{name}","{ns:,.0f}"' for i, (stream, name, ns) in enumerate(kernels)]
    return "\n".join(lines) + "\n"


def test_kernels_gpu_compare_puts_libraries_side_by_side():
    """compare's parts without a GPU: ncu's kernels are taken per session by stream and the median run is kept; the
    table gives each library's speed over the first's, and the decode step is 16 layers of the four products plus the
    LM head."""
    kg = _kernels_gpu()
    rows = [64]
    sessions = kg.plan(kg.SHAPES, rows, ("quantized",))
    for entry in sessions:
        entry["repeats"] = 3

    def csv_for(us_of: dict, stream0: int) -> str:
        kernels = []
        for i, entry in enumerate(sessions):
            us = us_of[entry["shape"]]
            for run_us in (us * 1.5, us, us * 0.9):  # the median run is us * 1.0 (two kernels a run)
                kernels += [(str(stream0 + i), "tiled_stream_groups<4>(x)", run_us * 600),
                            (str(stream0 + i), "pdl_helper(x)", run_us * 400)]
        return _ncu_csv(kernels)

    base_us = {"qkv": 10.0, "o": 8.0, "gate|up": 30.0, "down": 20.0, "lm head": 200.0}
    new_us = {**base_us, "qkv": 5.0, "lm head": 250.0}
    main = kg.results_of(sessions, csv_for(base_us, 100))
    assert [r["us"] for r in main] == [10.0, 8.0, 30.0, 20.0, 200.0]
    assert main[0]["kernels"] == ["tiled_stream_groups<4>", "pdl_helper"] and main[4]["kind"] == "int8"
    lines, record = kg.compare_table({"main": main, "branch": kg.results_of(sessions, csv_for(new_us, 7))}, rows)
    assert lines[0] == "| shape | rows | main µs | branch µs |"
    assert "| qkv | 64 | 10.0 | 5.0 (2.00x) |" in lines and "| lm head | 64 | 200.0 | 250.0 (0.80x) |" in lines
    assert record["decode_step_us"] == {"main": {64: 16 * 68.0 + 200.0}, "branch": {64: 16 * 63.0 + 250.0}}
    assert lines[-1].startswith("| decode step (16 layers + LM head) | 64 | 1288.0 | 1258.0 (1.02x) |")
    with pytest.raises(SystemExit, match="5 streams in the CSV against 4 sessions"):
        kg.results_of(sessions[:4], csv_for(base_us, 0))


def test_kernels_gpu_compare_names_what_failed_and_keeps_going(tmp_path):
    """Where a library's run fails (here: no CUDA provider behind a stand-in ncu that runs the command as it is), the
    other libraries still run, each failure is named, the table has empty columns and the exit code is 1; with --check,
    numeric tests that all skipped are not a pass."""
    import json
    import os
    import stat
    fake = tmp_path / "bin" / "ncu"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport os, sys\nargs = sys.argv[1:]\n"
                    f"i = args.index({sys.executable!r})\nos.execv(args[i], args[i:])\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    libs = []
    for name in ("main", "branch"):
        (tmp_path / f"{name}.so").write_bytes(b"never loaded: the run stops before")
        libs += ["--library", f"{name}={tmp_path / name}.so"]
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "compare", *libs, "--check", "--rows", "64", "--shapes", "o",
                           "--out", str(tmp_path / "ab.json")], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "| o | 64 | - | - | - |" in proc.stdout, proc.stdout
    for name in ("fp16", "main", "branch"):
        assert f"kernels_gpu compare: {name}: run failed (exit 2)" in proc.stderr, proc.stderr
    record = json.loads((tmp_path / "ab.json").read_text())
    assert set(record["failed"]) == {"fp16", "main", "branch"} and record["checks"]["main"].get("passed") is None
    assert record["checks"]["main"]["skipped"] > 0


def test_pytest_counts_reads_the_closing_line():
    kg = _kernels_gpu()
    assert kg.pytest_counts("..\n13 passed, 2 skipped, 40 deselected in 40.1s\n") == {
        "passed": 13, "skipped": 2, "deselected": 40}
    assert kg.pytest_counts("") == {} and kg.pytest_counts("1 failed, 12 passed in 3s") == {"failed": 1, "passed": 12}


@pytest.mark.parametrize("argv, said, code", [
    (["--library", "main"], "give NAME=PATH", 1),
    (["--library", "main=/no/such.so"], "is not a file: build it first", 1),
    (["--library", "a=LIB", "--library", "a=LIB"], "the name 'a' is taken", 1),
    (["--library", "a=LIB", "--rows", "64,x"], "give row counts from 1 to 128", 1),
    (["--library", "a=LIB", "--shapes", "qkv,lmhead"], "--shapes: no shape 'lmhead'", 1),
    (["--library", "a=LIB", "--repeats", "0"], "--repeats: '0': give a whole number >= 1", 2),
    (["--library", "a=LIB", "--out", "/no/such/dir/ab.json"], "its folder does not exist", 1),
])
def test_kernels_gpu_compare_names_bad_input(tmp_path, argv, said, code):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"not checked before the GPU run")
    proc = subprocess.run([sys.executable, str(SCRIPT), "compare", *[a.replace("LIB", str(lib)) for a in argv]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
