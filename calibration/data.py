"""Calibration data: token batches cut from a text file; and the texts leptonc ships, each with one role.

  calibration  `leptonc/data/calibration.txt`: characters [0, 119655) of WikiText-2 `valid.txt` (the file's
               first ~120 KB, ending on a line boundary). Activation statistics, SmoothQuant/AWQ scales, GPTQ
               Hessians and the layer sensitivity of mixed precision are measured on it.
  tuning       `leptonc/data/heldout.txt`: characters [400174, 460000) of the same file. Recipe defaults
               (SmoothQuant alpha, GPTQ damping, block size, bit budget) were chosen on it; pruning's importance
               check reads it. Never used to report accuracy.
  evaluation   `leptonc/data/eval_python_docs.txt` (Python Language Reference prose) and
               `eval_python_code.txt` (Python standard library source), from CPython 3.11.7 (PSF licence;
               bench/eval_texts.py builds them). Nothing was chosen on them: the accuracy gate reads the
               docs text by default, BENCHMARKS reports both (and WikiText-2 `valid.txt` from character
               800,000, which is not shipped).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from leptonc.errors import InputError

DEFAULT_CALIB_TEXT = Path(__file__).resolve().parents[1] / "leptonc" / "data" / "calibration.txt"
CALIB_CHARS = 119655  # how many leading characters of valid.txt the shipped text holds
EVAL_OFFSET_CHARS = 400_000  # held-out evaluation starts here in valid.txt (well past CALIB_CHARS)


TEXT_ROLES = {
    "calibration": "calibration.txt: WikiText-2 valid.txt [0, 119655); statistics, scales, GPTQ, layer sensitivity",
    "tuning": "heldout.txt: WikiText-2 valid.txt [400174, 460000); recipe defaults were chosen on it",
    "evaluation": "eval_python_docs.txt, eval_python_code.txt: Python 3.11.7 docs prose and stdlib source; "
                  "nothing was chosen on them",
}
GATE_TEXT = "eval_python_docs.txt"  # the accuracy gate's default text (an evaluation text)


def shipped_text(name: str) -> Path:
    """A text in leptonc/data/ (installed package or source tree)."""
    try:
        import leptonc

        path = Path(leptonc.__file__).resolve().parent / "data" / name
        if path.is_file():
            return path
    except ImportError:  # pragma: no cover
        pass
    return DEFAULT_CALIB_TEXT.parent / name


def default_calibration_text() -> Path:
    try:  # installed package: leptonc/data/ beside leptonc/__init__.py
        import leptonc

        path = Path(leptonc.__file__).resolve().parent / "data" / "calibration.txt"
        if path.is_file():
            return path
    except ImportError:  # pragma: no cover
        pass
    return DEFAULT_CALIB_TEXT


def calibration_batches(tokenizer, path: str | Path | None, samples: int, seq_len: int) -> np.ndarray:
    """[samples, seq_len] int64 token ids: consecutive, non-overlapping windows of the text."""
    path = Path(path) if path else default_calibration_text()
    if not path.is_file():
        raise InputError(f"--calib-data {path} does not exist", hint="give a UTF-8 text file")
    if samples < 1 or seq_len < 2:
        raise InputError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--calib-data {path} is not UTF-8 text") from None
    need = samples * seq_len
    ids = np.asarray(tokenizer(text[: need * 12])["input_ids"], dtype=np.int64)
    if len(ids) < seq_len:
        raise InputError(f"--calib-data {path} has {len(ids)} tokens; need at least --calib-seq-len {seq_len}")
    n = min(samples, len(ids) // seq_len)
    return ids[: n * seq_len].reshape(n, seq_len)


def file_digest(path: str | Path | None) -> str:
    path = Path(path) if path else default_calibration_text()
    return hashlib.sha256(path.read_bytes()).hexdigest()
