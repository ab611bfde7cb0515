"""`leptonc package BUNDLE --triton REPO`: a Triton Inference Server model repository from a bundle.

The default model is a Python-backend model in decoupled mode that runs leptonc's in-flight batching
engine on the bundle: text in, text streaming out through Triton's generate endpoints.

    REPO/NAME/config.pbtxt            backend "python", decoupled, text/sampling inputs, instance groups
    REPO/NAME/VERSION/model.py        leptonc/triton_model/model.py (the engine behind Triton)
    REPO/NAME/VERSION/bundle.lepton/  the bundle, its verified bytes (checked again when Triton loads it)

`--triton-raw-decoder` writes instead the raw decoder for users who run the generation loop themselves:

    REPO/NAME/config.pbtxt            onnxruntime/tensorrt backend, every input/output of the decoder
    REPO/NAME/VERSION/model.onnx(+.data) | engine.plan   the bundle's engine files, byte for byte
    REPO/NAME/tokenizer/              the bundle's tokenizer (Triton ignores non-numeric folders)
    REPO/NAME/leptonc-manifest.json   the bundle's manifest, for provenance

There the KV cache is explicit: every `past_key_values.{i}.key/value` is an input and every
`present.{i}.key/value` an output, so the client carries the cache between calls. Config text is written
by hand (no tritonclient dependency at run time); the tests parse it with Triton's own `ModelConfig`
protobuf and start the real `tritonserver` on the Python-backend repository.
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


PYTHON_MODEL_FILE = Path(__file__).parent / "triton_model" / "model.py"
BUNDLE_IN_VERSION = "bundle.lepton"  # the bundle's folder inside the Python model's version folder


@dataclass(frozen=True)
class InstanceGroup:
    """One Triton instance group. `cpu` / `cpu:N`: N CPU instances; `gpu`: one instance on every GPU;
    `gpu:0,2`: one instance on each listed GPU (Triton's `count` is per listed GPU)."""

    kind: str  # "cpu" or "gpu"
    count: int = 1
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "gpu"):
            raise UnsupportedRequestError(f"instance group kind {self.kind!r} is unknown; use cpu or gpu")
        if not 1 <= self.count <= 64:
            raise UnsupportedRequestError(f"instance group count {self.count} is out of range; use 1..64")
        if self.kind == "cpu" and self.gpus:
            raise UnsupportedRequestError("a cpu instance group lists no GPUs; use gpu:0,1 for GPUs")
        if any(g < 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus):
            raise UnsupportedRequestError(f"GPU ids must be distinct and >= 0, not {list(self.gpus)}")

    @classmethod
    def parse(cls, text: str) -> "InstanceGroup":
        kind, _, rest = text.strip().lower().partition(":")
        try:
            if kind == "cpu":
                return cls("cpu", int(rest) if rest else 1)
            if kind == "gpu":
                return cls("gpu", 1, tuple(int(g) for g in rest.split(",")) if rest else ())
        except ValueError:
            pass
        raise UnsupportedRequestError(f"--instance-group {text!r} is not understood",
                                      hint="use cpu, cpu:N (N CPU instances), gpu (one per GPU) or gpu:0,1 (one per "
                                           "listed GPU)")

    def pbtxt(self) -> list[str]:
        lines = ["  {", f"    count: {self.count}", f"    kind: {'KIND_GPU' if self.kind == 'gpu' else 'KIND_CPU'}"]
        if self.gpus:
            lines.append(f"    gpus: [ {', '.join(map(str, self.gpus))} ]")
        return lines + ["  }"]


@dataclass(frozen=True)
class TritonOptions:
    name: str | None = None  # model name in the repository (default: the bundle's name)
    version: int = 1
    raw_decoder: bool = False  # the raw decoder (client runs the loop) instead of leptonc's engine
    instance_groups: tuple[InstanceGroup, ...] = ()  # () : the bundle's device (cpu:1, or gpu: one per GPU)
    instances: int = 1  # count of the default group when instance_groups is empty
    max_queue: int = 64  # the engine's waiting queue per instance, beyond its slots
    max_queue_delay_us: int = 100  # raw decoder only: Triton's dynamic batching delay
    force: bool = False  # replace an existing model directory of the same name

    def __post_init__(self) -> None:
        if self.name is not None and not _NAME_OK.match(self.name):
            raise UnsupportedRequestError(
                f"--name {self.name!r} is not a usable Triton model name; use letters, digits, '_', '-', '.'")
        if not 1 <= self.version <= 1_000_000:
            raise UnsupportedRequestError(f"--version {self.version} is out of range; use 1..1000000")
        if not 1 <= self.instances <= 64:
            raise UnsupportedRequestError(f"--instances {self.instances} is out of range; use 1..64")
        if not 0 <= self.max_queue <= 100_000:
            raise UnsupportedRequestError(f"--max-queue {self.max_queue} is out of range; use 0..100000")
        if not 0 <= self.max_queue_delay_us <= 10_000_000:
            raise UnsupportedRequestError("--max-queue-delay-us must be between 0 and 10000000")


def _bundle_on_gpu(manifest: dict) -> bool:
    if manifest["backend"] == "onnxruntime":
        return manifest["engine"].get("session", {}).get("provider") not in (None, "CPUExecutionProvider")
    return manifest["target"].get("family") not in (None, "cpu")


def instance_groups(manifest: dict, options: TritonOptions) -> tuple[InstanceGroup, ...]:
    """The groups asked for, checked against the bundle's device; by default the bundle's own device."""
    on_gpu = _bundle_on_gpu(manifest)
    if not options.instance_groups:
        return (InstanceGroup("gpu" if on_gpu else "cpu", options.instances),)
    for group in options.instance_groups:
        if (group.kind == "gpu") != on_gpu:
            where = "a GPU" if on_gpu else "the CPU"
            raise UnsupportedRequestError(f"this bundle was compiled for {where}; a {group.kind} instance group "
                                          "cannot run it",
                                          hint=f"use --instance-group {'gpu' if on_gpu else 'cpu'}, or package a "
                                               f"bundle compiled for the {group.kind}")
    return options.instance_groups


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


def raw_decoder_config(manifest: dict, options: TritonOptions = TritonOptions()) -> str:
    """The raw decoder's `config.pbtxt` (protobuf text format of Triton's ModelConfig): the ONNX Runtime or
    TensorRT backend runs one decoder step a request; the client runs the generation loop and the KV cache."""
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
    lines += _instance_group_block(manifest, options)
    params = _provenance(manifest)
    engine_sha = manifest.get("files", {}).get(manifest["engine"]["file"], {}).get("sha256")
    if engine_sha:
        params["leptonc_engine_sha256"] = str(engine_sha)
    lines += _parameter_lines(params)
    return "\n".join(lines) + "\n"


def _instance_group_block(manifest: dict, options: TritonOptions) -> list[str]:
    groups = instance_groups(manifest, options)
    lines = ["instance_group ["]
    for n, group in enumerate(groups):
        block = group.pbtxt()
        if n < len(groups) - 1:
            block[-1] += ","
        lines += block
    return lines + ["]"]


def _parameter_lines(params: dict[str, str]) -> list[str]:
    return [f"parameters: {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}"
            for k, v in params.items()]


def _provenance(manifest: dict) -> dict[str, str]:
    return {
        "leptonc_version": str(manifest.get("leptonc_version", "")),
        "leptonc_target": str(manifest["target"].get("name", "")),
        "leptonc_precision": str(manifest.get("precision", "")),
        "leptonc_max_sequence": str(manifest["limits"]["max_sequence"]),
    }


# The Python model's inputs: the prompt, then optional sampling settings (each may also come as a request
# parameter: Triton's generate endpoints turn JSON fields that name no input into parameters).
PYTHON_MODEL_INPUTS = (
    ("text_input", "TYPE_STRING", "[ 1 ]", False),
    ("max_tokens", "TYPE_INT32", "[ 1 ]", True),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("top_p", "TYPE_FP32", "[ 1 ]", True),
    ("top_k", "TYPE_INT32", "[ 1 ]", True),
    ("seed", "TYPE_INT64", "[ 1 ]", True),
    ("stop", "TYPE_STRING", "[ -1 ]", True),
    ("stop_at_eos", "TYPE_BOOL", "[ 1 ]", True),
    ("stream", "TYPE_BOOL", "[ 1 ]", True),
)
PYTHON_MODEL_OUTPUTS = (
    ("text_output", "TYPE_STRING", "[ 1 ]"),  # the whole completion, or one streamed delta
    ("output_ids", "TYPE_INT64", "[ -1 ]"),  # the tokens of that text
    ("finish_reason", "TYPE_STRING", "[ 1 ]"),  # on the last response only: stop, length, eos, cancelled
)


def python_model_config(manifest: dict, options: TritonOptions = TritonOptions()) -> str:
    """`config.pbtxt` of the Python-backend model that runs leptonc's batching engine (decoupled)."""
    if manifest["backend"] != "onnxruntime":
        raise UnsupportedRequestError(f"leptonc's engine serves onnxruntime bundles; this one is "
                                      f"{manifest['backend']!r}",
                                      hint="compile with the onnxruntime backend, or pass --triton-raw-decoder")
    lines = [
        "# Written by leptonc: Triton's Python backend runs leptonc's in-flight batching engine on",
        f"# {BUNDLE_IN_VERSION}/ in the version folder (model.py beside it). Text in, text streamed out.",
        f"name: {json.dumps(model_name(manifest, options))}",
        'backend: "python"',
        "max_batch_size: 0",  # the engine batches in flight; Triton hands it requests one by one
        "model_transaction_policy { decoupled: true }",
        "version_policy: { latest: { num_versions: 1 } }",
        "input [",
    ]
    for n, (name, dtype, dims, optional) in enumerate(PYTHON_MODEL_INPUTS):
        sep = "," if n < len(PYTHON_MODEL_INPUTS) - 1 else ""
        opt = " optional: true" if optional else ""
        lines.append(f"  {{ name: {json.dumps(name)} data_type: {dtype} dims: {dims}{opt} }}{sep}")
    lines += ["]", "output ["]
    for n, (name, dtype, dims) in enumerate(PYTHON_MODEL_OUTPUTS):
        sep = "," if n < len(PYTHON_MODEL_OUTPUTS) - 1 else ""
        lines.append(f"  {{ name: {json.dumps(name)} data_type: {dtype} dims: {dims} }}{sep}")
    lines.append("]")
    lines += _instance_group_block(manifest, options)
    params = {"leptonc_bundle": BUNDLE_IN_VERSION, "leptonc_max_queue": str(options.max_queue),
              **_provenance(manifest)}
    return "\n".join(lines + _parameter_lines(params)) + "\n"


def triton_config(manifest: dict, options: TritonOptions = TritonOptions()) -> str:
    """The `config.pbtxt` text for the model `options` asks for (leptonc's engine, or the raw decoder)."""
    return raw_decoder_config(manifest, options) if options.raw_decoder else python_model_config(manifest, options)


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


def _stage_raw_decoder(bundle: Bundle, staging: Path, version_dir: Path) -> None:
    manifest = bundle.manifest
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


def _stage_python_model(bundle: Bundle, version_dir: Path) -> None:
    """model.py and the whole bundle (every hashed file, byte for byte, and its sealed manifest)."""
    target = version_dir / BUNDLE_IN_VERSION
    for member, entry in bundle.manifest["files"].items():
        _copy_verified(bundle.path / member, target / member, entry)
    shutil.copyfile(bundle.path / MANIFEST, target / MANIFEST)
    shutil.copyfile(PYTHON_MODEL_FILE, version_dir / "model.py")


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
        if options.raw_decoder:
            _stage_raw_decoder(bundle, staging, staging / str(options.version))
        else:
            _stage_python_model(bundle, staging / str(options.version))
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
        "platform": TRITON_BACKENDS[manifest["backend"]][0] if options.raw_decoder else "python",
        "config": str(final / "config.pbtxt"),
        "files": sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()),
        "serve": f"tritonserver --model-repository {repo}" + ("" if options.raw_decoder else
                                                               f"   (or: python -m leptonc.triton_server {repo})"),
    }
