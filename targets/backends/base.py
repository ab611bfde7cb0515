"""The interface every backend implements, and the registry the compiler and the runtime pick one from.

A backend turns the exported decoder into the bundle's engine files for one target and opens a runner on
them. Each is a thin object over its module's functions (onnxruntime.py, tensorrt.py), which stay usable on
their own (tests and `--dry-run` call them). Nothing heavy is imported here or by the registry: a backend's
module imports its library (onnxruntime, tensorrt) only inside the functions that need it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from leptonc.errors import UnsupportedRequestError

# name -> the module that defines and registers the backend (imported on first use)
BACKEND_MODULES = {"onnxruntime": "leptonc.targets.backends.onnxruntime",
                   "tensorrt": "leptonc.targets.backends.tensorrt"}
_BACKENDS: dict[str, "Backend"] = {}


class Backend(ABC):
    """One backend: its pass pipeline, its checks before a compile, its build step and its runner."""

    name: str = ""

    @abstractmethod
    def pipeline(self, config) -> list[str]:
        """The explicit pass list for the config's target, precision and kernel settings."""

    @abstractmethod
    def export_dtype(self, target, precision: str) -> str:
        """The float type the graph is exported in for this backend ("fp16" or "fp32")."""

    @abstractmethod
    def preflight(self, config) -> None:
        """Refuse, before the model is loaded, a compile this machine cannot build (BackendUnavailableError,
        UnsupportedRequestError)."""

    @abstractmethod
    def build(self, exported, staging: Path, pipeline: list[str], ctx, disabled: tuple[str, ...] = (),
              on_pass=None) -> tuple[dict, list[dict]]:
        """Run the pipeline on the export and write the engine files into `staging`: (engine section, pass
        records)."""

    @abstractmethod
    def open_runner(self, model_path: Path, engine: dict, limits: dict, device: str | None = None,
                    run_settings: Any = None):
        """A `leptonc.runtime.base.Runner` on the built engine (`run_settings`: the bundle's run-time engine
        settings, for backends that have them)."""

    def plan_extras(self, config) -> dict:
        """What `compile --dry-run` shows beyond the pipeline (e.g. TensorRT's builder configuration)."""
        return {}

    # A cross-compile builds a GPU bundle where the GPU's runtime is missing; the backend then names a graph
    # the CPU can check (its engine section), and why the CPU cannot run it when it cannot.
    cpu_check_model: str | None = None  # in the compile's work folder, when the build wrote one

    def cross_compiling(self, target) -> bool:
        return False

    def cpu_check_engine(self, engine: dict, model_file: str) -> dict:
        raise NotImplementedError(f"the {self.name} backend does not cross-compile")

    def cpu_cannot_run(self, model_path: Path) -> str | None:
        raise NotImplementedError(f"the {self.name} backend does not cross-compile")


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: one instance of `cls` serves every compile and runtime load."""
    if not cls.name or cls.name in _BACKENDS:
        raise ValueError(f"backend {cls.name!r} has no name or is registered twice")
    _BACKENDS[cls.name] = cls()
    return cls


def get_backend(name: str) -> Backend:
    """The registered backend called `name` (its module is imported on first use)."""
    if name not in _BACKENDS and name in BACKEND_MODULES:
        importlib.import_module(BACKEND_MODULES[name])
    backend = _BACKENDS.get(name)
    if backend is None:
        raise UnsupportedRequestError(f"unknown backend {name!r}",
                                      hint="use one of " + ", ".join(sorted(BACKEND_MODULES)))
    return backend
