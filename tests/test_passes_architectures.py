"""The full cpu pipeline on every supported architecture (small seeded random transformers models,
the variants of tests/test_architectures.py): the fused graph must compute what the plain export
computes (ONNX Runtime, left-padded batches, prefill, decode and a chunked prefill), and each fusion
that the architecture's features call for must have applied; anything else is recorded as skipped
with a reason, never a wrong graph. (Parity with PyTorch through `compile` is test_architectures.py.)"""

from __future__ import annotations

import pytest
import torch
from test_architectures import VARIANTS
from test_passes import TOL, apply, export_model, max_errors

from leptonc.models.adapters import supported_architectures
from leptonc.targets.backends.onnxruntime import CPU_PIPELINE


def test_every_supported_architecture_has_a_variant():
    covered = {model_type for model_type, _, _ in VARIANTS.values()}
    missing = sorted(set(supported_architectures()) - covered)
    assert not missing, f"add a small variant for {missing} to tests/test_architectures.py VARIANTS"


SUPPORTED = set(supported_architectures())


@pytest.mark.parametrize("variant", [v for v, (t, _, _) in VARIANTS.items() if t in SUPPORTED])
def test_cpu_pipeline_keeps_every_architecture_exact(variant, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides, _ = VARIANTS[variant]
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **overrides),
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model, spec = export_model(module, tmp_path)
    fused, records, before, after = apply(model, CPU_PIPELINE, spec)

    must = ["fuse_gqa", "merge_qkv"]
    must += ["fuse_rmsnorm", "fuse_skip_rmsnorm"] if spec.norm == "rms" else ["fuse_skip_layernorm"]
    if spec.position == "rope":
        must.append("fuse_rotary")
    if spec.activation in ("gelu", "gelu_tanh"):
        must.append("fuse_gelu")
    if spec.mlp == "gated":
        must.append("merge_gate_up")
    for name in must:
        assert records[name]["status"] == "applied", (variant, records[name])
    for r in records.values():
        assert r["status"] in ("applied", "skipped") and r["detail"], r
    assert after.get("GroupQueryAttention") == spec.num_layers and not after.get("Softmax")
    assert sum(after.values()) < 0.6 * sum(before.values()), (variant, before, after)
    assert max_errors(model, fused, spec) <= TOL["fp32"], variant
