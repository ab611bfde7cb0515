"""`leptonc package BUNDLE --triton REPO`: a Triton Inference Server model repository from a bundle.

Layout written (ready for `tritonserver --model-repository REPO`):

    REPO/NAME/config.pbtxt            backend, inputs/outputs from the manifest, batching, instances
    REPO/NAME/VERSION/model.onnx(+.data) | engine.plan   the bundle's engine files, byte for byte
    REPO/NAME/tokenizer/              the bundle's tokenizer (Triton ignores non-numeric folders)
    REPO/NAME/leptonc-manifest.json   the bundle's manifest, for provenance

The KV cache is explicit: every `past_key_values.{i}.key/value` is an input and every
`present.{i}.key/value` an output, so a client (or a BLS/ensemble model) carries the cache between
calls. The config text is written by hand (no tritonclient dependency at run time); the tests parse
it with Triton's own `ModelConfig` protobuf.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from leptonc.bundle import MANIFEST, TMP_PREFIX, Bundle, load_bundle
from leptonc.errors import BundleError, UnsupportedRequestError

# numpy dtype name (as the manifest's I/O spec writes it) -> Triton DataType enum name
TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}
# (platform, backend) per leptonc backend; Triton accepts either field, we write both.
TRITON_BACKENDS = {
    "onnxruntime": ("onnxruntime_onnx", "onnxruntime"),
    "tensorrt": ("tensorrt_plan", "tensorrt"),
}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
BATCH_DIM = "batch"


@dataclass(frozen=True)
class TritonOptions:
    name: str | None = None  # model name in the repository (default: the bundle's name)
    version: int = 1
    instances: int = 1
    max_queue_delay_us: int = 100
    force: bool = False  # replace an existing model directory of the same name

    def __post_init__(self) -> None:
        if self.name is not None and not _NAME_OK.match(self.name):
            raise UnsupportedRequestError(
                f"--name {self.name!r} is not a usable Triton model name; use letters, digits, '_', '-', '.'")
        if not 1 <= self.version <= 1_000_000:
            raise UnsupportedRequestError(f"--version {self.version} is out of range; use 1..1000000")
        if not 1 <= self.instances <= 64:
            raise UnsupportedRequestError(f"--instances {self.instances} is out of range; use 1..64")
        if not 0 <= self.max_queue_delay_us <= 10_000_000:
            raise UnsupportedRequestError("--max-queue-delay-us must be between 0 and 10000000")


def model_name(manifest: dict, options: TritonOptions) -> str:
    if options.name:
        return options.name
    raw = str(manifest.get("name") or "model")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", raw).lstrip("._-") or "model"
    return name[:128]


def _tensor_block(kind: str, tensors: list[dict], batched: bool) -> list[str]:
    lines = [f"{kind} ["]
    for n, t in enumerate(tensors):
        dtype = TRITON_DTYPES.get(str(t.get("dtype")))
        if dtype is None:
            raise UnsupportedRequestError(f"tensor {t.get('name')!r} has dtype {t.get('dtype')!r}, which Triton "
                                          f"has no type for; supported: {', '.join(TRITON_DTYPES)}")
        shape = list(t["shape"][1:] if batched else t["shape"])
        dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape)
        sep = "," if n < len(tensors) - 1 else ""
        lines += ["  {", f"    name: {json.dumps(t['name'])}", f"    data_type: {dtype}", f"    dims: [ {dims} ]",
                  "  }" + sep]
    lines.append("]")
    return lines


def triton_config(manifest: dict, options: TritonOptions = TritonOptions()) -> str:
    """The `config.pbtxt` text (protobuf text format of Triton's ModelConfig) for a bundle manifest."""
    backend = manifest["backend"]
    if backend not in TRITON_BACKENDS:
        raise UnsupportedRequestError(f"bundle backend {backend!r} has no Triton backend; "
                                      f"package onnxruntime or tensorrt bundles")
    platform, triton_backend = TRITON_BACKENDS[backend]
    io = manifest["engine"]["io"]
    tensors = list(io["inputs"]) + list(io["outputs"])
    # Triton's max_batch_size > 0 means "dim 0 of every tensor is the batch": true for leptonc decoders.
    batched = all(t["shape"] and t["shape"][0] == BATCH_DIM for t in tensors)
    max_batch = int(manifest["limits"]["max_batch"]) if batched else 0
    gpu = bool(manifest["target"].get("family") not in (None, "cpu"))
    if backend == "onnxruntime" and manifest["engine"].get("session", {}).get("provider") == "CPUExecutionProvider":
        gpu = False
    lines = [
        "# Written by leptonc from the bundle manifest; see leptonc-manifest.json beside this file.",
        f"name: {json.dumps(model_name(manifest, options))}",
        f"platform: {json.dumps(platform)}",
        f"backend: {json.dumps(triton_backend)}",
        f"max_batch_size: {max_batch}",
        f"default_model_filename: {json.dumps(Path(manifest['engine']['file']).name)}",
        "version_policy: { latest: { num_versions: 1 } }",
    ]
    lines += _tensor_block("input", list(io["inputs"]), batched)
    lines += _tensor_block("output", list(io["outputs"]), batched)
    if max_batch > 0:
        # Requests are batched only when their non-batch shapes agree (same prompt/past lengths),
        # which is what a scheduler feeding decode steps in lockstep produces.
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {options.max_queue_delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    count: {options.instances}",
              f"    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}", "  }", "]"]
    params = {
        "leptonc_version": str(manifest.get("leptonc_version", "")),
        "leptonc_target": str(manifest["target"].get("name", "")),
        "leptonc_precision": str(manifest.get("precision", "")),
        "leptonc_max_sequence": str(manifest["limits"]["max_sequence"]),
    }
    engine_sha = manifest.get("files", {}).get(manifest["engine"]["file"], {}).get("sha256")
    if engine_sha:
        params["leptonc_engine_sha256"] = str(engine_sha)
    for key, value in params.items():
        lines.append(f"parameters: {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(value)} }} }}")
    return "\n".join(lines) + "\n"


def _copy_verified(src: Path, dst: Path, entry: dict | None) -> None:
    """Copy `src` to `dst`, hashing the bytes copied; refuse if they differ from the manifest's hash
    (so the repository holds exactly the verified bytes even if the bundle changes under us)."""
    h = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(1 << 22):
            h.update(block)
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    if entry is not None and h.hexdigest() != entry["sha256"]:
        raise BundleError(f"{src.name} changed while it was being packaged (sha256 mismatch)",
                          hint="recompile the bundle and package it again")


def _external_data_members(bundle: Bundle, engine_file: str) -> list[str]:
    """The bundle files an ONNX engine reads its weights from (they go beside it in the version folder)."""
    if not engine_file.endswith(".onnx"):
        return []
    from leptonc.bundle import check_onnx_model

    model = check_onnx_model(bundle.path / engine_file, bundle.path)
    import onnx

    folder = Path(engine_file).parent
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    members = sorted((folder / loc).as_posix() for loc in locations)
    for m in members:
        if "/" in Path(m).relative_to(folder).as_posix():
            raise UnsupportedRequestError(f"{engine_file} keeps weights in a subfolder ({m}); Triton's version "
                                          "folder layout needs them beside the model", hint="recompile the bundle")
    return members


def package_triton(bundle_path: str | Path, repo: str | Path, options: TritonOptions = TritonOptions(), *,
                   verify: bool = True) -> dict:
    """Write a Triton model directory for the bundle into `repo`; returns a summary dict."""
    bundle = load_bundle(bundle_path, verify=verify)
    return write_triton_model(bundle, Path(repo), options)


def write_triton_model(bundle: Bundle, repo: Path, options: TritonOptions = TritonOptions()) -> dict:
    manifest = bundle.manifest
    config = triton_config(manifest, options)
    name = model_name(manifest, options)
    if repo.exists() and not repo.is_dir():
        raise UnsupportedRequestError(f"--triton {repo} exists and is not a directory; give a model repository folder")
    repo.mkdir(parents=True, exist_ok=True)
    final = repo / name
    if final.exists() and not options.force:
        raise UnsupportedRequestError(f"{final} already exists in the model repository",
                                      hint="pass --force to replace it, or --name to package under another name")
    staging = repo / f"{TMP_PREFIX}{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        version_dir = staging / str(options.version)
        engine_file = manifest["engine"]["file"]
        files = manifest["files"]
        engine_members = [engine_file] + _external_data_members(bundle, engine_file)
        for member in dict.fromkeys(engine_members):
            _copy_verified(bundle.path / member, version_dir / Path(member).name, files.get(member))
        tok = manifest.get("tokenizer")
        if tok:
            for member, entry in files.items():
                if member.startswith(tok + "/"):
                    _copy_verified(bundle.path / member, staging / "tokenizer" / member[len(tok) + 1:], entry)
        shutil.copyfile(bundle.path / MANIFEST, staging / "leptonc-manifest.json")
        (staging / "config.pbtxt").write_text(config, encoding="utf-8")
        if final.exists():
            old = repo / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "repository": str(repo),
        "model": name,
        "model_dir": str(final),
        "version": options.version,
        "platform": TRITON_BACKENDS[manifest["backend"]][0],
        "config": str(final / "config.pbtxt"),
        "files": sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()),
        "serve": f"tritonserver --model-repository {repo}",
    }
