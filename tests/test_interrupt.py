"""A compile that dies never leaves a partial bundle and never damages the previous one at the same path.

Real processes (`python -m leptonc compile tiny-llama`) are killed with SIGKILL or SIGTERM at random
moments, biased towards the part of the compile that writes files; after each kill the output path
must hold a complete, verifiable bundle (the previous one, or the new one if the compile finished) or
nothing at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leptonc.bundle import MANIFEST, TMP_PREFIX, exchange_paths, load_bundle, staging_dir

TRIALS = 20
SEED = 1122


def _compile(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "leptonc", "compile", "tiny-llama", "-o", str(out), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _identity(bundle: Path) -> str:
    return hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()


def _wait_for_staging(parent: Path, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until the compile's staging directory appears (it starts writing), or until it exits."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if any(p.name.endswith(f"-{proc.pid}") for p in parent.glob(f"{TMP_PREFIX}*")) or proc.poll() is not None:
            break
        time.sleep(0.01)
    return time.monotonic() - start


def _wait_for_manifest(parent: Path, proc: subprocess.Popen, timeout: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        if any((p / MANIFEST).exists() for p in parent.glob(f"{TMP_PREFIX}*-{proc.pid}")):
            return
        time.sleep(0.002)


def test_killed_compiles_leave_old_or_new_complete_bundle(tiny_bundle, tmp_path):
    rng = random.Random(SEED)
    work = tmp_path / "out"
    work.mkdir()
    reference = tmp_path / "ref" / "tiny.lepton"
    # One uninterrupted run: how long the writing part takes, and what a complete new bundle looks like.
    t0 = time.monotonic()
    proc = _compile(reference)
    started = _wait_for_staging(reference.parent if reference.parent.exists() else tmp_path, proc, 300)
    reference.parent.mkdir(exist_ok=True)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    writing = max(time.monotonic() - t0 - started, 0.5)
    new_files = json.loads((reference / MANIFEST).read_text())["files"]

    out = work / "tiny.lepton"
    outcomes = {"previous": 0, "new": 0, "absent": 0}
    for trial in range(TRIALS):
        fresh = trial % 4 == 3  # every fourth trial: no previous bundle at the path
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        elif not out.exists():
            shutil.copytree(tiny_bundle, out)
        before = _identity(out) if out.exists() else None
        sig = signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM
        proc = _compile(out)
        _wait_for_staging(work, proc, 300)
        if trial % 3 == 2:
            # Aim at the replace itself: the sealed manifest is the last file written before the rename.
            _wait_for_manifest(work, proc, 300)
            time.sleep(rng.uniform(0, 0.08))
        else:  # anywhere in the writing part (or, for some, right at its start)
            time.sleep(rng.uniform(0, writing * 1.1) if rng.random() < 0.9 else rng.uniform(0, 0.2))
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr, stderr
        if sig == signal.SIGTERM and code != 0:
            assert code in (130, -signal.SIGTERM), (code, stderr)
            # A clean unwind removes its own staging directory.
            assert not [p for p in work.glob(f"{TMP_PREFIX}*") if p.name.endswith(f"-{proc.pid}")]
        names = {p.name for p in work.iterdir() if not p.name.startswith(TMP_PREFIX)}
        assert names <= {"tiny.lepton"}, names  # nothing half-written under another name
        if not out.exists():
            assert before is None, f"trial {trial}: the previous bundle vanished (signal {sig.name}, exit {code})"
            outcomes["absent"] += 1
            continue
        bundle = load_bundle(out, verify=True)  # every file present and matching its sha256, seal intact
        if before is not None and _identity(out) == before:
            outcomes["previous"] += 1
        else:
            assert bundle.manifest["files"] == new_files, f"trial {trial}: a bundle that is neither old nor new"
            outcomes["new"] += 1
    print("outcomes:", outcomes)
    assert sum(outcomes.values()) == TRIALS
    # Leftover staging folders of SIGKILLed compiles are removed by the next compile into the folder.
    proc = _compile(out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert not list(work.glob(f"{TMP_PREFIX}*")), list(work.iterdir())
    load_bundle(out, verify=True)


def test_atomic_exchange_and_fallback_recovery(tiny_bundle, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not exchange_paths(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is unavailable on this kernel or filesystem; the fallback is used")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"

    # Fallback path: a compile that died between "old bundle aside" and "new bundle in" left the
    # path empty; the next compile into the folder puts the old bundle back before anything else.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "m.lepton"
    aside = tmp_path / f"{TMP_PREFIX}old-m.lepton-{dead.pid}"
    shutil.copytree(tiny_bundle, aside)
    staging = staging_dir(out)
    try:
        assert out.is_dir() and not aside.exists()
        load_bundle(out, verify=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # ... also when the next compile in that folder writes another bundle.
    shutil.rmtree(out)
    shutil.copytree(tiny_bundle, aside)
    staging = staging_dir(tmp_path / "other.lepton")
    try:
        assert out.is_dir() and not aside.exists()
        load_bundle(out, verify=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def test_a_full_disk_leaves_the_previous_bundle_intact(tiny_bundle, tmp_path):
    """A write that fails (here: RLIMIT_FSIZE makes any file over 64 KiB fail with EFBIG, standing in for
    ENOSPC; Python ignores SIGXFSZ) aborts the compile without touching the bundle at the path."""
    import resource

    out = tmp_path / "tiny.lepton"
    shutil.copytree(tiny_bundle, out)
    before = _identity(out)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = subprocess.run([sys.executable, "-m", "leptonc", "compile", "tiny-llama", "-o", str(out)],
                          capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert proc.returncode == 10, proc.stderr[-2000:]  # OutputWriteError: a message, not a traceback
    assert "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())  # rich wraps long lines
    assert "File too large" in message or "No space" in message, proc.stderr[-2000:]
    assert _identity(out) == before
    load_bundle(out, verify=True)
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))  # the failed compile removed its staging folder


def test_interrupt_is_raised_only_in_leptonc_code(monkeypatch):
    """The SIGINT/SIGTERM handler (leptonc/cli.py): in leptonc's own frames it raises KeyboardInterrupt at
    once; in another library's frame (which C++ may be calling back: raising there aborts the process)
    it asks again shortly instead; after its patience runs out it raises wherever the program is."""
    import types

    from leptonc import cli

    sent = []
    monkeypatch.setattr(cli.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    handler = cli._Interrupts()
    theirs = types.SimpleNamespace(f_globals={"__name__": "torch.nn.modules.module"})
    ours = types.SimpleNamespace(f_globals={"__name__": "leptonc.passes.cleanup"})

    handler.handle(signal.SIGTERM, theirs)  # deferred: a retry is scheduled, nothing raised
    assert handler.timer is not None
    handler.timer.join(2)
    assert sent == [(os.getpid(), signal.SIGTERM)]
    with pytest.raises(KeyboardInterrupt):
        handler.handle(signal.SIGTERM, ours)
    assert handler.first is None  # the next signal starts a fresh wait

    handler.handle(signal.SIGINT, theirs)
    handler.timer.cancel()
    handler.first -= handler.PATIENCE_S + 1  # asked for longer than its patience
    with pytest.raises(KeyboardInterrupt):
        handler.handle(signal.SIGINT, theirs)
