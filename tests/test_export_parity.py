"""Export parity: the bundle's ONNX model against PyTorch on the same inputs, prefill and 8 decode
steps through the KV cache, max |logits error| <= 1e-3 in fp32."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from leptonc.bundle import load_bundle
from leptonc.runtime import open_bundle_runner
from leptonc.verify import cache_arg, cache_of

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived"]


def _parity(module, tokenizer, bundle_path, prompt: str) -> tuple[float, float]:
    bundle = load_bundle(bundle_path)
    runner = open_bundle_runner(bundle)
    ids = np.asarray([tokenizer(prompt)["input_ids"]], dtype=np.int64) % module.config.vocab_size
    with torch.no_grad():
        ref = module(torch.from_numpy(ids), use_cache=True)
    got = runner.prefill(ids, np.ones_like(ids))
    prefill_err = float(np.abs(got - ref.logits.numpy()).max())
    past, token = cache_of(ref), ref.logits[:, -1].argmax(-1)
    decode_err = 0.0
    for _ in range(8):
        with torch.no_grad():
            ref = module(token[:, None], **{cache_arg(module): past}, use_cache=True)
        got = runner.decode(token.numpy())
        decode_err = max(decode_err, float(np.abs(got - ref.logits[:, -1].numpy()).max()))
        past, token = cache_of(ref), ref.logits[:, -1].argmax(-1)
    runner.release()
    return prefill_err, decode_err


def test_tiny_llama_parity(tiny_bundle):
    from leptonc.models.intake import load_model

    lm = load_model("tiny-llama")
    for prompt in PROMPTS:
        prefill, decode = _parity(lm.module, lm.tokenizer, tiny_bundle, prompt)
        assert prefill <= 1e-3 and decode <= 1e-3, (prefill, decode)


@pytest.mark.slow
def test_smollm2_parity(smollm2_bundle, smollm2_hf):
    for prompt in PROMPTS:
        prefill, decode = _parity(smollm2_hf.module, smollm2_hf.tokenizer, smollm2_bundle, prompt)
        assert prefill <= 1e-3 and decode <= 1e-3, (prefill, decode)


@pytest.mark.parametrize("fixture", ["tiny_bundle", "smollm2_bundle"])
def test_report_records_parity(fixture, request):
    path = request.getfixturevalue(fixture)
    report = json.loads((path / "report.json").read_text())
    v = report["verification"]
    assert v["status"] == "passed"
    assert v["decode_steps"] == 8
    assert 0 <= v["max_abs_error"] <= 1e-3
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["verification"]["max_abs_error"] == v["max_abs_error"]


def test_export_io_contract(tiny_bundle):
    """Names and dynamic axes as in DESIGN.md; weights as external data; opset >= 17."""
    bundle = load_bundle(tiny_bundle)
    model = onnx.load(str(bundle.model_path), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    outputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"][0] == "batch"
    assert inputs["position_ids"] == ["batch", "sequence"]
    layers = bundle.manifest["model"]["num_layers"]
    for i in range(layers):
        assert inputs[f"past_key_values.{i}.key"][2] == "past_sequence"
        assert inputs[f"past_key_values.{i}.value"][0] == "batch"
        assert f"present.{i}.key" in outputs and f"present.{i}.value" in outputs
    # passes/select_logits.py: after the passes the LM head runs on `logits_positions` [batch, K]
    positions = "logits_sequence" if "logits_positions" in inputs else "sequence"
    assert outputs["logits"][:2] == ["batch", positions]
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "weights must be stored as external data"
    assert all(e.value == "model.onnx.data" for t in external for e in t.external_data if e.key == "location")
