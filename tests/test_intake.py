"""Intake safety and refusals: unsupported architectures (exit 4, listing the supported ones),
pickle-only directories (exit 3 unless --allow-pickle), and remote code that never runs unless
--trust-remote-code is given."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_clean_error, run_cli
from leptonc.errors import ModelSourceError, UnsupportedArchitectureError
from leptonc.models.intake import byte_level_tokenizer, load_model

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox")
TINY = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _tiny_llama(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY), dtype=torch.float32).eval()


def test_supported_architectures_listed():
    from leptonc.models.adapters import supported_architectures

    assert set(SUPPORTED) <= set(supported_architectures())


def test_bert_is_refused_with_the_supported_list(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"],
                                               "hidden_size": 64, "num_hidden_layers": 2}))
    proc = run_cli("compile", d, "--target", "cpu", "-o", tmp_path / "out.lepton", timeout=300)
    assert_clean_error(proc, 4)
    assert "'bert'" in proc.stderr
    for arch in SUPPORTED:
        assert arch in proc.stderr, arch
    assert not (tmp_path / "out.lepton").exists()


def test_unknown_activation_is_refused_in_process():
    from transformers import AutoConfig, AutoModelForCausalLM

    from leptonc.models.adapters import get_adapter

    config = AutoConfig.for_model("llama", **TINY, hidden_act="quick_gelu")
    module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with pytest.raises(UnsupportedArchitectureError, match="quick_gelu"):
        get_adapter("llama").spec(module)


@pytest.fixture(scope="module")
def pickle_dir(tmp_path_factory):
    module = _tiny_llama()
    d = tmp_path_factory.mktemp("pickle")
    module.config.save_pretrained(d)
    torch.save(module.state_dict(), d / "pytorch_model.bin")
    byte_level_tokenizer().save_pretrained(d)
    assert not list(d.glob("*.safetensors"))
    return module, d


def test_pickle_only_directory_is_refused_by_the_cli(pickle_dir, tmp_path):
    _, d = pickle_dir
    proc = run_cli("compile", d, "--target", "cpu", "-o", tmp_path / "out.lepton", timeout=300)
    assert_clean_error(proc, 3)
    assert "pickle" in proc.stderr and "--allow-pickle" in proc.stderr


def test_allow_pickle_loads_the_same_weights(pickle_dir):
    module, d = pickle_dir
    with pytest.raises(ModelSourceError, match="--allow-pickle"):
        load_model(str(d))
    lm = load_model(str(d), allow_pickle=True)
    for name, p in module.state_dict().items():
        assert torch.equal(lm.module.state_dict()[name], p), name


REMOTE_CODE = '''
import os, pathlib
pathlib.Path(os.environ["LEPTONC_REMOTE_CODE_MARKER"]).write_text("remote code ran")
from transformers import LlamaForCausalLM

class MarkedLlamaForCausalLM(LlamaForCausalLM):
    pass
'''


def test_remote_code_runs_only_with_trust_remote_code(tmp_path, monkeypatch):
    module = _tiny_llama(seed=1)
    d = tmp_path / "remote"
    module.save_pretrained(d)
    byte_level_tokenizer().save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_marked.MarkedLlamaForCausalLM"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_marked.py").write_text(REMOTE_CODE)
    marker = tmp_path / "marker"
    monkeypatch.setenv("LEPTONC_REMOTE_CODE_MARKER", str(marker))

    lm = load_model(str(d))
    assert not marker.exists(), "remote code ran without --trust-remote-code"
    assert type(lm.module).__name__ == "LlamaForCausalLM"

    lm = load_model(str(d), trust_remote_code=True)
    assert marker.read_text() == "remote code ran"
    assert type(lm.module).__name__ == "MarkedLlamaForCausalLM"


def test_random_shape_too_large_for_this_host_is_refused_up_front(monkeypatch):
    from leptonc.models import intake

    assert intake.fp32_parameter_bytes(
        __import__("transformers").AutoConfig.for_model(**intake.BUILTINS["llama-1b-shape"].config)
    ) == pytest.approx(4.94e9, rel=0.01)  # Llama-3.2-1B: 1.236e9 parameters, tied embeddings
    monkeypatch.setattr(intake, "mem_available_bytes", lambda: 10**9)
    with pytest.raises(ModelSourceError, match="needs 4.9 GB") as exc:
        intake.load_model("llama-1b-shape")
    assert exc.value.exit_code == 3


def test_benchmark_shapes_skip_the_layers_own_init_but_keep_transformers_normal_init():
    """init="normal" (the llama-*-shape builtins): one init pass, N(0, initializer_range); the layers' own
    reset_parameters is back afterwards; the source hash says which init made the weights."""
    import dataclasses

    import torch

    from leptonc.models import intake

    tiny = intake.BUILTINS["tiny-llama"]
    fast = dataclasses.replace(tiny, init="normal")
    assert intake.BUILTINS["llama-1b-shape"].init == "normal" and tiny.init == "torch"
    lm = intake._load_builtin(fast)
    for name, p in lm.module.named_parameters():
        if p.dim() == 2:
            assert float(p.detach().std()) == pytest.approx(0.02, rel=0.15), name
    assert lm.source_hash != intake._load_builtin(tiny).source_hash
    layer = torch.nn.Linear(64, 64)
    assert float(layer.weight.detach().abs().max()) > 0 and float(layer.weight.detach().std()) > 0.05  # kaiming again


def test_a_layer_left_uninitialized_is_set_from_the_normal_init():
    import torch

    from leptonc.models import intake

    module = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256))
    with torch.no_grad():
        module[0].weight.fill_(float("nan"))
        intake._ensure_normal_init(module, type("Cfg", (), {"initializer_range": 0.02})())
    assert bool(module[0].weight.isfinite().all()) and float(module[0].weight.std()) == pytest.approx(0.02, rel=0.1)
    assert bool((module[1].weight == 1).all())  # 1-D parameters are left alone
