"""The decoder graph's I/O contract: the tensor names export writes, the passes rewrite around, the bundle
records and every runner binds; the custom-op domains; the operators of leptonc's CUDA kernel library.

One decoder graph serves prefill and decode (leptonc/export.py):

    inputs   input_ids [batch, sequence], attention_mask [batch, total_sequence],
             position_ids [batch, sequence], past_key_values.{i}.key / .value per layer
    outputs  logits [batch, sequence, vocab], present.{i}.key / .value per layer

and two names the passes may add: the `logits_positions` input (passes/select_logits.py: the LM head runs
on those positions only) and the `next_token` output (passes/greedy_token.py: the greedy token on the
device). Nothing here imports anything: every layer of the product may read it.
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
LOGITS_POSITIONS = "logits_positions"  # optional input (select_logits)
NEXT_TOKEN = "next_token"  # optional output (greedy_token)

KV_KINDS = ("key", "value")
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def past_name(layer: int, kind: str) -> str:
    """The cache input of a layer: past_key_values.{layer}.{key|value}."""
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """The cache output of a layer: present.{layer}.{key|value}."""
    return f"{PRESENT_PREFIX}{layer}.{kind}"


def past_key(layer: int) -> str:
    return past_name(layer, "key")


def past_value(layer: int) -> str:
    return past_name(layer, "value")


def present_key(layer: int) -> str:
    return present_name(layer, "key")


def present_value(layer: int) -> str:
    return present_name(layer, "value")


def past_names(num_layers: int) -> list[str]:
    """Every cache input, layer by layer, key before value (the order the runners keep their cache in)."""
    return [past_name(i, kind) for i in range(num_layers) for kind in KV_KINDS]


def present_names(num_layers: int) -> list[str]:
    """Every cache output, in past_names' order."""
    return [present_name(i, kind) for i in range(num_layers) for kind in KV_KINDS]


def cache_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(past, present) of each cache tensor, in past_names' order."""
    return list(zip(past_names(num_layers), present_names(num_layers)))


def cache_layers(names) -> list[int]:
    """The layer numbers whose past key input is among `names`, sorted (how a bare engine's layers are
    counted)."""
    layers = set()
    for name in names:
        if name.startswith(PAST_PREFIX) and name.endswith(".key"):
            middle = name[len(PAST_PREFIX):-len(".key")]
            if middle.isdigit():
                layers.add(int(middle))
    return sorted(layers)


REQUIRED_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)

# custom-op domains
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators
LEPTONC_DOMAIN = "ai.leptonc"  # leptonc's CUDA kernel library (targets/kernels/)

# every operator the kernel library registers in LEPTONC_DOMAIN (targets/kernels/*.cuh), as the manifest lists them
KERNEL_OPS = ("MatMulNBitsTiled", "SwiGLU", "MatMulF16", "NormMatMulF16", "NormMatMulNBitsTiled", "CachedAttention",
              "MaskLengths", "LogitsArgMax")
