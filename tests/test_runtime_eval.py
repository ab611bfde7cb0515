"""Eval and generation on the real model (smollm2-135m): the bundle against Hugging Face transformers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_eval_perplexity_matches_transformers(smollm2_bundle, smollm2_hf, wikitext):
    """`leptonc eval` of the cpu bundle on text that fits one window == HF's perplexity within 0.5%."""
    import torch

    from leptonc.runtime.evaluate import EvalConfig, load_tokens

    n = 512
    proc = run_cli("eval", smollm2_bundle, "--data", wikitext, "--max-tokens", n, "--window", n, "--stride", n,
                   "--json")
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)
    assert ours["evaluated"] == "bundle" and ours["tokens"] == n and ours["scored_tokens"] == n - 1

    ids = load_tokens(smollm2_hf.tokenizer, EvalConfig(data=str(wikitext), max_tokens=n, window=n, stride=n))
    assert len(ids) == n
    with torch.no_grad():
        t = torch.from_numpy(ids)[None]
        loss = smollm2_hf.module(t, labels=t).loss.item()  # HF's own shifted cross-entropy
    hf_ppl = math.exp(loss)
    assert ours["perplexity"] == pytest.approx(hf_ppl, rel=0.005), (ours["perplexity"], hf_ppl)
    assert 5 < hf_ppl < 40  # a real model on real text, not noise


def test_strided_eval_of_bundle_and_pytorch_agree(smollm2_bundle, wikitext):
    """Sliding windows (stride < window) give the same perplexity for the bundle and the PyTorch model."""
    args = ("--data", wikitext, "--max-tokens", 384, "--window", 256, "--stride", 128, "--json")
    bundle = json.loads(run_cli("eval", smollm2_bundle, *args).stdout)
    torch_ = json.loads(run_cli("eval", "smollm2-135m", *args).stdout)
    assert bundle["evaluated"] == "bundle" and torch_["evaluated"] == "pytorch"
    assert bundle["scored_tokens"] == torch_["scored_tokens"] == 383
    assert bundle["perplexity"] == pytest.approx(torch_["perplexity"], rel=0.005)


def test_batched_greedy_equals_each_prompt_alone(smollm2_bundle):
    from transformers import AutoTokenizer

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.generate import SamplingConfig, generate

    b = load_bundle(smollm2_bundle)
    tok = AutoTokenizer.from_pretrained(str(b.tokenizer_dir))
    prompts = ["The capital of France is", "Water boils at", "One, two, three, four, five, six, seven,"]
    cfg = SamplingConfig(max_new_tokens=10, stop_at_eos=False)
    with open_bundle_runner(b) as r:
        alone = [generate(r, tok, [p], cfg).outputs[0] for p in prompts]
        batch = generate(r, tok, prompts, cfg).outputs
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert alone[0].text.lstrip().startswith("Paris")


def test_sampling_on_real_model_reproducible_and_varied(smollm2_bundle):
    args = ("run", smollm2_bundle, "-p", "Once upon a time", "-n", 12, "--temperature", "0.9", "--top-p", "0.95",
            "--ignore-eos", "--json")
    a = json.loads(run_cli(*args, "--seed", 1).stdout)["outputs"][0]
    b = json.loads(run_cli(*args, "--seed", 1).stdout)["outputs"][0]
    c = json.loads(run_cli(*args, "--seed", 2).stdout)["outputs"][0]
    assert a["token_ids"] == b["token_ids"]
    assert a["token_ids"] != c["token_ids"]
    assert np.all(np.asarray(a["token_ids"]) >= 0)


def test_chat_template_and_eos(smollm2_bundle):
    """--chat wraps the prompt in the model's template; the instruct model then ends with EOS."""
    proc = run_cli("run", smollm2_bundle, "-p", "Say hello.", "--chat", "-n", 48, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)["outputs"][0]
    assert out["finish_reason"] == "eos", out
    assert out["text"].strip()
