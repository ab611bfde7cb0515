"""User-fixable failures, each with a stable exit code.

Anything raised that is *not* a `LeptonError` is a bug in leptonc and keeps its traceback. A
`LeptonError` is printed as one message (which names the next step) and exits with its code.
The codes are part of the CLI contract and are listed in the README.
"""

from __future__ import annotations


class LeptonError(Exception):
    """Base class: something the user can fix. `exit_code` is stable across releases."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UnsupportedRequestError(LeptonError):
    """The target or backend cannot serve what was asked (precision, backend, option). Exit 2."""

    exit_code = 2


class ModelSourceError(LeptonError):
    """The model path is missing, malformed, or not loadable safely. Exit 3."""

    exit_code = 3


class UnsupportedArchitectureError(LeptonError):
    """The model's architecture has no adapter yet. Exit 4."""

    exit_code = 4


class BackendUnavailableError(LeptonError):
    """A backend library (onnxruntime-gpu, TensorRT) is not installed here. Exit 5."""

    exit_code = 5


class VerificationError(LeptonError):
    """The built artifact does not match the reference within the thresholds. Exit 6."""

    exit_code = 6


class BundleError(LeptonError):
    """A bundle is missing, corrupt, tampered with, or from another toolchain. Exit 7."""

    exit_code = 7


class InputError(LeptonError):
    """A runtime input is invalid (prompt longer than the engine allows, empty prompt). Exit 8."""

    exit_code = 8


class ExportError(LeptonError):
    """The model could not be exported to ONNX. Exit 9."""

    exit_code = 9


class OutputWriteError(LeptonError):
    """The bundle could not be written (disk full, read-only or no permission). Exit 10."""

    exit_code = 10


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error: a bug in leptonc (the traceback is shown; please report it)",
    2: "unsupported request: bad option, or the target/backend cannot serve the precision",
    3: "model source missing, malformed or unsafe (pickle without `--allow-pickle`)",
    4: "unsupported model architecture (the message lists the supported ones)",
    5: "backend library not installed (onnxruntime-gpu, TensorRT)",
    6: "verification failed: parity against PyTorch or the accuracy gate; no bundle written",
    7: "bundle missing, corrupt, tampered with, or from another toolchain version",
    8: "invalid runtime input (prompt longer than the bundle allows, empty prompt)",
    9: "export to ONNX failed",
    10: "could not write the output (disk full, read-only, no permission); nothing partial was left",
    130: "interrupted (Ctrl-C or SIGTERM); nothing half-written was left",
}
