"""Adapter for gpt_neox (Pythia, GPT-NeoX): parallel residual (`use_parallel_residual`), partial
rotary (`partial_rotary_factor`, formerly `rotary_pct`), LayerNorm, a plain GELU MLP with biases.
attention.query_key_value fuses q, k and v *per head*: HF views its output as [B, S, H, 3*D] and
chunks the last axis, so the weight rows are laid out [H, 3, D]; the adapter un-interleaves them."""

from __future__ import annotations

from typing import Any

import numpy as np

from leptonc.models.adapters import register_adapter
from leptonc.models.common import activation, eos_ids, np32, rope_from, weak_module_getter
from leptonc.models.spec import DecoderSpec, DecoderWeights


class GPTNeoXAdapter:
    model_types = ("gpt_neox",)

    def spec(self, module: Any) -> DecoderSpec:
        c = module.config
        head_dim = c.hidden_size // c.num_attention_heads
        inv_freq, scaling = rope_from(module.gpt_neox.rotary_emb)
        attn = module.gpt_neox.layers[0].attention
        return DecoderSpec(
            architecture=c.model_type,
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings,
            norm="layer",
            norm_eps=float(c.layer_norm_eps),
            mlp="plain",
            activation=activation(c.hidden_act, c.model_type),
            position="rope",
            rotary_dim=2 * len(inv_freq),
            rope_inv_freq=inv_freq,
            rope_attention_scaling=scaling,
            qkv_bias=attn.query_key_value.bias is not None,
            o_bias=attn.dense.bias is not None,
            mlp_bias=True,
            parallel_residual=bool(c.use_parallel_residual),
            tied_embeddings=module.lm_head.weight is module.gpt_neox.embed_in.weight,
            attention_scale=float(attn.scaling),
            bos_token_id=getattr(c, "bos_token_id", None),
            eos_token_ids=eos_ids(c),
        )

    def weights(self, module: Any, spec: DecoderSpec) -> DecoderWeights:
        names = ["embed", "final_norm.weight", "final_norm.bias"]
        if not spec.tied_embeddings:
            names.append("lm_head")
        for i in range(spec.num_layers):
            for key in ("q", "k", "v", "o"):
                names.append(f"layers.{i}.{key}.weight")
                if (spec.qkv_bias if key != "o" else spec.o_bias):
                    names.append(f"layers.{i}.{key}.bias")
            for key in ("up", "down"):
                names += [f"layers.{i}.{key}.weight", f"layers.{i}.{key}.bias"]
            names += [f"layers.{i}.{n}.{p}" for n in ("ln1", "ln2") for p in ("weight", "bias")]
        H, D = spec.num_heads, spec.head_dim

        def get(module: Any, name: str) -> np.ndarray:
            m = module.gpt_neox
            if name == "embed":
                return np32(m.embed_in.weight)
            if name == "lm_head":
                return np32(module.lm_head.weight)
            if name.startswith("final_norm."):
                return np32(getattr(m.final_layer_norm, name.split(".")[1]))
            _, idx, key, param = name.split(".")
            layer = m.layers[int(idx)]
            if key in ("q", "k", "v"):
                fused = np32(getattr(layer.attention.query_key_value, param))
                per_head = fused.reshape(H, 3, D, *fused.shape[1:])[:, "qkv".index(key)]
                return per_head.reshape(H * D, *fused.shape[1:])
            sub = {"o": layer.attention.dense, "up": layer.mlp.dense_h_to_4h, "down": layer.mlp.dense_4h_to_h,
                   "ln1": layer.input_layernorm, "ln2": layer.post_attention_layernorm}[key]
            return np32(getattr(sub, param))

        return DecoderWeights(get=weak_module_getter(module, get), names=tuple(names))


register_adapter(GPTNeoXAdapter())
