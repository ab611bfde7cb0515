"""The I/O-binding runner's decode step at fixed device addresses, and the pipelined greedy decode built on it.

- **fixed addresses** (the shared K/V layout): a batch size's decode binding is made once (`_decode_state`): ids,
  positions, the K/V block and the logits (and `next_token`) at addresses that never change; a step copies only the
  new ids and positions in place. For right-padded graphs ("gqa_lengths": "mask_sum") the [B, capacity] mask is a
  fixed buffer too, which is what lets ONNX Runtime capture the step as a CUDA graph.
- **pipelined greedy decode** (`greedy_tokens`, what `leptonc run` and `leptonc bench` use at temperature 0): ONNX
  Runtime runs on a stream of the runner's (leptonc/runtime/ort_cuda_session.py), a step's ids are copied on the
  device from the step before's `next_token`, and up to PIPELINE_DEPTH steps queue ahead of the token the host reads,
  so the GPU does not wait for the host between steps (on the H100: +3% on llama-1b-shape, +16% on smollm2 at
  batch 1, BENCHMARKS.md).

`FixedAddressDecode` is a part of `OrtCudaRunner` kept in its own file; it uses the runner's session, provider,
K/V blocks (`_static`) and right-padded lengths.
"""

from __future__ import annotations

import numpy as np

from leptonc.errors import InputError
from leptonc.graph_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_POSITIONS, NEXT_TOKEN, POSITION_IDS
from leptonc.runtime.base import Runner

PIPELINE_DEPTH = 2  # greedy steps launched ahead of the one whose token the host reads (greedy_tokens)


class FixedAddressDecode(Runner):
    """The decode binding made once per batch size, and the pipelined greedy decode (module doc)."""

    def _decode_state(self, batch: int) -> dict:
        """The shared layout's decode binding for one batch size, made once: ids, positions, K/V (past and
        present on one buffer) and logits at fixed device addresses. Each step only copies the new ids
        and positions in place; for right-padded graphs the mask is a fixed [B, capacity] buffer too,
        which is what lets the step be captured as a CUDA graph."""
        static = self._static[batch]
        if "binding" not in static:
            static[LOGITS] = self._empty((batch, 1, self.vocab_size), self.logits_dtype)
            b = self.session.io_binding()
            if self.right_pad:
                # ids, positions and the [B, capacity] mask are three views of one device buffer (and of one
                # host array), so a step's inputs reach the device in one copy, not three.
                # Each view starts on a 256-byte boundary, as a separate allocation would.
                cap, seg = self.capacity, -(-batch // 32) * 32
                static["inputs"] = self._empty((2 * seg + batch * cap,), np.int64)
                host = static["host_inputs"] = np.zeros(2 * seg + batch * cap, np.int64)
                static["host_ids"], static["host_pos"] = host[:batch].reshape(batch, 1), host[seg:seg + batch].reshape(batch, 1)
                static["host_mask"] = host[2 * seg:].reshape(batch, cap)
                ptr = static["inputs"].data_ptr()
                for name, shape, offset in ((INPUT_IDS, [batch, 1], 0), (POSITION_IDS, [batch, 1], seg),
                                            (ATTENTION_MASK, [batch, cap], 2 * seg)):
                    b.bind_input(name, self.device_type, self.device_id, np.int64, shape, ptr + 8 * offset)
            else:
                static["ids"] = self._empty((batch, 1), np.int64)
                static["pos"] = self._empty((batch, 1), np.int64)
                b.bind_ortvalue_input(INPUT_IDS, static["ids"])
                b.bind_ortvalue_input(POSITION_IDS, static["pos"])
            static["kv"].bind(b)
            b.bind_ortvalue_output(LOGITS, static[LOGITS])
            if self.token_output:
                static[NEXT_TOKEN] = self._empty((batch, 1), np.int64)
                b.bind_ortvalue_output(NEXT_TOKEN, static[NEXT_TOKEN])
            if self.selects_logits:  # the one new position of each row: a constant buffer of zeros
                static[LOGITS_POSITIONS] = self.ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((batch, 1), np.int64), self.device_type, self.device_id)
                b.bind_ortvalue_input(LOGITS_POSITIONS, static[LOGITS_POSITIONS])
            if self.cuda_graph:
                self._graph_ids.setdefault(batch, len(self._graph_ids) + 1)
                static["run_options"] = self._run_options(self._graph_ids[batch])
            else:
                static["run_options"] = self.ort.RunOptions()
            static["binding"] = b
        return static

    def _reset_decode_mask(self, batch: int) -> None:
        state = self._decode_state(batch)
        host_mask = state["host_mask"]
        host_mask[:] = 0
        host_mask[np.arange(self.capacity)[None, :] < self._lengths[:, None]] = 1

    def _next_host_inputs(self, state: dict, ids: np.ndarray) -> None:
        """The right-padded layout's next step on the host: row b's new token sits at index len_b, which is its
        position and the mask entry that turns on."""
        state["host_ids"][:] = ids
        state["host_pos"][:, 0] = self._lengths
        state["host_mask"][np.arange(self._batch), self._lengths] = 1
        self._lengths += 1

    def _decode_shared(self, ids: np.ndarray) -> dict:
        state = self._decode_state(self._batch)
        if self.right_pad:
            self._next_host_inputs(state, ids)
            state["inputs"].update_inplace(state["host_inputs"])
        else:
            state["ids"].update_inplace(ids)
            state["pos"].update_inplace(np.ascontiguousarray(self._positions))
            self._feeds = []
            state["binding"].bind_ortvalue_input(ATTENTION_MASK, self._ortvalue(self._mask))
        self.session.run_with_iobinding(state["binding"], state["run_options"])
        return {name: state[name] for name in (LOGITS, NEXT_TOKEN) if name in state}

    # ---- pipelined greedy decode ------------------------------------------------------------------

    def greedy_tokens(self, token_ids: np.ndarray, steps: int):
        """Yield the greedy next tokens of `steps` decode steps, [batch] each, as Runner.greedy_tokens does.

        With the pipeline on (describe()'s greedy_pipeline), up to PIPELINE_DEPTH steps are queued on the device
        ahead of the one whose token the host reads: a step's input ids are copied on the device from the step
        before's next_token output, its positions and mask come from a page-locked host slot of its own, and ONNX
        Runtime returns without waiting for the GPU (run option disable_synchronize_execution_providers). The GPU
        then runs steps back to back instead of waiting for the host between them. A caller that stops early
        (closes the generator) gets the runner back as if only the steps it read had run."""
        if not self.pipelined:
            yield from super().greedy_tokens(token_ids, steps)
            return
        if self._total == 0:
            raise RuntimeError("decode before prefill")
        batch, d, stream = self._batch, self._driver, self._stream
        state = self._decode_state(batch)
        pipe = self._pipeline_state(batch, state)
        allowed = max(0, min(steps, self.max_sequence - self._total))
        first = np.asarray(token_ids, dtype=np.int64).reshape(batch)
        inputs_ptr, token_ptr = state["inputs"].data_ptr(), state[NEXT_TOKEN].data_ptr()
        launched = consumed = 0
        try:
            while consumed < allowed:
                while launched < allowed and launched - consumed < PIPELINE_DEPTH:
                    slot = pipe["slots"][launched % PIPELINE_DEPTH]
                    self._next_host_inputs(state, first.reshape(batch, 1) if launched == 0 else 0)
                    self._total += 1
                    np.copyto(slot["inputs"], state["host_inputs"])
                    d.copy(inputs_ptr, slot["inputs"].ctypes.data, slot["inputs"].nbytes, stream)
                    if launched > 0:  # this step's ids: the step before's greedy tokens, still on the device
                        d.copy(inputs_ptr, token_ptr, 8 * batch, stream)
                    self.session.run_with_iobinding(state["binding"], pipe["run_options"])
                    d.copy(slot["tokens"].ctypes.data, token_ptr, 8 * batch, stream)
                    d.record(slot["event"], stream)
                    launched += 1
                slot = pipe["slots"][consumed % PIPELINE_DEPTH]
                d.wait(slot["event"])
                consumed += 1
                yield slot["tokens"].copy()
        finally:
            if launched > consumed:  # stopped early: forget the steps nobody read (their cache entries are masked)
                d.sync(stream)
                self._lengths -= launched - consumed
                self._total -= launched - consumed
                self._reset_decode_mask(batch)
        if allowed < steps:
            raise InputError(f"sequence reached this bundle's limit of {self.max_sequence} tokens")

    def _pipeline_state(self, batch: int, state: dict) -> dict:
        """Page-locked host slots (inputs and tokens) and an event for each step in flight; made once per batch."""
        if "pipeline" not in state:
            d = self._driver
            run_options = self._run_options(self._graph_ids.get(batch, -1))
            run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            slots = [{"inputs": d.pinned(state["host_inputs"].size), "tokens": d.pinned(batch), "event": d.event()}
                     for _ in range(PIPELINE_DEPTH)]
            state["pipeline"] = {"run_options": run_options, "slots": slots}
        return state["pipeline"]

    def _release_stream(self) -> None:
        if self._stream is not None:
            self._driver.destroy_stream(self._stream)
        self._stream = None
