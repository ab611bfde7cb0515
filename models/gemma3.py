"""Adapter for Gemma 3 text models (gemma3_text: Gemma3ForCausalLM, e.g. gemma-3-270m / 1b).

The Llama module layout plus what Gemma 3 adds: four norms a layer (input, post-attention,
pre-feedforward, post-feedforward: `post_norms`), RMSNorm weights applied as (1 + w) (given to export
already shifted), q/k RMSNorm, GeGLU with tanh GELU, token embeddings scaled by sqrt(hidden) in the
model's dtype, attention scaled by query_pre_attn_scalar ** -0.5, and interleaved sliding-window and
global layers with rotary bases of their own (`rope_local_inv_freq` for the sliding ones).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leptonc.errors import UnsupportedArchitectureError
from leptonc.models.adapters import register_adapter
from leptonc.models.common import activation, eos_ids, np32, sliding_window
from leptonc.models.llama import LlamaAdapter
from leptonc.models.spec import DecoderSpec, DecoderWeights


def _rope_for(rotary: Any, layer_type: str) -> tuple[tuple[float, ...], float]:
    inv = getattr(rotary, f"{layer_type}_inv_freq")
    return tuple(float(x) for x in inv.detach().float().cpu()), float(getattr(rotary, f"{layer_type}_attention_scaling"))


class Gemma3Adapter(LlamaAdapter):
    model_types = ("gemma3_text",)

    LAYER_MAP = {
        **LlamaAdapter.LAYER_MAP,
        "ln1": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
        "ln2": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm",
    }
    NORMS = ("ln1", "ln2", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm")

    def spec(self, module: Any) -> DecoderSpec:
        c = module.config
        for field in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(c, field, None) is not None:
                raise UnsupportedArchitectureError(
                    f"gemma3_text with {field}={getattr(c, field)} is not supported (Gemma 3 releases leave it unset)",
                    hint="set it to null in config.json if the model was trained without it, or open an issue",
                )
        if getattr(c, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError(
                "gemma3_text with use_bidirectional_attention (an encoder) is not a causal language model",
                hint="compile a causal Gemma 3 checkpoint",
            )
        rotary = module.model.rotary_emb
        types = tuple(getattr(c, "layer_types", None) or ())
        global_type = "full_attention" if "full_attention" in types or not types else types[0]
        inv_freq, scaling = _rope_for(rotary, global_type)
        window, sliding_layers = sliding_window(c)
        local_inv, local_scaling = (), 1.0
        if sliding_layers and "sliding_attention" in types:
            local_inv, local_scaling = _rope_for(rotary, "sliding_attention")
        return DecoderSpec(
            architecture=c.model_type,
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings,
            norm="rms",
            norm_eps=float(c.rms_norm_eps),
            mlp="gated",
            activation=activation(getattr(c, "hidden_activation", None) or c.hidden_act, c.model_type),
            position="rope",
            rotary_dim=2 * len(inv_freq),
            rope_inv_freq=inv_freq,
            rope_attention_scaling=scaling,
            rope_local_inv_freq=local_inv,
            rope_local_attention_scaling=local_scaling,
            **self._biases(module),
            qk_norm=True,
            post_norms=True,
            embed_scale=float(module.model.embed_tokens.embed_scale),
            tied_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
            attention_scale=float(c.query_pre_attn_scalar) ** -0.5,
            sliding_window=window,
            sliding_layers=sliding_layers,
            bos_token_id=getattr(c, "bos_token_id", None),
            eos_token_ids=eos_ids(c),
        )

    def weight_names(self, spec: DecoderSpec) -> list[str]:
        names = super().weight_names(spec)
        for i in range(spec.num_layers):
            names += [f"layers.{i}.post_attn_norm.weight", f"layers.{i}.post_mlp_norm.weight"]
        return names

    def layer_tensor(self, layer: Any, key: str, param: str, spec: DecoderSpec) -> np.ndarray:
        t = super().layer_tensor(layer, key, param, spec)
        return t + np.float32(1.0) if key in self.NORMS else t  # Gemma3RMSNorm: x_normed * (1 + w)

    def weights(self, module: Any, spec: DecoderSpec) -> DecoderWeights:
        base = super().weights(module, spec)
        inner = base.get

        def get(name: str) -> np.ndarray:
            t = inner(name)
            return t + np.float32(1.0) if name == "final_norm.weight" else t  # (1 + w), as in the layers

        return DecoderWeights(get=get, names=base.names)


register_adapter(Gemma3Adapter())
