"""ONNX Runtime runners. CPU: numpy feeds, the cache carried from `present.*` to `past_key_values.*`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leptonc.errors import BackendUnavailableError, InputError
from leptonc.graph_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_POSITIONS, POSITION_IDS, past_key, \
    past_value, present_names
from leptonc.runtime.base import Runner, positions_from_mask


def session_options(settings: dict, model_dir: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if settings.get("custom_ops_library"):
        register_kernels(so, settings["custom_ops_library"], model_dir)
    level = settings.get("graph_optimization_level", "all")
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if settings.get("intra_op_num_threads"):
        so.intra_op_num_threads = int(settings["intra_op_num_threads"])
    so.log_severity_level = 3
    return so


def register_kernels(so, relative: str, model_dir: Path | None) -> None:
    """The bundle's own CUDA kernel library (targets/kernels/), registered before the session is made."""
    from leptonc.errors import BundleError

    path = (model_dir or Path(".")) / relative
    if not path.is_file():
        raise BundleError(f"this bundle's CUDA kernel library {relative} is missing",
                          hint="the bundle is incomplete; copy it again or compile it again")
    try:
        so.register_custom_ops_library(str(path))
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises plain RuntimeError/Fail here
        raise BundleError(f"this bundle's CUDA kernels ({relative}) could not be loaded here: {str(exc).strip()[-300:]}",
                          hint="compile the bundle on a machine with this CUDA version, or compile with "
                               "--disable-pass use_leptonc_kernels to use ONNX Runtime's kernels") from None


class OrtCpuRunner(Runner):
    device = "cpu"

    def __init__(self, model_path: Path, io: dict, settings: dict | None = None, *, max_sequence: int = 2048,
                 max_batch: int = 64):
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - onnxruntime is a hard dependency
            raise BackendUnavailableError("onnxruntime is not installed", hint="pip install onnxruntime") from None
        settings = settings or {}
        self.session = ort.InferenceSession(str(model_path), session_options(settings, Path(model_path).parent),
                                            providers=["CPUExecutionProvider"])
        self.io = io
        self.num_layers = io["num_layers"]
        self.kv_heads, self.head_dim = io["num_kv_heads"], io["head_dim"]
        self.kv_dtype = np.dtype(io["kv_dtype"])
        self.vocab_size = io["vocab_size"]
        self.max_sequence, self.max_batch = max_sequence, max_batch
        self._past: list[np.ndarray] = []
        self._mask: np.ndarray | None = None
        self._positions: np.ndarray | None = None
        # passes/select_logits.py: the LM head runs only on the positions fed here.
        self.selects_logits = LOGITS_POSITIONS in {i.name for i in self.session.get_inputs()}
        # By name: the graph may have outputs past the cache (next_token, passes/greedy_token.py).
        self._fetches = [LOGITS, *present_names(self.num_layers)]

    @property
    def sequence_length(self) -> int:
        return 0 if self._mask is None else self._mask.shape[1]

    def _run(self, input_ids: np.ndarray, positions: np.ndarray, last_only: bool = False) -> np.ndarray:
        feed = {INPUT_IDS: input_ids, ATTENTION_MASK: self._mask, POSITION_IDS: positions}
        if self.selects_logits:  # left padding: the last column is every row's last real token
            batch, seq = input_ids.shape
            feed[LOGITS_POSITIONS] = (np.full((batch, 1), seq - 1, np.int64) if last_only
                                        else np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy())
        for i in range(self.num_layers):
            feed[past_key(i)] = self._past[2 * i]
            feed[past_value(i)] = self._past[2 * i + 1]
        outputs = self.session.run(self._fetches, feed)
        self._past = outputs[1:]
        return outputs[0]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        if seq > self.max_sequence:
            raise InputError(f"prompt is {seq} tokens; this bundle allows at most {self.max_sequence}")
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        self._past = [empty] * (2 * self.num_layers)
        self._mask = np.asarray(attention_mask, dtype=np.int64)
        self._positions = positions_from_mask(self._mask)
        logits = self._run(input_ids, self._positions, last_only)
        return logits[:, -1] if last_only else logits

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        if self._mask is None:
            raise RuntimeError("decode before prefill")
        if self.sequence_length >= self.max_sequence:
            raise InputError(f"sequence reached this bundle's limit of {self.max_sequence} tokens")
        batch = self._mask.shape[0]
        self._mask = np.concatenate([self._mask, np.ones((batch, 1), np.int64)], axis=1)
        pos = self._positions[:, -1:] + 1
        self._positions = pos
        ids = np.asarray(token_ids, dtype=np.int64).reshape(batch, 1)
        return self._run(ids, pos, last_only=True)[:, -1]

    def release(self) -> None:
        self._past = []
        self.session = None
