"""Registry of architecture adapters: HF `model_type` -> adapter. Each adapter lives in its own file."""

from __future__ import annotations

from typing import Any, Protocol

from leptonc.errors import UnsupportedArchitectureError
from leptonc.models.spec import DecoderSpec, DecoderWeights


class Adapter(Protocol):
    model_types: tuple[str, ...]

    def spec(self, module: Any) -> DecoderSpec: ...

    def weights(self, module: Any, spec: DecoderSpec) -> DecoderWeights: ...


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


def supported_architectures() -> list[str]:
    _load_all()
    return sorted(ADAPTERS)


def get_adapter(model_type: str) -> Adapter:
    _load_all()
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported yet; supported: {', '.join(sorted(ADAPTERS))}",
            hint="open an issue with the model's config.json",
        )
    return ADAPTERS[model_type]


def _load_all() -> None:
    # Importing an adapter module registers it; cheap (no torch at import time).
    from leptonc.models import gemma3, gpt2, gpt_neox, llama, phi3  # noqa: F401
