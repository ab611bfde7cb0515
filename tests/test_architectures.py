"""Every supported architecture, end to end on a small seeded random model built with transformers:
saved as a Hugging Face directory (safetensors + a byte-level tokenizer), compiled for cpu in
process, then checked against the in-memory PyTorch model it was saved from: prefill and 8 decode
steps (max |logits error| <= 1e-3, fp32) and greedy equality for 12 new tokens.

The variants cover tied and untied embeddings, grouped-query and multi-head attention, head dims
that are not hidden/heads (24, 32), partial rotary, Llama-3 rope scaling, a sliding window that the
prompts exceed, Gemma 3's interleaved sliding and global layers with two rotary bases, QKV bias, q/k
norm, fused qkv/gate-up weights, learned positions + LayerNorm + GELU, and parallel and sequential
residuals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leptonc.models.intake import byte_level_tokenizer

PROMPTS = ("The capital of France is", "def f(x):\n    return x * 2")
NEW_TOKENS = 12
COMMON = {"vocab_size": 320, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2}
LLAMA_LIKE = {**COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "rms_norm_eps": 1e-5}

# name -> (model_type, config overrides, what the exported spec must show)
VARIANTS = {
    "llama-gqa-untied-llama3rope": ("llama", {
        **LLAMA_LIKE, "num_key_value_heads": 2, "tie_word_embeddings": False, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}},
        {"num_kv_heads": 2, "tied_embeddings": False}),
    "llama-mha-tied-bias": ("llama", {
        **LLAMA_LIKE, "num_key_value_heads": 4, "tie_word_embeddings": True, "attention_bias": True,
        "mlp_bias": True},
        {"num_kv_heads": 4, "tied_embeddings": True, "qkv_bias": True, "o_bias": True, "mlp_bias": True}),
    "mistral-sliding-headdim24": ("mistral", {
        **LLAMA_LIKE, "num_key_value_heads": 1, "head_dim": 24, "sliding_window": 8, "tie_word_embeddings": False},
        {"num_kv_heads": 1, "head_dim": 24, "sliding_window": 8, "sliding_layers": [0, 1]}),
    "qwen2-qkv-bias": ("qwen2", {**LLAMA_LIKE, "num_key_value_heads": 2, "tie_word_embeddings": True},
                       {"qkv_bias": True, "o_bias": False, "tied_embeddings": True}),
    "qwen3-qknorm-headdim32": ("qwen3", {
        **LLAMA_LIKE, "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": False},
        {"qk_norm": True, "head_dim": 32}),
    "phi3-fused-partial-rotary": ("phi3", {
        **LLAMA_LIKE, "num_key_value_heads": 2, "partial_rotary_factor": 0.5, "tie_word_embeddings": False,
        "pad_token_id": 0},
        {"num_kv_heads": 2, "rotary_dim": 8}),
    "gemma3-sliding-local-rope": ("gemma3_text", {
        **LLAMA_LIKE, "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}},
        {"post_norms": True, "qk_norm": True, "sliding_layers": [0], "activation": "gelu_tanh",
         "tied_embeddings": True}),
    "gpt2-tied": ("gpt2", {**COMMON, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
                  {"position": "learned", "norm": "layer", "activation": "gelu_tanh", "tied_embeddings": True}),
    "gpt_neox-parallel": ("gpt_neox", {
        **COMMON, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False},
        {"parallel_residual": True, "rotary_dim": 4, "norm": "layer", "activation": "gelu"}),
    "gpt_neox-sequential-tied": ("gpt_neox", {
        **COMMON, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "rotary_pct": 1.0, "use_parallel_residual": False, "tie_word_embeddings": True},
        {"parallel_residual": False, "rotary_dim": 32, "tied_embeddings": True}),
}


def build_random_model(model_type: str, overrides: dict, directory, seed: int = 0):
    """A seeded random transformers model saved as an HF directory (safetensors + tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **overrides)
    torch.manual_seed(seed)
    module = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF's default init (std 0.02) makes near-ties in greedy decoding; widen it
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    module.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    assert any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin"))
    return module


@pytest.fixture(scope="module", params=list(VARIANTS))
def compiled(request, tmp_path_factory):
    from leptonc.bundle import load_bundle
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    model_type, overrides, expected = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    module = build_random_model(model_type, overrides, root / "hf")
    bundle = compile_model(CompileConfig(source=str(root / "hf"), target="cpu", output=str(root / "m.lepton"),
                                         max_sequence=256, max_batch=2))
    return request.param, module, load_bundle(bundle.path), expected


def test_spec_shows_the_architecture_features(compiled):
    name, module, bundle, expected = compiled
    model = bundle.manifest["model"]
    assert model["architecture"] == VARIANTS[name][0]
    for key, value in expected.items():
        got = model[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, (key, got)


def test_compile_verification_passed(compiled):
    _, _, bundle, _ = compiled
    v = bundle.manifest["verification"]
    assert v["status"] == "passed" and v["decode_steps"] == 8
    assert v["max_abs_error"] <= 1e-3
    report = json.loads((bundle.path / "report.json").read_text())
    assert bundle.manifest.get("build_stats", report).get("peak_host_mb", 0) > 0


def test_parity_with_the_original_pytorch_model(compiled):
    """Against the model object that was saved (not the one intake reloaded): catches a weight
    mapping that intake and export would both get wrong in the same way."""
    from leptonc.runtime import open_bundle_runner
    from leptonc.verify import check_parity, reference_trace

    _, module, bundle, _ = compiled
    trace = reference_trace(module, byte_level_tokenizer(), prompts=PROMPTS, steps=8)
    runner = open_bundle_runner(bundle)
    try:
        result = check_parity(runner, trace)
    finally:
        runner.release()
    assert result["decode_steps"] == 8 and result["prompts"] == len(PROMPTS)
    assert result["prefill_max_abs_error"] <= 1e-3, result
    assert result["decode_max_abs_error"] <= 1e-3, result
    # the logits are not degenerate (a constant output would also "match" a broken reference)
    assert float(np.std(trace.prefill_logits[0])) > 0.1


def test_greedy_matches_transformers_generate(compiled):
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.generate import SamplingConfig, generate

    _, module, bundle, _ = compiled
    tok = byte_level_tokenizer()
    runner = open_bundle_runner(bundle)
    try:
        for prompt in PROMPTS:
            enc = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                out = module.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                      pad_token_id=0)
            expected = out[0, enc["input_ids"].shape[1]:].tolist()
            ours = generate(runner, tok, [prompt], SamplingConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False))
            assert len(expected) == NEW_TOKENS
            assert ours.outputs[0].token_ids == expected, prompt
    finally:
        runner.release()
