"""Build the two evaluation texts shipped in leptonc/data/ from Python's own files (PSF licence), so that
quantization recipes are judged on text that is neither WikiText (their calibration text and tuning
split) nor anything a recipe was chosen on:

  eval_python_docs.txt   English prose: sections of the Python Language Reference as CPython 3.11.7 ships
                         them in `pydoc_data/topics.py` (the text `help("execmodel")` prints)
  eval_python_code.txt   Python source: modules of CPython 3.11.7's standard library

Deterministic for one Python version; the files are committed, so other versions only matter when
rebuilding them.

    .venv/bin/python bench/eval_texts.py            # rewrites leptonc/data/eval_python_*.txt
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

DOC_TOPICS = ("execmodel", "exceptions", "import", "compound", "naming", "customization", "types")
CODE_MODULES = ("textwrap.py", "fractions.py", "heapq.py", "shlex.py", "calendar.py")
DOC_CHARS = 48_000
CODE_CHARS = 36_000


def _cut(text: str, chars: int, at: str) -> str:
    """The first `chars` characters, ended at the last `at` (a paragraph or line boundary) before them."""
    if len(text) <= chars:
        return text
    return text[: text.rindex(at, 0, chars) + len(at)]


def docs_text() -> str:
    import pydoc_data.topics as topics

    parts = [topics.topics[name].strip() + "\n" for name in DOC_TOPICS]
    return _cut("\n\n".join(parts), DOC_CHARS, "\n\n")


def code_text() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = [f"# ---- {name} ----\n" + (lib / name).read_text(encoding="utf-8") for name in CODE_MODULES]
    return _cut("\n".join(parts), CODE_CHARS, "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "leptonc" / "data"))
    args = ap.parse_args(argv)
    if sys.version_info[:3] != (3, 11, 7):
        print(f"note: built from Python {sys.version.split()[0]}, not 3.11.7: the texts will differ from the "
              "committed ones", file=sys.stderr)
    out = Path(args.out_dir)
    for name, text in (("eval_python_docs.txt", docs_text()), ("eval_python_code.txt", code_text())):
        (out / name).write_text(text, encoding="utf-8")
        print(f"{out / name}: {len(text)} characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
