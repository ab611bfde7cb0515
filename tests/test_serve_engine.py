"""The in-flight batching engine as a library (no HTTP): isolation, cancellation, the bounded queue."""

from __future__ import annotations

import time

import pytest

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


@pytest.fixture(scope="module")
def right_padded_bundle(tmp_path_factory):
    """tiny-llama with the GPU targets' attention contract (lengths from the mask's contents, right padding:
    what CUDA bundles are served with), run here on ONNX Runtime's CPU provider."""
    import leptonc.passes.fuse_gqa as fuse_gqa
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny.right-padded.lepton"
    with pytest.MonkeyPatch.context() as patch:  # the contract a GPU target picks, forced on a CPU compile
        patch.setattr(fuse_gqa, "lengths_contract", lambda ctx: "mask_sum")
        compile_model(CompileConfig(source="tiny-llama", target="cpu", output=str(out)))
    return out


def test_block_slots_of_a_right_padded_bundle_match_run_alone(right_padded_bundle):
    # the fixed [slots, capacity] K/V block and one fixed-shape decode step over every row (BlockKvSlots)
    engine = BatchingEngine.from_bundle(right_padded_bundle, EngineConfig(max_queue=8, num_slots=4)).start()
    try:
        assert engine.slots.describe()["slots"] == "BlockKvSlots"
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
    from leptonc.runtime.block_slots import decode_buckets

    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 64] and decode_buckets(12) == [1, 2, 4, 8, 12]
    engine = BatchingEngine.from_bundle(right_padded_bundle, EngineConfig(max_queue=0, num_slots=8, verify=False))
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
        steps = engine.slots.steps_by_bucket
        assert steps[8] == 0 and steps[4] == metrics["decode_steps_total"] > 0, steps  # 4 rows: 4-row steps
        assert metrics["slots_used"] == 0
        solo = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=5))
        assert _collect(solo)[0] == reference[0].token_ids[:5]
        assert engine.slots.steps_by_bucket[1] >= 4  # one sequence in slot 0: one-row steps
    finally:
        assert engine.shutdown(grace_s=5)
