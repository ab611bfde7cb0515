"""Hostile input: generated truncated, garbled and ill-typed manifests and ONNX files fed to `inspect`
and `run`. Every case must end in success or a clean error (an exit code from leptonc/errors.py, not
1), never a traceback or a hang. Most cases run in-process through the CLI's main() (fast); a few go
through real subprocesses.

Cases (seeded, 210 in all, each through `inspect` and `run`):
- 110 manifests that are valid JSON and correctly sealed but have fields replaced by wrong types, huge
  or negative sizes, paths out of the bundle, deep nesting, or deleted (they reach the validator and
  the runtime, not just the seal);
- 40 manifests with truncated, flipped or inserted bytes (half run with --no-verify, so the validator
  sees them rather than the seal);
- 60 model.onnx files truncated or with flipped bytes: 30 as bare files, 30 inside a bundle run with
  --no-verify.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import signal
from pathlib import Path

from conftest import run_cli
from leptonc.bundle import MANIFEST, write_manifest
from leptonc.errors import EXIT_CODES

SEED = 20261122
HANG_S = 60
HOSTILE = [None, True, False, -1, 0, 1, 2 ** 31, 2 ** 63, 10 ** 30, 1e308, -0.5, "", "x" * 100_000,
           "../../etc/passwd", "/etc/passwd", "model.onnx\x00", [], {}, [1, "a", None], {"a": {"b": [None]}},
           "float128", "CUDAExecutionProvider", "tensorrt"]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"no result after {HANG_S} s")


def _paths(obj, prefix=()):
    """Every (key path) in a JSON tree, for picking a field to mutate."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            yield from _paths(v, prefix + (i,))


def _mutate(manifest: dict, rng: random.Random) -> tuple[dict, str]:
    m = copy.deepcopy(manifest)
    paths = [p for p in _paths(m) if p and p[0] != "manifest_sha256"]
    # Bias towards what the runtime reads: engine, limits, files, io.
    hot = [p for p in paths if p[0] in ("engine", "limits", "files", "tokenizer", "model", "backend", "toolchain",
                                        "format_version", "target")]
    path = rng.choice(hot if rng.random() < 0.8 else paths)
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    action = rng.random()
    if action < 0.15 and isinstance(parent, dict):
        del parent[key]
        return m, f"delete {path}"
    if action < 0.25:
        deep: list = []
        for _ in range(rng.choice([10, 200, 5000])):
            deep = [deep]
        parent[key] = deep
        return m, f"deep-nest {path}"
    value = rng.choice(HOSTILE)
    parent[key] = value
    return m, f"set {path} = {str(value)[:40]!r}"


def _garble(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["truncate", "flip", "flip", "insert", "zero-run"])
    if kind == "truncate":
        n = rng.randrange(0, len(data))
        return data[:n], f"truncate to {n}"
    b = bytearray(data)
    if kind == "flip":
        for _ in range(rng.choice([1, 1, 3, 20])):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), "flip bits"
    if kind == "insert":
        pos = rng.randrange(len(b))
        return bytes(b[:pos] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9))) + b[pos:]), "insert"
    pos = rng.randrange(len(b))
    b[pos:pos + 64] = bytes(len(b[pos:pos + 64]))
    return bytes(b), "zero 64 bytes"


def _linked_copy(src: Path, dst: Path) -> None:
    """A bundle copy. Real copies, not hard links: ONNX refuses external data with several links (a
    hard-link attack guard), which would break later tests that share the session's tiny bundle."""
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        elif rel.as_posix() not in (MANIFEST, "model.onnx"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / rel)
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(p.read_bytes())


def _cases(tiny_bundle: Path, root: Path) -> list[tuple[str, list[list[str]]]]:
    rng = random.Random(SEED)
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    raw_manifest = (tiny_bundle / MANIFEST).read_bytes()
    onnx_bytes = (tiny_bundle / "model.onnx").read_bytes()
    tok = str(tiny_bundle / "tokenizer")
    cases = []

    def run_argv(b: Path, *extra: str) -> list[str]:
        return ["run", str(b), "--prompt", "The capital", "-n", "1", "--json", *extra]

    for i in range(110):
        b = root / f"m{i}.lepton"
        _linked_copy(tiny_bundle, b)
        mutated, what = _mutate(manifest, rng)
        try:
            write_manifest(b, mutated)
        except (RecursionError, ValueError):  # too deep for json.dumps itself: write it by hand
            (b / MANIFEST).write_text("{\"files\": " + "[" * 100_000 + "]" * 100_000 + "}")
        cases.append((f"manifest {what}", [["inspect", str(b)], run_argv(b)]))
    for i in range(40):
        b = root / f"g{i}.lepton"
        _linked_copy(tiny_bundle, b)
        data, what = _garble(raw_manifest, rng)
        (b / MANIFEST).write_bytes(data)
        extra = ["--no-verify"] if i % 2 else []
        cases.append((f"manifest bytes {what} {extra}", [["inspect", str(b), *extra], run_argv(b, *extra)]))
    for i in range(60):
        data, what = _garble(onnx_bytes, rng)
        if i % 2 == 0:
            d = root / f"bare{i}"
            d.mkdir()
            (d / "model.onnx").write_bytes(data)
            shutil.copyfile(tiny_bundle / "model.onnx.data", d / "model.onnx.data")
            cases.append((f"bare onnx {what}", [["inspect", str(d / "model.onnx")],
                                                ["run", str(d / "model.onnx"), "--tokenizer", tok, "-p", "Hi", "-n",
                                                 "2", "--json"]]))
        else:
            b = root / f"o{i}.lepton"
            _linked_copy(tiny_bundle, b)
            (b / "model.onnx").write_bytes(data)
            cases.append((f"bundle onnx {what}", [["inspect", str(b), "--no-verify"], run_argv(b, "--no-verify")]))
    return cases


def test_fuzzed_manifests_and_onnx_files_fail_cleanly(tiny_bundle, tmp_path, capsys):
    from leptonc.cli import main

    cases = _cases(tiny_bundle, tmp_path)
    assert len(cases) >= 200
    failures, outcomes = [], {}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for what, commands in cases:
            for argv in commands:
                signal.alarm(HANG_S)
                try:
                    main(argv)
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException as exc:  # a traceback: the bug this test exists to catch
                    import traceback

                    code = None
                    failures.append(f"{what}: {argv[0]} raised {type(exc).__name__}: {exc}\n"
                                    f"{''.join(traceback.format_exception(exc)[-3:])}")
                finally:
                    signal.alarm(0)
                    captured = capsys.readouterr()
                if code is not None:
                    outcomes[code] = outcomes.get(code, 0) + 1
                    if code not in EXIT_CODES or code == 1 or (code and "error" not in captured.err.lower()):
                        failures.append(f"{what}: {argv[0]} exit {code}: {captured.err[-500:]}")
    finally:
        signal.signal(signal.SIGALRM, old)
    print("outcomes by exit code:", dict(sorted(outcomes.items())))
    assert not failures, f"{len(failures)} unclean outcomes:\n" + "\n".join(failures[:15])
    assert outcomes.get(7, 0) > 100  # most hostile inputs are refused as bad bundles
    assert outcomes.get(0, 0) > 0  # and harmless mutations (e.g. a description) still run


def test_a_few_fuzzed_cases_through_real_processes(tiny_bundle, tmp_path):
    rng = random.Random(SEED + 1)
    raw = (tiny_bundle / MANIFEST).read_bytes()
    b = tmp_path / "t.lepton"
    _linked_copy(tiny_bundle, b)
    (b / MANIFEST).write_bytes(raw[: len(raw) // 3])
    d = tmp_path / "bare"
    d.mkdir()
    (d / "model.onnx").write_bytes(_garble((tiny_bundle / "model.onnx").read_bytes(), rng)[0][:5000])
    manifest = json.loads(raw)
    manifest["engine"]["io"]["num_layers"] = 10 ** 12
    c = tmp_path / "c.lepton"
    _linked_copy(tiny_bundle, c)
    write_manifest(c, manifest)
    for args in (("inspect", b), ("run", d / "model.onnx", "--tokenizer", tiny_bundle / "tokenizer", "-p", "x"),
                 ("run", c, "-p", "x", "-n", "1")):
        proc = run_cli(*args, timeout=120)
        assert proc.returncode in EXIT_CODES and proc.returncode not in (0, 1), (args, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
        assert "error" in proc.stderr.lower()
