"""Adapter for the Llama family: llama (incl. Llama-3 rope scaling), mistral (sliding window),
qwen2 (QKV bias), qwen3 (q/k norm). They share HF's module layout: model.embed_tokens,
model.layers[i].self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm,
post_attention_layernorm, model.norm, lm_head. phi3 reuses this adapter with fused weights split."""

from __future__ import annotations

from typing import Any

import numpy as np

from leptonc.models.adapters import register_adapter
from leptonc.models.common import activation, eos_ids, np32, rope_from, sliding_window, weak_module_getter
from leptonc.models.spec import DecoderSpec, DecoderWeights


def rope_from_module(module: Any) -> tuple[tuple[float, ...], float]:
    return rope_from(module.model.rotary_emb)


class LlamaAdapter:
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    # logical layer key -> HF submodule path under model.layers[i]
    LAYER_MAP = {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
        "ln1": "input_layernorm", "ln2": "post_attention_layernorm",
        "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
    }

    def spec(self, module: Any) -> DecoderSpec:
        c = module.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        inv_freq, scaling = rope_from_module(module)
        window, sliding_layers = sliding_window(c)
        return DecoderSpec(
            architecture=c.model_type,
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings,
            norm="rms",
            norm_eps=float(c.rms_norm_eps),
            mlp="gated",
            activation=activation(getattr(c, "hidden_act", "silu"), c.model_type),
            position="rope",
            rotary_dim=2 * len(inv_freq),
            rope_inv_freq=inv_freq,
            rope_attention_scaling=scaling,
            **self._biases(module),
            qk_norm=hasattr(module.model.layers[0].self_attn, "q_norm"),
            tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            sliding_window=window,
            sliding_layers=sliding_layers,
            bos_token_id=getattr(c, "bos_token_id", None),
            eos_token_ids=eos_ids(c),
        )

    def _biases(self, module: Any) -> dict:
        attn, mlp = module.model.layers[0].self_attn, module.model.layers[0].mlp
        return {"qkv_bias": attn.q_proj.bias is not None, "o_bias": attn.o_proj.bias is not None,
                "mlp_bias": mlp.gate_proj.bias is not None}

    def weight_names(self, spec: DecoderSpec) -> list[str]:
        names = ["embed", "final_norm.weight"]
        if not spec.tied_embeddings:
            names.append("lm_head")
        for i in range(spec.num_layers):
            for key in ("q", "k", "v", "o", "gate", "up", "down"):
                names.append(f"layers.{i}.{key}.weight")
            names += [f"layers.{i}.ln1.weight", f"layers.{i}.ln2.weight"]
            if spec.qkv_bias:
                names += [f"layers.{i}.{k}.bias" for k in ("q", "k", "v")]
            if spec.o_bias:
                names.append(f"layers.{i}.o.bias")
            if spec.mlp_bias:
                names += [f"layers.{i}.{k}.bias" for k in ("gate", "up", "down")]
            if spec.qk_norm:
                names += [f"layers.{i}.q_norm.weight", f"layers.{i}.k_norm.weight"]
        return names

    def layer_tensor(self, layer: Any, key: str, param: str, spec: DecoderSpec) -> np.ndarray:
        return np32(getattr(layer.get_submodule(self.LAYER_MAP[key]), param))

    def weights(self, module: Any, spec: DecoderSpec) -> DecoderWeights:
        def get(module: Any, name: str) -> np.ndarray:
            m = module.model
            if name == "embed":
                return np32(m.embed_tokens.weight)
            if name == "lm_head":
                return np32(module.lm_head.weight)
            if name == "final_norm.weight":
                return np32(m.norm.weight)
            _, idx, key, param = name.split(".")
            return self.layer_tensor(m.layers[int(idx)], key, param, spec)

        return DecoderWeights(get=weak_module_getter(module, get), names=tuple(self.weight_names(spec)))


register_adapter(LlamaAdapter())
