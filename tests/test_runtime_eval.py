"""Eval and generation on the real model (smollm2-135m): the bundle against Hugging Face transformers."""

from __future__ import annotations

import json
import math

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


def test_strided_eval_of_bundle_and_pytorch_agree(smollm2_runner, smollm2_hf, wikitext):
    """Sliding windows (stride < window): the bundle's runner and the PyTorch model score the same."""
    from leptonc.runtime import evaluate as ev

    cfg = ev.EvalConfig(data=str(wikitext), max_tokens=384, window=256, stride=128)
    ids = ev.load_tokens(smollm2_hf.tokenizer, cfg)
    bundle = ev.perplexity(ev.runner_scorer(smollm2_runner[0]), ids, cfg)
    torch_ = ev.perplexity(ev.torch_scorer(smollm2_hf.module), ids, cfg)
    assert bundle["scored_tokens"] == torch_["scored_tokens"] == 383
    assert bundle["perplexity"] == pytest.approx(torch_["perplexity"], rel=0.005)


@pytest.fixture(scope="module")
def smollm2_runner(smollm2_bundle):
    from transformers import AutoTokenizer

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner

    b = load_bundle(smollm2_bundle)
    runner = open_bundle_runner(b)
    yield runner, AutoTokenizer.from_pretrained(str(b.tokenizer_dir))
    runner.release()


def test_batched_greedy_equals_each_prompt_alone(smollm2_runner):
    from leptonc.runtime.generate import SamplingConfig, generate

    r, tok = smollm2_runner
    prompts = ["The capital of France is", "Water boils at", "One, two, three, four, five, six, seven,"]
    cfg = SamplingConfig(max_new_tokens=10, stop_at_eos=False)
    alone = [generate(r, tok, [p], cfg).outputs[0] for p in prompts]
    batch = generate(r, tok, prompts, cfg).outputs
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert alone[0].text.lstrip().startswith("Paris")


def test_sampling_on_real_model_reproducible_and_varied(smollm2_runner):
    from leptonc.runtime.generate import SamplingConfig, generate

    r, tok = smollm2_runner

    def sample(seed):
        cfg = SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=seed, stop_at_eos=False)
        return generate(r, tok, ["Once upon a time"], cfg).outputs[0].token_ids

    a, b, c = sample(1), sample(1), sample(2)
    assert a == b and len(a) == 12
    assert a != c


def test_chat_template_and_eos(smollm2_bundle):
    """--chat wraps the prompt in the model's template; the instruct model then ends with EOS."""
    proc = run_cli("run", smollm2_bundle, "-p", "Say hello.", "--chat", "-n", 48, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)["outputs"][0]
    assert out["finish_reason"] == "eos", out
    assert out["text"].strip()
