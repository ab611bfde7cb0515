"""NVIDIA GPU targets. Compute capability and tensor-core precisions from NVIDIA's published specs."""

from __future__ import annotations

from leptonc.targets.hardware.base import Target

_TURING = ("fp32", "fp16", "int8", "int4")
_AMPERE = ("fp32", "fp16", "bf16", "int8", "int4")
_ADA_HOPPER = ("fp32", "fp16", "bf16", "int8", "fp8", "int4")

GPUS = (
    Target("t4", "NVIDIA T4 (Turing)", "nvidia", (7, 5), 16, _TURING),
    Target("a10g", "NVIDIA A10G (Ampere)", "nvidia", (8, 6), 24, _AMPERE, sparsity_2_4=True),
    Target("a100", "NVIDIA A100 80GB (Ampere)", "nvidia", (8, 0), 80, _AMPERE, sparsity_2_4=True),
    Target("l4", "NVIDIA L4 (Ada)", "nvidia", (8, 9), 24, _ADA_HOPPER, sparsity_2_4=True),
    Target("l40s", "NVIDIA L40S (Ada)", "nvidia", (8, 9), 48, _ADA_HOPPER, sparsity_2_4=True),
    Target("rtx4090", "NVIDIA GeForce RTX 4090 (Ada)", "nvidia", (8, 9), 24, _ADA_HOPPER, sparsity_2_4=True),
    Target("h100", "NVIDIA H100 SXM 80GB (Hopper)", "nvidia", (9, 0), 80, _ADA_HOPPER, sparsity_2_4=True),
    Target("h200", "NVIDIA H200 141GB (Hopper)", "nvidia", (9, 0), 141, _ADA_HOPPER, sparsity_2_4=True),
    Target("b200", "NVIDIA B200 192GB (Blackwell)", "nvidia", (10, 0), 192, _ADA_HOPPER, sparsity_2_4=True),
)
