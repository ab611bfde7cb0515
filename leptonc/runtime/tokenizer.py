"""Loading a bundle's (or a user's) Hugging Face tokenizer, with a user error when there is none."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from leptonc.errors import InputError


def load_tokenizer(directory: Optional[Path]):
    if directory is None or not Path(directory).is_dir():
        raise InputError("no tokenizer: this bundle has none; pass --tokenizer DIR (a Hugging Face tokenizer directory)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise InputError(f"could not load the tokenizer in {directory}: {exc}") from None


def eos_ids(tokenizer, manifest: Optional[dict] = None) -> tuple[int, ...]:
    """The tokens that end a sequence: the bundle's recorded end-of-sequence ids (its model's generation config),
    then the tokenizer's own, once each."""
    eos = tuple((manifest or {}).get("model", {}).get("eos_token_ids") or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos = tuple(dict.fromkeys((*eos, tokenizer.eos_token_id)))
    return eos


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokenizer's chat template over `messages`, with the prompt for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("this model's tokenizer has no chat template", hint="use the completions endpoint")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])
