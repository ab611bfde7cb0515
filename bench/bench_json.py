"""What every bench/ script does with its result: print it as JSON and, with an output path, write the
same text there (creating the folder). Scripts run as `python bench/NAME.py`, so this module is found
beside them."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
