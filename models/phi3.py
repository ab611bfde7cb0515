"""Adapter for phi3: the Llama layout with fused weights, split here so export sees separate
q/k/v and gate/up matrices. self_attn.qkv_proj rows are [q (H*D) | k (KV*D) | v (KV*D)];
mlp.gate_up_proj rows are [gate (I) | up (I)] (HF: `gate, up = gate_up.chunk(2, dim=-1)`).
Partial rotary (`partial_rotary_factor`) and longrope come from the HF rotary module."""

from __future__ import annotations

from typing import Any

import numpy as np

from leptonc.models.adapters import register_adapter
from leptonc.models.common import np32
from leptonc.models.llama import LlamaAdapter
from leptonc.models.spec import DecoderSpec


class Phi3Adapter(LlamaAdapter):
    model_types = ("phi3",)

    def _biases(self, module: Any) -> dict:
        attn, mlp = module.model.layers[0].self_attn, module.model.layers[0].mlp
        return {"qkv_bias": attn.qkv_proj.bias is not None, "o_bias": attn.o_proj.bias is not None,
                "mlp_bias": mlp.gate_up_proj.bias is not None}

    def layer_tensor(self, layer: Any, key: str, param: str, spec: DecoderSpec) -> np.ndarray:
        if key in ("q", "k", "v"):
            fused = np32(getattr(layer.self_attn.qkv_proj, param))
            q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[key]
            return fused[start:start + size]
        if key in ("gate", "up"):
            fused = np32(getattr(layer.mlp.gate_up_proj, param))
            size = spec.intermediate_size
            return fused[:size] if key == "gate" else fused[size:]
        if key == "down":
            return np32(getattr(layer.mlp.down_proj, param))
        return super().layer_tensor(layer, key, param, spec)


register_adapter(Phi3Adapter())
