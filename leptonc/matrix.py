"""`leptonc compile --config leptonc.toml`: a build matrix for CI, one bundle per entry, one summary.

    [defaults]                 # optional: applied to every entry (an entry's own keys win)
    output_dir = "dist"        # relative paths are relative to the .toml file
    max_batch = 8

    [[build]]
    source = "smollm2-135m"
    targets = ["cpu", "h100"]  # `target`/`targets`, `precision`/`precisions`: lists expand to one
    precision = "fp16"         #   entry per combination
    name = "smollm2"           # bundle: OUTPUT_DIR/NAME.TARGET.PRECISION.lepton (or give `output`)

Keys of an entry: source, target(s), precision(s), backend, name, output, output_dir, max_batch,
max_sequence, passes, disable_passes, verify, max_parity_error, allow_pickle, trust_remote_code, and the
tables of typed settings `kernels`, `tensorrt`, `quantization` and `pruning` (the fields of
leptonc.config's KernelOptions, TensorRTOptions, PruningOptions and calibration's QuantSettings), e.g.
`kernels = { attention_kernel = false }`.
Every entry is validated before anything is built (a bad key or an impossible target/precision pair
fails the whole run with exit 2, nothing built). Entries then build in order; a failed entry is
recorded and the next one runs (unless `--fail-fast`).

Exit codes: 0 when every entry built; otherwise the exit code of the first failed entry (the codes of
`leptonc.errors`, e.g. 6 for a verification failure), with every entry's outcome in the summary;
2 for an invalid config file; 130 when interrupted (the entry being built leaves nothing behind).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from leptonc.config import CompileConfig
from leptonc.errors import LeptonError, UnsupportedRequestError

ENTRY_KEYS = {
    "source", "target", "targets", "precision", "precisions", "backend", "name", "output", "output_dir",
    "max_batch", "max_sequence", "passes", "disable_passes", "verify", "max_parity_error", "allow_pickle",
    "trust_remote_code", "kernels", "tensorrt", "quantization", "pruning",
}
_TYPES = {
    "source": str, "target": str, "precision": str, "backend": str, "name": str, "output": str, "output_dir": str,
    "max_batch": int, "max_sequence": int, "passes": bool, "verify": bool, "max_parity_error": (int, float),
    "allow_pickle": bool, "trust_remote_code": bool,
}
MAX_ENTRIES = 256


@dataclass
class MatrixEntry:
    index: int
    label: str
    config: CompileConfig


@dataclass
class EntryResult:
    index: int
    label: str
    output: str
    status: str  # "built", "failed", "not run"
    exit_code: int
    seconds: float = 0.0
    error: str | None = None
    hint: str | None = None
    engine_sha256: str | None = None
    verification: dict | None = field(default=None)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _bad(path: Path, msg: str) -> UnsupportedRequestError:
    return UnsupportedRequestError(f"{path}: {msg}", hint="fix the build matrix file (see examples/leptonc.toml)")


def load_matrix(path: str | Path, *, force: bool = False) -> list[MatrixEntry]:
    """Parse and validate the whole file into CompileConfigs (nothing is built here)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise UnsupportedRequestError(f"--config {path} does not exist", hint="give a leptonc.toml build matrix")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _bad(path, f"not valid TOML ({exc})") from None
    unknown = set(doc) - {"defaults", "build"}
    if unknown:
        raise _bad(path, f"unknown top-level table(s) {sorted(unknown)}; use [defaults] and [[build]]")
    defaults = doc.get("defaults", {})
    builds = doc.get("build")
    if not isinstance(defaults, dict):
        raise _bad(path, "[defaults] must be a table")
    if not isinstance(builds, list) or not builds or not all(isinstance(b, dict) for b in builds):
        raise _bad(path, "no [[build]] entries")
    base = path.parent
    entries: list[MatrixEntry] = []
    outputs: dict[str, str] = {}
    for i, raw in enumerate(builds, 1):
        spec = {**defaults, **raw}
        where = f"[[build]] #{i}"
        bad_keys = set(spec) - ENTRY_KEYS
        if bad_keys:
            raise _bad(path, f"{where}: unknown key(s) {sorted(bad_keys)}; known: {', '.join(sorted(ENTRY_KEYS))}")
        for key, typ in _TYPES.items():
            if key in spec and (not isinstance(spec[key], typ) or (typ is int and isinstance(spec[key], bool))):
                raise _bad(path, f"{where}: {key} must be a {getattr(typ, '__name__', 'number')}")
        if "source" not in spec:
            raise _bad(path, f"{where}: no source (a model directory, .gguf file or built-in name)")
        targets = _one_or_many(path, where, spec, "target", "targets") or ["cpu"]
        precisions = _one_or_many(path, where, spec, "precision", "precisions") or [None]
        disabled = spec.get("disable_passes", [])
        if not isinstance(disabled, list) or not all(isinstance(d, str) for d in disabled):
            raise _bad(path, f"{where}: disable_passes must be a list of pass names")
        if "output" in spec and len(targets) * len(precisions) > 1:
            raise _bad(path, f"{where}: `output` names one bundle but the entry expands to "
                             f"{len(targets) * len(precisions)}; use `name` and `output_dir` instead")
        source = spec["source"]
        if (base / source).exists():
            source = str(base / source)
        for target, precision in itertools.product(targets, precisions):
            try:
                cfg = CompileConfig(
                    source=source, target=target, backend=spec.get("backend"), precision=precision,
                    max_batch=spec.get("max_batch", 16), max_sequence=spec.get("max_sequence", 2048),
                    passes=spec.get("passes", True), disabled_passes=tuple(disabled),
                    verify=spec.get("verify", True), max_parity_error=float(spec.get("max_parity_error", 1e-3)),
                    allow_pickle=spec.get("allow_pickle", False),
                    trust_remote_code=spec.get("trust_remote_code", False), force=force,
                    kernels=spec.get("kernels"), tensorrt=spec.get("tensorrt"), quantization=spec.get("quantization"),
                    pruning=spec.get("pruning"),
                )
            except LeptonError as exc:
                raise _bad(path, f"{where} ({target}{', ' + precision if precision else ''}): {exc}") from None
            if "output" in spec:
                output = base / spec["output"]
            else:
                stem = spec.get("name") or Path(source.rstrip("/")).name.removesuffix(".gguf") or "model"
                output = base / spec.get("output_dir", ".") / f"{stem}.{cfg.target}.{cfg.precision}.lepton"
            output = Path(os.path.normpath(output))
            cfg = cfg.with_(output=str(output))
            label = f"{Path(source).name} -> {cfg.target}/{cfg.backend}/{cfg.precision}"
            key = str(output.resolve())
            if key in outputs:
                raise _bad(path, f"{where}: output {output} is also written by {outputs[key]}; give each entry a "
                                 "distinct name or output")
            outputs[key] = f"{where} ({label})"
            entries.append(MatrixEntry(len(entries) + 1, label, cfg))
    if len(entries) > MAX_ENTRIES:
        raise _bad(path, f"{len(entries)} builds; at most {MAX_ENTRIES} per file")
    return entries


def _one_or_many(path: Path, where: str, spec: dict, one: str, many: str) -> list:
    if one in spec and many in spec:
        raise _bad(path, f"{where}: give `{one}` or `{many}`, not both")
    if many in spec:
        values = spec[many]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise _bad(path, f"{where}: {many} must be a non-empty list of names")
        return list(dict.fromkeys(values))
    return [spec[one]] if one in spec else []


def run_matrix(entries: list[MatrixEntry], *, fail_fast: bool = False, on_start=None, on_done=None,
               steps_factory=None) -> dict:
    """Build every entry; returns the summary (also what --json prints) with its `exit_code`."""
    from leptonc.compiler import compile_model

    results: list[EntryResult] = []
    stop = False
    for entry in entries:
        out = str(entry.config.output)
        if stop:
            results.append(EntryResult(entry.index, entry.label, out, "not run", 0, error="skipped by --fail-fast"))
            continue
        if on_start:
            on_start(entry)
        t0 = time.perf_counter()
        try:
            bundle = compile_model(entry.config, steps_factory() if steps_factory else None)
        except LeptonError as exc:
            res = EntryResult(entry.index, entry.label, out, "failed", exc.exit_code,
                              round(time.perf_counter() - t0, 2), exc.message, exc.hint)
            stop = fail_fast
        else:
            m = bundle.manifest
            res = EntryResult(entry.index, entry.label, out, "built", 0, round(time.perf_counter() - t0, 2),
                              engine_sha256=m["files"].get(m["engine"]["file"], {}).get("sha256"),
                              verification={k: m["verification"].get(k) for k in ("status", "max_abs_error",
                                                                                   "top1_agreement")
                                            if k in m["verification"]} if isinstance(m.get("verification"), dict)
                              else None)
        results.append(res)
        if on_done:
            on_done(res)
    failed = [r for r in results if r.status == "failed"]
    return {
        "entries": [r.to_dict() for r in results],
        "built": sum(r.status == "built" for r in results),
        "failed": len(failed),
        "not_run": sum(r.status == "not run" for r in results),
        "exit_code": failed[0].exit_code if failed else 0,
    }
