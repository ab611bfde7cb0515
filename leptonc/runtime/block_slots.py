"""Slots as the rows of the I/O-binding runner's fixed K/V block: how CUDA bundles are served.

GPU bundles are built with the "mask_sum" attention contract (passes/fuse_gqa.py): each row's length is
the sum of its mask row, so a row's sequence is right-padded in a [batch, capacity] block and rows of
different lengths share one decode step of fixed shapes, the step ONNX Runtime captures as a CUDA graph.
`BlockKvSlots` keeps one such block of `num_slots` rows (`OrtCudaRunner._kv_block`):

- `prefill_many(slots, prompts)` runs prompts into empty rows; prompts whose slots are neighbours run as one
  right-padded batch (each row's last position's logits selected), so a burst of arrivals costs a few batched
  runs, not one run per prompt. A prompt is never split: the contract's multi-token steps start from an empty row.
  `prefill_tokens` is the same for prompts whose first token is greedy: each one's token comes from the graph's
  next_token, and the logits rows (a vocabulary of float32 each) are not copied to the host.
- `decode(slots, ids)` runs one step over the lowest rows that cover the running slots, rounded up to a bucket
  (1, 2, 4, ... num_slots rows): a step of 3 sequences in slots 0-2 costs a 4-row step, not a num_slots-row one.
  Each bucket has its own binding (and its own captured CUDA graph) over a prefix of the same block and of one
  input buffer [ids | positions | mask], so a step copies only its bucket's prefix of the inputs to the device.
  Rows of the bucket not in the step compute a throw-away entry at their own next index (never read: their
  mask stops before it, and their next prefill or step writes that index again).
- `free(slot)` zeroes the slot's mask row and length.
- `warm_up(token)` runs every decode bucket (ONNX Runtime captures a bucket's CUDA graph on its first runs) and
  prefill runs of every multiple of 64 tokens within the budget before the engine says it is ready, so the first
  requests do not pay for them.
- **pipelined greedy steps** (CUDA, where the runner has a stream of its own): `decode_launch` queues a step on the
  device and returns at once, `decode_collect` waits for its tokens. A step whose sequences all ran in the step
  before takes its ids from that step's `next_token` on the device, so the engine can queue the next step before it
  reads this one's tokens, and the GPU does not wait for the host (or for Python's lock) between steps. Each step in
  flight has its own page-locked copy of the inputs.
- **pipelined prefills** (`async_prefill`: pipelined slots whose graph selects the logits' rows): `prefill_launch`
  queues a greedy prefill behind the steps in flight and returns at once; each prompt's first token is written
  into next_tokens at its row, so the next step launched takes it as that row's id, and copied to the host for
  `prefill_collect`. So a prefill leaves no gap on the device: no drain before it, no restart from host ids after.
  Its inputs go to the device as a step's do, through a page-locked copy on the stream.

The engine (batching.py) takes the lowest free slot first, so running sequences stay packed at the low rows.
The same code runs on ONNX Runtime's CPU provider (device_type "cpu"), which is how CI checks it.
"""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np

from leptonc.errors import InputError, UnsupportedRequestError
from leptonc.graph_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_POSITIONS, NEXT_TOKEN, POSITION_IDS
from leptonc.runtime.slots import KvSlots

BUCKET_GRAPH_IDS = 1000  # CUDA graph ids of the decode buckets: 1000 + rows (the runner's own use 1, 2, ...)
# warm_up on CUDA: runs of each decode bucket (ONNX Runtime captures a graph id's CUDA graph within its first runs),
# and prefill runs of every multiple of WARMUP_PREFILL_GRID tokens within the budget (warmup_prefill_shapes). On the
# H100 a prefill of a token count the process has not run before took 4-16 ms more than the same run again; after
# this warm-up a count on the grid costs nothing extra, in whatever rows it comes (off the grid it still may). On
# the CPU, where nothing is captured, one run of each bucket and one narrow prefill, so CI runs the same code cheaply.
WARMUP_DECODE_RUNS = 3
WARMUP_PREFILL_GRID = 64
WARMUP_PREFILL_WIDTH = 512  # widest prompt a warm-up run uses; larger token counts take more rows
PIPELINE_DEPTH = 3  # greedy steps in flight at most (decode_launch): slack for the host to take a step's tokens
# and to launch a prefill (on the H100, 5 and 8 served 3-8% fewer tokens/s than 3)


def decode_buckets(num_slots: int) -> list[int]:
    """The row counts a decode step may run at: powers of two below num_slots, and num_slots."""
    return sorted({1 << k for k in range(num_slots.bit_length()) if 1 << k < num_slots} | {num_slots})


def warmup_prefill_shapes(budget: int, capacity: int, num_slots: int, grid: int = WARMUP_PREFILL_GRID
                          ) -> list[tuple[int, int]]:
    """The (rows, width) of the warm-up's prefill runs: one narrow run (16 tokens), then one run of each multiple of
    `grid` tokens up to the budget, as one row up to WARMUP_PREFILL_WIDTH tokens and beyond that as the fewest rows
    (a power of two) that hold it within the width and the slots."""
    shapes = [(1, min(16, capacity - 1))]
    for tokens in range(grid, budget + 1, grid):
        rows = 1
        while tokens // rows > min(WARMUP_PREFILL_WIDTH, capacity - 1) and rows * 2 <= num_slots:
            rows *= 2
        if tokens % rows == 0 and tokens // rows <= capacity - 1:
            shapes.append((rows, tokens // rows))
    return shapes


def prefill_runs(slots: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """The runs a prefill of prompts (of `lengths` tokens) into `slots` takes: indexes into both, neighbouring slots
    together, each run's rows x longest prompt within the budget of padded tokens."""
    runs: list[list[int]] = []
    run: list[int] = []
    for i in sorted(range(len(slots)), key=lambda i: slots[i]):
        longest = max([lengths[j] for j in run] + [lengths[i]])
        if run and (slots[i] != slots[run[-1]] + 1 or (len(run) + 1) * longest > budget):
            runs.append(run)
            run = []
        run.append(i)
    return runs + [run] if run else runs


class BlockKvSlots(KvSlots):
    prefill_in_chunks = False  # the mask_sum contract prefills a row from empty, in one run
    # async_prefill (KvSlots) is on for pipelined slots whose graph selects the logits' rows, unless the warm-up's
    # check turns it off: then this says why
    queued_prefills = "off: needs pipelined steps and a graph that selects the logits' rows"

    def __init__(self, runner, num_slots: int):
        if not getattr(runner, "right_pad", False):
            raise UnsupportedRequestError(
                "this bundle's attention takes sequence lengths from the mask's length, so sequences of different "
                "lengths cannot share its fixed-shape decode step", hint="recompile the bundle with this leptonc")
        self.runner = runner
        self.device = runner.device_type
        self.num_slots, self.max_sequence, self.vocab_size = num_slots, runner.capacity, runner.vocab_size
        self.prefill_budget = runner.prefill_tokens  # padded prompt tokens per prefill run (engine setting)
        self.lengths = np.zeros(num_slots, np.int64)
        self.block = runner._kv_block(num_slots)
        self.buckets = decode_buckets(num_slots)
        # One input buffer for every bucket: [ids (seg) | positions (seg) | mask (num_slots x capacity)]; bucket b
        # binds the first b entries of each part, so its inputs are the buffer's first 2 x seg + b x capacity.
        self._seg = -(-num_slots // 32) * 32
        cap = self.max_sequence
        self.host = np.zeros(2 * self._seg + num_slots * cap, np.int64)
        self.host_ids, self.host_pos = self.host[:num_slots], self.host[self._seg:self._seg + num_slots]
        self.host_mask = self.host[2 * self._seg:].reshape(num_slots, cap)
        self.inputs = runner._empty((self.host.size,), np.int64)
        self.next_tokens = runner._empty((num_slots,), np.int64)  # every bucket's next_token: a prefix of this
        # zeros, not whatever the memory held: a step whose ids come from here reads its idle rows' entries too, and
        # after a prefill joins (prefill_launch) the bucket may cover rows no step has written yet
        self.next_tokens.update_inplace(np.zeros(num_slots, np.int64))
        self._states: dict[int, dict] = {}
        self.steps_by_bucket: dict[int, int] = dict.fromkeys(self.buckets, 0)
        driver = getattr(runner, "_driver", None)
        self.pipelined = False
        self._stages: list[dict] = []
        self._prefill_stage: dict | None = None  # the prefill in flight (prefill_launch): its tokens' page-locked copy
        self._launched = 0
        self.warmed = None  # what warm_up ran: decode buckets, runs of each, prefill [rows, width], seconds
        self.prefill_runs_by_result = {"tokens": 0, "logits": 0}  # greedy first tokens from the graph, or logits
        self.last_prefill_runs = 0  # the model runs the last prefill_many / prefill_tokens took
        self._context_thread: int | None = None  # the thread on which _driver() last made the context current
        self._options = None  # prefill_launch's run options (no wait for the device at the end of the run)
        self.pipeline_depth = PIPELINE_DEPTH
        if runner.device_type == "cuda" and driver is not None and runner._stream is not None and runner.token_output:
            self._start_pipeline(driver)

    def _start_pipeline(self, driver) -> None:
        """Pipelined steps and prefills (module doc): page-locked inputs and tokens for each step in flight, and
        the prefill's tokens. (Tests start it on the CPU provider with a driver over host memory.)"""
        self.pipelined = True
        self._stages = [{"inputs": driver.pinned(self.host.size), "tokens": driver.pinned(self.num_slots),
                         "event": driver.event(), "busy": False} for _ in range(self.pipeline_depth)]
        # a queued prefill's inputs (ids, mask, positions, logits positions of each run) go through a page-locked
        # copy into one device buffer with the stream's own copy, as a step's do: no copy that waits for the device
        # (one run always fits; a launch's later runs that do not are made as the waited path makes its inputs)
        words = 3 * (self.prefill_budget + self.max_sequence) + 2 * self.num_slots
        self._prefill_stage = {"tokens": driver.pinned(self.num_slots), "event": driver.event(), "busy": False,
                               "inputs": driver.pinned(words), "device": self.runner._empty((words,), np.int64)}
        self.async_prefill = bool(self.runner.selects_logits)  # a run's first tokens are [rows, 1]: one copy each

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    # ---- prefill ----------------------------------------------------------------------------------

    def prefill(self, slot: int, token_ids: list[int]) -> np.ndarray:
        return self.prefill_many([slot], [token_ids])[0]

    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> list[np.ndarray]:
        return self._prefill_runs(slots, prompts, tokens=False)

    def prefill_tokens(self, slots: list[int], prompts: list[list[int]]) -> list[int]:
        if not self.runner.token_output:
            return super().prefill_tokens(slots, prompts)
        return self._prefill_runs(slots, prompts, tokens=True)

    def _prefill_runs(self, slots: list[int], prompts: list[list[int]], *, tokens: bool) -> list:
        results: list = [None] * len(slots)
        for run in self._planned_runs(slots, prompts):
            self._prefill_rows(run, slots, prompts, results, tokens)
        return results

    def _planned_runs(self, slots: list[int], prompts: list[list[int]]) -> list[list[int]]:
        for slot, ids in zip(slots, prompts):
            if self.lengths[slot]:
                raise ValueError(f"slot {slot} holds a sequence: this bundle prefills a slot only from empty")
            if len(ids) == 0 or len(ids) > self.max_sequence:
                raise InputError(f"a prompt of {len(ids)} tokens; this bundle allows 1 to {self.max_sequence}")
        runs = prefill_runs(slots, [len(p) for p in prompts], self.prefill_budget)
        self.last_prefill_runs = len(runs)
        return runs

    def _prefill_binding(self, run: list[int], slots: list[int], prompts: list[list[int]], tokens: bool,
                         staged: int | None = None):
        """The binding of one run over neighbouring rows slots[run[0]]..slots[run[-1]], prompts right-padded to the
        longest, and the prompts' lengths. The rows' lengths and mask are set: the run fills them. Its inputs are
        in runner._feeds, or (`staged`, prefill_launch) in the prefill stage's buffers from that word on, copied on
        the stream where they fit; the third value is the first word the next run may use (`staged` unchanged where
        they were not staged). `tokens`: the graph's next_token is bound last (after
        the cache); on pipelined slots (prefill_launch) straight into the rows' entries of next_tokens, where the
        next step takes its ids."""
        runner = self.runner
        r0, count = slots[run[0]], len(run)
        lengths = np.asarray([len(prompts[i]) for i in run], np.int64)
        width = int(lengths.max())
        ids = np.zeros((count, width), np.int64)
        for r, i in enumerate(run):
            ids[r, :lengths[r]] = prompts[i]
        inputs = {INPUT_IDS: ids, ATTENTION_MASK: (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64),
                  POSITION_IDS: np.broadcast_to(np.arange(width, dtype=np.int64), (count, width))}
        if runner.selects_logits:
            inputs[LOGITS_POSITIONS] = (lengths - 1).reshape(count, 1)
        runner._feeds = []
        binding = runner.session.io_binding()
        # an input the graph does not read stays on the host (runner._bind): bound on the device, ONNX Runtime would
        # copy it to the host, waiting for every step queued ahead
        for name in [name for name in inputs if name in runner.unread_inputs]:
            runner._bind(binding, name, inputs.pop(name))
        stage = self._prefill_stage
        if staged is None or staged + sum(a.size for a in inputs.values()) > stage["inputs"].size:
            for name, array in inputs.items():
                runner._bind(binding, name, array)
        else:
            start = staged
            for name, array in inputs.items():
                stage["inputs"][staged:staged + array.size] = array.reshape(-1)
                binding.bind_input(name, runner.device_type, runner.device_id, np.int64, list(array.shape),
                                   stage["device"].data_ptr() + 8 * staged)
                staged += array.size
            self._driver().copy(stage["device"].data_ptr() + 8 * start, stage["inputs"].ctypes.data + 8 * start,
                                8 * (staged - start), runner._stream)
        binding.bind_output(LOGITS, runner.device_type, runner.device_id)
        self.block.bind(binding, (r0, r0 + count))
        if tokens and self.async_prefill:
            binding.bind_output(NEXT_TOKEN, runner.device_type, runner.device_id, np.int64, [count, 1],
                                self.next_tokens.data_ptr() + 8 * r0)
        elif tokens:
            binding.bind_output(NEXT_TOKEN, runner.device_type, runner.device_id)
        for r, i in enumerate(run):
            self.lengths[slots[i]] = lengths[r]
            self.host_mask[slots[i], :lengths[r]] = 1
        self.prefill_runs_by_result["tokens" if tokens else "logits"] += 1
        return binding, lengths, staged

    def _prefill_rows(self, run: list[int], slots: list[int], prompts: list[list[int]], results: list,
                      tokens: bool) -> None:
        """One run, waited for: each prompt's result is its last logits (float32 [vocab]) or, `tokens`, the graph's
        next_token there (the logits stay on the device)."""
        runner = self.runner
        binding, lengths, _ = self._prefill_binding(run, slots, prompts, tokens)
        runner.session.run_with_iobinding(binding, runner._run_options(-1))
        out = binding.get_outputs()[-1 if tokens else 0].numpy()
        runner._feeds = []
        for r, i in enumerate(run):
            last = 0 if runner.selects_logits else lengths[r] - 1
            results[i] = int(out[r, last]) if tokens else out[r, last].reshape(-1).astype(np.float32)

    def prefill_launch(self, slots: list[int], prompts: list[list[int]]) -> dict:
        """Queue the greedy prefill of `prompts` into empty `slots` behind the steps in flight and return at once
        (async_prefill slots): each prompt's first token lands in next_tokens at its row, where the next step
        launched takes it as its id, and in a page-locked copy that prefill_collect reads. One prefill is in
        flight at a time: its inputs and outputs are kept until it is collected."""
        stage, runner = self._prefill_stage, self.runner
        if not self.async_prefill or stage["busy"]:
            raise RuntimeError("prefill_launch: needs async_prefill slots and no prefill in flight")
        d, stream = self._driver(), runner._stream
        kept = []
        if self._options is None:
            self._options = runner._run_options(-1)
            self._options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        staged = 0  # each run's inputs after the last one's: all of them may be on the stream at once
        try:
            for run in self._planned_runs(slots, prompts):
                binding, _, staged = self._prefill_binding(run, slots, prompts, tokens=True, staged=staged)
                runner.session.run_with_iobinding(binding, self._options)
                kept.append((binding, runner._feeds))
                runner._feeds = []
                r0 = slots[run[0]]
                d.copy(stage["tokens"].ctypes.data + 8 * r0, self.next_tokens.data_ptr() + 8 * r0, 8 * len(run),
                       stream)
        except BaseException:
            d.sync(stream)  # the runs already queued finish before their inputs are let go
            raise
        d.record(stage["event"], stream)
        stage["busy"] = True
        return {"slots": list(slots), "kept": kept}

    def prefill_collect(self, handle: dict) -> list[int]:
        """The first tokens of a launched prefill, in its slots' order (waits for it)."""
        stage = self._prefill_stage
        self._driver().wait(stage["event"])
        stage["busy"] = False
        handle["kept"] = []
        return [int(stage["tokens"][slot]) for slot in handle["slots"]]

    # ---- decode -----------------------------------------------------------------------------------

    def _state(self, rows: int) -> dict:
        """The decode binding of a bucket of `rows` rows, made once: prefixes of the input buffer and of the K/V
        block, and its own logits (and next_token) outputs."""
        state = self._states.get(rows)
        if state is None:
            runner = self.runner
            binding = runner.session.io_binding()
            ptr, seg, cap = self.inputs.data_ptr(), self._seg, self.max_sequence
            for name, shape, offset in ((INPUT_IDS, [rows, 1], 0), (POSITION_IDS, [rows, 1], seg),
                                        (ATTENTION_MASK, [rows, cap], 2 * seg)):
                binding.bind_input(name, runner.device_type, runner.device_id, np.int64, shape, ptr + 8 * offset)
            self.block.bind(binding, (0, rows))
            state = {LOGITS: runner._empty((rows, 1, self.vocab_size), runner.logits_dtype)}
            binding.bind_ortvalue_output(LOGITS, state[LOGITS])
            if runner.token_output:
                binding.bind_output(NEXT_TOKEN, runner.device_type, runner.device_id, np.int64, [rows, 1],
                                    self.next_tokens.data_ptr())
            if runner.selects_logits:  # each row's one new position: zeros
                state[LOGITS_POSITIONS] = runner.ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((rows, 1), np.int64), runner.device_type, runner.device_id)
                binding.bind_ortvalue_input(LOGITS_POSITIONS, state[LOGITS_POSITIONS])
            state["binding"] = binding
            state["run_options"] = runner._run_options(BUCKET_GRAPH_IDS + rows)
            state["async_options"] = runner._run_options(BUCKET_GRAPH_IDS + rows)
            state["async_options"].add_run_config_entry("disable_synchronize_execution_providers", "1")
            state["nbytes"] = 8 * (2 * seg + rows * cap)
            self._states[rows] = state
        return state

    def _driver(self):
        """The runner's CUDA driver with the device's context current on this thread (the engine steps on a thread
        of its own)."""
        driver = self.runner._driver
        if self._context_thread != threading.get_ident():
            driver.make_current()
            self._context_thread = threading.get_ident()
        return driver

    def _copy_inputs(self, nbytes: int, bucket: int) -> None:
        """The input buffer's first `nbytes` to the device, before the step (in the session's stream order)."""
        runner = self.runner
        if self.device == "cpu":
            ctypes.memmove(self.inputs.data_ptr(), self.host.ctypes.data, nbytes)
        elif getattr(runner, "_driver", None) is not None and runner._stream is not None:
            self._driver().copy(self.inputs.data_ptr(), self.host.ctypes.data, nbytes, runner._stream)
        else:  # no stream of ours: the whole buffer, on ONNX Runtime's copy path
            self.inputs.update_inplace(self.host)

    def _step_inputs(self, rows: np.ndarray, token_ids: np.ndarray | None, copy) -> tuple[int, dict]:
        """The host side of a step over `rows`: ids (unless None: they come from the device), positions and the mask
        with a throw-away entry for the bucket's other rows, handed to `copy(nbytes)` before those entries are
        taken back. (bucket, its state)."""
        lengths, cap = self.lengths, self.max_sequence
        if (lengths[rows] >= cap).any():
            raise InputError(f"a sequence reached this bundle's limit of {cap} tokens")
        bucket = next(b for b in self.buckets if b > rows.max())
        state = self._state(bucket)
        active = np.zeros(bucket, bool)
        active[rows] = True
        idle = np.flatnonzero(~active & (lengths[:bucket] < cap))
        if token_ids is not None:
            self.host_ids[:bucket] = 0
            self.host_ids[rows] = np.asarray(token_ids, np.int64).reshape(-1)
        self.host_pos[:bucket] = np.minimum(lengths[:bucket], cap - 1)
        self.host_mask[rows, lengths[rows]] = 1
        self.host_mask[idle, lengths[idle]] = 1  # a throw-away entry for rows not in this step
        copy(state["nbytes"], bucket)
        self.host_mask[idle, lengths[idle]] = 0
        lengths[rows] += 1
        self.steps_by_bucket[bucket] += 1
        return bucket, state

    def decode(self, slots: list[int], token_ids: np.ndarray, *, logits: bool = False
               ) -> tuple[np.ndarray, np.ndarray | None]:
        runner = self.runner
        self.drain()
        rows = np.asarray(slots, np.int64)
        bucket, state = self._step_inputs(rows, token_ids, self._copy_inputs)
        runner.session.run_with_iobinding(state["binding"], state["run_options"])
        want = logits or not runner.token_output
        step_logits = state[LOGITS].numpy().reshape(bucket, -1)[rows].astype(np.float32) if want else None
        tokens = (self.next_tokens.numpy()[rows] if runner.token_output else step_logits.argmax(-1))
        return tokens.astype(np.int64), step_logits if logits else None

    # ---- pipelined greedy steps (CUDA) ------------------------------------------------------------

    def decode_launch(self, slots: list[int], token_ids: np.ndarray | None) -> dict:
        """Queue one greedy step over `slots` and return at once (module doc). `token_ids` None: every slot ran in
        the step launched last, and its id is that step's next_token, on the device. At most pipeline_depth
        steps are in flight: collect the oldest before launching past that."""
        runner, d, stream = self.runner, self._driver(), self.runner._stream
        stage = self._stages[self._launched % len(self._stages)]
        if stage["busy"]:
            raise RuntimeError("decode_launch: collect the oldest step in flight first")
        rows = np.asarray(slots, np.int64)
        staged, base, seg = stage["inputs"], self.inputs.data_ptr(), self._seg

        def copy(nbytes: int, bucket: int) -> None:
            words = nbytes // 8
            np.copyto(staged[:words], self.host[:words])
            if token_ids is None:  # positions and mask from the host, ids from the last step's next_token
                d.copy(base + 8 * seg, staged.ctypes.data + 8 * seg, nbytes - 8 * seg, stream)
                d.copy(base, self.next_tokens.data_ptr(), 8 * bucket, stream)
            else:
                d.copy(base, staged.ctypes.data, nbytes, stream)

        bucket, state = self._step_inputs(rows, token_ids, copy)
        runner.session.run_with_iobinding(state["binding"], state["async_options"])
        d.copy(stage["tokens"].ctypes.data, self.next_tokens.data_ptr(), 8 * bucket, stream)
        d.record(stage["event"], stream)
        stage["busy"] = True
        self._launched += 1
        return {"stage": stage, "rows": rows}

    def decode_collect(self, handle: dict) -> np.ndarray:
        """The greedy tokens of a launched step, for its slots in launch order (waits for the step)."""
        stage = handle["stage"]
        self._driver().wait(stage["event"])
        stage["busy"] = False
        return stage["tokens"][handle["rows"]].copy()

    def drain(self) -> None:
        """Wait for every launched step (their tokens are dropped: the caller collects the ones it wants first)."""
        stages = self._stages + ([self._prefill_stage] if self._prefill_stage else [])
        if any(stage["busy"] for stage in stages):
            self._driver().sync(self.runner._stream)
            for stage in stages:
                stage["busy"] = False

    def free(self, slot: int) -> None:
        self.host_mask[slot] = 0
        self.lengths[slot] = 0

    def warm_up(self, token_id: int) -> bool:
        if self.lengths.any():
            raise RuntimeError("warm_up runs before any sequence holds a slot")
        cuda, started = self.device == "cuda", time.perf_counter()
        slots, shapes = list(range(self.num_slots)), []
        grid = warmup_prefill_shapes(self.prefill_budget, self.max_sequence, self.num_slots)
        for rows, width in grid if cuda else grid[:1]:
            self.prefill_tokens(slots[:rows], [[token_id] * width] * rows)
            for slot in slots[:rows]:
                self.free(slot)
            shapes.append([rows, width])
        runs = min(WARMUP_DECODE_RUNS if cuda else 1, self.max_sequence - 1)  # each run adds a token to every row
        if runs > 0:
            self.prefill_many(slots, [[token_id]] * self.num_slots)
            ids = np.full(self.num_slots, token_id, np.int64)
            for bucket in self.buckets:
                for _ in range(runs):
                    self.decode(slots[:bucket], ids[:bucket])
            for slot in slots:
                self.free(slot)
        if self.async_prefill:
            self._check_queued_prefill(token_id)
        self.steps_by_bucket = dict.fromkeys(self.buckets, 0)  # the serving's own steps are counted from here
        self.prefill_runs_by_result = {"tokens": 0, "logits": 0}
        self.warmed = {"decode_buckets": list(self.buckets) if runs else [], "runs_each": runs,
                       "prefill_shapes": shapes, "seconds": round(time.perf_counter() - started, 2),
                       "queued_prefills": "on" if self.async_prefill else self.queued_prefills}
        return bool(shapes) or runs > 0

    def _check_queued_prefill(self, token_id: int) -> None:
        """Before serving: a queued prefill (prefill_launch) must give the first tokens a waited one gives, here and
        in the next_tokens rows the next step reads. Where it fails or differs, prefills are waited for, and
        describe() says why."""
        slots = list(range(min(2, self.num_slots)))
        prompts = [[token_id] * min(16, self.max_sequence - 1), [token_id] * min(9, self.max_sequence - 1)][:len(slots)]
        try:
            waited = self.prefill_tokens(slots, prompts)
            self._reset(slots, -1)  # a sentinel: the queued prefill must write these rows of next_tokens
            queued = self.prefill_collect(self.prefill_launch(slots, prompts))
            rows = self.next_tokens.numpy().reshape(-1)[:len(slots)].tolist()
            problem = None if queued == waited == rows else (
                f"a queued prefill gave first tokens {queued} (next_tokens {rows}), a waited one {waited}")
        except Exception as exc:  # noqa: BLE001 - the waited path serves instead, and the reason is shown
            self.drain()
            problem = f"a queued prefill failed: {type(exc).__name__}: {exc}"
        self._reset(slots, 0)
        if problem is not None:
            self.async_prefill = False
            self.queued_prefills = f"off: {problem}"

    def _reset(self, slots: list[int], token: int) -> None:
        """Empty `slots`, and every row of next_tokens holds `token` (zeros: ids a step may read for idle rows)."""
        for slot in slots:
            self.free(slot)
        self.next_tokens.update_inplace(np.full(self.num_slots, token, np.int64))

    def describe(self) -> dict:
        return {**super().describe(), "decode_buckets": self.buckets, "prefill_budget_tokens": self.prefill_budget,
                "warm_up": self.warmed, "queued_prefills": "on" if self.async_prefill else self.queued_prefills,
                "pipelined_steps": self.pipeline_depth if self.pipelined else "off (needs CUDA and a stream of the "
                "runner's own)", **self.runner.describe()}

    def release(self) -> None:
        self.drain()
        for stage in self._stages + ([self._prefill_stage] if self._prefill_stage else []):
            driver = self._driver()
            for buffer in ("inputs", "tokens"):
                if buffer in stage:
                    driver.free_pinned(stage[buffer])
            driver.destroy_event(stage["event"])
        self._stages, self._states, self._prefill_stage = [], {}, None
        self.runner.release()
