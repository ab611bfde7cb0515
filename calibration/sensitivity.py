"""Mixed precision from measured sensitivity: which layer groups an int4 compile keeps at 8 bits.

Each linear's sensitivity is the Fisher estimate of the loss increase its quantization error causes, as
NVIDIA ModelOpt's auto_quantize scores layers: over the calibration tokens, sum of (dL/dy * dy)^2, where
dy = x (W_q - W)^T is the change of the layer's output and dL/dy the gradient of the next-token loss at
that output (one forward and backward pass of the PyTorch model; W_q is the 4-bit round-to-nearest
weight of the compile's block size, the error AWQ and GPTQ then reduce). Layers that read one tensor
(q/k/v, gate/up) are merged by the graph passes, so they are chosen together: a group's score is the
sum of its members'. Groups are taken in order of score per extra bit until the budget (bits per
weight over the decoder's linear layers, `effective_bits`) would be exceeded.
"""

from __future__ import annotations

import math

import numpy as np

SCALE_BITS = 16  # a block's scale counted at 16 bits: what the GPU bundles store (the CPU's MatMulNBits
# takes scales in the activation type, fp32, which the manifest's byte counts show)
EIGHT_BIT_BLOCK = 64  # --int4's 8-bit layers: symmetric, block 64 (quantize_common.HEAD_BLOCK)


def layer_bits(k: int, bits: int, block: int) -> float:
    """Bits per weight of a block-quantized [N, K] weight as MatMulNBits stores it: codes (K padded to whole
    blocks), a scale per block, and for 4 bits the zero points, two a byte (a row's odd one pads a byte);
    8 bits are symmetric (no zero points)."""
    blocks = math.ceil(k / block)
    zero_points = math.ceil(blocks / 2) * 8 if bits == 4 else 0
    return (blocks * block * bits + blocks * SCALE_BITS + zero_points) / k


def effective_bits(shapes: dict[str, tuple[int, int]], block: int, eight_bit: set[str]) -> float:
    """Bits per weight over the linears in `shapes` ({name: (N, K)}), those in `eight_bit` at 8 bits."""
    total = sum(n * k for n, k in shapes.values())
    bits = sum(n * k * (layer_bits(k, 8, EIGHT_BIT_BLOCK) if name in eight_bit else layer_bits(k, 4, block))
               for name, (n, k) in shapes.items())
    return bits / max(total, 1)


LOGITS_BYTES = 512 << 20  # float32 logits one forward and backward may hold: 4 sequences of 256 at smollm2-135m's
# 49,152-token vocabulary, 1 at gemma-3-270m's 262,144 (its loss and gradients are several copies of them)


def fisher_scores(module, linears: dict, fake_quant, batches: np.ndarray, chunk: int = 4) -> dict[str, float]:
    """{name: sum over tokens and output channels of (dL/dy * dy)^2} for the linears named in `linears`
    ({name: module}); `fake_quant(name, w [N, K] float32) -> W_q` gives each weight's quantized value.
    Sequences go `chunk` at a time, fewer where their logits would pass LOGITS_BYTES. Only the activations'
    gradients are computed (the parameters' would be the model's size again: a tied 262k-row head alone
    is 671 MB)."""
    import torch

    vocab = int(getattr(getattr(module, "config", None), "vocab_size", 0) or 0)
    if vocab:
        chunk = max(1, min(chunk, LOGITS_BYTES // (4 * vocab * batches.shape[1])))

    deltas = {name: torch.from_numpy(np.asarray(fake_quant(name, sub.weight.detach().float().numpy()), np.float32)
                                     - sub.weight.detach().float().numpy()) for name, sub in linears.items()}
    scores = dict.fromkeys(linears, 0.0)

    def hook(name):
        def fn(mod, args, out):
            dy = torch.nn.functional.linear(args[0].detach().float(), deltas[name])

            def grad(g):
                scores[name] += float(((g.float() * dy) ** 2).sum())
            out.register_hook(grad)
        return fn

    handles = [sub.register_forward_hook(hook(n)) for n, sub in linears.items()]
    trained = [p for p in module.parameters() if p.requires_grad]
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    if embeddings is not None:  # gradients flow from the embedded input instead of the parameters
        for p in trained:
            p.requires_grad_(False)
        handles.append(embeddings.register_forward_hook(lambda mod, args, out: out.requires_grad_()))
    try:
        for i in range(0, len(batches), chunk):
            ids = torch.from_numpy(np.ascontiguousarray(batches[i:i + chunk]))
            logits = module(ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            loss.backward()
            module.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        for p in trained:
            p.requires_grad_(True)
    return scores


def choose_eight_bit(groups: list[list[str]], scores: dict[str, float], shapes: dict[str, tuple[int, int]],
                     block: int, budget: float) -> tuple[list[str], float]:
    """The groups (by first member) kept at 8 bits: by score per extra bit, while the effective bits over
    every linear in `shapes` stay within `budget`. Returns (chosen first members, effective bits)."""
    def extra(g):
        return sum(shapes[m][0] * shapes[m][1] * (layer_bits(shapes[m][1], 8, EIGHT_BIT_BLOCK)
                                                  - layer_bits(shapes[m][1], 4, block)) for m in g)

    total = sum(n * k for n, k in shapes.values())
    bits = effective_bits(shapes, block, set())
    ranked = sorted(groups, key=lambda g: -sum(scores.get(m, 0.0) for m in g) / max(extra(g), 1.0))
    chosen = []
    for g in ranked:
        step = extra(g) / total
        if bits + step <= budget + 1e-9:
            chosen.append(g[0])
            bits += step
    return chosen, bits
