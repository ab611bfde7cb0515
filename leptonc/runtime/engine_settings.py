"""How a bundle runs: the engine settings, written into the manifest's engine section at compile
(`engine.run_settings`) and overridable per run in one way only:

    open_bundle_runner(bundle, device, overrides={"prefill_tokens": 512})     # the library
    leptonc run|bench|eval BUNDLE --engine-option prefill_tokens=512           # the CLI

Overrides are validated here (unknown names and wrong types are an InputError naming the known settings),
and the settings a runner used, with the overrides that changed them, are in its `describe()`, which
`leptonc bench --json` records. Nothing here is read from the environment.

The settings apply to the ONNX Runtime runners (CUDA, and the I/O-binding runner on the CPU); a TensorRT
bundle refuses overrides. The kernel-library sizes reach leptonc's CUDA kernels through their exported setter
(`leptonc_set_buffer_sizes`, targets/kernels/): process-wide, and only before the library's first step
allocates its buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from leptonc.errors import InputError

_DOCS = {
    "prefill_tokens": "tokens per prefill run: a prompt batch runs in chunks of whole rows of at most this many "
                      "tokens (a single row is never split)",
    "cuda_graph": "capture the decode step as a CUDA graph where the bundle allows it (GPU bundles do)",
    "kernel_buffer_mb": "leptonc CUDA kernels: MiB of each shared scratch, product and normed-row buffer",
    "kernel_cublas_workspace_mb": "leptonc CUDA kernels: MiB of their cuBLAS workspace",
    "profile_prefix": "write ONNX Runtime's per-node profile (JSON) to files with this prefix; empty: off",
}


@dataclass(frozen=True)
class EngineSettings:
    """A bundle's run-time settings (module doc). The defaults are the measured-best ones."""

    prefill_tokens: int = 4096  # 16 x 128 prompts of llama-1b-shape: 12.1 ms in one run, 21.2 ms in 512-token chunks
    cuda_graph: bool = True
    kernel_buffer_mb: int = 16
    kernel_cublas_workspace_mb: int = 32  # cuBLAS's recommendation for Hopper
    profile_prefix: str = ""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool) or f.type == "str" and not isinstance(value, str) or (
                    f.type == "int" and (isinstance(value, bool) or not isinstance(value, int))):
                raise InputError(f"engine setting {f.name}={value!r} is not a {f.type}", hint=_DOCS[f.name])
        if self.prefill_tokens < 1:
            raise InputError(f"engine setting prefill_tokens={self.prefill_tokens} is below 1",
                             hint=f"a whole number of tokens >= 1 (default {EngineSettings.prefill_tokens})")
        for name in ("kernel_buffer_mb", "kernel_cublas_workspace_mb"):
            if not 1 <= getattr(self, name) <= 4096:
                raise InputError(f"engine setting {name}={getattr(self, name)} is outside 1-4096 MiB", hint=_DOCS[name])

    @classmethod
    def from_manifest(cls, engine: dict) -> "EngineSettings":
        """The settings a bundle was compiled with (`engine.run_settings`); defaults for bundles written before it."""
        recorded = engine.get("run_settings") or {}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in recorded.items() if k in known})

    def with_overrides(self, overrides: dict | None) -> "EngineSettings":
        """These settings with per-run overrides applied: values of the field's type, or strings as a CLI gives them."""
        if not overrides:
            return self
        types = {f.name: f.type for f in fields(self)}
        changes = {}
        for name, value in overrides.items():
            if name not in types:
                raise InputError(f"unknown engine setting {name!r}",
                                 hint="known: " + "; ".join(f"{k} ({types[k]}): {doc}" for k, doc in _DOCS.items()))
            changes[name] = _parse(name, types[name], value) if isinstance(value, str) else value
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


def parse_engine_options(options: list[str] | None) -> dict[str, str]:
    """`--engine-option KEY=VALUE` flags as an overrides dict (values still strings: with_overrides parses them)."""
    out = {}
    for option in options or ():
        name, sep, value = option.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--engine-option {option!r} is not KEY=VALUE",
                             hint="for example --engine-option prefill_tokens=512; known: " + ", ".join(_DOCS))
        out[name.strip()] = value.strip()
    return out


def _parse(name: str, kind: str, text: str):
    if kind == "str":
        return text
    if kind == "bool":
        if text.lower() in ("1", "true", "on", "yes"):
            return True
        if text.lower() in ("0", "false", "off", "no"):
            return False
        raise InputError(f"engine setting {name}={text!r} is not a boolean", hint="use true or false")
    try:
        return int(text)
    except ValueError:
        raise InputError(f"engine setting {name}={text!r} is not a whole number", hint=_DOCS[name]) from None
