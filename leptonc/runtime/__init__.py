"""The thin runtime: open a runner on a bundle (or a bare model file), generate, bench, evaluate."""

from __future__ import annotations

from pathlib import Path

from leptonc.errors import BundleError


def open_bundle_runner(bundle, device: str | None = None):
    """A `Runner` for a loaded `Bundle`, chosen by its backend."""
    if bundle.backend == "onnxruntime":
        from leptonc.targets.backends.onnxruntime import open_runner

        return open_runner(bundle.model_path, bundle.engine, bundle.manifest["limits"], device)
    if bundle.backend == "tensorrt":
        from leptonc.targets.backends.tensorrt import open_runner as open_trt

        return open_trt(bundle.model_path, bundle.engine, bundle.manifest["limits"])
    raise BundleError(f"bundle backend {bundle.backend!r} is unknown to this leptonc", hint="recompile the bundle")


__all__ = ["open_bundle_runner", "Path"]
