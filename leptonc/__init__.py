"""leptonc: an ahead-of-time compiler for large language models.

    import leptonc
    bundle = leptonc.compile(leptonc.CompileConfig(source="smollm2-135m", target="cpu", output="out/smol.lepton"))

Heavy libraries (torch, onnxruntime, tensorrt) are imported only when a function needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"
FORMAT_VERSION = 1


def __getattr__(name: str):
    if name == "compile":
        from leptonc.compiler import compile_model

        return compile_model
    if name == "CompileConfig":
        from leptonc.config import CompileConfig

        return CompileConfig
    if name == "load_bundle":
        from leptonc.bundle import load_bundle

        return load_bundle
    raise AttributeError(name)
