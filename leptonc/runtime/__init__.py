"""The thin runtime: open a runner on a bundle (or a bare model file), generate, bench, evaluate."""

from __future__ import annotations

from pathlib import Path

from leptonc.errors import BundleError


def open_bundle_runner(bundle, device: str | None = None, overrides: dict | None = None):
    """A `Runner` for a loaded `Bundle`, chosen by its backend. `overrides` change the bundle's run-time engine
    settings for this runner only (names and types: leptonc/runtime/engine_settings.py's EngineSettings; values
    may be strings, as `--engine-option KEY=VALUE` gives them); the runner's describe() records what applied."""
    from leptonc.errors import InputError, UnsupportedRequestError
    from leptonc.targets.backends.base import get_backend

    try:
        backend = get_backend(bundle.backend)
    except UnsupportedRequestError:
        raise BundleError(f"bundle backend {bundle.backend!r} is unknown to this leptonc",
                          hint="recompile the bundle") from None
    if bundle.backend == "onnxruntime":
        from leptonc.runtime.engine_settings import EngineSettings

        run_settings = EngineSettings.from_manifest(bundle.engine).with_overrides(overrides)
        runner = backend.open_runner(bundle.model_path, bundle.engine, bundle.manifest["limits"], device, run_settings)
        on_gpu = bundle.engine.get("session", {}).get("provider") == "CUDAExecutionProvider" and device != "cpu"
        if on_gpu and getattr(bundle, "verified", True):  # a cross-compiled bundle's GPU check, at its first load
            from leptonc import gpu_check

            try:
                gpu_check.ensure_checked(bundle, gpu_check.gpu_name(), runner)
            except BaseException:
                runner.release()
                raise
        return runner
    if overrides:
        raise InputError(f"engine settings ({', '.join(overrides)}) apply to ONNX Runtime bundles; this one is "
                         f"{bundle.backend}", hint="drop --engine-option for this bundle")
    return backend.open_runner(bundle.model_path, bundle.engine, bundle.manifest["limits"])


__all__ = ["open_bundle_runner", "Path"]
