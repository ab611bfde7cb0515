"""Adapter for gpt2: learned position embeddings (transformer.wpe), LayerNorm with bias, a plain
GELU MLP, biases on every projection. Its `Conv1D` layers store weights as [in, out] (the transpose
of nn.Linear); the adapter hands export the [out, in] view it expects, without a copy. c_attn fuses
q, k and v along the output dimension: [q | k | v], each hidden_size wide."""

from __future__ import annotations

from typing import Any

import numpy as np

from leptonc.errors import UnsupportedArchitectureError
from leptonc.models.adapters import register_adapter
from leptonc.models.common import activation, eos_ids, np32, weak_module_getter
from leptonc.models.spec import DecoderSpec, DecoderWeights


class GPT2Adapter:
    model_types = ("gpt2",)

    def spec(self, module: Any) -> DecoderSpec:
        c = module.config
        if getattr(c, "add_cross_attention", False):
            raise UnsupportedArchitectureError("gpt2 with cross-attention (an encoder-decoder setup) is not supported",
                                               hint="compile a decoder-only gpt2 checkpoint")
        heads = c.n_head
        head_dim = c.n_embd // heads
        base = head_dim ** -0.5 if c.scale_attn_weights else 1.0
        per_layer = (tuple(base / (i + 1) for i in range(c.n_layer))
                     if getattr(c, "scale_attn_by_inverse_layer_idx", False) else ())
        return DecoderSpec(
            architecture=c.model_type,
            num_layers=c.n_layer,
            hidden_size=c.n_embd,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            intermediate_size=c.n_inner or 4 * c.n_embd,
            vocab_size=c.vocab_size,
            max_positions=c.n_positions,
            norm="layer",
            norm_eps=float(c.layer_norm_epsilon),
            mlp="plain",
            activation=activation(c.activation_function, c.model_type),
            position="learned",
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tied_embeddings=module.lm_head.weight is module.transformer.wte.weight,
            attention_scale=base,
            layer_attention_scales=per_layer,
            bos_token_id=getattr(c, "bos_token_id", None),
            eos_token_ids=eos_ids(c),
        )

    def weights(self, module: Any, spec: DecoderSpec) -> DecoderWeights:
        names = ["embed", "pos_embed", "final_norm.weight", "final_norm.bias"]
        if not spec.tied_embeddings:
            names.append("lm_head")
        for i in range(spec.num_layers):
            for key in ("q", "k", "v", "o", "up", "down"):
                names += [f"layers.{i}.{key}.weight", f"layers.{i}.{key}.bias"]
            names += [f"layers.{i}.{n}.{p}" for n in ("ln1", "ln2") for p in ("weight", "bias")]
        hidden = spec.hidden_size

        def get(module: Any, name: str) -> np.ndarray:
            t = module.transformer
            if name == "embed":
                return np32(t.wte.weight)
            if name == "pos_embed":
                return np32(t.wpe.weight)
            if name == "lm_head":
                return np32(module.lm_head.weight)
            if name.startswith("final_norm."):
                return np32(getattr(t.ln_f, name.split(".")[1]))
            _, idx, key, param = name.split(".")
            block = t.h[int(idx)]
            if key in ("ln1", "ln2"):
                return np32(getattr(block.ln_1 if key == "ln1" else block.ln_2, param))
            conv = {"o": block.attn.c_proj, "up": block.mlp.c_fc, "down": block.mlp.c_proj}.get(key, block.attn.c_attn)
            value = np32(getattr(conv, param))  # weight [in, out], bias [out]
            if key in ("q", "k", "v"):
                j = "qkv".index(key)
                value = value[..., j * hidden:(j + 1) * hidden]
            return value.T if param == "weight" else value

        return DecoderWeights(get=weak_module_getter(module, get), names=tuple(names))


register_adapter(GPT2Adapter())
