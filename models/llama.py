"""Adapter for the Llama family: llama (incl. Llama-3 rope scaling), mistral, qwen2 (QKV bias),
qwen3 (q/k norm). They share HF's module layout: model.embed_tokens, model.layers[i].self_attn.
{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, model.norm."""

from __future__ import annotations

from typing import Any

import numpy as np

from leptonc.models.adapters import register_adapter
from leptonc.models.spec import DecoderSpec, DecoderWeights


def _np(t: Any) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def rope_from_module(module: Any) -> tuple[tuple[float, ...], float]:
    """Inverse frequencies and attention scaling exactly as the HF module computes them (covers
    default, linear, dynamic-at-init, llama3, yarn, longrope init)."""
    rotary = module.model.rotary_emb
    return tuple(float(x) for x in rotary.inv_freq.detach().float().cpu()), float(rotary.attention_scaling)


def eos_ids(config: Any) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


class LlamaAdapter:
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def spec(self, module: Any) -> DecoderSpec:
        c = module.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        inv_freq, scaling = rope_from_module(module)
        attn = module.model.layers[0].self_attn
        mlp = module.model.layers[0].mlp
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
            activation="silu",
            position="rope",
            rotary_dim=2 * len(inv_freq),
            rope_inv_freq=inv_freq,
            rope_attention_scaling=scaling,
            qkv_bias=attn.q_proj.bias is not None,
            o_bias=attn.o_proj.bias is not None,
            mlp_bias=mlp.gate_proj.bias is not None,
            qk_norm=hasattr(attn, "q_norm"),
            tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            bos_token_id=getattr(c, "bos_token_id", None),
            eos_token_ids=eos_ids(c),
        )

    def weights(self, module: Any, spec: DecoderSpec) -> DecoderWeights:
        m = module.model
        layer_map = {
            "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
            "ln1": "input_layernorm", "ln2": "post_attention_layernorm",
            "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
        }
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

        def get(name: str) -> np.ndarray:
            if name == "embed":
                return _np(m.embed_tokens.weight)
            if name == "lm_head":
                return _np(module.lm_head.weight)
            if name == "final_norm.weight":
                return _np(m.norm.weight)
            _, idx, key, param = name.split(".")
            sub = m.layers[int(idx)].get_submodule(layer_map[key])
            return _np(getattr(sub, param))

        return DecoderWeights(get=get, names=tuple(names))


register_adapter(LlamaAdapter())
