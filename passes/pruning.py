"""Pruning of the PyTorch model before export: structured MLP channels, whole KV-head groups, and
2:4 semi-structured sparsity.

It runs between intake and export (leptonc/compiler.py), so the exported graph simply has smaller
weight matrices (and fewer KV heads, hence a smaller KV cache and I/O spec) and every later step
(passes, quantization, verification) sees the pruned model as the model:

  --prune RATIO     per layer, remove RATIO of the MLP intermediate channels: the same channels go
                    from gate and up (rows) and from down (columns). Importance of channel j:
                    mean |x_j| over the calibration tokens at down's input (calibration/collect.py)
                    times ||W_down[:, j]||_2 (Wanda's activation x weight-magnitude score, summed over
                    the channel's outputs).
  --prune-heads N   per layer, remove the N key/value head groups (the KV head and the query heads
                    that read it) with the lowest score; the score of a group is the same product at
                    o_proj's input, summed over the group's query-head channels. Every layer keeps the
                    same number of heads, so DecoderSpec and the KV cache stay uniform.
  --sparsity 2:4    in every decoder linear (q, k, v, o, gate, up, down), keep the 2 largest |w| of
                    each 4 consecutive weights along the reduction (input) dimension. TensorRT builds
                    with sparse weights on sm80+; ONNX Runtime runs the zeros densely (simulated).

The accuracy effect is measured in PyTorch on held-out text (leptonc/data/heldout.txt, disjoint from
the calibration text): perplexity of the unpruned and pruned model on the same windows, and top-1
agreement between them. It is recorded in report.json (`pruning.accuracy`); parity of the bundle is
then checked against the *pruned* PyTorch model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from leptonc.config import PruningOptions
from leptonc.errors import UnsupportedRequestError, VerificationError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # HF's shared Llama module layout (models/llama.py)
PRUNE_VERSION = 1  # bump when the same settings would prune differently
LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


# ---- scores ---------------------------------------------------------------------------------------

def channel_scores(absmean: np.ndarray, weight_oi: np.ndarray) -> np.ndarray:
    """Importance of each input channel of a linear ([out, in] weight): mean |x_c| * ||W[:, c]||_2."""
    return np.asarray(absmean, np.float64) * np.linalg.norm(np.asarray(weight_oi, np.float64), axis=0)


def kept_channels(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the `keep` highest scores, in their original order (ties: the lower index wins)."""
    order = np.argsort(-scores, kind="stable")[:keep]
    return np.sort(order)


def mlp_keep_count(intermediate: int, ratio: float, multiple: int) -> int:
    keep = intermediate * (1.0 - ratio)
    if intermediate >= 64 * multiple:  # wide layers: a multiple of 8 channels suits GEMM tiles
        keep = round(keep / multiple) * multiple
    return int(min(intermediate - 1, max(1, round(keep))))


def group_scores(absmean: np.ndarray, o_weight_oi: np.ndarray, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> np.ndarray:
    """Score of each KV head group: channel scores at o_proj's input summed over the group's query
    heads (HF's repeat_kv: query head h reads KV head h // (num_heads / num_kv_heads))."""
    per_channel = channel_scores(absmean, o_weight_oi)
    per_head = per_channel.reshape(num_heads, head_dim).sum(1)
    return per_head.reshape(num_kv_heads, num_heads // num_kv_heads).sum(1)


def mask_2_4(weight_oi: np.ndarray) -> np.ndarray:
    """Boolean keep-mask with the 2 largest |w| of every 4 consecutive inputs of each output row."""
    out, k = weight_oi.shape
    groups = np.abs(weight_oi).reshape(out, k // 4, 4)
    top = np.argsort(-groups, axis=-1, kind="stable")[..., :2]
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, top, True, axis=-1)
    return mask.reshape(out, k)


def violates_2_4(weight_ki: np.ndarray, axis: int = 0) -> int:
    """How many groups of 4 along `axis` have more than 2 nonzeros (0 for a valid 2:4 weight)."""
    w = np.moveaxis(np.asarray(weight_ki), axis, -1)
    if w.shape[-1] % 4:
        return -1
    nz = (w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4) != 0).sum(-1)
    return int((nz > 2).sum())


# ---- surgery on the HF module -------------------------------------------------------------------

def _set_linear(linear, weight, bias=None) -> None:
    import torch

    linear.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = linear.weight.shape


def _prune_rows(linear, idx) -> None:
    bias = linear.bias[idx] if linear.bias is not None else None
    _set_linear(linear, linear.weight.data[idx], bias)


def _prune_cols(linear, idx) -> None:
    _set_linear(linear, linear.weight.data[:, idx], linear.bias.data if linear.bias is not None else None)


def count_parameters(module) -> dict:
    seen, total, mlp, attn = set(), 0, 0, 0
    for name, p in module.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".mlp." in name:
            mlp += p.numel()
        elif ".self_attn." in name:
            attn += p.numel()
    return {"total": total, "mlp": mlp, "attention": attn}


# ---- held-out accuracy (PyTorch, before and after) ------------------------------------------------

def _heldout_windows(module, ids: np.ndarray, window: int) -> tuple[float, int, list[np.ndarray]]:
    import torch

    from leptonc.runtime.evaluate import nll_sum

    nll, count, argmax = 0.0, 0, []
    for begin in range(0, len(ids) - 1, window):
        end = min(begin + window, len(ids))
        if end - begin < 2:
            break
        with torch.no_grad():
            logits = module(torch.from_numpy(ids[begin:end][None, :]), use_cache=False).logits[0].float().numpy()
        nll += nll_sum(logits, ids, begin, begin + 1, end)
        count += end - begin - 1
        argmax.append(logits.argmax(-1))
    return nll, count, argmax


# ---- the compile step ----------------------------------------------------------------------------

@dataclass
class PruneResult:
    settings: PruningOptions
    mode: str  # how 2:4 runs here: "native" (TensorRT sparse weights) | "simulated" | "n/a"
    target: str
    backend: str
    parameters: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    sparsity: dict | None = None
    accuracy: dict | None = None
    calibration: dict | None = None
    seconds: float = 0.0
    source_hash: str = ""  # the unpruned source model's hash (the manifest's source.hash)
    model_hash: str = ""  # the pruned model's identity (keys quantization's calibration cache)

    def report_section(self) -> dict:
        p = self.parameters
        mlp_b, mlp_a = p["before"]["mlp"], p["after"]["mlp"]
        return {
            "requested": {"prune": self.settings.mlp_ratio, "prune_heads": self.settings.kv_heads or None,
                          "sparsity": self.settings.sparsity},
            "parameters": {**p, "mlp_removed_ratio": round(1.0 - mlp_a / mlp_b, 6) if mlp_b else 0.0,
                           "total_removed_ratio": round(1.0 - p["after"]["total"] / p["before"]["total"], 6)},
            "layers": self.layers,
            "sparsity": self.sparsity,
            "accuracy": self.accuracy,
            "calibration": self.calibration,
            "pruned_model_hash": self.model_hash,
            "note": self.note(),
        }

    def note(self) -> str:
        parts = []
        if self.settings.structured:
            parts.append("structured pruning makes the weight matrices (and, with --prune-heads, the KV cache) "
                         "smaller: the speed-up is real on every backend")
        if self.settings.sparsity:
            if self.mode == "native":
                parts.append(f"2:4 sparsity runs on {self.target}'s sparse tensor cores (TensorRT sparse weights)")
            else:
                parts.append(f"2:4 sparsity is simulated on {self.target} ({self.backend}): the zeros are stored "
                             "and multiplied densely, so it shows the accuracy cost, not a speed-up")
        return "; ".join(parts)

    def manifest_section(self) -> dict:
        r = self.report_section()
        return {"requested": r["requested"], "parameters": r["parameters"], "sparsity_mode": self.mode,
                "accuracy": {k: (self.accuracy or {}).get(k) for k in
                             ("reference_perplexity", "pruned_perplexity", "top1_agreement")}}


def _layers(module):
    return module.model.layers


def prune_for_compile(config, lm, adapter, spec, on_progress=None):
    """Prune `lm.module` in place as `config.pruning` asks; return (the new spec, PruneResult)."""
    settings = config.pruning
    start = time.perf_counter()
    if lm.model_type not in SUPPORTED:
        raise UnsupportedRequestError(
            f"pruning supports the Llama-layout architectures ({', '.join(SUPPORTED)}); this model is {lm.model_type}",
            hint="compile without --prune / --prune-heads / --sparsity")
    if settings.kv_heads and settings.kv_heads >= spec.num_kv_heads:
        raise UnsupportedRequestError(
            f"--prune-heads {settings.kv_heads}: the model has {spec.num_kv_heads} KV head group(s) per layer and "
            "at least one must stay", hint=f"use --prune-heads 1..{spec.num_kv_heads - 1}" if spec.num_kv_heads > 1
            else "drop --prune-heads (this model has one KV head)")
    target = config.target_record
    mode = "n/a"
    if settings.sparsity:
        mode = "native" if config.backend == "tensorrt" and target.sparsity_2_4 else "simulated"
    result = PruneResult(settings, mode, target.name, config.backend)
    module = lm.module
    progress = on_progress or (lambda i, n, what: None)

    from leptonc.calibration.gate import default_heldout_text, held_out_ids

    data = default_heldout_text()
    ids = held_out_ids(lm.tokenizer, data, settings.check_tokens)
    ids = np.clip(ids, 0, spec.vocab_size - 1)
    window = int(min(512, config.max_sequence, max(2, len(ids))))
    progress(0, 2, "held-out perplexity (unpruned)")
    nll_ref, count, argmax_ref = _heldout_windows(module, ids, window)
    before = count_parameters(module)

    if settings.structured:
        result.calibration = _prune_structured(module, lm, adapter, spec, settings, result, progress)
    if settings.sparsity:
        result.sparsity = _apply_2_4(module, spec.num_layers, mode)

    new_spec = adapter.spec(module)
    progress(1, 2, "held-out perplexity (pruned)")
    nll_p, count_p, argmax_p = _heldout_windows(module, ids, window)
    ppl_ref, ppl_p = math.exp(nll_ref / count), math.exp(nll_p / count_p)
    agree = sum(int((a == b).sum()) for a, b in zip(argmax_ref, argmax_p))
    positions = sum(len(a) for a in argmax_ref)
    result.accuracy = {
        "reference_perplexity": round(ppl_ref, 4), "pruned_perplexity": round(ppl_p, 4),
        "ppl_increase_pct": round(100.0 * (ppl_p / ppl_ref - 1.0), 3), "top1_agreement": round(agree / positions, 4),
        "scored_tokens": count, "window": window, "data": str(data),
        "reference": "unpruned PyTorch fp32", "measured_on": "pruned PyTorch fp32 (the bundle is checked against it)",
        "status": "recorded",
    }
    if not math.isfinite(ppl_p):
        raise VerificationError(f"the pruned model's held-out perplexity is {ppl_p}; no bundle was written",
                                hint="prune less (a smaller --prune ratio or --prune-heads)")
    result.parameters = {"before": before, "after": count_parameters(module)}
    # The pruned module is another model: anything keyed by the source's hash (quantization's calibration
    # cache) must not mistake it for the original, so lm.source_hash now names the pruned model.
    result.source_hash, result.model_hash = lm.source_hash, pruned_model_hash(lm.source_hash, settings)
    lm.source_hash = result.model_hash
    result.seconds = round(time.perf_counter() - start, 2)
    return new_spec, result


def pruned_model_hash(source_hash: str, settings: PruningOptions) -> str:
    """Pruning is deterministic given the source and the settings (and the calibration text)."""
    import hashlib
    import json

    from leptonc.calibration.data import file_digest

    fields = {"v": PRUNE_VERSION, "model": source_hash, "settings": asdict(settings),
              "calib": file_digest(settings.calib_data) if settings.structured else None}
    return "sha256:" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _prune_structured(module, lm, adapter, spec, settings: PruningOptions, result: PruneResult, progress) -> dict:
    import torch

    from leptonc.calibration.collect import collect
    from leptonc.calibration.data import calibration_batches, default_calibration_text

    batches = calibration_batches(lm.tokenizer, settings.calib_data, settings.calib_samples, settings.calib_seq_len)
    batches = np.clip(batches, 0, spec.vocab_size - 1)
    weights = adapter.weights(module, spec)
    stats = collect(module, weights, batches, need_ranges=False,
                    on_batch=lambda i, n, what: progress(i, n, f"pruning scores {what}"))
    H, KV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    rep = H // KV
    keep_inter = None
    for i, layer in enumerate(_layers(module)):
        row = {"layer": i}
        if settings.mlp_ratio is not None:
            mlp = layer.mlp
            down = mlp.down_proj.weight.detach().float().numpy()
            scores = channel_scores(_absmean(stats, f"layers.{i}.down.weight"), down)
            n = down.shape[1]
            keep_inter = mlp_keep_count(n, settings.mlp_ratio, settings.channel_multiple)
            idx = torch.from_numpy(kept_channels(scores, keep_inter))
            _prune_rows(mlp.gate_proj, idx)
            _prune_rows(mlp.up_proj, idx)
            _prune_cols(mlp.down_proj, idx)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = keep_inter
            row.update({"intermediate_before": n, "intermediate_after": keep_inter,
                        "mlp_ratio": round(1.0 - keep_inter / n, 6)})
        if settings.kv_heads:
            attn = layer.self_attn
            o = attn.o_proj.weight.detach().float().numpy()
            g_scores = group_scores(_absmean(stats, f"layers.{i}.o.weight"), o, H, KV, D)
            kept = kept_channels(g_scores, KV - settings.kv_heads)
            removed = sorted(set(range(KV)) - set(kept.tolist()))
            kv_idx = torch.from_numpy(np.concatenate([np.arange(g * D, (g + 1) * D) for g in kept]))
            q_heads = [h for g in kept for h in range(g * rep, (g + 1) * rep)]
            q_idx = torch.from_numpy(np.concatenate([np.arange(h * D, (h + 1) * D) for h in q_heads]))
            _prune_rows(attn.q_proj, q_idx)
            _prune_rows(attn.k_proj, kv_idx)
            _prune_rows(attn.v_proj, kv_idx)
            _prune_cols(attn.o_proj, q_idx)
            row.update({"kv_heads_before": KV, "kv_heads_after": len(kept), "removed_kv_heads": removed,
                        "query_heads_after": len(q_heads),
                        "kv_group_scores": [round(float(s), 6) for s in g_scores]})
        result.layers.append(row)
    c = module.config
    if settings.mlp_ratio is not None:
        c.intermediate_size = keep_inter
    if settings.kv_heads:
        c.head_dim = D  # explicit: hidden_size // num_heads no longer gives it
        c.num_key_value_heads = KV - settings.kv_heads
        c.num_attention_heads = (KV - settings.kv_heads) * rep
    return {"data": str(settings.calib_data or default_calibration_text()), "samples": int(len(batches)),
            "seq_len": int(batches.shape[1]), "tokens": int(batches.size),
            "score": "mean|x| at the linear's input x ||W[:, c]||_2 (down for MLP channels, o for KV head groups)"}


def _absmean(stats, name: str) -> np.ndarray:
    g = stats.group_of(name)
    if g is None:  # collect() hooks every linear the adapter names: a miss is a bug, not a user error
        raise RuntimeError(f"calibration recorded no activations for {name}")
    return g.absmean


def _apply_2_4(module, num_layers: int, mode: str) -> dict:
    import torch

    done, skipped, zeros, total = [], [], 0, 0
    for i, layer in enumerate(_layers(module)):
        for key, path in LINEARS.items():
            lin = layer.get_submodule(path)
            w = lin.weight.detach().float().numpy()
            name = f"layers.{i}.{key}.weight"
            if w.shape[1] % 4:
                skipped.append({"name": name, "reason": f"input dimension {w.shape[1]} is not a multiple of 4"})
                continue
            mask = mask_2_4(w)
            lin.weight.data.mul_(torch.from_numpy(mask).to(lin.weight.dtype))
            zeros += int((lin.weight.data == 0).sum())
            total += lin.weight.numel()
            done.append(name)
    return {"pattern": "2:4", "axis": "input (reduction) dimension", "mode": mode, "weights": len(done),
            "skipped": skipped, "zero_fraction": round(zeros / total, 6) if total else 0.0,
            "not_sparsified": "embedding and LM head (the tied embedding is also a Gather table)"}


def settings_dict(settings: PruningOptions) -> dict:
    return asdict(settings)


__all__ = ["PruneResult", "prune_for_compile", "mask_2_4",
           "violates_2_4", "channel_scores", "group_scores", "kept_channels", "mlp_keep_count"]
