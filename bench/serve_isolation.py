"""Isolation on a served bundle, GPU or CPU: a burst of concurrent greedy requests (prompts of 1 to ~200 token ids,
4 to 40 new tokens each) must each get the tokens its prompt gives alone (`leptonc run`'s generation). The engine runs
twice: with its prefills as the bundle's slots run them (on CUDA: queued behind the decode steps, `async_prefill`)
and with each prefill waited for. Where the two runs differ from each other, the queued prefills' bookkeeping is
wrong; where both differ from the run alone in the same places, it is the batch's numerics (fp16 GEMMs of other
shapes), which the note reports with the positions.

    python3 bench/serve_isolation.py BUNDLE.lepton [--requests 24] [--slots 16] [--out r.json]

Prints JSON: per run, the requests whose tokens equal the run alone, the first differing position of the others,
and the engine's prefill runs and decode steps; whether the two runs agree request by request; and at each first
difference, the run alone's margin between its top two logits there (a near tie is the batch's numerics).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from bench_json import emit  # noqa: E402


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (the shorter one's length if one is a prefix), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def served(bundle: Path, prompts: list[list[int]], max_tokens: list[int], slots: int, queued: bool) -> dict:
    from leptonc.runtime.batching import BatchingEngine, EngineConfig, SamplingParams

    engine = BatchingEngine.from_bundle(bundle, EngineConfig(max_queue=len(prompts), num_slots=slots, verify=False))
    if not queued:
        engine.slots.async_prefill = False
    async_prefill = bool(engine.slots.async_prefill)
    engine.start()
    try:
        requests = []
        for i, (ids, n) in enumerate(zip(prompts, max_tokens)):
            requests.append(engine.submit(ids, SamplingParams(max_tokens=n)))
            time.sleep(0.001 * (i % 4))  # arrivals spread over several scheduler turns
        outputs = []
        for request in requests:
            for event in request.events(timeout=300):
                if event.finish_reason is not None:
                    break
            outputs.append(list(request.token_ids))
        metrics = engine.metrics()
    finally:
        engine.shutdown(grace_s=5)
    return {"async_prefill": async_prefill, "outputs": outputs, "prefill_runs": metrics["prefill_runs_total"],
            "decode_steps": metrics["decode_steps_total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--slots", type=int, default=16, help="the engine's slots (the bundle's max batch at most)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if not args.bundle.is_dir():
        parser.error(f"{args.bundle} is not a bundle folder (leptonc compile ... -o B.lepton makes one)")

    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.generate import SamplingConfig, generate
    from leptonc.runtime.tokenizer import eos_ids, load_tokenizer

    bundle = load_bundle(args.bundle, verify=False)
    tokenizer = load_tokenizer(bundle.tokenizer_dir)
    eos = eos_ids(tokenizer, bundle.manifest)
    rng = np.random.default_rng(args.seed)
    vocab = len(tokenizer)
    prompts = [[int(t) for t in rng.integers(10, min(vocab, 30000), size=int(n))]
               for n in rng.integers(1, 200, size=args.requests)]
    max_tokens = [int(n) for n in rng.integers(4, 41, size=args.requests)]

    runner = open_bundle_runner(bundle)
    try:
        alone = [generate(runner, tokenizer, [""], SamplingConfig(max_new_tokens=n), eos_ids=eos,
                          prompt_ids=[ids]).outputs[0].token_ids for ids, n in zip(prompts, max_tokens)]
    finally:
        runner.release()

    report = {"bundle": str(args.bundle), "requests": args.requests, "slots": args.slots, "runs": {}}
    runs = {name: served(args.bundle, prompts, max_tokens, args.slots, queued) for name, queued in
            (("as_the_slots_run_them", True), ("each_prefill_waited", False))}
    for name, run in runs.items():
        differ = {i: first_difference(out, ref) for i, (out, ref) in enumerate(zip(run["outputs"], alone))}
        differ = {i: pos for i, pos in differ.items() if pos is not None}
        report["runs"][name] = {"async_prefill": run["async_prefill"], "exact": args.requests - len(differ),
                                "first_difference": differ, "prefill_runs": run["prefill_runs"],
                                "decode_steps": run["decode_steps"]}
    a, b = (run["outputs"] for run in runs.values())
    report["runs_agree"] = sum(x == y for x, y in zip(a, b))
    # the cause of a difference: how close the run alone's top two logits were where a served run left it
    where = sorted({(i, pos) for run in report["runs"].values() for i, pos in run["first_difference"].items()})
    runner = open_bundle_runner(bundle)
    try:
        report["top2_margin_at_difference"] = {f"{i}@{pos}": top2_margin(runner, prompts[i] + alone[i][:pos])
                                               for i, pos in where if pos < len(alone[i])}
    finally:
        runner.release()
    emit(report, args.out)


def top2_margin(runner, ids: list[int]) -> float:
    """The gap between the largest and second-largest logit of the token after `ids`, run alone."""
    row = np.asarray(ids, np.int64)[None, :]
    logits = np.asarray(runner.prefill(row, np.ones_like(row), last_only=True), np.float32).reshape(-1)
    top = np.partition(logits, -2)[-2:]
    return round(float(top[1] - top[0]), 4)


if __name__ == "__main__":
    main()
