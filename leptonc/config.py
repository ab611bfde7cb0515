"""The frozen compile configuration: what the CLI builds from flags and `leptonc.compile` takes.

Validated in `__post_init__` with messages that say what to do; cheap to import (no torch).
The same record is printed by `--dry-run` and saved into the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from leptonc.errors import UnsupportedRequestError
from leptonc.targets import BACKENDS, PRECISIONS, Target, get_target

DEFAULT_MAX_SEQUENCE = 2048
DEFAULT_MAX_BATCH = 16


@dataclass(frozen=True)
class CompileConfig:
    source: str
    target: str = "cpu"
    output: str | None = None
    backend: str | None = None  # None: the target's default
    precision: str | None = None  # None: the target's default
    max_batch: int = DEFAULT_MAX_BATCH
    max_sequence: int = DEFAULT_MAX_SEQUENCE
    passes: bool = True
    disabled_passes: tuple[str, ...] = ()
    verify: bool = True
    max_parity_error: float = 1e-3
    allow_pickle: bool = False
    trust_remote_code: bool = False
    force: bool = False
    options: dict = field(default_factory=dict)  # backend/quantization extras, recorded in the manifest

    def __post_init__(self) -> None:
        target = get_target(self.target)  # raises with the list of valid targets
        object.__setattr__(self, "target", target.name)
        backend = self.backend or target.default_backend
        if backend not in BACKENDS:
            raise UnsupportedRequestError(f"unknown backend {backend!r}; use one of: {', '.join(BACKENDS)}")
        target.check_backend(backend)
        object.__setattr__(self, "backend", backend)
        precision = self.precision or target.default_precision
        if precision not in PRECISIONS:
            raise UnsupportedRequestError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
        target.check_precision(precision)
        object.__setattr__(self, "precision", precision)
        if not 1 <= self.max_batch <= 4096:
            raise UnsupportedRequestError(f"--max-batch {self.max_batch} is out of range; use 1..4096")
        if not 1 <= self.max_sequence <= 1 << 20:
            raise UnsupportedRequestError(f"--max-seq {self.max_sequence} is out of range; use 1..1048576")
        if self.max_parity_error <= 0:
            raise UnsupportedRequestError("--max-parity-error must be positive")
        if self.output is None:
            stem = Path(self.source.rstrip("/")).name.removesuffix(".gguf") or "model"
            object.__setattr__(self, "output", f"{stem}.{target.name}.lepton")
        object.__setattr__(self, "disabled_passes", tuple(self.disabled_passes))

    @property
    def target_record(self) -> Target:
        return get_target(self.target)

    @property
    def precision_mode(self) -> str:
        return self.target_record.mode(self.precision)

    def with_(self, **changes) -> "CompileConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
