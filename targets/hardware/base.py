"""The hardware target record: what a GPU (or the CPU) can run, and how a request is checked against it."""

from __future__ import annotations

from dataclasses import dataclass, field

from leptonc.errors import UnsupportedRequestError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int4")
BACKENDS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Target:
    """One hardware target. `native` precisions run on tensor cores (or the CPU's vector units);
    `simulated` ones are accepted for accuracy studies only (dequantized at run time)."""

    name: str
    description: str
    family: str  # "nvidia" or "cpu"
    compute_capability: tuple[int, int] | None
    memory_gb: float
    native: tuple[str, ...]
    simulated: tuple[str, ...] = ()
    default_backend: str = "tensorrt"
    backends: tuple[str, ...] = BACKENDS
    default_precision: str = "fp16"
    sparsity_2_4: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for p in self.native + self.simulated:
            if p not in PRECISIONS:
                raise ValueError(f"target {self.name}: unknown precision {p!r}; use one of {PRECISIONS}")
        if self.default_backend not in self.backends:
            raise ValueError(f"target {self.name}: default backend {self.default_backend} not in {self.backends}")

    @property
    def sm(self) -> str:
        if self.compute_capability is None:
            return "-"
        major, minor = self.compute_capability
        return f"sm{major}{minor}"

    @property
    def is_gpu(self) -> bool:
        return self.family != "cpu"

    def supports(self, precision: str) -> bool:
        return precision in self.native or precision in self.simulated

    def mode(self, precision: str) -> str:
        """'native' or 'simulated' for a precision this target accepts."""
        return "native" if precision in self.native else "simulated"

    def check_precision(self, precision: str) -> None:
        if self.supports(precision):
            return
        raise UnsupportedRequestError(_refusal(self, precision))

    def check_backend(self, backend: str) -> None:
        if backend not in self.backends:
            raise UnsupportedRequestError(
                f"target {self.name} has no {backend} backend; use --backend {' or '.join(self.backends)}"
            )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "family": self.family,
            "compute_capability": ".".join(map(str, self.compute_capability)) if self.compute_capability else None,
            "sm": self.sm,
            "memory_gb": self.memory_gb,
            "native_precisions": list(self.native),
            "simulated_precisions": list(self.simulated),
            "default_precision": self.default_precision,
            "default_backend": self.default_backend,
            "backends": list(self.backends),
            "sparsity_2_4": self.sparsity_2_4,
        }


# What each precision needs on NVIDIA tensor cores, for refusal messages.
_NEEDS = {"fp8": (8, 9), "bf16": (8, 0), "int4": (7, 5), "int8": (7, 5), "fp16": (7, 0)}


def _refusal(target: Target, precision: str) -> str:
    from leptonc.targets import TARGETS  # late: the registry imports this module

    alternatives = [p for p in ("fp8", "int8", "int4", "bf16", "fp16") if p != precision and target.supports(p)]
    alt = f"use --{alternatives[0]}" if alternatives else "choose another precision"
    if target.compute_capability and precision in _NEEDS:
        need = _NEEDS[precision]
        better = [t.name for t in TARGETS.values() if t.compute_capability and t.supports(precision)]
        return (
            f"{target.name} is {target.sm}: {precision.upper()} needs sm{need[0]}{need[1]}+ tensor cores; "
            f"{alt}, or target {', '.join(better)}"
        )
    return f"target {target.name} cannot run {precision}; {alt}"
