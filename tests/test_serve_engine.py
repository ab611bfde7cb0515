"""The in-flight batching engine as a library (no HTTP): isolation, cancellation, the bounded queue."""

from __future__ import annotations

import json
import time

import pytest
from conftest import HostMemoryDriver

from leptonc.errors import InputError
from leptonc.runtime.batching import BatchingEngine, EngineConfig, QueueFullError, SamplingParams

PROMPTS = [f"Request {i} asks about " + "the weather " * (i * 3 % 11) for i in range(12)]


@pytest.fixture(scope="module")
def alone(tiny_bundle):
    """What `leptonc run` generates for each prompt on its own (greedy), with max_tokens 20 - i."""
    return run_alone(tiny_bundle, PROMPTS, [20 - i for i in range(len(PROMPTS))])


def run_alone(bundle_path, prompts, max_tokens):
    """`leptonc run`'s generation (its runner, greedy) for each prompt on its own."""
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.generate import SamplingConfig, generate

    engine = BatchingEngine.from_bundle(bundle_path, EngineConfig(verify=False, num_slots=1))
    tokenizer, eos = engine.tokenizer, engine.eos_ids
    engine.shutdown(0)
    runner = open_bundle_runner(load_bundle(bundle_path))
    try:
        return [generate(runner, tokenizer, [p], SamplingConfig(max_new_tokens=n), eos_ids=eos).outputs[0]
                for p, n in zip(prompts, max_tokens)]
    finally:
        runner.release()


def _collect(request):
    events = list(request.events(timeout=60))
    return [t for e in events for t in e.token_ids], "".join(e.text for e in events), events[-1].finish_reason


def test_each_request_matches_its_run_alone(tiny_bundle, alone):
    # 12 requests over 4 slots (the rest queue), prompts prefilled 5 tokens at a time between decode steps,
    # arriving while others decode: each gets exactly the tokens, text and finish of its run alone.
    engine = BatchingEngine.from_bundle(tiny_bundle, EngineConfig(max_queue=8, num_slots=4, prefill_chunk=5)).start()
    try:
        requests = []
        for i, prompt in enumerate(PROMPTS):
            requests.append(engine.submit(engine.encode(prompt), SamplingParams(max_tokens=20 - i)))
            time.sleep(0.003 * (i % 3))
        for request, reference in zip(requests, alone):
            assert _collect(request) == (reference.token_ids, reference.text, reference.finish_reason)
        metrics = engine.metrics()
        assert metrics["running"] == metrics["queued"] == metrics["slots_used"] == 0
        assert metrics["prompt_tokens_total"] == sum(len(engine.encode(p)) for p in PROMPTS)
        assert metrics["generated_tokens_total"] == sum(len(r.token_ids) for r in alone)
    finally:
        assert engine.shutdown(grace_s=5)


def test_cancel_frees_the_slot_and_the_queue_is_bounded(tiny_bundle):
    engine = BatchingEngine.from_bundle(tiny_bundle, EngineConfig(max_queue=1, num_slots=2)).start()
    try:
        ids = engine.encode("a long story")
        long = SamplingParams(max_tokens=1500, stop_at_eos=False)
        held = [engine.submit(ids, long) for _ in range(3)]  # two slots and one queued
        with pytest.raises(QueueFullError):
            engine.submit(ids, long)
        for request in held:
            request.cancel()
            assert _collect(request)[2] == "cancelled"
        deadline = time.monotonic() + 10
        while engine.metrics()["slots_used"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.metrics()["slots_used"] == 0
        # the slots serve again, and the result is still the greedy one
        tokens, _, reason = _collect(engine.submit(ids, SamplingParams(max_tokens=4, stop_at_eos=False)))
        assert len(tokens) == 4 and reason == "length"
        assert engine.metrics()["finished_total"]["cancelled"] == 3
    finally:
        engine.shutdown(grace_s=5)


def test_bad_requests_are_input_errors(tiny_bundle):
    engine = BatchingEngine.from_bundle(tiny_bundle, EngineConfig(num_slots=1))
    with pytest.raises(InputError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(top_p=0)
    engine.start()
    try:
        with pytest.raises(InputError, match="no tokens"):
            engine.submit([], SamplingParams())
        with pytest.raises(InputError, match=f"at most {engine.max_sequence}"):
            engine.submit([5] * engine.max_sequence, SamplingParams())
        with pytest.raises(InputError, match="limit of"):
            engine.submit([5, 6], SamplingParams(max_tokens=engine.max_sequence))
        with pytest.raises(InputError, match="vocabulary"):
            engine.submit([10**9], SamplingParams())
    finally:
        engine.shutdown(grace_s=1)


def test_stop_strings_and_seeded_sampling(tiny_bundle, alone):
    engine = BatchingEngine.from_bundle(tiny_bundle, EngineConfig(num_slots=2)).start()
    try:
        reference = alone[0]
        stop = reference.text[3:5]  # text from the middle of the greedy continuation
        tokens, text, reason = _collect(engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=20, stop=(stop,))))
        assert reason == "stop" and text == reference.text[:reference.text.find(stop)]
        sampled = [_collect(engine.submit(engine.encode(PROMPTS[1]), SamplingParams(max_tokens=8, temperature=1.0,
                                                                                  seed=seed, stop_at_eos=False)))
                   for seed in (7, 7, 8)]
        assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    finally:
        engine.shutdown(grace_s=5)


def test_block_slots_of_a_right_padded_bundle_match_run_alone(right_padded_bundle):
    # the fixed [slots, capacity] K/V block and one fixed-shape decode step over every row (BlockKvSlots)
    engine = BatchingEngine.from_bundle(right_padded_bundle, EngineConfig(max_queue=8, num_slots=4)).start()
    try:
        described = engine.slots.describe()
        assert described["slots"] == "BlockKvSlots"
        # before the first request, every decode bucket ran once (a CUDA graph each on the GPU) and prefill shapes did
        assert described["warm_up"]["decode_buckets"] == [1, 2, 4] and described["warm_up"]["prefill_shapes"], described
        assert engine.slots.steps_by_bucket == {1: 0, 2: 0, 4: 0} and not engine.slots.lengths.any()
        count = 8
        reference = run_alone(right_padded_bundle, PROMPTS[:count], [20 - i for i in range(count)])
        requests = []
        for i, prompt in enumerate(PROMPTS[:count]):
            requests.append(engine.submit(engine.encode(prompt), SamplingParams(max_tokens=20 - i)))
            time.sleep(0.003 * (i % 3))
        for request, alone in zip(requests, reference):
            assert _collect(request)[0] == alone.token_ids
        assert engine.metrics()["slots_used"] == 0
    finally:
        assert engine.shutdown(grace_s=5)


def test_block_slots_batch_prefills_and_decode_only_the_rows_in_use(right_padded_bundle):
    # a burst of prompts of different lengths in neighbouring slots is prefilled in one right-padded run, and a
    # step of the low rows runs at a small bucket; each request still gets exactly its run alone's tokens
    from leptonc.runtime.block_slots import decode_buckets, prefill_runs

    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 64] and decode_buckets(12) == [1, 2, 4, 8, 12]
    # the CUDA warm-up's prefills: one narrow run, then every multiple of 64 tokens within the budget, one row up to
    # 512 tokens, beyond that the fewest rows (a power of two) within the width, the capacity and the slots
    from leptonc.runtime.block_slots import warmup_prefill_shapes

    shapes = warmup_prefill_shapes(4096, 1280, 64)
    assert shapes[0] == (1, 16) and [r * w for r, w in shapes[1:]] == list(range(64, 4097, 64))
    assert (1, 512) in shapes and (2, 288) in shapes and (8, 512) in shapes and all(w <= 512 for _, w in shapes)
    few = warmup_prefill_shapes(4096, 1280, 2)  # 2 slots: wider rows, up to the capacity, and no more tokens than fit
    assert few[-1] == (2, 1248) and all(r <= 2 and w < 1280 for r, w in few)
    # neighbouring slots share a run within the budget of padded tokens; a gap or the budget starts another
    assert prefill_runs([4, 2, 3, 9], [10, 10, 30, 5], 100) == [[1, 2, 0], [3]]
    assert prefill_runs([0, 1, 2, 3], [30, 30, 30, 30], 100) == [[0, 1, 2], [3]]
    engine = BatchingEngine.from_bundle(right_padded_bundle, EngineConfig(max_queue=0, num_slots=8, verify=False,
                                                                         warmup=False))
    assert engine.slots.describe()["warm_up"] is None
    count = 4
    reference = run_alone(right_padded_bundle, PROMPTS[:count], [12] * count)
    engine.start()
    try:
        with engine._lock:  # submitted together: the scheduler sees them all on its next turn
            requests = [engine.submit(engine.encode(p), SamplingParams(max_tokens=12)) for p in PROMPTS[:count]]
        for request, alone in zip(requests, reference):
            assert _collect(request)[0] == alone.token_ids
        metrics = engine.metrics()
        assert metrics["prefill_runs_total"] == 1, metrics
        # every request greedy: their first tokens came from the graph's next_token, no logits to the host
        assert engine.slots.prefill_runs_by_result == {"tokens": 1, "logits": 0}
        steps = engine.slots.steps_by_bucket
        assert steps[8] == 0 and steps[4] == metrics["decode_steps_total"] > 0, steps  # 4 rows: 4-row steps
        assert metrics["slots_used"] == 0
        solo = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=5))
        assert _collect(solo)[0] == reference[0].token_ids[:5]
        assert engine.slots.steps_by_bucket[1] >= 4  # one sequence in slot 0: one-row steps
        # a run with a sampled request reads the logits; the same seed twice gives the same tokens
        params = SamplingParams(max_tokens=6, temperature=0.9, seed=7)
        with engine._lock:
            twins = [engine.submit(engine.encode(PROMPTS[1]), params) for _ in range(2)]
        first, second = (_collect(r)[0] for r in twins)
        assert first == second and len(first) == 6
        assert engine.slots.prefill_runs_by_result["logits"] == 1
    finally:
        assert engine.shutdown(grace_s=5)


def test_block_slots_with_queued_steps_and_prefills_match_run_alone(right_padded_bundle):
    # the GPU's way, on the CPU: steps queued ahead of their tokens take their ids from the last step's next_token,
    # and a prefill queued behind them writes each prompt's first token where the next step takes it as an id
    engine = BatchingEngine.from_bundle(right_padded_bundle, EngineConfig(max_queue=16, num_slots=4, verify=False,
                                                                         warmup=False))
    runner = engine.slots.runner
    runner._driver, runner._stream = HostMemoryDriver(), 1
    engine.slots._start_pipeline(runner._driver)
    assert engine.slots.pipelined and engine.slots.async_prefill
    assert engine.slots.warm_up(engine.eos_ids[0]) and engine.slots.describe()["queued_prefills"] == "on"
    count = 10
    lengths = [1 if i % 4 == 1 else 3 + (7 * i) % 17 for i in range(count)]  # some end with their prefill's token
    reference = run_alone(right_padded_bundle, PROMPTS[:count + 1], [*lengths, 6])
    launched, late, launching, drained = [], [], [], []
    launch = engine.slots.prefill_launch

    def launch_and_submit(slots, prompts):
        launched.append(list(slots))
        handle = launch(slots, prompts)
        if len(launched) == 1:  # a prompt that arrives while this prefill is in flight
            late.append(engine.submit(engine.encode(PROMPTS[count]), SamplingParams(max_tokens=6)))
        return handle

    engine.slots.prefill_launch = launch_and_submit
    # the late prompt waits for the prefill in flight to be collected in its turn: no prefill collects the runs
    # ahead of it (the device would be left without queued work while the host launches it)
    launch_prefill, collect = engine._launch_prefill, engine._collect_oldest
    engine._launch_prefill = lambda requests: (launching.append(1), launch_prefill(requests), launching.clear())
    engine._collect_oldest = lambda: (launching and drained.append(len(engine._in_flight)), collect())
    engine.start()
    try:
        requests = []
        for i, (prompt, n) in enumerate(zip(PROMPTS[:count], lengths)):
            requests.append(engine.submit(engine.encode(prompt), SamplingParams(max_tokens=n)))
            time.sleep(0.004 * (i % 3))
        for request, alone in zip(requests, reference):
            assert _collect(request)[0] == alone.token_ids
        metrics = engine.metrics()
        assert _collect(late[0])[0] == reference[count].token_ids
        assert len(launched) == metrics["prefill_runs_total"] > 1 and sum(map(len, launched)) == count + 1
        assert engine.slots.prefill_runs_by_result["logits"] == 0 and metrics["slots_used"] == 0
        assert drained == []
        assert engine.slots._prefill_stage["inputs"].any()  # the prompts went through the stage's page-locked copy
        # one cancelled while others run: it leaves, its slot is reused, the others are unchanged
        prompt = engine.encode(PROMPTS[0])
        long = engine.submit(prompt, SamplingParams(max_tokens=engine.max_sequence - len(prompt), stop_at_eos=False))
        next(long.events(timeout=10))
        long.cancel()
        again = [engine.submit(engine.encode(p), SamplingParams(max_tokens=n)) for p, n in zip(PROMPTS[:3], lengths)]
        assert _collect(long)[2] == "cancelled"
        assert [_collect(r)[0] for r in again] == [a.token_ids for a in reference[:3]]
    finally:
        assert engine.shutdown(grace_s=5)


def test_an_input_the_graph_does_not_read_is_bound_on_the_host(right_padded_bundle):
    # the GPU contract's attention takes positions from the mask, so no node reads position_ids. ONNX Runtime copies
    # an unread input bound on the device to the host as it is bound, and on the GPU that copy waited for every step
    # queued ahead of a prefill (1.5 ms a step on the H100): prefills bind it on the host, where nothing is copied
    from leptonc.graph_contract import POSITION_IDS

    engine = BatchingEngine.from_bundle(right_padded_bundle, EngineConfig(num_slots=2, verify=False, warmup=False))
    try:
        runner, slots = engine.slots.runner, engine.slots
        assert runner.unread_inputs == {POSITION_IDS}
        bound = {"host": [], "device": []}
        make = runner.session.io_binding

        def recording_binding():
            binding = make()
            cpu, ortvalue, pointer = binding.bind_cpu_input, binding.bind_ortvalue_input, binding.bind_input
            binding.bind_cpu_input = lambda name, array: (bound["host"].append(name), cpu(name, array))[1]
            binding.bind_ortvalue_input = lambda name, value: (bound["device"].append(name), ortvalue(name, value))[1]
            binding.bind_input = lambda name, *args: (bound["device"].append(name), pointer(name, *args))[1]
            return binding

        runner.session.io_binding = recording_binding
        prompt = engine.encode(PROMPTS[3])
        first = slots.prefill_tokens([0], [prompt])
        assert bound["host"] == [POSITION_IDS] and POSITION_IDS not in bound["device"]
        assert first == run_alone(right_padded_bundle, [PROMPTS[3]], [1])[0].token_ids
    finally:
        engine.shutdown(0)


def test_queued_prefills_that_fail_the_warm_up_check_are_turned_off(right_padded_bundle, monkeypatch):
    # the warm-up compares a queued prefill with a waited one; where it differs or fails, prefills are waited for
    # and describe() says why
    from leptonc.bundle import load_bundle
    from leptonc.runtime.block_slots import BlockKvSlots
    from leptonc.runtime.slots import open_kv_slots

    for broken, reason in ((lambda self, handle: [7, 7], "a queued prefill gave first tokens [7, 7]"),
                           (lambda self, handle: 1 / 0, "a queued prefill failed: ZeroDivisionError")):
        slots = open_kv_slots(load_bundle(right_padded_bundle, verify=False), "cpu", 4)
        slots.runner._driver, slots.runner._stream = HostMemoryDriver(), 1
        slots._start_pipeline(slots.runner._driver)
        with monkeypatch.context() as patch:
            patch.setattr(BlockKvSlots, "prefill_collect", broken)
            slots.warm_up(0)
        assert not slots.async_prefill and slots.describe()["queued_prefills"].startswith(f"off: {reason}")
        assert not slots.lengths.any() and (slots.next_tokens.numpy() == 0).all()
        slots.release()


def test_a_queued_prefill_whose_runs_overflow_the_staged_inputs_makes_the_rest_as_a_waited_one(right_padded_bundle):
    # slots 0 and 2 are not neighbours: two runs in one launch. The stage holds the first run's inputs only, so the
    # second run's are made as a waited prefill's; both give the first tokens a waited prefill gives
    from leptonc.bundle import load_bundle
    from leptonc.runtime.slots import open_kv_slots

    slots = open_kv_slots(load_bundle(right_padded_bundle, verify=False), "cpu", 4)
    slots.runner._driver, slots.runner._stream = HostMemoryDriver(), 1
    slots._start_pipeline(slots.runner._driver)
    prompts = [[5, 9, 11, 3, 8], [7, 2, 6]]
    waited = slots.prefill_tokens([0, 2], prompts)
    for slot in (0, 2):
        slots.free(slot)
    # room for the first run's staged inputs (ids, mask, last position: position_ids stays on the host), not the second's
    slots._prefill_stage["inputs"] = slots._prefill_stage["inputs"][:2 * 5 + 1 + 2]
    queued = slots.prefill_collect(slots.prefill_launch([0, 2], prompts))
    assert slots.last_prefill_runs == 2 and queued == waited
    assert slots._prefill_stage["inputs"][:5].tolist() == prompts[0]  # the first run's ids went through the stage
    slots.release()


@pytest.mark.slow
def test_the_warm_up_and_every_step_run_on_one_thread(right_padded_bundle, monkeypatch):
    # ONNX Runtime's CUDA provider keeps CUDA graphs and cuBLAS handles per thread: the thread that warms the slots
    # up must be the one that steps them when serving
    import threading

    from leptonc.runtime.block_slots import BlockKvSlots

    threads = {}
    for name in ("warm_up", "prefill_tokens", "decode"):
        def recording(self, *args, _name=name, _method=getattr(BlockKvSlots, name), **kwargs):
            threads.setdefault(_name, set()).add(threading.get_ident())
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(BlockKvSlots, name, recording)
    engine = BatchingEngine.from_bundle(right_padded_bundle, EngineConfig(max_queue=0, num_slots=4, verify=False))
    assert engine.slots.warmed and threads["warm_up"] != {threading.get_ident()}
    engine.start()
    try:
        request = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=4))
        assert len(_collect(request)[0]) == 4
    finally:
        assert engine.shutdown(grace_s=5)
    assert threads["warm_up"] == threads["prefill_tokens"] == threads["decode"] and len(threads["decode"]) == 1, threads
    assert not engine.ready


class _PipelinedSlots:
    """A stand-in for the GPU's slots with pipelined steps, whose "model" is a fixed function of the last token and
    the position, so the engine's bookkeeping (which step's ids come from the device, which tokens belong to whom)
    is checked without a GPU: each request must get the sequence its prompt gives alone."""

    num_slots, max_sequence, vocab_size = 6, 512, 97
    prefill_in_chunks, prefill_budget, pipelined, pipeline_depth, device = False, 64, True, 2, "cpu"
    async_prefill = False

    def __init__(self):
        import numpy as np

        self.np = np
        self.lengths = np.zeros(self.num_slots, np.int64)
        self.device_next = np.zeros(self.num_slots, np.int64)  # what next_token holds on the "device"
        self.on_device: set[int] = set()  # rows whose next id next_token holds: the last step's, and prefills' since
        self.in_flight: list = []
        self.launches = self.device_ids = 0

    @staticmethod
    def model(token: int, position: int) -> int:
        return (token * 31 + position * 7 + 3) % 97

    def prefill_many(self, slots, prompts):
        out = []
        for slot, prompt in zip(slots, prompts):
            assert self.lengths[slot] == 0
            self.lengths[slot] = len(prompt)
            logits = self.np.zeros(self.vocab_size, self.np.float32)
            logits[self.model(sum(prompt), len(prompt))] = 1
            out.append(logits)
        return out

    def prefill_tokens(self, slots, prompts):
        return [int(row.argmax()) for row in self.prefill_many(slots, prompts)]

    def prefill(self, slot, ids):
        return self.prefill_many([slot], [ids])[0]

    def _step(self, slots, ids):
        time.sleep(0.0005)  # a step takes time, as on a device
        slots = self.np.asarray(slots)
        tokens = self.np.asarray([self.model(int(t), int(self.lengths[s])) for s, t in zip(slots, ids)], self.np.int64)
        self.device_next[slots] = tokens
        self.lengths[slots] += 1
        self.on_device = set(int(s) for s in slots)
        return tokens

    def decode(self, slots, ids, logits=False):
        assert not self.in_flight, "a step run at once while pipelined steps are in flight"
        tokens = self._step(slots, ids)
        return tokens, (self.np.eye(self.vocab_size, dtype=self.np.float32)[tokens] if logits else None)

    def decode_launch(self, slots, ids):
        assert sum(not isinstance(h, tuple) for h in self.in_flight) < self.pipeline_depth  # steps (not prefills)
        if ids is None:  # every slot must have run in the step launched last, or been prefilled since
            assert set(slots) <= self.on_device, (slots, self.on_device)
            ids = self.device_next[self.np.asarray(slots)]
            self.device_ids += 1
        handle = self._step(slots, ids)
        self.in_flight.append(handle)
        self.launches += 1
        return handle

    def decode_collect(self, handle):
        assert self.in_flight[0] is handle, "steps are collected in launch order"
        return self.in_flight.pop(0)

    def drain(self):
        self.in_flight.clear()

    def free(self, slot):
        self.lengths[slot] = 0

    def length(self, slot):
        return int(self.lengths[slot])

    def describe(self):
        return {"slots": "pipelined stand-in"}

    def release(self):
        pass


class _AsyncPrefillSlots(_PipelinedSlots):
    """The same, with prefills queued like steps (block_slots.BlockKvSlots.prefill_launch): a prompt's first token goes
    to next_token at its row, where the next step takes it, and to the host when the prefill is collected."""

    async_prefill = True

    def __init__(self):
        super().__init__()
        self.prefills_in_flight: list = []
        self.prefill_launches = 0

    def prefill_launch(self, slots, prompts):
        assert not self.prefills_in_flight, "one prefill in flight at a time"
        tokens = self.prefill_tokens(slots, prompts)
        self.device_next[self.np.asarray(slots)] = tokens
        self.on_device |= set(int(s) for s in slots)
        handle = (list(slots), tokens)
        self.in_flight.append(handle)
        self.prefills_in_flight.append(handle)
        self.prefill_launches += 1
        return handle

    def prefill_collect(self, handle):
        assert self.in_flight[0] is handle, "runs are collected in launch order"
        self.prefills_in_flight.remove(handle)
        return self.in_flight.pop(0)[1]

    def drain(self):
        super().drain()
        self.prefills_in_flight.clear()


@pytest.mark.parametrize("slots_class", [_PipelinedSlots, _AsyncPrefillSlots], ids=["prefill-waited", "prefill-queued"])
def test_pipelined_steps_give_each_request_its_own_sequence(tiny_bundle, slots_class):
    from leptonc.runtime.tokenizer import load_tokenizer
    from leptonc.bundle import load_bundle

    slots = slots_class()
    tokenizer = load_tokenizer(load_bundle(tiny_bundle).tokenizer_dir)
    engine = BatchingEngine(slots, tokenizer, (5,), EngineConfig(max_queue=20))
    ahead = []  # steps in flight as each prefill is launched
    if slots.async_prefill:
        launch_prefill = slots.prefill_launch
        slots.prefill_launch = lambda s, p: (ahead.append(len(slots.in_flight)), launch_prefill(s, p))[1]
    engine.start()

    def alone(prompt, max_tokens, stop_at_eos):
        out, token, position = [], slots.model(sum(prompt), len(prompt)), len(prompt)
        while True:
            if stop_at_eos and token == 5:
                return out
            out.append(token)
            if len(out) == max_tokens:
                return out
            token, position = slots.model(token, position), position + 1

    try:
        cases = [([10 + i, 20 + i, 7 * i % 50 + 1], 3 + (i * 5) % 23, i % 3 == 0) for i in range(20)]
        requests = []
        for i, (prompt, n, eos) in enumerate(cases):
            requests.append(engine.submit(prompt, SamplingParams(max_tokens=n, stop_at_eos=eos)))
            time.sleep(0.002 * (i % 4))
        for request, (prompt, n, eos) in zip(requests, cases):
            assert _collect(request)[0] == alone(prompt, n, eos)
        assert slots.device_ids > 0 and not slots.in_flight  # steps ran ahead on device ids, and none is left over
        if slots.async_prefill:  # the prompts' prefills were queued too, and steps took their first tokens as ids
            assert slots.prefill_launches == engine.metrics()["prefill_runs_total"] > 0
            # a prefill launched while sequences run has one more step queued first: pipeline_depth steps ahead
            assert max(ahead) == slots.pipeline_depth
        # a sampled request among greedy ones: its steps run one at a time, and the greedy ones are unchanged
        sampled = engine.submit([1, 2, 3], SamplingParams(max_tokens=6, temperature=1.0, seed=1, stop_at_eos=False))
        greedy = engine.submit([4, 5, 6], SamplingParams(max_tokens=9, stop_at_eos=False))
        assert len(_collect(sampled)[0]) == 6 and _collect(greedy)[0] == alone([4, 5, 6], 9, False)
        cancelled = engine.submit([7, 8], SamplingParams(max_tokens=500, stop_at_eos=False))
        next(cancelled.events(timeout=10))
        cancelled.cancel()
        assert _collect(cancelled)[2] == "cancelled"
        deadline = time.monotonic() + 10
        while engine.metrics()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.metrics()["slots_used"] == 0 and (slots.lengths == 0).all()
    finally:
        assert engine.shutdown(grace_s=5)


def test_no_step_runs_past_the_last_token_and_the_timeline_accounts_for_the_scheduler(tiny_bundle, tmp_path):
    # a sequence's first token comes from its prefill, so max_tokens=N takes N - 1 decode steps: the pipeline does
    # not queue steps whose tokens nobody would take; the counters and the trace see every run
    from leptonc.bundle import load_bundle
    from leptonc.runtime.tokenizer import load_tokenizer

    slots = _PipelinedSlots()
    tokenizer = load_tokenizer(load_bundle(tiny_bundle).tokenizer_dir)
    engine = BatchingEngine(slots, tokenizer, (5,), EngineConfig(max_queue=4, trace=True)).start()
    try:
        time.sleep(0.05)  # the scheduler waits with nothing to run: idle time
        with engine._lock:  # two sequences that end on the same step, one that ends earlier
            requests = [engine.submit([3, 4, 5 + i], SamplingParams(max_tokens=n, stop_at_eos=False))
                        for i, n in enumerate((12, 12, 7))]
        assert [len(_collect(r)[0]) for r in requests] == [12, 12, 7]
        metrics = engine.metrics()
        assert metrics["decode_steps_total"] == slots.launches == 11, (metrics, slots.launches)
        assert metrics["prefill_runs_total"] == 1
        assert metrics["idle_seconds_total"] >= 0.04
        assert metrics["prefill_seconds_total"] > 0 and metrics["decode_wait_seconds_total"] >= 0
    finally:
        assert engine.shutdown(grace_s=5)
    totals = engine.trace.totals()
    assert totals["launch"]["count"] == totals["wait"]["count"] == totals["take"]["count"] == 11, totals
    assert totals["prefill"]["count"] == 1 and totals["idle"]["count"] >= 1
    engine.trace.write(tmp_path / "trace.json")
    written = json.loads((tmp_path / "trace.json").read_text())
    spans = [e for e in written["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == written["otherData"]["spans"] and {"idle", "prefill", "launch", "wait"} <= {e["name"] for e in spans}
    spans = [e for e in spans if e["tid"] == 1]  # the scheduler's line (Python's collections have their own)
    prefill = next(e for e in spans if e["name"] == "prefill")
    assert prefill["args"] == {"rows": 3, "tokens": 9, "runs": 1} and prefill["dur"] >= 0
    assert all(a["ts"] <= b["ts"] for a, b in zip(spans, spans[1:]))  # one thread's spans, in order


def test_stream_interval_gathers_tokens_into_fewer_events(tiny_bundle, alone):
    engine = BatchingEngine.from_bundle(tiny_bundle, EngineConfig(num_slots=2, stream_interval=4)).start()
    try:
        reference = alone[0]
        events = list(engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=20)).events(timeout=60))
        assert [t for e in events for t in e.token_ids] == reference.token_ids
        assert "".join(e.text for e in events) == reference.text and events[-1].finish_reason == reference.finish_reason
        carrying = [len(e.token_ids) for e in events if e.token_ids]
        # the first token alone, then groups of at most 4 (the first and the last may be shorter: the sequence's phase)
        assert carrying[0] == 1 and max(carrying) <= 4 and len(carrying) <= 3 + (len(reference.token_ids) - 2) // 4
        assert max(carrying) == 4
    finally:
        engine.shutdown(grace_s=5)
    for bad in (0, -1, "fast"):
        with pytest.raises(InputError, match="stream_interval"):
            EngineConfig(stream_interval=bad)


def test_the_engine_sets_pythons_switch_interval_while_it_runs_and_puts_it_back(tiny_bundle):
    import sys

    before = sys.getswitchinterval()
    engine = BatchingEngine.from_bundle(tiny_bundle, EngineConfig(num_slots=1, switch_interval_s=0.002)).start()
    try:
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        engine.shutdown(grace_s=5)
    assert sys.getswitchinterval() == pytest.approx(before)
    with pytest.raises(InputError, match="switch_interval_s"):
        EngineConfig(switch_interval_s=5.0)


def test_auto_stream_interval_streams_every_token_until_many_sequences_run(tiny_bundle, alone):
    from leptonc.runtime.engine_output import AUTO_EVENTS_PER_STEP, auto_interval

    assert [auto_interval(n) for n in (1, AUTO_EVENTS_PER_STEP, AUTO_EVENTS_PER_STEP + 1, 4 * AUTO_EVENTS_PER_STEP)] \
        == [1, 1, 2, 4]
    engine = BatchingEngine.from_bundle(tiny_bundle, EngineConfig(num_slots=2)).start()  # "auto" is the default
    try:
        reference = alone[0]
        events = list(engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=20)).events(timeout=60))
        assert [t for e in events for t in e.token_ids] == reference.token_ids
        assert all(len(e.token_ids) <= 1 for e in events)  # two slots: every token is its own event
    finally:
        engine.shutdown(grace_s=5)
