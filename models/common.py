"""Helpers shared by the architecture adapters: tensor conversion, rotary tables read from the HF
module, activation names, sliding-window layers, and a weak handle on the source module."""

from __future__ import annotations

import weakref
from typing import Any, Callable

import numpy as np

from leptonc.errors import UnsupportedArchitectureError

# HF `ACT2FN` names -> the export's activation names (same math, checked by the parity tests).
ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


def np32(t: Any) -> np.ndarray:
    """A float32 numpy view of a CPU tensor (no copy when it is already float32)."""
    return t.detach().to("cpu").float().numpy()


def activation(name: str, model_type: str) -> str:
    if name not in ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"{model_type} with activation {name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}",
            hint="open an issue with the model's config.json",
        )
    return ACTIVATIONS[name]


def rope_from(rotary: Any) -> tuple[tuple[float, ...], float]:
    """Inverse frequencies and attention scaling exactly as the HF rotary module computed them at
    init (default, linear, llama3, yarn, longrope's init choice). `dynamic` NTK changes them with the
    sequence length at run time; the export keeps the init values (exact up to the original length)."""
    return tuple(float(x) for x in rotary.inv_freq.detach().float().cpu()), float(rotary.attention_scaling)


def eos_ids(config: Any) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def sliding_window(config: Any) -> tuple[int | None, tuple[int, ...]]:
    """(window, layers that use it) from HF's `layer_types` / `sliding_window`; (None, ()) if none."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None, ()
    if getattr(config, "use_sliding_window", True) is False:  # qwen2/qwen3 carry a window but leave it off
        return None, ()
    types = getattr(config, "layer_types", None)
    if not types:
        return int(window), tuple(range(config.num_hidden_layers))
    return int(window), tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def weak_module_getter(module: Any, get: Callable[[Any, str], np.ndarray]) -> Callable[[str], np.ndarray]:
    """Bind `get(module, name)` through a weak reference, so the weights handle that export holds
    does not keep a multi-GB PyTorch model alive after the compiler drops it."""
    ref = weakref.ref(module)

    def fetch(name: str) -> np.ndarray:
        m = ref()
        if m is None:
            raise RuntimeError(f"the source model was freed before weight {name!r} was read")
        return get(m, name)

    return fetch
