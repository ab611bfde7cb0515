"""Compile settings are typed fields of CompileConfig: validated once, printed by `--dry-run --json`,
recorded in the manifest, and read by the passes from the pass context (no environment switches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest

from leptonc.config import CompileConfig, KernelOptions, TensorRTOptions
from leptonc.errors import UnsupportedRequestError


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTONC_") or k == "LEPTONC_CACHE"}
    return subprocess.run([sys.executable, "-m", "leptonc", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_kernel_switch_changes_the_gpu_pipeline_and_is_printed_by_dry_run():
    on = json.loads(_cli("compile", "tiny-llama", "--target", "h100", "--backend", "onnxruntime", "--int4",
                         "--dry-run", "--json").stdout)
    off = _cli("compile", "tiny-llama", "--target", "h100", "--backend", "onnxruntime", "--int4",
               "--no-cuda-kernels", "--no-attention-kernel", "--dry-run", "--json")
    assert off.returncode == 0, off.stderr
    off = json.loads(off.stdout)
    assert on["config"]["kernels"] == {"cuda_kernels": True, "attention_kernel": True, "norm_prologue": True,
                                       "norm_prologue_nbits": True}
    assert off["config"]["kernels"]["cuda_kernels"] is False and off["config"]["kernels"]["attention_kernel"] is False
    assert on["pipeline"][-1] == "use_leptonc_kernels" and "use_leptonc_kernels" not in off["pipeline"]


def test_kernel_switches_are_refused_where_no_kernel_is_built():
    proc = _cli("compile", "tiny-llama", "--target", "cpu", "--no-norm-prologue", "--dry-run")
    assert proc.returncode == 2 and "--no-norm-prologue" in proc.stderr
    with pytest.raises(UnsupportedRequestError, match="tensorrt"):
        CompileConfig("tiny-llama", target="h100", backend="tensorrt", kernels=KernelOptions(attention_kernel=False))
    with pytest.raises(UnsupportedRequestError, match="true or false"):
        KernelOptions(norm_prologue="0")


def test_settings_are_typed_records_and_round_trip_through_plain_data():
    config = CompileConfig("tiny-llama", target="h100", backend="onnxruntime", precision="int4",
                           kernels={"norm_prologue_nbits": False}, quantization={"int4_method": "rtn"})
    assert isinstance(config.kernels, KernelOptions) and config.kernels.norm_prologue_nbits is False
    assert config.quantization.int4_method == "rtn" and config.quantization.precision == "int4"
    assert isinstance(config.tensorrt, TensorRTOptions) and config.pruning is None
    data = {k: v for k, v in config.to_dict().items()}
    again = CompileConfig(**{**data, "quantization": {k: v for k, v in data["quantization"].items() if k != "precision"}})
    assert again == config
    with pytest.raises(UnsupportedRequestError, match="only apply to a quantized compile"):
        CompileConfig("tiny-llama", quantization={"int4_block": 32})
    with pytest.raises(UnsupportedRequestError, match="--opt-batch 32 must be between 1 and --max-batch 8"):
        CompileConfig("tiny-llama", target="h100", backend="tensorrt", max_batch=8, tensorrt={"opt_batch": 32})


def test_a_graph_changing_setting_is_in_dry_run_json_and_in_the_manifest(tmp_path):
    """--int4-block 32 changes every MatMulNBits of the graph; the plan and the manifest both say so."""
    out = tmp_path / "tiny.lepton"
    args = ("compile", "tiny-llama", "--int4", "--int4-method", "rtn", "--int4-block", "32", "--no-check",
            "--no-parity", "-o", out)
    plan = _cli(*args, "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["config"]["quantization"]["int4_block"] == 32
    built = _cli(*args, "--json")
    assert built.returncode == 0, built.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["quantization"]["int4_block"] == 32
    assert manifest["config"]["kernels"] == KernelOptions().__dict__
    model = onnx.load(str(out / manifest["engine"]["file"]), load_external_data=False)
    blocks = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert 32 in blocks  # the decoder's products; the LM head keeps its own 8-bit block
