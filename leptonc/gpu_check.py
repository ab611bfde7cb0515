"""The GPU check of a cross-compiled bundle: what only the GPU can verify, run once per bundle and GPU.

A GPU bundle compiled where ONNX Runtime has no CUDA provider (a CPU-only CI runner) is verified there as far
as the CPU can: the graph before the lowering to leptonc's CUDA kernels runs on the CPU provider against
PyTorch (compiler.py). Its outputs on the verification prompts become the bundle's GPU reference
(`checks/gpu_reference.json`: per position the top-k token ids and logits), and the manifest lists the check
under `verification.pending_gpu_checks`. On a GPU, `leptonc verify BUNDLE` runs it, and so does the first load
by `leptonc run`, `bench`, `eval` and `serve` (`--no-verify` skips it): the bundle as built, leptonc's kernels
included, on the CUDA provider, must pick the reference's greedy token at >= 90% of the positions.

The result is recorded beside the bundle, outside its hashed files: `NAME.lepton/gpu_check.json` where the
bundle folder is writable, otherwise the user cache (`$LEPTONC_CACHE` or ~/.cache/leptonc, `gpu-checks/`), keyed
by the manifest's sha256 (which covers every file's hash) and the GPU. A passed check is not run again on that
GPU; a failed one refuses the bundle with exit 6 naming the check, every time, until the bundle is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from leptonc.atomic_rename import atomic_write_text
from leptonc.errors import VerificationError

CHECK_NAME = "gpu_parity"
REFERENCE_FILE = "checks/gpu_reference.json"
SIDECAR = "gpu_check.json"
TOP_K = 8
MIN_TOP1_AGREEMENT = 0.9


class GpuCheckFailed(VerificationError):
    """A bundle's GPU check failed here (exit 6, like any failed verification)."""


def pending_checks(manifest: dict) -> list[dict]:
    return list((manifest.get("verification") or {}).get("pending_gpu_checks") or [])


def _positions(runner, prompts: list[np.ndarray], decode_tokens: list[np.ndarray]) -> list[np.ndarray]:
    """The logits row of every position the verification visits: each prompt's prefill, then its decode steps."""
    rows = []
    for ids, tokens in zip(prompts, decode_tokens):
        got = runner.prefill(ids, np.ones_like(ids))[0]
        rows.extend(np.asarray(got[i], np.float32) for i in range(got.shape[0]))
        for token in tokens:
            rows.append(np.asarray(runner.decode(np.asarray([int(token)]))[0], np.float32))
    return rows


def record_reference(runner, trace) -> dict:
    """The CPU-verified graph's outputs on the verification inputs (`trace`: verify.ReferenceTrace)."""
    return _reference(_positions(runner, trace.prompt_ids, trace.decode_tokens), trace)


def reference_from_trace(trace) -> dict:
    """PyTorch's own logits as the reference (where the CPU can run no form of the GPU graph)."""
    rows = [np.asarray(r, np.float32) for p, d in zip(trace.prefill_logits, trace.decode_logits) for r in (*p, *d)]
    return _reference(rows, trace)


def _reference(rows: list[np.ndarray], trace) -> dict:
    top = [np.argsort(-r)[:TOP_K] for r in rows]
    return {"prompts": [ids.tolist() for ids in trace.prompt_ids],
            "decode_tokens": [t.tolist() for t in trace.decode_tokens],
            "top_ids": [t.tolist() for t in top],
            "top_logits": [[round(float(r[i]), 4) for i in t] for r, t in zip(rows, top)]}


def pending_entry(precision: str, against: str = "the CPU-verified graph") -> dict:
    return {"name": CHECK_NAME, "reference": REFERENCE_FILE,
            "rule": f"top-1 agreement >= {MIN_TOP1_AGREEMENT:g} with {against} ({precision})",
            "why": "the graph after use_leptonc_kernels (leptonc's CUDA kernels) runs only on ONNX Runtime's "
                   "CUDA provider"}


def compare(rows: list[np.ndarray], reference: dict) -> dict:
    """The rule, applied to this GPU's logits rows against the reference."""
    top_ids, top_logits = reference["top_ids"], reference["top_logits"]
    if len(rows) != len(top_ids):
        return {"status": "failed", "reason": f"{len(rows)} positions against the reference's {len(top_ids)}"}
    agree = sum(int(int(r.argmax()) == ids[0]) for r, ids in zip(rows, top_ids))
    error = max(float(np.abs(r[ids] - np.asarray(vals)).max()) for r, ids, vals in zip(rows, top_ids, top_logits))
    agreement = agree / len(rows)
    return {"status": "passed" if agreement >= MIN_TOP1_AGREEMENT else "failed", "positions": len(rows),
            "top1_agreement": round(agreement, 4), "max_abs_error_top_k": round(error, 4),
            "rule": f"top-1 agreement >= {MIN_TOP1_AGREEMENT:g} with the bundle's reference"}


def run_check(bundle, runner) -> dict:
    """Run the pending GPU check of `bundle` on `runner` (the bundle's own runner on the GPU)."""
    reference = json.loads((bundle.path / REFERENCE_FILE).read_text())
    prompts = [np.asarray(p, np.int64) for p in reference["prompts"]]
    tokens = [np.asarray(t, np.int64) for t in reference["decode_tokens"]]
    return {"check": CHECK_NAME, **compare(_positions(runner, prompts, tokens), reference)}


# ---- the recorded result ------------------------------------------------------------------------

def bundle_key(bundle_path: Path) -> str:
    return hashlib.sha256((Path(bundle_path) / "manifest.json").read_bytes()).hexdigest()


def _record_paths(bundle_path: Path, key: str) -> list[Path]:
    cache = Path(os.environ.get("LEPTONC_CACHE") or Path.home() / ".cache" / "leptonc") / "gpu-checks"
    return [Path(bundle_path) / SIDECAR, cache / f"{key}.json"]


def recorded_result(bundle_path: Path, device: str) -> dict | None:
    """The result recorded for this bundle (its exact manifest) on `device`, or None."""
    key = bundle_key(bundle_path)
    for path in _record_paths(bundle_path, key):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("manifest_sha256") == key:
            result = (record.get("devices") or {}).get(device)
            if result is not None:
                return result
    return None


def record_result(bundle_path: Path, device: str, result: dict) -> Path:
    """Write `result` beside the bundle (or, where the bundle is read-only, into the user cache)."""
    key = bundle_key(bundle_path)
    for path in _record_paths(bundle_path, key):
        try:
            record = json.loads(path.read_text()) if path.is_file() else {}
            if record.get("manifest_sha256") != key:
                record = {"manifest_sha256": key, "devices": {}}
            record["devices"][device] = {**result, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
            return path
        except OSError:
            continue
    raise OSError(f"could not record the GPU check of {bundle_path} (the bundle folder and the cache are read-only)")


def refusal(bundle_path: Path, result: dict) -> GpuCheckFailed:
    return GpuCheckFailed(
        f"{Path(bundle_path).name} failed its GPU check {result.get('check', CHECK_NAME)} on this GPU: "
        f"{result.get('reason') or 'top-1 agreement %s (rule: %s)' % (result.get('top1_agreement'), result.get('rule'))}",
        hint="recompile the bundle on this GPU (or report the cross-compile); --no-verify loads it anyway")


def ensure_checked(bundle, device: str, runner, *, force: bool = False) -> dict | None:
    """Before a GPU runs `bundle`: its pending GPU check on `runner` (the bundle's runner on that GPU), run once
    per GPU and recorded (`force`: run it again). Returns the result (None where nothing is pending); raises
    GpuCheckFailed (exit 6) for a failed one, now or recorded earlier."""
    if not pending_checks(bundle.manifest):
        return None
    result = None if force else recorded_result(bundle.path, device)
    if result is None:
        result = run_check(bundle, runner)
        result["recorded_in"] = str(record_result(bundle.path, device, result))
    if result.get("status") != "passed":
        raise refusal(bundle.path, result)
    return result


def gpu_name() -> str:
    """This machine's GPU, as the key of a recorded result ("NVIDIA H100 80GB HBM3 sm_90")."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{torch.cuda.get_device_name(0)} sm_{major}{minor}"
    except ImportError:
        pass
    return "cuda"


def verify_bundle(path) -> dict:
    """`leptonc verify BUNDLE`: authenticate the bundle and run its pending GPU checks here (again, if recorded)."""
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner

    bundle = load_bundle(path, verify=True)
    bundle.verified = False  # the check runs below, forced, not as a first-load check
    runner = open_bundle_runner(bundle)
    try:
        result = ensure_checked(bundle, gpu_name(), runner, force=True)
    finally:
        runner.release()
    return {"bundle": str(bundle.path), "pending_gpu_checks": pending_checks(bundle.manifest), "result": result}
