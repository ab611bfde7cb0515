"""The architecture-neutral description of a decoder that export builds a graph from.

An adapter (one small file per architecture family) turns a Hugging Face module into a
`DecoderSpec` plus named weights; `leptonc.export` turns that into one ONNX graph. Weight names are
logical, not HF's: `embed`, `lm_head`, `final_norm.weight`, `layers.{i}.q.weight`, ... Linear weights
are given in PyTorch's [out, in] layout; export transposes them for MatMul.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np


@dataclass(frozen=True)
class DecoderSpec:
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    mlp: str = "gated"  # "gated" (down(act(gate) * up)) | "plain" (down(act(up)))
    activation: str = "silu"  # "silu" | "gelu" (erf) | "gelu_tanh" | "relu"
    position: str = "rope"  # "rope" | "learned"
    rotary_dim: int = 0  # dims of each head that rotate (head_dim unless partial rotary)
    rope_inv_freq: tuple[float, ...] = ()
    rope_attention_scaling: float = 1.0
    # the sliding-window layers' own rotary (gemma3: a local base beside the global one); () = same as above
    rope_local_inv_freq: tuple[float, ...] = ()
    rope_local_attention_scaling: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (qwen3)
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (gpt_neox)
    post_norms: bool = False  # x + post_attn_norm(attn(ln1(x))), then x + post_mlp_norm(mlp(ln2(x))) (gemma3)
    embed_scale: float = 1.0  # token embeddings are multiplied by this before the first layer (gemma3: sqrt(hidden))
    tied_embeddings: bool = False
    attention_scale: float | None = None  # defaults to head_dim ** -0.5
    layer_attention_scales: tuple[float, ...] = ()  # per-layer override (gpt2 scale_attn_by_inverse_layer_idx)
    sliding_window: int | None = None  # a key is visible if query_index - key_index < window
    sliding_layers: tuple[int, ...] = ()  # the layers that use the window (the others attend to everything)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.position == "rope" and len(self.rope_inv_freq) * 2 != self.rotary_dim:
            raise ValueError("rope_inv_freq must hold rotary_dim / 2 frequencies")
        if self.layer_attention_scales and len(self.layer_attention_scales) != self.num_layers:
            raise ValueError("layer_attention_scales needs one scale per layer")
        if self.sliding_layers and not self.sliding_window:
            raise ValueError("sliding_layers given without a sliding_window")
        if self.rope_local_inv_freq and len(self.rope_local_inv_freq) != len(self.rope_inv_freq):
            raise ValueError("rope_local_inv_freq must hold as many frequencies as rope_inv_freq")
        if self.post_norms and self.parallel_residual:
            raise ValueError("post_norms is defined for sequential residuals only")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("rope_inv_freq")
        d.pop("rope_local_inv_freq")
        return d


WeightSource = Callable[[str], np.ndarray]


@dataclass
class DecoderWeights:
    """Named float32 numpy weights, fetched one at a time so export can stream them to disk."""

    get: WeightSource
    names: tuple[str, ...]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __call__(self, name: str) -> np.ndarray:
        return self.get(name)
