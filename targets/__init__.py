"""Hardware targets and per-backend pipelines.

Importing this package is cheap (no torch, onnxruntime or tensorrt): `leptonc targets` relies on it.
"""

from __future__ import annotations

from leptonc.errors import UnsupportedRequestError
from leptonc.targets.hardware.base import BACKENDS, PRECISIONS, Target
from leptonc.targets.hardware.cpu import CPU
from leptonc.targets.hardware.nvidia import GPUS

TARGETS: dict[str, Target] = {t.name: t for t in (*GPUS, CPU)}


def get_target(name: str) -> Target:
    key = name.strip().lower()
    if key not in TARGETS:
        raise UnsupportedRequestError(
            f"unknown target {name!r}; valid targets: {', '.join(TARGETS)} (see `leptonc targets`)"
        )
    return TARGETS[key]


__all__ = ["BACKENDS", "PRECISIONS", "TARGETS", "Target", "get_target"]
