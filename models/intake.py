"""Model intake: a built-in name, a local Hugging Face directory, or a .gguf file -> a loaded model.

Weights are read from safetensors or GGUF only; pickle checkpoints need --allow-pickle, and remote
code runs only with --trust-remote-code. torch and transformers are imported here, lazily.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leptonc.bundle import sha256_file
from leptonc.errors import ModelSourceError
from leptonc.models.adapters import get_adapter
from leptonc.models.builtin import BUILTINS, Builtin, gguf_path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


@dataclass
class LoadedModel:
    name: str
    kind: str  # "builtin" | "hf-dir" | "gguf"
    description: str
    module: Any  # transformers PreTrainedModel, eval mode, float32
    tokenizer: Any  # transformers tokenizer (always present: built-ins without one get a byte-level one)
    source_hash: str
    random_weights: bool
    path: str | None = None

    @property
    def model_type(self) -> str:
        return self.module.config.model_type


def describe_source(source: str) -> tuple[str, Builtin | Path]:
    """Classify a source string without loading anything (cheap; used by --dry-run)."""
    if source in BUILTINS:
        return "builtin", BUILTINS[source]
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(
            f"model source {source!r} does not exist",
            hint=f"give a Hugging Face model directory, a .gguf file, or a built-in name: {', '.join(BUILTINS)}",
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(
                f"{path} is a file but not a .gguf; give a Hugging Face model directory or a .gguf file"
            )
        return "gguf", path
    if not (path / "config.json").is_file():
        raise ModelSourceError(
            f"{path} has no config.json, so it is not a Hugging Face model directory",
            hint="point at the directory that holds config.json and the *.safetensors weights",
        )
    return "hf-dir", path


def read_hf_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelSourceError(f"{path / 'config.json'} has no \"model_type\" string; is it a model config?")
    return config


def load_model(source: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> LoadedModel:
    kind, what = describe_source(source)
    if kind == "builtin":
        return _load_builtin(what)  # type: ignore[arg-type]
    if kind == "gguf":
        return _load_gguf(Path(what), name=Path(what).stem, kind="gguf", description=f"GGUF file {what}")
    return _load_hf_dir(Path(what), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def _load_builtin(b: Builtin) -> LoadedModel:
    if b.kind in ("gguf-package", "gguf-chunks"):
        return _load_gguf(gguf_path(b), name=b.name, kind="builtin", description=b.description)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    get_adapter(b.config["model_type"])
    config = AutoConfig.for_model(**b.config)
    check_host_memory(b.name, fp32_parameter_bytes(config))
    torch.manual_seed(b.seed)
    with torch.no_grad(), _layer_init_skipped(b.init == "normal"):
        module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if b.init == "normal":
            _ensure_normal_init(module, config)
    module.eval()
    identity = {"config": b.config, "seed": b.seed, **({"init": b.init} if b.init != "torch" else {})}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return LoadedModel(b.name, "builtin", b.description, module, byte_level_tokenizer(), f"sha256:{digest}", True)


@contextmanager
def _layer_init_skipped(skip: bool):
    """While a model is built: Linear and Embedding layers skip their own reset_parameters (transformers' init
    then sets every weight once)."""
    import torch

    if not skip:
        yield
        return
    saved = torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters
    torch.nn.Linear.reset_parameters = torch.nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters = saved


def _ensure_normal_init(module: Any, config: Any) -> None:
    """A transformers release that did not initialize a layer would leave torch.empty's bytes in it: any matrix that
    is not finite with roughly the configured spread is set from N(0, initializer_range) here."""
    std = float(getattr(config, "initializer_range", 0.02))
    for p in module.parameters():
        if p.dim() < 2:
            continue
        sample = p.detach().reshape(-1)[:: max(1, p.numel() // 65536)]
        spread = float(sample.std()) if bool(sample.isfinite().all()) else float("nan")
        if not (0.5 * std <= spread <= 2.0 * std):
            p.normal_(0.0, std)


def fp32_parameter_bytes(config: Any) -> int:
    """Bytes of the model's parameters in float32, counted on the meta device (allocates nothing)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in meta.parameters()) * 4  # parameters() counts tied weights once


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(name: str, weight_bytes: int) -> None:
    """Refuse up front what cannot fit: the float32 model must be held once in host memory (compile
    peaks at about 1.4x the weight bytes; see BENCHMARKS.md), rather than be killed by the OOM killer."""
    available = mem_available_bytes()
    if available is not None and weight_bytes > available:
        raise ModelSourceError(
            f"{name} needs {weight_bytes / 1e9:.1f} GB of host memory for its float32 weights alone, "
            f"but only {available / 1e9:.1f} GB is available here",
            hint="use a machine with more memory (about 1.5x the weights), or a smaller model such as llama-1b-shape",
        )


def _load_gguf(path: Path, *, name: str, kind: str, description: str) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # gguf raises many types for a bad file
        raise ModelSourceError(f"{path} is not a readable GGUF model: {exc}") from None
    get_adapter(config.model_type)
    # the config read above, passed on: from_pretrained would otherwise parse the GGUF file for it again (~5 s for
    # smollm2's 49k-token vocabulary)
    module = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32)
    module.eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return LoadedModel(name, kind, description, module, tokenizer, f"sha256:{sha256_file(path)}", False, str(path))


def _load_hf_dir(path: Path, *, allow_pickle: bool, trust_remote_code: bool) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = read_hf_config(path)
    get_adapter(config["model_type"])
    safetensors = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.glob("*.bin") if p.name.startswith("pytorch_model"))
    if not safetensors:
        if not pickles:
            raise ModelSourceError(f"{path} has no *.safetensors weights", hint="save the model with safe_serialization=True")
        if not allow_pickle:
            raise ModelSourceError(
                f"{path} has only pickle weights ({pickles[0].name}); loading pickle can run arbitrary code",
                hint="convert to safetensors, or pass --allow-pickle if you trust this file",
            )
    try:
        module = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, use_safetensors=bool(safetensors), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(f"could not load the model in {path}: {exc}") from None
    module.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = byte_level_tokenizer()
    digest = hashlib.sha256()
    for f in [path / "config.json", *(safetensors or pickles)]:
        digest.update(f.name.encode())
        digest.update(sha256_file(f).encode())
    return LoadedModel(path.name, "hf-dir", f"Hugging Face directory {path}", module, tokenizer,
                       f"sha256:{digest.hexdigest()}", False, str(path))


def byte_level_tokenizer() -> Any:
    """A 259-token byte-level tokenizer (<unk>, <s>, </s> + 256 bytes) for random-weight models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
