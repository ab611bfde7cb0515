"""Slot-level access to a bundle's KV cache, what the in-flight batching engine (batching.py) steps.

A `KvSlots` holds up to `num_slots` independent sequences, one per slot. Unlike a `Runner`, whose
prefill starts a whole new batch, a slot is filled, extended and freed on its own:

- `prefill(slot, token_ids)` runs a prompt (or the next chunk of one) into a slot while the other
  slots keep their sequences; it returns the logits of the chunk's last position.
- `decode(slots, token_ids)` appends one token to each of the given slots in one batched step and
  returns that step's greedy tokens (the graph's argmax) and, when asked, its logits.
- `free(slot)` forgets a slot's sequence at once.

`HostKvSlots` keeps the cache in host memory as numpy arrays and runs ONNX Runtime's CPU provider.
A prompt is prefilled alone (batch 1, no padding: the very run `leptonc run` makes for that prompt).
The decode batch is the running slots left-padded to the longest, the same layout `leptonc run`
uses for a batch of prompts; it is kept between steps and rebuilt only when a slot joins or leaves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from leptonc.errors import InputError, UnsupportedRequestError
from leptonc.graph_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_POSITIONS, NEXT_TOKEN, POSITION_IDS, \
    past_names, present_names


class KvSlots(ABC):
    num_slots: int
    max_sequence: int
    vocab_size: int
    device: str = "cpu"
    prefill_in_chunks: bool = True  # whether a prompt may be prefilled over several calls
    prefill_budget: int = 0  # slots that prefill whole prompts: padded prompt tokens the engine gives one prefill_many
    pipelined: bool = False  # greedy steps can be queued ahead of their tokens (decode_launch / decode_collect)
    pipeline_depth: int = 1  # steps in flight at most
    async_prefill: bool = False  # greedy prefills can be queued ahead of their tokens (prefill_launch / _collect)
    warmed: dict | None = None  # what warm_up ran, where it runs anything (block_slots.py)

    @abstractmethod
    def prefill(self, slot: int, token_ids: list[int]) -> np.ndarray:
        """Append `token_ids` (a prompt, or its next chunk) to `slot`'s sequence; the logits [vocab] of the
        last one."""

    @abstractmethod
    def decode(self, slots: list[int], token_ids: np.ndarray, *, logits: bool = False
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """One token appended to each slot in `slots` (one batched step): (greedy next token per slot [n],
        logits [n, vocab] when `logits`, else None)."""

    @abstractmethod
    def length(self, slot: int) -> int:
        """Tokens held in `slot` (0 when free)."""

    @abstractmethod
    def free(self, slot: int) -> None:
        """Forget `slot`'s sequence; the slot can take a new one at once."""

    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> list[np.ndarray]:
        """Prefill several slots, each with its whole prompt (or next chunk); the logits [vocab] of each one's last
        token, in the given order. Implementations that can run them together do (block_slots.py)."""
        return [self.prefill(slot, ids) for slot, ids in zip(slots, prompts)]

    def prefill_tokens(self, slots: list[int], prompts: list[list[int]]) -> list[int]:
        """`prefill_many` for prompts whose first token is greedy: the argmax of each one's last logits (block_slots.py
        takes it from the graph's next_token and leaves the logits on the device)."""
        return [int(row.argmax()) for row in self.prefill_many(slots, prompts)]

    def decode_launch(self, slots: list[int], token_ids: np.ndarray | None):
        """Queue a greedy step (only where `pipelined`; block_slots.py)."""
        raise NotImplementedError(f"{type(self).__name__} runs its steps one at a time")

    def decode_collect(self, handle) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} runs its steps one at a time")

    def prefill_launch(self, slots: list[int], prompts: list[list[int]]):
        """Queue greedy prefills (only where `async_prefill`; block_slots.py)."""
        raise NotImplementedError(f"{type(self).__name__} runs its prefills one at a time")

    def prefill_collect(self, handle) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} runs its prefills one at a time")

    def drain(self) -> None:
        """Wait for steps in flight (nothing to wait for where steps run one at a time)."""

    def warm_up(self, token_id: int) -> bool:
        """Run the shapes serving will run before the first request does, leaving every slot free (block_slots.py:
        a CUDA graph per decode bucket); whether it ran a step. Nothing to do where each step is built as it comes."""
        return False

    def describe(self) -> dict:
        return {"slots": type(self).__name__, "num_slots": self.num_slots, "device": self.device}

    def release(self) -> None:  # noqa: B027 - optional
        """Free sessions and memory."""


class HostKvSlots(KvSlots):
    """Slots whose K/V rows live in host numpy arrays, on ONNX Runtime's CPU provider (module doc)."""

    device = "cpu"

    def __init__(self, model_path: Path, io: dict, settings: dict | None, *, num_slots: int, max_sequence: int):
        import onnxruntime as ort

        from leptonc.runtime.ort import session_options

        settings = settings or {}
        if settings.get("custom_ops_library"):
            raise UnsupportedRequestError("this bundle runs leptonc's CUDA kernels, which need a GPU",
                                          hint="serve it on a machine with an NVIDIA GPU, or serve a --target cpu bundle")
        self.session = ort.InferenceSession(str(model_path), session_options(settings, Path(model_path).parent),
                                            providers=["CPUExecutionProvider"])
        self.num_layers, self.kv_heads, self.head_dim = io["num_layers"], io["num_kv_heads"], io["head_dim"]
        self.kv_dtype = np.dtype(io["kv_dtype"])
        self.vocab_size = int(io["vocab_size"])
        self.num_slots, self.max_sequence = num_slots, max_sequence
        names = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        self.selects_logits = LOGITS_POSITIONS in names
        self.token_output = NEXT_TOKEN in outputs
        self._kv_fetches = present_names(self.num_layers)
        self._fetches = [LOGITS, *self._kv_fetches] + ([NEXT_TOKEN] if self.token_output else [])
        # A slot outside the decode batch: its K/V as [1, kv_heads, length, head_dim] per layer and kind.
        self._alone: dict[int, list[np.ndarray]] = {}
        self._lengths: dict[int, int] = {}
        # The decode batch: its slots in row order, K/V left-padded to the longest row, the mask so far.
        self._rows: list[int] = []
        self._past: list[np.ndarray] = []
        self._mask = np.zeros((0, 0), np.int64)

    def length(self, slot: int) -> int:
        return self._lengths.get(slot, 0)

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.num_slots - 1}")

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray],
             select: np.ndarray) -> list[np.ndarray]:
        feed = {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: positions}
        if self.selects_logits:
            feed[LOGITS_POSITIONS] = select
        for j, name in enumerate(past_names(self.num_layers)):
            feed[name] = past[j]
        return self.session.run(self._fetches, feed)

    def prefill(self, slot: int, token_ids: list[int]) -> np.ndarray:
        self._check(slot)
        if slot in self._rows:
            self._leave(slot)
        start, count = self.length(slot), len(token_ids)
        if count == 0:
            raise InputError("nothing to prefill: the prompt has no tokens")
        if start + count > self.max_sequence:
            raise InputError(f"sequence of {start + count} tokens exceeds this bundle's maximum of {self.max_sequence}")
        past = self._alone.get(slot) or [np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)] * (2 * self.num_layers)
        ids = np.asarray(token_ids, np.int64).reshape(1, count)
        mask = np.ones((1, start + count), np.int64)
        positions = np.arange(start, start + count, dtype=np.int64).reshape(1, count)
        outputs = self._run(ids, mask, positions, past, np.full((1, 1), count - 1, np.int64))
        self._alone[slot] = outputs[1:1 + 2 * self.num_layers]
        self._lengths[slot] = start + count
        logits = outputs[0]
        return (logits[0, -1] if self.selects_logits else logits[0, count - 1]).astype(np.float32, copy=False)

    def decode(self, slots: list[int], token_ids: np.ndarray, *, logits: bool = False
               ) -> tuple[np.ndarray, np.ndarray | None]:
        if list(slots) != self._rows:
            self._regroup(list(slots))
        batch = len(slots)
        for slot in slots:
            if self._lengths[slot] >= self.max_sequence:
                raise InputError(f"slot {slot} reached this bundle's limit of {self.max_sequence} tokens")
        self._mask = np.concatenate([self._mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = np.asarray([self._lengths[s] for s in slots], np.int64).reshape(batch, 1)
        ids = np.asarray(token_ids, np.int64).reshape(batch, 1)
        outputs = self._run(ids, self._mask, positions, self._past, np.zeros((batch, 1), np.int64))
        self._past = outputs[1:1 + 2 * self.num_layers]
        for slot in slots:
            self._lengths[slot] += 1
        step_logits = outputs[0].reshape(batch, -1)
        tokens = outputs[-1].reshape(batch) if self.token_output else step_logits.argmax(-1)
        return tokens.astype(np.int64), (step_logits.astype(np.float32, copy=False) if logits else None)

    def _rows_of_batch(self) -> dict[int, list[np.ndarray]]:
        """Each decode-batch slot's own K/V (its padding cut off)."""
        width = self._mask.shape[1]
        own = {}
        for r, slot in enumerate(self._rows):
            n = self._lengths[slot]
            own[slot] = [kv[r:r + 1, :, width - n:] for kv in self._past]
        return own

    def _regroup(self, slots: list[int]) -> None:
        """Rebuild the decode batch for `slots` (a slot joined or left): rows left-padded to the longest."""
        for slot in slots:
            self._check(slot)
            if slot not in self._lengths:
                raise ValueError(f"slot {slot} holds no sequence: prefill it first")
        own = {**self._rows_of_batch(), **self._alone}
        width = max(self._lengths[s] for s in slots)
        batch = len(slots)
        self._past = []
        for j in range(2 * self.num_layers):
            block = np.zeros((batch, self.kv_heads, width, self.head_dim), self.kv_dtype)
            for r, slot in enumerate(slots):
                n = self._lengths[slot]
                if n:
                    block[r, :, width - n:] = own[slot][j][0]
            self._past.append(block)
        self._mask = np.zeros((batch, width), np.int64)
        for r, slot in enumerate(slots):
            self._mask[r, width - self._lengths[slot]:] = 1
        # Slots that were in the batch but are not now keep their rows alone.
        for slot in self._rows:
            if slot not in slots:
                self._alone[slot] = own[slot]
        for slot in slots:
            self._alone.pop(slot, None)
        self._rows = slots

    def _leave(self, slot: int) -> None:
        """Take `slot` out of the decode batch, keeping its sequence (alone)."""
        rest = [s for s in self._rows if s != slot]
        own = self._rows_of_batch()
        self._alone[slot] = own[slot]
        if rest:
            self._regroup(rest)
        else:
            self._rows, self._past, self._mask = [], [], np.zeros((0, 0), np.int64)

    def free(self, slot: int) -> None:
        if slot in self._rows:
            self._leave(slot)
        self._alone.pop(slot, None)
        self._lengths.pop(slot, None)

    def release(self) -> None:
        self._alone, self._past, self._rows = {}, [], []
        self.session = None


def serves_on_cuda(engine: dict, device: str | None) -> bool:
    """Whether a bundle with this manifest `engine` record runs its sequences on CUDA: `device` ("cpu" or "cuda")
    when given, else the bundle's session provider."""
    return device == "cuda" or (device is None and engine.get("session", {}).get("provider") == "CUDAExecutionProvider")


def open_kv_slots(bundle, device: str | None = None, num_slots: int | None = None) -> KvSlots:
    """The slot implementation for a loaded bundle: its backend and device decide."""
    slots = int(num_slots or bundle.max_batch)
    if bundle.backend != "onnxruntime":
        raise UnsupportedRequestError(f"serving a {bundle.backend} bundle is not supported yet",
                                      hint="compile the model with the onnxruntime backend to serve it")
    if serves_on_cuda(bundle.engine, device) or bundle.engine.get("session", {}).get("gqa_lengths") == "mask_sum":
        from leptonc.runtime import open_bundle_runner
        from leptonc.runtime.block_slots import BlockKvSlots

        runner = open_bundle_runner(bundle, device)
        try:
            return BlockKvSlots(runner, slots)
        except BaseException:
            runner.release()
            raise
    return HostKvSlots(bundle.model_path, bundle.io, bundle.engine.get("session", {}), num_slots=slots,
                       max_sequence=bundle.max_sequence)
