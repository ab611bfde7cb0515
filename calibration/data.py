"""Calibration data: token batches cut from a text file; and the texts leptonc ships, each with one role.

  calibration  `leptonc/data/calibration.txt` (137 KB, 37k tokens of smollm2's tokenizer), four domains cut
               into ~1,000-character pieces and interleaved evenly, so that every prefix of it (the 16
               sequences AWQ reads, the 8 of the layer sensitivity, the 128 of GPTQ) mixes them:
                 encyclopedic prose  WikiText-2 `valid.txt` [0, 41247) (CC BY-SA 3.0)
                 tutorial prose      The Rust Programming Language, 7 chapters (MIT OR Apache-2.0)
                 API reference       Node.js API docs: events, stream, fs (MIT)
                 source code         Python modules of click, jinja2 (BSD-3-Clause), attrs, rich (MIT),
                                     requests (Apache-2.0)
               Activation statistics, SmoothQuant/AWQ scales, GPTQ Hessians and the layer sensitivity of mixed
               precision are measured on it. bench/calib_texts.py builds it (and says which pieces).
  tuning       One split per domain, disjoint from calibration; recipe defaults (SmoothQuant alpha, GPTQ
               damping and order, block size, bit budget) were chosen on them, never on evaluation text:
                 `heldout.txt`      WikiText-2 `valid.txt` [400174, 460000); pruning's importance check reads it
                 `tuning_docs.txt`  other Rust book chapters (closures, Box, message passing) and Node.js API
                                    pages (path, timers)
                 `tuning_code.txt`  Python modules of packages calibration does not read: networkx
                                    (BSD-3-Clause), pygments (BSD-2-Clause), PyYAML, tomlkit (MIT)
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
CALIB_WIKITEXT_CHARS = 41247  # the leading characters of valid.txt that the shipped text holds, in pieces
EVAL_OFFSET_CHARS = 400_000  # held-out evaluation starts here in valid.txt (well past CALIB_WIKITEXT_CHARS)


TEXT_ROLES = {
    "calibration": "calibration.txt: WikiText-2 valid.txt [0, 41247) (CC BY-SA 3.0), Rust book chapters (MIT OR "
                   "Apache-2.0), Node.js API docs (MIT) and Python source of click, jinja2, attrs, rich, requests "
                   "(BSD/MIT/Apache-2.0), interleaved; statistics, scales, GPTQ, layer sensitivity",
    "tuning": "heldout.txt: WikiText-2 valid.txt [400174, 460000); tuning_docs.txt: other Rust book chapters and "
              "Node.js API pages; tuning_code.txt: Python source of networkx, pygments, PyYAML, tomlkit; "
              "recipe defaults were chosen on them",
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
