"""`leptonc run --temperature 0` on the smollm2-135m cpu bundle reproduces Hugging Face transformers'
greedy output token for token (first 16 new tokens), for several prompts."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def add(a, b):",
    "My favourite thing about autumn is",
]

pytestmark = pytest.mark.slow


def _hf_greedy(lm, prompt: str, n: int = 16) -> list[int]:
    enc = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.module.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_cli_run_matches_hf_greedy(smollm2_bundle, smollm2_hf, prompt):
    proc = run_cli("run", smollm2_bundle, "--prompt", prompt, "--max-new-tokens", "16", "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)["outputs"][0]["token_ids"]
    assert ours == _hf_greedy(smollm2_hf, prompt)


def test_runtime_matches_hf_greedy_in_process(smollm2_bundle, smollm2_hf):
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.generate import SamplingConfig, generate

    bundle = load_bundle(smollm2_bundle)
    runner = open_bundle_runner(bundle)
    eos = tuple(bundle.manifest["model"]["eos_token_ids"])
    for prompt in PROMPTS:
        result = generate(runner, smollm2_hf.tokenizer, [prompt], SamplingConfig(max_new_tokens=16), eos_ids=eos)
        assert result.outputs[0].token_ids == _hf_greedy(smollm2_hf, prompt), prompt


def test_demo_prompt_says_paris(smollm2_bundle):
    proc = run_cli("run", smollm2_bundle, "--prompt", "The capital of France is", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
