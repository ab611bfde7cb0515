"""The bundle: `NAME.lepton/` holding manifest.json, the engine or model files, tokenizer files and
report.json. Written into a temporary sibling directory and renamed into place, so an interrupted
compile leaves nothing at the output path; loading checks every file's sha256 and the toolchain.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leptonc import FORMAT_VERSION, __version__
from leptonc.errors import BundleError, UnsupportedRequestError

MANIFEST = "manifest.json"
REPORT = "report.json"
TMP_PREFIX = ".leptonc-tmp-"
# Files whose hash the manifest cannot hold (itself) are listed here; everything else is hashed.
UNHASHED = {MANIFEST}


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def engine(self) -> dict:
        return self.manifest["engine"]

    @property
    def io(self) -> dict:
        return self.manifest["engine"]["io"]

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["engine"]["file"]

    @property
    def tokenizer_dir(self) -> Path | None:
        t = self.manifest.get("tokenizer")
        return self.path / t if t else None

    @property
    def max_sequence(self) -> int:
        return int(self.manifest["limits"]["max_sequence"])

    @property
    def max_batch(self) -> int:
        return int(self.manifest["limits"]["max_batch"])

    def report(self) -> dict:
        p = self.path / REPORT
        return json.loads(p.read_text()) if p.is_file() else {}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def toolchain_versions(backend: str) -> dict:
    import importlib.metadata as md

    versions = {"leptonc": __version__, "python": ".".join(map(str, sys.version_info[:3]))}
    for dist in ("onnx", "onnxruntime", "onnxruntime-gpu", "torch", "transformers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if backend == "tensorrt":
        try:
            versions["tensorrt"] = md.version("tensorrt")
        except md.PackageNotFoundError:
            pass
    return versions


def hash_files(root: Path) -> dict[str, dict]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in UNHASHED:
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


# ---- writing -------------------------------------------------------------------------------------

def staging_dir(output: Path) -> Path:
    """A fresh temporary directory beside `output` (same filesystem, so the final rename is atomic).
    Stale ones left by a killed compile are removed first."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f"{TMP_PREFIX}*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = output.parent / f"{TMP_PREFIX}{output.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_path(output: Path, force: bool) -> None:
    """An existing bundle is replaced (only once the new one is complete); anything else needs --force."""
    if output.exists() and not (output / MANIFEST).is_file() and not force:
        raise UnsupportedRequestError(
            f"{output} exists and is not a leptonc bundle; choose another -o path or pass --force to replace it"
        )


def finalize(staging: Path, output: Path, manifest: dict) -> Bundle:
    """Hash every file, write the manifest, and move the staging directory to `output`."""
    manifest["files"] = hash_files(staging)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if output.exists() or output.is_symlink():
        old = output.parent / f"{TMP_PREFIX}old-{output.name}-{os.getpid()}"
        os.rename(output, old)  # the previous bundle stays complete under `old` until the new one is in
        try:
            os.rename(staging, output)
        except BaseException:
            os.rename(old, output)
            raise
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(staging, output)
    return Bundle(output, manifest)


# ---- loading -------------------------------------------------------------------------------------

_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "leptonc_version": str,
    "backend": str,
    "precision": str,
    "target": dict,
    "engine": dict,
    "limits": dict,
    "files": dict,
    "toolchain": dict,
}


def read_manifest(path: Path) -> dict:
    mf = path / MANIFEST
    if not path.exists():
        raise BundleError(f"{path} does not exist", hint="compile one with `leptonc compile MODEL -o PATH`")
    if not path.is_dir() or not mf.is_file():
        raise BundleError(f"{path} is not a leptonc bundle (no {MANIFEST})",
                          hint="pass a NAME.lepton directory made by `leptonc compile`")
    try:
        if mf.stat().st_size > 16 << 20:
            raise BundleError(f"{mf} is implausibly large ({mf.stat().st_size} bytes); the bundle is corrupt")
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{mf} is not valid JSON ({type(exc).__name__}); the bundle is corrupt",
                          hint="recompile it") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mf} is not a JSON object; the bundle is corrupt", hint="recompile it")
    for key, typ in _MANIFEST_TYPES.items():
        if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool):
            raise BundleError(f"{mf}: field {key!r} is missing or not a {getattr(typ, '__name__', typ)}",
                              hint="the bundle is corrupt or from an incompatible leptonc; recompile it")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format {manifest['format_version']}; this leptonc {__version__} reads format "
            f"{FORMAT_VERSION}", hint="recompile it with this leptonc")
    engine = manifest["engine"]
    if not isinstance(engine.get("file"), str) or not isinstance(engine.get("io"), dict):
        raise BundleError(f"{mf}: engine.file / engine.io missing; the bundle is corrupt", hint="recompile it")
    for key in ("max_sequence", "max_batch"):
        v = manifest["limits"].get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BundleError(f"{mf}: limits.{key} is not a positive integer; the bundle is corrupt")
    for name, entry in manifest["files"].items():
        _check_member(path, name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
            raise BundleError(f"{mf}: files[{name!r}] is malformed; the bundle is corrupt", hint="recompile it")
    _check_member(path, engine["file"])
    return manifest


def _check_member(root: Path, name: str) -> Path:
    p = Path(name)
    if not isinstance(name, str) or not name or p.is_absolute() or ".." in p.parts:
        raise BundleError(f"bundle file name {name!r} points outside the bundle; refusing to read it")
    return root / p


def verify_files(path: Path, manifest: dict) -> None:
    listed = manifest["files"]
    for name, entry in listed.items():
        p = path / name
        if not p.is_file():
            raise BundleError(f"{path}: file {name} is missing", hint="the bundle is incomplete; recompile it")
        if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            raise BundleError(f"{path}: file {name} does not match its sha256 in the manifest (modified or corrupt)",
                              hint="recompile the bundle, or pass --no-verify to load it anyway")
    for p in path.rglob("*"):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and rel not in listed and rel not in UNHASHED:
            raise BundleError(f"{path}: file {rel} is not listed in the manifest (added after compile)",
                              hint="remove it or recompile the bundle")


def check_toolchain(manifest: dict) -> None:
    """Refuse a bundle whose engine needs a newer runtime than this one."""
    built = manifest["toolchain"]
    backend = manifest["backend"]
    if backend == "onnxruntime":
        have = toolchain_versions(backend)
        for dist in ("onnxruntime", "onnxruntime-gpu"):
            if dist in built and (dist in have or "onnxruntime" in have):
                mine = have.get(dist) or have.get("onnxruntime")
                if _ver(mine)[:2] < _ver(str(built[dist]))[:2]:
                    raise BundleError(
                        f"bundle was built with {dist} {built[dist]}; this machine has {mine}, which may lack its operators",
                        hint=f"pip install '{dist}>={built[dist]}', or recompile the bundle here")
    elif backend == "tensorrt":
        from leptonc.targets.tensorrt import check_engine_toolchain

        check_engine_toolchain(manifest)


def _ver(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
        check_toolchain(manifest)
    return Bundle(path, manifest)


def describe(bundle: Bundle) -> dict[str, Any]:
    m = bundle.manifest
    return {
        "path": str(bundle.path),
        "name": m.get("name"),
        "source": m.get("source"),
        "target": m["target"].get("name"),
        "backend": m["backend"],
        "precision": m["precision"],
        "precision_mode": m.get("precision_mode"),
        "limits": m["limits"],
        "files": {k: v["bytes"] for k, v in m["files"].items()},
        "verification": m.get("verification"),
        "passes": m.get("passes"),
        "toolchain": m["toolchain"],
        "leptonc_version": m["leptonc_version"],
        "created": m.get("created"),
    }
