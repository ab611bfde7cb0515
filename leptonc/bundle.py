"""The bundle: `NAME.lepton/` holding manifest.json, the engine or model files, tokenizer files and
report.json. Written into a temporary sibling directory and renamed into place, so an interrupted
compile leaves nothing at the output path; loading checks every file's sha256 and the toolchain.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leptonc import FORMAT_VERSION, __version__
from leptonc.atomic_rename import exchange_paths, fsync_dir, fsync_tree
from leptonc.errors import BundleError, UnsupportedRequestError
from leptonc.graph_contract import LOGITS, REQUIRED_INPUTS, past_names

MANIFEST = "manifest.json"
REPORT = "report.json"
TMP_PREFIX = ".leptonc-tmp-"
# Files whose hash the manifest cannot hold (itself) are listed here; everything else is hashed.
UNHASHED = {MANIFEST, "gpu_check.json"}  # gpu_check.json: a GPU check's result, written after the compile (gpu_check.py)
# The manifest seals itself: `manifest_sha256` is the sha256 of manifest.json's exact bytes with this
# field's value replaced by 64 zeros. Any edited byte is caught (an integrity check against damage and
# casual edits, not a signature: whoever can rewrite the file can recompute it).
SELF_HASH = "manifest_sha256"
_ZERO_HASH = "0" * 64
_SELF_HASH_RE = re.compile(rb'^  "manifest_sha256": "([^"]*)"', re.MULTILINE)


@dataclass
class Bundle:
    path: Path
    manifest: dict
    verified: bool = True  # loaded with its checks (load_bundle's verify); False: --no-verify, no GPU check either

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
        if not p.is_file():
            return {}
        try:
            report = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise BundleError(f"{self.path}: file {REPORT} is not valid JSON ({type(exc).__name__})",
                              hint="recompile the bundle") from None
        if not isinstance(report, dict):
            raise BundleError(f"{self.path}: file {REPORT} is not a JSON object", hint="recompile the bundle")
        return report


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
            owner = None  # a bundle set aside by a replace that died between its two renames
            if stale.name.startswith(f"{TMP_PREFIX}old-"):
                owner = output.parent / stale.name[len(f"{TMP_PREFIX}old-"):].rsplit("-", 1)[0]
            if owner is not None and not owner.exists() and not owner.is_symlink() and (stale / MANIFEST).is_file():
                os.rename(stale, owner)  # put the previous bundle back where it was
            else:
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


def manifest_bytes(manifest: dict) -> bytes:
    """manifest.json's bytes, sealed with its own sha256 (see SELF_HASH)."""
    body = dict(manifest)
    body[SELF_HASH] = _ZERO_HASH
    raw = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("utf-8")
    digest = hashlib.sha256(raw).hexdigest()
    return raw.replace(f'"{SELF_HASH}": "{_ZERO_HASH}"'.encode(), f'"{SELF_HASH}": "{digest}"'.encode(), 1)


def write_manifest(root: Path, manifest: dict) -> None:
    """(Re)write a bundle's manifest.json, sealed. Use this, not json.dump, when editing a manifest."""
    manifest = {k: v for k, v in manifest.items() if k != SELF_HASH}
    (root / MANIFEST).write_bytes(manifest_bytes(manifest))


def check_manifest_seal(mf: Path, raw: bytes) -> None:
    found = _SELF_HASH_RE.findall(raw)
    if len(found) != 1:
        raise BundleError(f"{mf}: the manifest's own sha256 ({SELF_HASH}) is missing; file manifest.json was "
                          "modified or comes from an older leptonc",
                          hint="recompile the bundle, or pass --no-verify to load it anyway")
    sealed = _SELF_HASH_RE.sub(f'  "{SELF_HASH}": "{_ZERO_HASH}"'.encode(), raw, count=1)
    if hashlib.sha256(sealed).hexdigest() != found[0].decode("ascii", "replace"):
        raise BundleError(f"{mf.parent}: file manifest.json does not match its own sha256 (modified or corrupt)",
                          hint="recompile the bundle, or pass --no-verify to load it anyway")


def finalize(staging: Path, output: Path, manifest: dict) -> Bundle:
    """Hash every file, write the sealed manifest, flush to disk, and move the staging directory to
    `output`. An existing bundle at `output` is swapped out atomically (renameat2 RENAME_EXCHANGE), so
    the path always names a complete bundle, old or new; where the exchange is unavailable the old
    bundle is renamed aside first and restored by the next compile if we die in between."""
    manifest = {k: v for k, v in manifest.items() if k != SELF_HASH}
    manifest["files"] = hash_files(staging)
    (staging / MANIFEST).write_bytes(manifest_bytes(manifest))
    fsync_tree(staging)
    if output.exists() or output.is_symlink():
        if exchange_paths(staging, output):
            fsync_dir(output.parent)
            shutil.rmtree(staging, ignore_errors=True) if staging.is_dir() else staging.unlink()
        else:
            old = output.parent / f"{TMP_PREFIX}old-{output.name}-{os.getpid()}"
            os.rename(output, old)  # the previous bundle stays complete under `old` until the new one is in
            try:
                os.rename(staging, output)
            except BaseException:
                os.rename(old, output)
                raise
            fsync_dir(output.parent)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(staging, output)
        fsync_dir(output.parent)
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
MAX_MANIFEST_BYTES = 16 << 20
_DTYPES = {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Plausible ranges: a manifest outside them is corrupt or hostile (it would make the runtime allocate
# absurd caches), not a model we should try to run.
_IO_LIMITS = {"num_layers": 4096, "num_kv_heads": 4096, "head_dim": 65536, "vocab_size": 16 << 20}
_LIMIT_MAX = {"max_batch": 4096, "max_sequence": 1 << 20}


def _corrupt(mf: Path, what: str) -> BundleError:
    return BundleError(f"{mf}: {what}; the bundle is corrupt or from an incompatible leptonc",
                       hint="recompile it with this leptonc")


def _is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def read_manifest(path: Path, *, verify: bool = False) -> dict:
    """Parse and validate manifest.json: types, sizes and ranges of every field the runtime reads.
    With `verify`, also check the manifest's own seal (any edited byte is refused)."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.exists():
        raise BundleError(f"{path} does not exist", hint="compile one with `leptonc compile MODEL -o PATH`")
    if not path.is_dir() or not mf.is_file():
        raise BundleError(f"{path} is not a leptonc bundle (no {MANIFEST})",
                          hint="pass a NAME.lepton directory made by `leptonc compile`")
    size = mf.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mf} is implausibly large ({size} bytes); the bundle is corrupt", hint="recompile it")
    raw = mf.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{mf} is not valid JSON ({type(exc).__name__}); file manifest.json is corrupt",
                          hint="recompile it") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mf} is not a JSON object; file manifest.json is corrupt", hint="recompile it")
    if verify:
        check_manifest_seal(mf, raw)
    for key, typ in _MANIFEST_TYPES.items():
        if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool):
            raise _corrupt(mf, f"field {key!r} is missing or not a {getattr(typ, '__name__', typ)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format {manifest['format_version']}; this leptonc {__version__} reads format "
            f"{FORMAT_VERSION}", hint="recompile it with this leptonc")
    if manifest["backend"] not in ("onnxruntime", "tensorrt"):
        raise _corrupt(mf, f"backend {manifest['backend']!r} is unknown")
    if not isinstance(manifest["target"].get("name"), str):
        raise _corrupt(mf, "target.name is missing")
    for key, hi in _LIMIT_MAX.items():
        if not _is_int(manifest["limits"].get(key), 1, hi):
            raise _corrupt(mf, f"limits.{key} is not an integer in 1..{hi}")
    if len(manifest["files"]) > 100_000:
        raise _corrupt(mf, f"it lists {len(manifest['files'])} files")
    for name, entry in manifest["files"].items():
        _check_member(path, name)
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not _SHA256.match(entry["sha256"]) or not _is_int(entry.get("bytes"), 0, 1 << 50)):
            raise _corrupt(mf, f"files[{name!r}] is malformed")
    _check_engine(mf, manifest["engine"], manifest["files"])
    for key, value in manifest["toolchain"].items():
        if not isinstance(value, str) or len(value) > 256:
            raise _corrupt(mf, f"toolchain[{key!r}] is not a version string")
    tok = manifest.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, str):
            raise _corrupt(mf, "tokenizer is not a folder name")
        _check_member(path, tok)
    model = manifest.get("model", {})
    if not isinstance(model, dict):
        raise _corrupt(mf, "model is not an object")
    eos = model.get("eos_token_ids")
    if eos is not None and (not isinstance(eos, list) or len(eos) > 64
                            or not all(_is_int(e, 0, _IO_LIMITS["vocab_size"]) for e in eos)):
        raise _corrupt(mf, "model.eos_token_ids is not a short list of token ids")
    _check_records(mf, manifest)
    return manifest


def _check_records(mf: Path, manifest: dict) -> None:
    """The build's records that `inspect` shows and a GPU's first load reads (source, verification, passes)."""
    for key in ("source", "verification"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise _corrupt(mf, f"{key} is not an object")
    v = manifest.get("verification") or {}
    if v.get("status") is not None and not isinstance(v["status"], str):
        raise _corrupt(mf, "verification.status is not a string")
    err = v.get("max_abs_error")
    if err is not None and (isinstance(err, bool) or not isinstance(err, (int, float))):
        raise _corrupt(mf, "verification.max_abs_error is not a number")
    if v.get("pending_gpu_checks") is not None and not isinstance(v["pending_gpu_checks"], list):
        raise _corrupt(mf, "verification.pending_gpu_checks is not a list")
    passes = manifest.get("passes")
    if passes is not None and (not isinstance(passes, list) or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("status"), str)
            for p in passes)):
        raise _corrupt(mf, "passes is not a list of pass records (name, status)")


def _check_engine(mf: Path, engine: dict, files: dict) -> None:
    if not isinstance(engine.get("file"), str) or not isinstance(engine.get("io"), dict):
        raise _corrupt(mf, "engine.file / engine.io missing")
    _check_member(mf.parent, engine["file"])
    if engine["file"] not in files:
        raise _corrupt(mf, f"engine file {engine['file']!r} is not listed in files")
    io = engine["io"]
    for key, hi in _IO_LIMITS.items():
        if not _is_int(io.get(key), 1, hi):
            raise _corrupt(mf, f"engine.io.{key} is not an integer in 1..{hi}")
    if io.get("kv_dtype") not in _DTYPES:
        raise _corrupt(mf, f"engine.io.kv_dtype {io.get('kv_dtype')!r} is not a known dtype")
    for kind in ("inputs", "outputs"):
        tensors = io.get(kind)
        if not isinstance(tensors, list) or not 1 <= len(tensors) <= 4 * _IO_LIMITS["num_layers"] + 16:
            raise _corrupt(mf, f"engine.io.{kind} is not a list of tensors")
        for t in tensors:
            if (not isinstance(t, dict) or not isinstance(t.get("name"), str) or not 0 < len(t["name"]) <= 256
                    or t.get("dtype") not in _DTYPES or not isinstance(t.get("shape"), list)
                    or not 1 <= len(t["shape"]) <= 8
                    or not all(_is_int(d, 0, 1 << 31) or (isinstance(d, str) and 0 < len(d) <= 64)
                               for d in t["shape"])):
                raise _corrupt(mf, f"engine.io.{kind} holds a malformed tensor entry")
    names = {t["name"] for t in io["inputs"]}
    needed = {*REQUIRED_INPUTS, *past_names(io["num_layers"])}
    if not needed <= names or LOGITS not in {t["name"] for t in io["outputs"]}:
        raise _corrupt(mf, "engine.io does not describe a decoder with num_layers KV-cache inputs")
    session = engine.get("session", {})
    if not isinstance(session, dict):
        raise _corrupt(mf, "engine.session is not an object")
    if session.get("graph_optimization_level", "all") not in ("disabled", "basic", "extended", "all"):
        raise _corrupt(mf, "engine.session.graph_optimization_level is unknown")
    if not _is_int(session.get("intra_op_num_threads", 0), 0, 4096):
        raise _corrupt(mf, "engine.session.intra_op_num_threads is not a small integer")
    if not isinstance(session.get("provider", ""), str):
        raise _corrupt(mf, "engine.session.provider is not a string")


def _check_member(root: Path, name) -> Path:
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 4096:
        raise BundleError(f"bundle file name {name!r} is not a usable relative path; the bundle is corrupt")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        raise BundleError(f"bundle file name {name!r} points outside the bundle; refusing to read it")
    return root / p


@contextmanager
def engine_load_errors(model_path: Path):
    """Turn an inference library's refusal to load or run a corrupt model (ONNX Runtime raises its own
    exception types: InvalidGraph, InvalidArgument, Fail, ...) into a clean BundleError naming the file.
    Other exceptions pass through untouched: they are leptonc bugs and keep their traceback."""
    try:
        yield
    except Exception as exc:
        # ONNX Runtime also lets a UnicodeDecodeError out of session creation for garbled names, and a
        # plain RuntimeError ("Error in execution: Non-zero status code ...") out of a run.
        ort_run = isinstance(exc, RuntimeError) and "Non-zero status code returned while running" in str(exc)
        if not (type(exc).__module__.startswith(("onnxruntime", "tensorrt")) or isinstance(exc, UnicodeDecodeError)
                or ort_run):
            raise
        detail = str(exc).splitlines()[0] if str(exc) else ""
        detail = detail.split("failed:", 1)[-1].strip()[:300]
        raise BundleError(f"{Path(model_path).name}: the inference library cannot load or run it "
                          f"({type(exc).__name__}: {detail}); the model file is corrupt or inconsistent",
                          hint="recompile the bundle (or re-export the model); check it was copied whole") from None


# ---- ONNX engine files: external data must stay inside the bundle --------------------------------

def _onnx_tensors(graph):
    """Every TensorProto of a graph: initializers, and tensors in node attributes and subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _onnx_tensors(attr.g)
            for g in attr.graphs:
                yield from _onnx_tensors(g)


def check_onnx_model(model_path: Path, root: Path | None = None, io: dict | None = None):
    """Parse an .onnx file (without its weights) and refuse, before ONNX Runtime opens it, external-data
    locations outside `root` (absolute, `../`, symlinks out) or past the end of their file; with `io`,
    also check the graph's inputs/outputs match the manifest. Returns the parsed ModelProto."""
    import onnx

    model_path = Path(model_path)
    root = Path(root) if root is not None else model_path.parent
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends for garbled bytes
        raise BundleError(f"{model_path.name}: not a readable ONNX model ({type(exc).__name__})",
                          hint="recompile the bundle or re-export the model; check the file was copied whole") from None
    real_root = os.path.realpath(root)
    sizes: dict[str, int] = {}
    for tensor in _onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        if not loc or "\x00" in loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", loc):
            raise BundleError(f"{model_path.name}: tensor {tensor.name!r} reads external data from {loc!r}, "
                              "outside the model's folder; refusing to load it",
                              hint="only load models whose weights live beside them; re-export the model")
        target = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(model_path)), loc))
        if os.path.commonpath([real_root, target]) != real_root:
            raise BundleError(f"{model_path.name}: external data {loc!r} of tensor {tensor.name!r} resolves outside "
                              f"{root} (a symlink?); refusing to load it", hint="re-export the model")
        if loc not in sizes:
            if not os.path.isfile(target):
                raise BundleError(f"{model_path.name}: external data file {loc!r} is missing",
                                  hint="copy the model together with its .data file")
            sizes[loc] = os.path.getsize(target)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise BundleError(f"{model_path.name}: tensor {tensor.name!r} has a malformed external-data "
                              "offset/length; the model is corrupt", hint="re-export the model") from None
        if offset < 0 or (length >= 0 and offset + length > sizes[loc]) or offset > sizes[loc]:
            raise BundleError(f"{model_path.name}: tensor {tensor.name!r} reads past the end of {loc}; "
                              "the model is corrupt or truncated", hint="re-export the model")
    if io is not None:
        _check_graph_io(model, model_path, io)
    return model


def _check_graph_io(model, model_path: Path, io: dict) -> None:
    import onnx

    def declared(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            try:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else None
            except Exception:  # an elem_type numbered outside the enum
                dtype = None
            out[v.name] = (dtype, [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim])
        return out

    graph_in = declared(model.graph.input)
    graph_out = declared(model.graph.output)
    initializers = {t.name for t in model.graph.initializer}
    for kind, listed, graph in (("input", io["inputs"], graph_in), ("output", io["outputs"], graph_out)):
        for t in listed:
            if t["name"] not in graph:
                raise BundleError(f"{model_path.name} has no {kind} {t['name']!r} although the manifest lists it; "
                                  "the bundle is inconsistent", hint="recompile it")
            dtype, dims = graph[t["name"]]
            if dtype != t["dtype"] or len(dims) != len(t["shape"]) or any(
                    g is not None and isinstance(m, int) and g != m for g, m in zip(dims, t["shape"])):
                raise BundleError(f"{model_path.name}: {kind} {t['name']!r} is {dtype}{dims} in the graph but "
                                  f"{t['dtype']}{t['shape']} in the manifest; the bundle is inconsistent",
                                  hint="recompile it")
    missing = set(graph_in) - initializers - {t["name"] for t in io["inputs"]}
    if missing:
        raise BundleError(f"{model_path.name} needs inputs the manifest does not list: {sorted(missing)[:5]}",
                          hint="recompile the bundle")


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
    """Refuse a bundle whose engine needs a newer runtime than the one that will run it here.

    The runtime is the onnxruntime module this process imports (onnxruntime-gpu for GPU bundles, whose distribution
    can sit beside a CPU onnxruntime), compared with the same kind of runtime that built the bundle. A GPU bundle
    cross-compiled on a CPU-only machine was built by no onnxruntime-gpu: nothing to compare (ONNX Runtime still
    refuses opsets it does not know when it loads the model, and the GPU check runs at first load)."""
    built = manifest["toolchain"]
    backend = manifest["backend"]
    if backend == "onnxruntime":
        target = manifest.get("target")
        gpu = (target.get("name") if isinstance(target, dict) else target) not in (None, "cpu")
        dist = "onnxruntime-gpu" if gpu else "onnxruntime"
        if dist in built:
            mine = _runtime_version()
            if mine and _ver(mine)[:2] < _ver(str(built[dist]))[:2]:
                raise BundleError(
                    f"bundle was built with {dist} {built[dist]}; this machine runs onnxruntime {mine}, which may lack its operators",
                    hint=f"pip install '{dist}>={built[dist]}', or recompile the bundle here")
    elif backend == "tensorrt":
        from leptonc.targets.backends.tensorrt import check_engine_toolchain

        check_engine_toolchain(manifest)


def _runtime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return getattr(onnxruntime, "__version__", None)


def _ver(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Validate and (with `verify`) authenticate a bundle: the manifest's seal, every file's sha256,
    the toolchain. Always, even without `verify`: manifest types and ranges, and for ONNX engines the
    external-data locations and the graph's I/O against the manifest (before any runtime opens it)."""
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    if verify:
        verify_files(path, manifest)
        check_toolchain(manifest)
    engine = manifest["engine"]
    if engine.get("format", "onnx") == "onnx" and engine["file"].endswith(".onnx"):
        model_path = path / engine["file"]
        if not model_path.is_file():
            raise BundleError(f"{path}: file {engine['file']} is missing", hint="the bundle is incomplete; recompile it")
        check_onnx_model(model_path, path, engine["io"])
    return Bundle(path, manifest, verified=verify)


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
        "build_stats": m.get("build_stats"),
    }
