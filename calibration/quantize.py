"""Quantization settings and the calibration step of a compile.

`QuantSettings` is the quantization record of a compile (`CompileConfig.quantization`), checked in its
`__post_init__` (what depends on the backend: in `CompileConfig`); `calibrate(...)` runs while the PyTorch model is still loaded (between
the reference trace and the export) and returns the activation statistics the graph passes use,
cached on disk by content hash (model, data, settings) so a second compile skips the forward passes.

What each format needs from calibration:
  int8 w8a8     per-channel max |x| -> SmoothQuant factors; per-tensor range of x / s (observer)
  fp8           SmoothQuant factors (alpha 0.5 unless --smoothquant-alpha); the per-tensor range of x / s for
                static activations; then (rounding gptq, the default) the input second moment -> GPTQ codes on
                E4M3's grid, a scale per row (gptq.py)
  int4 awq      mean |x| and sample rows -> AWQ scale search; then (rounding gptq, the default) the
                input second moment over --gptq-samples sequences -> GPTQ codes on AWQ's grid (gptq.py)
  int4 rtn, int8 weight-only    sample rows only (for the per-layer SQNR report)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from leptonc.calibration.collect import AWQ_SAMPLE_ROWS, SAMPLE_ROWS, ActivationStats, GroupStats, collect
from leptonc.calibration.gptq import GPTQ_DAMP, GPTQ_SAMPLES
from leptonc.calibration.observers import METHODS
from leptonc.errors import UnsupportedRequestError, VerificationError

CALIB_VERSION = 6  # bump when the statistics change meaning (invalidates the cache)
QUANTIZED = ("int8", "fp8", "int4")
SENSITIVITY_SEQUENCES = 8  # calibration sequences the layer sensitivity is measured on: on the tuning splits 32
# chose other groups and did no better (smollm2-135m, BENCHMARKS.md)
FP8_DEFAULT_KEEP = ("lm_head", "embed")  # --fp8 keeps these in higher precision; --fp8-lm-head quantizes them
CLIPPING_OBSERVERS = ("percentile", "entropy")  # they clip activation outliers, which fp8 (E4M3) could represent
FP8_DEFAULT_ALPHA = 0.5  # --fp8's SmoothQuant strength unless --smoothquant-alpha is given. Chosen on the WikiText
# tuning split with the earlier WikiText-only calibration (never the evaluation text):
# smollm2-135m +3.16% unsmoothed, +3.10% at 0.25, +2.88% at 0.5, +3.90% at 0.75; not chosen again for the mixed
# calibration text; the per-group alpha search overfits the calibration rows (BENCHMARKS.md, Quantization)


# The accuracy gate's default limit (perplexity increase, %) per format, from smollm2-135m's figures on the gate's
# text (the Python docs, an evaluation text; BENCHMARKS.md): int8 +0.8%, fp8 +1.2% (GPTQ codes) pass 5%;
# int4 AWQ + GPTQ with its 8-bit layers (+7.9% there, +6.0-6.9% on the three tuning splits) passes 15%.
DEFAULT_MAX_PPL_INCREASE = {"int8": 5.0, "fp8": 5.0, "int4": 15.0}
INT8_BLOCK_CPU, INT8_BLOCK = 32, 64  # --int8-block defaults: ONNX Runtime on the CPU (its 8-bit kernel rounds the
# activations per block: see QuantSettings.int8_block), everywhere else
INT4_BITS_BUDGET = 4.5  # --int4-bits-budget default (bits per weight over the decoder's linear layers)
WEIGHT_ONLY_ACTIVATIONS = {  # what --int8-mode weight-only does to the activations, for the manifest (on the CPU)
    False: "rounded to int8 per token in blocks of --int8-block channels by ONNX Runtime's CPU MatMulNBits kernel "
           "(accuracy_level 4, its fast path: the same graph as dynamic W8A8); --activations fp32 keeps them unrounded",
    True: "fp32 (MatMulNBits accuracy_level 1): weights alone are rounded; ONNX Runtime's CPU kernel dequantizes "
          "each 8-bit weight at every call, slower than fp32",
}


@dataclass(frozen=True)
class QuantSettings:
    precision: str
    int8_mode: str = "w8a8"  # w8a8 | weight-only
    smoothquant_alpha: float | None = None  # None: int8 searches it per layer group (smoothquant.search_alpha);
    # fp8 uses FP8_DEFAULT_ALPHA (set in __post_init__)
    activations: str | None = None  # --int8 w8a8 and --fp8: dynamic (a scale per token: int8 in --int8-block
    # blocks inside MatMulNBits; fp8 per row of each linear's input) | static (per tensor from calibration, Q/DQ);
    # None: CompileConfig picks dynamic for ONNX Runtime on the CPU, static elsewhere (a bare QuantSettings: static).
    # --int8-mode weight-only: fp32 keeps the activations unrounded (MatMulNBits accuracy_level 1, which ONNX
    # Runtime's CPU kernel runs by dequantizing each 8-bit weight at every call: gemma-3-270m decodes at 0.09x
    # fp32); None: the kernel's fast path, which rounds them to int8 per --int8-block channels (accuracy_level 4)
    int8_block: int | None = None  # int8 MatMulNBits (weight-only, dynamic W8A8) block along K; None: INT8_BLOCK_CPU
    # for ONNX Runtime on the CPU, whose 8-bit kernel also rounds the activations per block (set by CompileConfig),
    # else INT8_BLOCK (int8_block_size).
    # Chosen on the tuning splits (WikiText, docs, code): 32 against 64, smollm2-135m +0.73% / +0.62% / +0.40% against
    # +1.02% / +0.88% / +0.74%, gemma-3-270m +0.01% / -0.13% / +0.20% against +0.59% / +0.35% / +0.22%, for 0.25 more
    # bits per weight and about 5% of decode speed (BENCHMARKS.md)
    int4_block: int = 64  # chosen on the tuning split: with the 8-bit layers of --int4-bits-budget 4.5, smollm2-135m
    # +4.4% against block 128's +8.7% (block 128 pads K=576 to 640 and so costs 4.5 bits with no room for 8-bit layers)
    int4_method: str = "awq"  # awq | rtn
    int4_rounding: str | None = None  # gptq | nearest; None: gptq for awq, nearest for rtn (set in __post_init__)
    fp8_rounding: str | None = None  # --fp8 weight codes: gptq | nearest; None: gptq (set in __post_init__). GPTQ on
    # the E4M3 grid (a scale per row), chosen on the tuning splits before any held-out text was scored: smollm2-135m
    # +0.85% / +1.15% / +0.86% (WikiText, docs, code) against nearest rounding's +2.04% / +2.35% / +2.01% (BENCHMARKS.md)
    gptq_act_order: bool | None = None  # GPTQ rounds columns in order of decreasing input energy (diag H), not
    # 0..K-1; None: on with GPTQ rounding (set in __post_init__). Chosen on the tuning splits: smollm2-135m +6.4% /
    # +6.0% / +6.9% (WikiText, docs, code) against +7.9% / +6.3% / +7.8% in natural order (BENCHMARKS.md)
    gptq_samples: int | None = None  # sequences of calib_seq_len whose every token enters GPTQ's Hessian; None:
    # GPTQ_SAMPLES with GPTQ rounding (set in __post_init__), else unused
    kv_cache: str | None = None
    calib_data: str | None = None  # None: the text shipped with leptonc
    calib_samples: int = 16
    calib_seq_len: int = 256
    calib_method: str = "minmax"
    keep_fp: tuple[str, ...] = ()
    int4_8bit: tuple[str, ...] = ()  # --int4: layers (patterns) quantized to 8 bits instead (sensitive ones)
    int4_bits_budget: float = INT4_BITS_BUDGET  # --int4: effective bits per weight (decoder linears) that the
    # sensitivity-driven 8-bit layers may bring the model to (calibration/sensitivity.py); 0 turns them off
    fp8_lm_head: bool = False  # --fp8: also quantize the LM head (and the tied embedding); off by default
    max_ppl_increase: float | None = None  # None: DEFAULT_MAX_PPL_INCREASE for the precision
    check: bool = True
    check_tokens: int = 2048
    check_data: str | None = None  # held-out text for the gate (default: leptonc/data/eval_python_docs.txt)
    break_scales: float = 1.0  # test hook: multiplies every weight scale (a forced-tiny scale must trip the gate)

    def __post_init__(self) -> None:
        if self.precision not in QUANTIZED:
            raise UnsupportedRequestError(f"precision {self.precision} is not a quantized format")
        if self.int8_mode not in ("w8a8", "weight-only"):
            raise UnsupportedRequestError(f"--int8-mode {self.int8_mode!r}: use w8a8 or weight-only")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise UnsupportedRequestError("--smoothquant-alpha must be in [0, 1] (0.5 is the paper's default; "
                                          "leave it out to search it per layer)")
        if self.activations not in (None, "dynamic", "static", "fp32"):
            raise UnsupportedRequestError(f"--activations {self.activations!r}: use dynamic or static (--int8 W8A8, "
                                          "--fp8), or fp32 (--int8-mode weight-only)")
        if self.activations == "fp32" and self.format != "int8-weight-only":
            raise UnsupportedRequestError("--activations fp32 applies to --int8 --int8-mode weight-only only",
                                          hint="drop it, or add --int8-mode weight-only")
        if self.activations in ("dynamic", "static") and self.format not in ("int8-w8a8", "fp8"):
            raise UnsupportedRequestError(f"--activations {self.activations} applies to --int8 W8A8 and --fp8 only",
                                          hint="drop it")
        if self.int4_bits_budget < 0:
            raise UnsupportedRequestError("--int4-bits-budget is bits per weight (4.5 by default; 0 turns the "
                                          "sensitivity-driven 8-bit layers off)")
        if self.int8_block not in (None, 16, 32, 64, 128):
            raise UnsupportedRequestError(f"--int8-block {self.int8_block}: use 16, 32, 64 or 128")
        if self.int8_block is not None and self.precision != "int8":
            raise UnsupportedRequestError("--int8-block only applies to --int8", hint="drop it")
        if self.int4_block not in (32, 64, 128):
            raise UnsupportedRequestError(f"--int4-block {self.int4_block}: use 32, 64 or 128")
        if self.int4_method not in ("awq", "rtn"):
            raise UnsupportedRequestError(f"--int4-method {self.int4_method!r}: use awq or rtn")
        if self.int4_rounding not in (None, "gptq", "nearest"):
            raise UnsupportedRequestError(f"--int4-rounding {self.int4_rounding!r}: use gptq or nearest")
        if self.int4_rounding == "gptq" and (self.precision != "int4" or self.int4_method != "awq"):
            raise UnsupportedRequestError("--int4-rounding gptq rounds on AWQ's grid: it needs --int4 --int4-method awq",
                                          hint="drop --int4-rounding, or use --int4-method awq")
        if self.int4_rounding is None:
            object.__setattr__(self, "int4_rounding",
                               "gptq" if self.precision == "int4" and self.int4_method == "awq" else "nearest")
        if self.fp8_rounding not in (None, "gptq", "nearest"):
            raise UnsupportedRequestError(f"--fp8-rounding {self.fp8_rounding!r}: use gptq or nearest")
        if self.fp8_rounding is not None and self.precision != "fp8":
            raise UnsupportedRequestError("--fp8-rounding only applies to --fp8", hint="drop it")
        if self.fp8_rounding is None and self.precision == "fp8":
            object.__setattr__(self, "fp8_rounding", "gptq")
        if self.gptq_samples is not None and self.gptq_samples < 1:
            raise UnsupportedRequestError("--gptq-samples must be >= 1")
        if self.gptq_samples is not None and not self.uses_gptq:
            raise UnsupportedRequestError("--gptq-samples only applies to GPTQ rounding (--int4 with --int4-method awq "
                                          "and --int4-rounding gptq, or --fp8 with --fp8-rounding gptq: the "
                                          "defaults)", hint="drop --gptq-samples")
        if self.gptq_act_order and not self.uses_gptq:
            raise UnsupportedRequestError("--gptq-act-order only applies to GPTQ rounding (--int4 with --int4-method "
                                          "awq and --int4-rounding gptq, or --fp8 with --fp8-rounding gptq: the "
                                          "defaults)", hint="drop --gptq-act-order")
        if self.uses_gptq and self.gptq_samples is None:
            object.__setattr__(self, "gptq_samples", GPTQ_SAMPLES)
        if self.gptq_act_order is None:
            object.__setattr__(self, "gptq_act_order", self.uses_gptq)
        if self.fp8_lm_head and self.precision != "fp8":
            raise UnsupportedRequestError("--fp8-lm-head only applies to --fp8",
                                          hint="drop it, or use --keep-fp lm_head to keep an int8/int4 head in fp32")
        if self.kv_cache not in (None, "fp8", "int8"):
            raise UnsupportedRequestError(f"--kv-cache {self.kv_cache!r}: use fp8 or int8")
        if self.calib_method not in METHODS:
            raise UnsupportedRequestError(f"--calib-method {self.calib_method!r}: use one of {', '.join(METHODS)}")
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise UnsupportedRequestError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
        if self.max_ppl_increase is None:
            object.__setattr__(self, "max_ppl_increase", DEFAULT_MAX_PPL_INCREASE[self.precision])
        if self.max_ppl_increase < 0:
            raise UnsupportedRequestError("--max-ppl-increase is a percentage >= 0")
        if self.check_tokens < 64:
            raise UnsupportedRequestError("--check-tokens must be at least 64")
        if self.calib_data is not None and not Path(self.calib_data).is_file():
            raise UnsupportedRequestError(f"--calib-data {self.calib_data} does not exist", hint="give a UTF-8 text file")
        if self.precision == "fp8" and self.smoothquant_alpha is None:
            object.__setattr__(self, "smoothquant_alpha", FP8_DEFAULT_ALPHA)

    @property
    def format(self) -> str:
        """int8-w8a8, int8-weight-only, fp8, int4-awq or int4-rtn."""
        if self.precision == "int8":
            return f"int8-{self.int8_mode}"
        if self.precision == "int4":
            return f"int4-{self.int4_method}"
        return "fp8"

    @property
    def dynamic_activations(self) -> bool:
        """int8 W8A8 (MatMulNBits at accuracy_level 4) or fp8 with per-token dynamic activation scales."""
        return self.format in ("int8-w8a8", "fp8") and self.activations == "dynamic"

    @property
    def static_activations(self) -> bool:
        """Activation ranges from calibration (per-tensor Q/DQ): static int8 W8A8 and fp8."""
        return self.format in ("int8-w8a8", "fp8") and not self.dynamic_activations

    @property
    def mixed_int4(self) -> bool:
        """int4 with measured-sensitivity 8-bit layers under --int4-bits-budget."""
        return self.precision == "int4" and self.int4_bits_budget > 0

    @property
    def int8_block_size(self) -> int:
        """The int8 MatMulNBits block: int8_block as CompileConfig set it, or INT8_BLOCK for a bare QuantSettings."""
        return self.int8_block or INT8_BLOCK

    @property
    def uses_gptq(self) -> bool:
        return (self.format == "int4-awq" and self.int4_rounding == "gptq") or \
            (self.precision == "fp8" and self.fp8_rounding == "gptq")

    @property
    def caution(self) -> str | None:
        """A combination of flags that is allowed but known to hurt, said before the compile starts."""
        if self.precision == "fp8" and self.calib_method in CLIPPING_OBSERVERS:
            return (f"--calib-method {self.calib_method} clips activation outliers that fp8 (E4M3) could represent; "
                    "on smollm2-135m it multiplied perplexity (minmax is the fp8 default)")
        return None

    def int4_uses_8bit(self, name: str) -> bool:
        return self.precision == "int4" and _matches(name, self.int4_8bit)

    def keeps_fp(self, name: str) -> bool:
        """True when `name` (a logical weight name such as layers.3.down.weight, embed, lm_head)
        matches a --keep-fp pattern (fnmatch; a bare word also matches as a substring), or is the LM
        head / embedding of an fp8 compile without --fp8-lm-head (FP8_DEFAULT_KEEP)."""
        return _matches(name, self.keep_fp) or name in self.default_keep_fp

    @property
    def default_keep_fp(self) -> tuple[str, ...]:
        """Layers this format leaves in the model's float type unless asked: for fp8 the LM head and
        the embedding tied to it, as NVIDIA ModelOpt's default FP8 recipe does (it excludes *lm_head*).
        On smollm2-135m that took fp8 from +5.9% to +3.8% perplexity (+3.0% without SmoothQuant), at
        113 MB of fp32 head (BENCHMARKS.md, Quantization)."""
        return FP8_DEFAULT_KEEP if self.precision == "fp8" and not self.fp8_lm_head else ()


def _matches(name: str, patterns) -> bool:
    """fnmatch, and a bare word (no wildcard) also matches as a substring."""
    return any(fnmatch.fnmatch(name, p) or (not any(c in p for c in "*?[") and p in name) for p in patterns)


def cache_dir() -> Path:
    root = os.environ.get("LEPTONC_CACHE") or Path.home() / ".cache" / "leptonc"
    return Path(root) / "calibration"


def cache_key(source_hash: str, settings: QuantSettings, data_digest: str, mlp_activation: str | None = None) -> str:
    fields = {
        "v": CALIB_VERSION, "model": source_hash, "data": data_digest, "samples": settings.calib_samples,
        "seq_len": settings.calib_seq_len, "method": settings.calib_method, "format": settings.format,
        "alpha": settings.smoothquant_alpha if settings.format in ("int8-w8a8", "fp8") else None,
        "block": settings.int4_block if settings.format == "int4-awq" else None,
        "mlp_activation": mlp_activation if settings.format == "int4-awq" else None,
        "gptq": ([settings.gptq_samples, GPTQ_DAMP] + (["act_order"] if settings.gptq_act_order else []))
        if settings.uses_gptq else None,
    }
    if settings.dynamic_activations:  # no smoothing, no ranges: other statistics than static W8A8's
        fields["activations"] = "dynamic"
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _save(stats: ActivationStats, path: Path) -> None:
    arrays, meta = {}, {"tokens": stats.tokens, "method": stats.method, "groups": []}
    for i, g in enumerate(stats.groups):
        arrays[f"{i}.absmax"], arrays[f"{i}.absmean"] = g.absmax, g.absmean
        arrays[f"{i}.samples"] = g.samples.astype(np.float16)
        if g.prescale is not None:
            arrays[f"{i}.prescale"] = g.prescale
        if g.fingerprints is not None:
            arrays[f"{i}.fingerprints"] = g.fingerprints
        meta["groups"].append({"members": g.members, "amax": g.amax, "alpha": g.alpha,
                               "rounded": _save_rounded(g.rounded, arrays, i) if g.rounded else None})
    meta["gptq"] = stats.rounding
    meta["sensitivity_scores"] = stats.sensitivity_scores
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    os.replace(tmp, path)


def _load(path: Path) -> ActivationStats | None:
    try:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            stats = ActivationStats(tokens=meta["tokens"], method=meta["method"])
            for i, g in enumerate(meta["groups"]):
                stats.groups.append(GroupStats(
                    g["members"], z[f"{i}.absmax"], z[f"{i}.absmean"], z[f"{i}.samples"].astype(np.float32),
                    g["amax"], z[f"{i}.prescale"] if f"{i}.prescale" in z.files else None,
                    alpha=g.get("alpha"),
                    fingerprints=z[f"{i}.fingerprints"] if f"{i}.fingerprints" in z.files else None,
                    rounded=_load_rounded(g.get("rounded"), z, i)))
            stats.rounding = meta.get("gptq")
            stats.sensitivity_scores = meta.get("sensitivity_scores")
        return stats
    except (OSError, ValueError, KeyError):  # a corrupt or partial cache entry: recompute
        return None


def _save_rounded(rounded: dict, arrays: dict, i: int) -> list:
    """Store a group's GPTQ codes (int4: two codes a byte, scales and zero points; fp8: a byte a code and a
    scale a row); returns the meta."""
    from leptonc.calibration.scales import Fp8Rows

    meta = []
    for j, (member, q) in enumerate(rounded.items()):
        if isinstance(q, Fp8Rows):
            arrays[f"{i}.r{j}.codes"], arrays[f"{i}.r{j}.scales"] = q.codes.view(np.uint8), q.scales
            meta.append({"member": member, "format": "fp8"})
            continue
        arrays[f"{i}.r{j}.codes"] = q.packed()  # MatMulNBits' B: two 4-bit codes a byte
        arrays[f"{i}.r{j}.scales"], arrays[f"{i}.r{j}.zero_points"] = q.scales, q.zero_points
        meta.append({"member": member, "block": q.block_size, "k": q.k})
    return meta


def _load_rounded(meta: list | None, z, i: int) -> dict | None:
    import ml_dtypes

    from leptonc.calibration.scales import BlockQuantized, Fp8Rows, unpack_nibbles

    if not meta:
        return None
    out = {}
    for j, r in enumerate(meta):
        packed = z[f"{i}.r{j}.codes"]
        if r.get("format") == "fp8":
            out[r["member"]] = Fp8Rows(packed.view(ml_dtypes.float8_e4m3fn), z[f"{i}.r{j}.scales"])
            continue
        codes = unpack_nibbles(packed.reshape(packed.shape[0], -1))
        out[r["member"]] = BlockQuantized(codes, z[f"{i}.r{j}.scales"], z[f"{i}.r{j}.zero_points"], 4,
                                          r["block"], r["k"])
    return out


@dataclass
class CalibrationResult:
    stats: ActivationStats
    summary: dict  # recorded in the manifest's "calibration"


def calibrate(module, tokenizer, weights, settings: QuantSettings, source_hash: str,
              on_progress=None, mlp_activation: str | None = None) -> CalibrationResult:
    """Run (or load from the cache) the calibration this format needs. `mlp_activation`: the
    activation between a gated MLP's gate/up and down projections (the model's DecoderSpec.activation,
    or None when the MLP is not gated or has biases): AWQ then measures the gate/up error after it."""
    from leptonc.calibration.data import calibration_batches, default_calibration_text, file_digest

    data_path = Path(settings.calib_data) if settings.calib_data else default_calibration_text()
    key = cache_key(source_hash, settings, file_digest(data_path), mlp_activation)
    path = cache_dir() / f"{key}.npz"
    start = time.perf_counter()
    stats = _load(path) if path.is_file() else None
    cached = stats is not None
    if stats is None:
        batches = calibration_batches(tokenizer, data_path, settings.calib_samples, settings.calib_seq_len)
        fmt = settings.format
        prescales = None
        if settings.static_activations or fmt == "fp8":
            # fp8 smooths with a fixed alpha (FP8_DEFAULT_ALPHA): the per-group alpha search overfits the
            # calibration rows (smollm2-135m: +3.8% with it; BENCHMARKS.md, Quantization).
            prescales = lambda st: _smoothing(st, weights, settings)  # noqa: E731
        elif fmt == "int4-awq":
            prescales = lambda st: _awq(st, weights, settings, mlp_activation)  # noqa: E731
        stats = collect(module, weights, batches, settings.calib_method, prescales=prescales,
                        on_batch=on_progress, need_ranges=settings.static_activations,
                        sample_rows=AWQ_SAMPLE_ROWS if fmt == "int4-awq" else SAMPLE_ROWS)
        if settings.uses_gptq:
            from leptonc.calibration.gptq import round_groups

            t0 = time.perf_counter()
            gptq_batches = calibration_batches(tokenizer, data_path, settings.gptq_samples, settings.calib_seq_len)
            summary = round_groups(module, weights, stats, gptq_batches, settings.int4_block, on_progress=on_progress,
                                   act_order=settings.gptq_act_order, fmt=settings.precision)
            stats.rounding = {**summary, "seconds": round(time.perf_counter() - t0, 1)}
        _save(stats, path)
    if settings.mixed_int4:  # the scores are cached (a calibration without them, or with scores of another token
        # count, gets them once); the choice is not
        batches = calibration_batches(tokenizer, data_path, SENSITIVITY_SEQUENCES, settings.calib_seq_len)
        if stats.sensitivity_scores is None or stats.sensitivity_scores.get("tokens") != int(batches.size):
            _measure_sensitivity(module, weights, stats, batches, settings, on_progress)
            _save(stats, path)
        _choose_eight_bit(weights, stats, settings)
    summary = {
        "format": settings.format,
        "data": str(data_path),
        "data_chars": "shipped: WikiText-2 valid.txt[0:41247], Rust book, Node.js API docs and Python source, "
                      "interleaved (calibration/data.py)" if not settings.calib_data else "user file",
        "role": "calibration: activation statistics, SmoothQuant/AWQ scales, GPTQ Hessians, layer sensitivity",
        "samples": settings.calib_samples,
        "seq_len": settings.calib_seq_len,
        "tokens": stats.tokens,
        "method": settings.calib_method,
        "groups": len(stats.groups),
        "cache": {"key": key, "hit": cached, "path": str(path)},
        "seconds": round(time.perf_counter() - start, 2),
    }
    if settings.dynamic_activations:
        summary["activations"] = (f"dynamic: per token, one int8 scale per {settings.int8_block_size}-channel block, "
                                  "computed by MatMulNBits (accuracy_level 4) at run time; no SmoothQuant"
                                  if settings.precision == "int8" else
                                  "dynamic: per token, one fp8 scale per row of each linear's input (its max |x|)")
    if settings.format == "int8-weight-only":
        summary["activations"] = WEIGHT_ONLY_ACTIVATIONS[settings.activations == "fp32"]
    if settings.mixed_int4:
        summary["mixed_precision"] = stats.sensitivity
    if settings.static_activations or settings.precision == "fp8":
        alphas = [g.alpha for g in stats.groups if g.alpha is not None]
        summary["smoothquant_alpha"] = settings.smoothquant_alpha if settings.smoothquant_alpha is not None else \
            {"searched_per_group": True, "min": min(alphas, default=None), "max": max(alphas, default=None),
             "mean": round(float(np.mean(alphas)), 3) if alphas else None}
    if settings.precision == "fp8":
        summary["rounding"] = stats.rounding if settings.uses_gptq else \
            {"rounding": "nearest", "note": "each weight rounds to its nearest E4M3 value (--fp8-rounding nearest)"}
    if settings.format == "int4-awq":
        summary["awq"] = ("grid search of alpha in s = mean|x|**alpha over 21 points per input group, on "
                          f"{AWQ_SAMPLE_ROWS} calibration rows; gate/up error measured after the MLP activation"
                          + ("" if mlp_activation else " (not here: no gated MLP without biases)"))
        summary["rounding"] = stats.rounding if settings.uses_gptq else \
            {"rounding": "nearest", "note": "each weight rounds to its nearest code on AWQ's grid (--int4-rounding nearest)"}
    return CalibrationResult(stats, summary)


def _group_weights(group: GroupStats, weights) -> list[np.ndarray]:
    return [weights("embed" if m == "lm_head" else m) for m in group.members]


def _smoothing(stats: ActivationStats, weights, settings: QuantSettings) -> dict:
    """SmoothQuant factors per input group: a fixed --smoothquant-alpha, or (default) the alpha per
    group whose quantized output is closest to fp32 on the calibration rows (recorded in the stats)."""
    from leptonc.calibration.smoothquant import search_alpha, smoothing_factors

    out = {}
    for g in stats.groups:
        if g.members == ["lm_head"]:  # the head runs weight-only (it shares the embedding's codes)
            continue
        ws = _group_weights(g, weights)
        if settings.smoothquant_alpha is None:
            out[g.members[0]], g.alpha, _ = search_alpha(g.samples, g.absmax, ws,
                                                         fmt="fp8" if settings.precision == "fp8" else "int8")
        else:
            out[g.members[0]] = smoothing_factors(g.absmax, ws, settings.smoothquant_alpha)
            g.alpha = settings.smoothquant_alpha
    return out


def _awq(stats: ActivationStats, weights, settings: QuantSettings, mlp_activation: str | None = None) -> dict:
    from leptonc.calibration.awq import awq_search, gated_output

    out = {}
    for g in stats.groups:
        if g.members == ["lm_head"]:  # the head is int8 in int4 mode: no search
            continue
        ws = _group_weights(g, weights)
        output = None
        if mlp_activation and [m.split(".")[-2] for m in g.members] == ["gate", "up"]:
            output = gated_output(mlp_activation, ws[0].shape[0])
        s, _ = awq_search(g.samples, g.absmean, ws, 4, settings.int4_block, output=output)
        out[g.members[0]] = s
    return out


def _measure_sensitivity(module, weights, stats: ActivationStats, batches: np.ndarray, settings: QuantSettings,
                         on_progress=None) -> None:
    """Each decoder linear's sensitivity to 4-bit rounding (calibration/sensitivity.py), into the stats."""
    from leptonc.calibration.collect import find_linears
    from leptonc.calibration.scales import block_quantize
    from leptonc.calibration.sensitivity import fisher_scores

    t0 = time.perf_counter()
    linears = {n: m for n, m in find_linears(module, weights).items() if n != "lm_head"}
    if on_progress:
        on_progress(0, 1, "layer sensitivity")
    scores = fisher_scores(module, linears, lambda _, w: block_quantize(w, 4, settings.int4_block).dequantize(),
                           batches)
    stats.sensitivity_scores = {"scores": scores, "tokens": int(batches.size),
                                "seconds": round(time.perf_counter() - t0, 1)}


def _choose_eight_bit(weights, stats: ActivationStats, settings: QuantSettings) -> None:
    """Keep the most sensitive groups at 8 bits under --int4-bits-budget; the choice and its figures go into
    the stats (stats.eight_bit, stats.sensitivity)."""
    from leptonc.calibration.sensitivity import SCALE_BITS, choose_eight_bit, effective_bits

    scores = stats.sensitivity_scores["scores"]
    groups = [g.members for g in stats.groups if all(m in scores for m in g.members)]
    shapes = {m: tuple(np.asarray(weights(m)).shape) for g in groups for m in g}
    chosen, bits = choose_eight_bit(groups, scores, shapes, settings.int4_block, settings.int4_bits_budget)
    stats.eight_bit = [m for g in groups if g[0] in chosen for m in g]
    ranked = sorted(groups, key=lambda g: -sum(scores[m] for m in g))
    stats.sensitivity = {
        "method": "Fisher estimate of each layer's loss increase under 4-bit rounding, sum (dL/dy * dy)^2 over "
                  f"{stats.sensitivity_scores['tokens']} calibration tokens (as ModelOpt's auto_quantize scores "
                  "layers); groups taken by score per extra bit",
        "budget_bits": settings.int4_bits_budget, "scale_bits": SCALE_BITS,
        "uniform_int4_bits": round(effective_bits(shapes, settings.int4_block, set()), 4),
        "effective_bits": round(bits, 4), "eight_bit_groups": ["+".join(g) for g in groups if g[0] in chosen],
        "most_sensitive": [{"group": "+".join(g), "score": round(sum(scores[m] for m in g), 4)} for g in ranked[:8]],
        "seconds": stats.sensitivity_scores["seconds"]}


def settings_dict(settings: QuantSettings) -> dict:
    return asdict(settings)


# ---- the compile's quantization step (called from leptonc/compiler.py) ---------------------------

QUANT_PASS = {"int8": "quantize_int8", "int4": "quantize_int4", "fp8": "quantize_fp8"}


@dataclass
class CompileQuantization:
    settings: QuantSettings
    calibration: CalibrationResult
    mode: str  # "native" | "simulated" on this target
    target: str
    gate: dict | None = None
    report: dict | None = None
    pass_record: dict | None = None

    def check_applied(self, ctx, records) -> None:
        """Keep the quantize pass's record and report; refuse when the pass did not run. The accuracy gate is
        then run by the compiler with its backend's runners (calibration/gate.py) and kept in `gate`."""
        self.report = ctx.quant_report
        name = QUANT_PASS[self.settings.precision]
        self.pass_record = next((r for r in records if r["name"] == name), None)
        if self.pass_record is None or self.pass_record["status"] != "applied":
            why = self.pass_record["detail"] if self.pass_record else "it is not in the pipeline"
            raise VerificationError(f"--{self.settings.precision} was requested but {name} did not run ({why}); "
                                    "no bundle was written", hint="report this with the command line")

    def manifest_section(self) -> dict:
        return {**self.calibration.summary, "settings": {k: v for k, v in asdict(self.settings).items()
                                                         if k != "break_scales" or v != 1.0}}

    def report_section(self) -> dict:
        layers = (self.report or {}).get("layers", [])
        worst = sorted(layers, key=lambda r: r["sqnr_db"])[:5]
        return {
            "format": self.settings.format,
            "mode": self.mode,
            "simulated": self.mode == "simulated",
            "note": (f"{self.settings.precision} is simulated on {self.target}: accuracy only, not speed"
                     if self.mode == "simulated" else f"{self.settings.format} runs natively on {self.target}"),
            "layers": layers,
            "worst_layers": worst,
            "kept_fp": (self.report or {}).get("kept_fp", []),
            "notes": (self.report or {}).get("notes", []),
            "accuracy_gate": self.gate,
        }


def calibrate_for_compile(config, lm, adapter, spec, on_progress=None) -> CompileQuantization:
    settings = config.quantization  # resolved for the backend by CompileConfig
    weights = adapter.weights(lm.module, spec)
    gated = getattr(spec, "mlp", None) == "gated" and not getattr(spec, "mlp_bias", False)
    result = calibrate(lm.module, lm.tokenizer, weights, settings, lm.source_hash, on_progress=on_progress,
                       mlp_activation=spec.activation if gated else None)
    target = config.target_record
    return CompileQuantization(settings, result, target.mode(config.precision), target.name)
