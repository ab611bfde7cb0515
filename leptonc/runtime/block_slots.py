"""Slots as the rows of the I/O-binding runner's fixed K/V block: how CUDA bundles are served.

GPU bundles are built with the "mask_sum" attention contract (passes/fuse_gqa.py): each row's length is
the sum of its mask row, so a row's sequence is right-padded in a [batch, capacity] block and rows of
different lengths share one decode step of fixed shapes, the step ONNX Runtime captures as a CUDA graph.
`BlockKvSlots` keeps one such block of `num_slots` rows (`OrtCudaRunner._kv_block`) and one fixed decode
binding for it (`_decode_state`):

- `prefill(slot, ids)` runs the prompt at batch 1 bound to the slot's row of the block (uncaptured); the
  whole prompt at once (the contract's multi-token steps start from an empty row).
- `decode(slots, ids)` runs the captured step over every row: running slots get their token at their
  length; other rows compute a throw-away entry at their own next index (never read: their mask stops
  before it, and their next prefill or step writes that index again). One graph, one copy of the inputs.
- `free(slot)` zeroes the slot's mask row and length.

The same code runs on ONNX Runtime's CPU provider (device_type "cpu"), which is how CI checks it.
"""

from __future__ import annotations

import numpy as np

from leptonc.errors import InputError, UnsupportedRequestError
from leptonc.graph_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_POSITIONS, NEXT_TOKEN, POSITION_IDS
from leptonc.runtime.slots import KvSlots


class BlockKvSlots(KvSlots):
    prefill_in_chunks = False  # the mask_sum contract prefills a row from empty, in one run

    def __init__(self, runner, num_slots: int):
        if not getattr(runner, "right_pad", False):
            raise UnsupportedRequestError(
                "this bundle's attention takes sequence lengths from the mask's length, so sequences of different "
                "lengths cannot share its fixed-shape decode step", hint="recompile the bundle with this leptonc")
        self.runner = runner
        self.device = runner.device_type
        self.num_slots, self.max_sequence, self.vocab_size = num_slots, runner.capacity, runner.vocab_size
        runner._batch = num_slots
        runner._lengths = np.zeros(num_slots, np.int64)
        self.lengths = runner._lengths
        self.block = runner._kv_block(num_slots)
        self.state = runner._decode_state(num_slots)
        self.state["host_mask"][:] = 0

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def prefill(self, slot: int, token_ids: list[int]) -> np.ndarray:
        runner, count = self.runner, len(token_ids)
        if self.lengths[slot]:
            raise ValueError(f"slot {slot} holds a sequence: this bundle prefills a slot only from empty")
        if count == 0 or count > self.max_sequence:
            raise InputError(f"a prompt of {count} tokens; this bundle allows 1 to {self.max_sequence}")
        runner._feeds = []
        binding = runner.session.io_binding()
        binding.bind_ortvalue_input(INPUT_IDS, runner._ortvalue(np.asarray(token_ids, np.int64).reshape(1, count)))
        binding.bind_ortvalue_input(ATTENTION_MASK, runner._ortvalue(np.ones((1, count), np.int64)))
        binding.bind_ortvalue_input(POSITION_IDS, runner._ortvalue(np.arange(count, dtype=np.int64).reshape(1, count)))
        if runner.selects_logits:
            binding.bind_ortvalue_input(LOGITS_POSITIONS, runner._ortvalue(np.full((1, 1), count - 1, np.int64)))
        binding.bind_output(LOGITS, runner.device_type, runner.device_id)
        self.block.bind(binding, (slot, slot + 1))
        runner.session.run_with_iobinding(binding, runner._run_options(-1))
        logits = binding.get_outputs()[0].numpy()
        runner._feeds = []
        self.lengths[slot] = count
        self.state["host_mask"][slot, :count] = 1
        row = logits.reshape(-1) if runner.selects_logits else logits[0, count - 1]
        return row.astype(np.float32)

    def decode(self, slots: list[int], token_ids: np.ndarray, *, logits: bool = False
               ) -> tuple[np.ndarray, np.ndarray | None]:
        state, runner, n = self.state, self.runner, self.num_slots
        rows = np.asarray(slots, np.int64)
        if (self.lengths[rows] >= self.max_sequence).any():
            raise InputError(f"a sequence reached this bundle's limit of {self.max_sequence} tokens")
        idle = np.setdiff1d(np.arange(n), rows)
        idle = idle[self.lengths[idle] < self.max_sequence]
        state["host_ids"][:] = 0
        state["host_ids"][rows, 0] = np.asarray(token_ids, np.int64)
        state["host_pos"][:, 0] = np.minimum(self.lengths, self.max_sequence - 1)
        state["host_mask"][rows, self.lengths[rows]] = 1
        state["host_mask"][idle, self.lengths[idle]] = 1  # a throw-away entry for rows not in this step
        state["inputs"].update_inplace(state["host_inputs"])
        state["host_mask"][idle, self.lengths[idle]] = 0
        runner.session.run_with_iobinding(state["binding"], state["run_options"])
        self.lengths[rows] += 1
        step_logits = state[LOGITS].numpy().reshape(n, -1)[rows].astype(np.float32) if logits or not runner.token_output \
            else None
        tokens = (state[NEXT_TOKEN].numpy().reshape(n)[rows].copy() if runner.token_output
                  else step_logits.argmax(-1))
        return tokens.astype(np.int64), step_logits if logits else None

    def free(self, slot: int) -> None:
        self.state["host_mask"][slot] = 0
        self.lengths[slot] = 0

    def describe(self) -> dict:
        return {**super().describe(), **self.runner.describe()}

    def release(self) -> None:
        self.runner.release()
