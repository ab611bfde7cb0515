"""Activation statistics from the PyTorch model, recorded with forward hooks on its linear layers.

Linear layers are found by weight identity: the adapter's logical weights (`layers.3.q.weight`,
`embed`, ...) are numpy views of the module's parameters, so a layer whose weight shares that memory
is that logical weight, whatever the architecture calls it. The tied LM head (its weight is `embed`)
is recorded as `lm_head`.

Per linear input (layers that read the same tensor, q/k/v or gate/up, form one `group` and share
statistics): per-channel max |x| and mean |x| (SmoothQuant, AWQ), a random sample of rows (AWQ's
scale search, per-layer SQNR), and after an optional per-channel pre-scale (SmoothQuant's smoothing
factors), the per-tensor range from the chosen observer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from leptonc.calibration.observers import make_observer

SAMPLE_ROWS = 256  # rows kept per group for the per-layer SQNR report (and SmoothQuant's alpha search)
AWQ_SAMPLE_ROWS = 2048  # AWQ's scale and clip search: on smollm2-135m, 2,048 rows instead of 256 took the
# int4 AWQ perplexity increase from +16.3% to +14.7% (BENCHMARKS.md, Quantization)


@dataclass
class GroupStats:
    """Statistics of one activation tensor read by the linears in `members` (logical weight names)."""

    members: list[str]
    absmax: np.ndarray  # [K] per input channel
    absmean: np.ndarray  # [K]
    samples: np.ndarray  # [<=SAMPLE_ROWS, K] float32 rows of the input
    amax: float = 0.0  # per-tensor range of (x / prescale) from the observer
    prescale: np.ndarray | None = None  # [K] divides x before quantization (SmoothQuant / AWQ factors)
    alpha: float | None = None  # the SmoothQuant migration strength chosen for this group
    fingerprints: np.ndarray | None = None  # [members, K]: row 0 ([out, in] layout) of each member's weight,
    # so a graph pass can recognise the group in a merged weight (merge_qkv / merge_gate_up rename them)
    rounded: dict | None = None  # {member: BlockQuantized of W * prescale}: int4 codes chosen by GPTQ (gptq.py)


@dataclass
class ActivationStats:
    groups: list[GroupStats] = field(default_factory=list)
    tokens: int = 0
    method: str = "minmax"
    rounding: dict | None = None  # GPTQ's summary when the groups carry GPTQ codes (gptq.round_groups)
    sensitivity_scores: dict | None = None  # --int4 mixed precision: {"scores": {linear: score}, ...} (cached)
    eight_bit: list[str] = field(default_factory=list)  # --int4: linears kept at 8 bits by measured sensitivity
    sensitivity: dict | None = None  # how they were chosen (calibration/quantize.py _choose_eight_bit; not cached)

    def group_of(self, weight_name: str) -> GroupStats | None:
        for g in self.groups:
            if weight_name in g.members:
                return g
        return None

    def group_of_weight(self, w_oi: np.ndarray) -> GroupStats | None:
        """The group whose members' weights are all row blocks of `w_oi` ([out, in]): a merged
        projection (q|k|v or gate|up concatenated along the output) made by a fusion pass, in the
        model's float type or an fp16 / bf16 export of it."""
        index = self.__dict__.get("_fp_index")
        if index is None:  # fingerprint bytes -> (group number, member number)
            import ml_dtypes

            index = {}
            for gi, g in enumerate(self.groups):
                if g.fingerprints is not None:
                    for mi, fp in enumerate(np.asarray(g.fingerprints, np.float32)):
                        # the row as an fp32, fp16 or bf16 graph holds it (read back as float32)
                        for dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
                            index[fp.astype(dtype).astype(np.float32).tobytes()] = (gi, mi)
            self.__dict__["_fp_index"] = index
        w = np.ascontiguousarray(w_oi, np.float32)
        found: dict[int, set[int]] = {}
        for row in w:
            hit = index.get(row.tobytes())
            if hit is not None:
                found.setdefault(hit[0], set()).add(hit[1])
        for gi, members in found.items():
            if len(members) == len(self.groups[gi].members):
                return self.groups[gi]
        return None


def find_linears(module, weights) -> dict[str, object]:
    """{logical weight name: the nn.Linear-like submodule that uses it}."""
    import torch

    by_ptr: dict[int, str] = {}
    for name in weights.names:
        if name.endswith(".bias") or "norm" in name or name.startswith("ln") or ".ln" in name:
            continue
        arr = weights(name)
        if arr.ndim != 2:
            continue
        by_ptr[arr.__array_interface__["data"][0]] = name
    found: dict[str, object] = {}
    for _, sub in module.named_modules():
        w = getattr(sub, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or isinstance(sub, torch.nn.Embedding):
            continue
        name = by_ptr.get(w.data_ptr())
        if name is None:
            continue
        found["lm_head" if name == "embed" else name] = sub
    return found


def collect(module, weights, batches: np.ndarray, method: str = "minmax", prescales: dict | None = None,
            seed: int = 0, on_batch=None, need_ranges: bool = True, sample_rows: int = SAMPLE_ROWS) -> ActivationStats:
    """Run `batches` ([n, seq] token ids) through `module` and return per-group statistics.

    `prescales(stats) -> {weight name: [K] factors}` is called between the two passes: the second
    pass observes x / factor (the tensor that will actually be quantized). With the minmax method
    the range comes from the per-channel maxima directly and the second pass is not run."""
    import torch

    linears = find_linears(module, weights)
    rng = np.random.default_rng(seed)
    per_batch: dict[int, list[str]] = {}  # id(input tensor) -> members, rebuilt per forward
    acc: dict[tuple, dict] = {}
    order: list[tuple] = []

    def hook_pass1(name):
        def fn(mod, args):
            x = args[0]
            key = id(x)
            alive.append(x)  # keep x alive for the whole forward: a freed tensor's id is reused
            members = per_batch.setdefault(key, [])
            members.append(name)
            if len(members) > 1:
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            a = flat.abs()
            rec = {"absmax": a.amax(0).numpy(), "abssum": a.sum(0).double().numpy(), "rows": flat.shape[0]}
            take = rng.choice(flat.shape[0], size=min(flat.shape[0], max(1, sample_rows // len(batches))), replace=False)
            rec["samples"] = flat[torch.from_numpy(np.sort(take))].numpy().copy()
            pending.append((name, rec))
        return fn

    pending: list = []
    alive: list = []

    def run(hook_factory):
        handles = [sub.register_forward_pre_hook(hook_factory(name)) for name, sub in linears.items()]
        try:
            with torch.no_grad():
                for i, row in enumerate(batches):
                    per_batch.clear()
                    pending.clear()
                    alive.clear()
                    module(torch.from_numpy(row[None, :]), use_cache=False)
                    yield i
        finally:
            for h in handles:
                h.remove()

    for i in run(hook_pass1):
        groups = {id_: tuple(m) for id_, m in per_batch.items()}
        for name, rec in pending:
            members = next(g for g in groups.values() if g[0] == name)
            if members not in acc:
                acc[members] = {"absmax": rec["absmax"], "abssum": rec["abssum"], "rows": rec["rows"],
                                "samples": [rec["samples"]]}
                order.append(members)
            else:
                a = acc[members]
                a["absmax"] = np.maximum(a["absmax"], rec["absmax"])
                a["abssum"] = a["abssum"] + rec["abssum"]
                a["rows"] += rec["rows"]
                a["samples"].append(rec["samples"])
        if on_batch:
            on_batch(i + 1, len(batches), "statistics")

    stats = ActivationStats(method=method, tokens=int(batches.size))
    for members in order:
        a = acc[members]
        fps = np.stack([np.asarray(weights("embed" if m == "lm_head" else m), np.float32)[0] for m in members])
        stats.groups.append(GroupStats(list(members), a["absmax"].astype(np.float32),
                                       (a["abssum"] / a["rows"]).astype(np.float32),
                                       np.concatenate(a["samples"])[:sample_rows].astype(np.float32),
                                       fingerprints=fps))
    if prescales is not None:
        factors = prescales(stats)
        for g in stats.groups:
            f = factors.get(g.members[0])
            if f is not None:
                g.prescale = np.asarray(f, np.float32)
    if not need_ranges:
        return stats
    if method == "minmax":
        for g in stats.groups:
            g.amax = float((g.absmax / (g.prescale if g.prescale is not None else 1.0)).max())
        return stats

    observers = {tuple(g.members): make_observer(method) for g in stats.groups}
    by_first = {g.members[0]: g for g in stats.groups}

    def hook_pass2(name):
        def fn(mod, args):
            g = by_first.get(name)
            if g is None:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().numpy()
            if g.prescale is not None:
                x = x / g.prescale
            observers[tuple(g.members)].observe(x)
        return fn

    for i in run(hook_pass2):
        if on_batch:
            on_batch(i + 1, len(batches), f"{method} ranges")
    for g in stats.groups:
        g.amax = observers[tuple(g.members)].amax()
    return stats
