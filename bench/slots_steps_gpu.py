"""A served GPU bundle's slots alone, on one thread: how long the host takes to queue a decode step right after a
prefill ("fresh": its ids from the host) and in the steady pipeline (ids from the step before, on the device), and how
long prefill runs of 1 and of many prompts take. `leptonc serve --trace` showed launches after prefills of 8-13 ms
on the H100 where a launch otherwise takes 0.3-0.5 ms; this separates the runtime from the server's other threads.

    python3 bench/slots_steps_gpu.py BUNDLE.lepton [--rows 64] [--prompt 128] [--trials 8] [--out r.json]
    python3 bench/slots_steps_gpu.py BUNDLE.lepton --shapes | --queued [--profile]

Prints JSON: per trial, the prefill of `--refill` prompts into freed slots, the fresh launch after it, the wait for
its tokens, then a pipelined launch and its wait (ms), and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from bench_json import emit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rows", type=int, default=64, help="slots (the bundle's max batch at most)")
    parser.add_argument("--refill", type=int, default=20, help="slots freed and prefilled again in each trial")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--shapes", action="store_true", help="instead: time prefills of new shapes (1-24 rows of "
                        "--prompt tokens, then 4 rows of --prompt-12 to --prompt+12), each shape twice, no decode")
    parser.add_argument("--queued", action="store_true", help="instead: with 0-3 decode steps queued ahead, time "
                        "the host's launch of a queued prefill of 4 prompts, and of one CUDA OrtValue made from numpy "
                        "(does either wait for the steps ahead?)")
    parser.add_argument("--profile", action="store_true", help="with --queued: ONNX Runtime's profile of the "
                        "session, summarized as each prefill node's host time with 0 and with 3 steps ahead (which "
                        "node waits, if the launch does)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if not args.bundle.is_dir():
        parser.error(f"{args.bundle} is not a bundle folder (leptonc compile ... -o B.lepton makes one)")

    import onnxruntime

    onnxruntime.preload_dlls()
    from leptonc.bundle import load_bundle
    from leptonc.runtime.slots import open_kv_slots

    if args.profile:
        profile_sessions(onnxruntime)
    slots = open_kv_slots(load_bundle(args.bundle, verify=False), "cuda", args.rows)
    slots.warm_up(0)
    every = list(range(args.rows))
    ms = lambda a, b: round((b - a) * 1e3, 3)  # noqa: E731
    if args.shapes:  # does a prefill of a shape not run before cost more than the same shape again?
        shapes = [(rows, args.prompt) for rows in range(1, 25)] + [(4, w) for w in range(args.prompt - 12, args.prompt + 13)]
        rows_out = []
        for rows, width in shapes:
            times = []
            for _ in range(2):
                start = time.perf_counter()
                slots.prefill_tokens(list(range(rows)), [[5] * width] * rows)
                times.append(ms(start, time.perf_counter()))
                for slot in range(rows):
                    slots.free(slot)
            rows_out.append({"rows": rows, "width": width, "first_ms": times[0], "again_ms": times[1]})
        emit({"bundle": str(args.bundle), "shapes": rows_out,
              "median_first_ms": statistics.median(r["first_ms"] for r in rows_out),
              "median_again_ms": statistics.median(r["again_ms"] for r in rows_out)}, args.out)
        return
    if args.queued:
        emit(queued_launches(slots, args), args.out)
        return
    slots.prefill_tokens(every, [[5] * args.prompt] * args.rows)
    ids = np.full(args.rows, 7, np.int64)
    slots.decode_collect(slots.decode_launch(every, ids))
    trials = []
    for trial in range(args.trials):
        refill = list(range(trial % 3, trial % 3 + args.refill))
        for slot in refill:
            slots.free(slot)
        t0 = time.perf_counter()
        slots.prefill_tokens(refill, [[5] * args.prompt] * len(refill))
        t1 = time.perf_counter()
        fresh = slots.decode_launch(every, ids)
        t2 = time.perf_counter()
        slots.decode_collect(fresh)
        t3 = time.perf_counter()
        steady = slots.decode_launch(every, None)
        t4 = time.perf_counter()
        slots.decode_collect(steady)
        t5 = time.perf_counter()
        t6 = time.perf_counter()
        slots.free(refill[0])
        slots.prefill_tokens(refill[:1], [[5] * args.prompt])
        t7 = time.perf_counter()
        trials.append({"prefill_ms": ms(t0, t1), "prefill_runs": slots.last_prefill_runs, "fresh_launch_ms": ms(t1, t2),
                       "fresh_wait_ms": ms(t2, t3), "steady_launch_ms": ms(t3, t4), "steady_wait_ms": ms(t4, t5),
                       "one_prompt_prefill_ms": ms(t6, t7)})
        if int(slots.lengths.max()) > slots.max_sequence - 8:
            break
    medians = {key: round(statistics.median(t[key] for t in trials), 3) for key in trials[0]}
    emit({"bundle": str(args.bundle), "rows": args.rows, "refill": args.refill, "prompt": args.prompt,
          "trials": trials, "median": medians}, args.out)
    slots.release()


def queued_launches(slots, args) -> dict:
    """Rows 4.. decode while rows 0-3 are prefilled: per trial and per number of steps queued ahead (0-3), the
    host's time to make a CUDA OrtValue from numpy (as a prefill's inputs are made) and to launch the prefill, then
    the waits for the steps and for the prefill. A launch that grows by a step's time per step ahead waits for them."""
    if not getattr(slots, "async_prefill", False):
        return {"bundle": str(args.bundle), "queued": "not measured: these slots wait for their prefills "
                f"({slots.describe().get('queued_prefills')})"}
    ms = lambda a, b: round((b - a) * 1e3, 3)  # noqa: E731
    every = list(range(args.rows))
    slots.prefill_tokens(every, [[5] * args.prompt] * args.rows)
    busy, runner, out = every[4:], slots.runner, []
    runner.session = TimedRuns(runner.session)  # the launch's ONNX Runtime run, apart from its bindings
    ids = np.full(len(busy), 7, np.int64)
    # inputs no node reads, bound on the host (as the runtime does) and, alternately, on the device as before
    unread = {"host": set(runner.unread_inputs), "device": set()}
    for trial, ahead, bound in [(t, a, b) for t in range(args.trials) for a in range(4) for b in unread]:
        runner.unread_inputs = unread[bound]
        for slot in range(4):
            slots.free(slot)
        handles = [slots.decode_launch(busy, ids) for _ in range(ahead)]
        t0 = time.perf_counter()
        runner._ortvalue(np.zeros((4, args.prompt), np.int64))
        t1 = time.perf_counter()
        runner._feeds = []
        runner.session.seconds.clear()
        prefill = slots.prefill_launch(list(range(4)), [[5] * args.prompt] * 4)
        t2 = time.perf_counter()
        run_ms, runs = round(sum(runner.session.seconds) * 1e3, 3), len(runner.session.seconds)
        for handle in handles:
            slots.decode_collect(handle)
        t3 = time.perf_counter()
        slots.prefill_collect(prefill)
        t4 = time.perf_counter()
        out.append({"trial": trial, "ahead": ahead, "unread_bound": bound, "ortvalue_ms": ms(t0, t1),
                    "prefill_launch_ms": ms(t1, t2),
                    "prefill_ort_run_ms": run_ms, "prefill_runs": runs, "steps_wait_ms": ms(t2, t3),
                    "prefill_wait_ms": ms(t3, t4)})
    keys = ("ortvalue_ms", "prefill_launch_ms", "prefill_ort_run_ms", "steps_wait_ms", "prefill_wait_ms")
    runner.unread_inputs = unread["host"]

    def medians(bound: str) -> dict:
        return {ahead: {k: round(statistics.median(r[k] for r in out if r["ahead"] == ahead and r["unread_bound"] == bound),
                                 3) for k in keys} for ahead in range(4)}

    result = {"bundle": str(args.bundle), "rows": args.rows, "prompt": args.prompt, "unread_inputs": sorted(unread["host"]),
              "runs": out, "median_by_steps_ahead": medians("host"),
              "median_by_steps_ahead_unread_on_device": medians("device")}
    if args.profile:  # the launches with the unread inputs on the host
        session = runner.session.session
        result["profile"] = profile_summary(Path(session.end_profiling()), [r["prefill_runs"] for r in out],
                                            [r["ahead"] if r["unread_bound"] == "host" else -1 for r in out])
    return result


class TimedRuns:
    """A session whose run_with_iobinding calls are timed (`seconds`); everything else is the session's."""

    def __init__(self, session):
        self.session, self.seconds = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, binding, options=None):
        started = time.perf_counter()
        try:
            return self.session.run_with_iobinding(binding, options)
        finally:
            self.seconds.append(time.perf_counter() - started)


def profile_sessions(onnxruntime) -> None:
    """Every InferenceSession made from here on writes ONNX Runtime's profile (a JSON trace of each run's nodes)."""
    made = onnxruntime.InferenceSession

    def profiled(path, options=None, *args, **kwargs):
        options = options or onnxruntime.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = "/tmp/slots_profile"
        return made(path, options, *args, **kwargs)

    onnxruntime.InferenceSession = profiled


def profile_summary(path: Path, runs_per_launch: list[int], ahead: list[int]) -> dict:
    """The profile's prefill runs (runs with node events; a captured decode step has none), the last ones matched to
    the launches in order: per node, the median host time (us) with 0 and with 3 steps queued ahead, the nodes whose
    time grows most first."""
    import json

    events = json.loads(path.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run = []
    for run in runs:
        inside = [e for e in nodes if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]]
        if inside:
            per_run.append((run["dur"], {e["name"].removesuffix("_kernel_time"): e["dur"] for e in inside}))
    per_run = per_run[-sum(runs_per_launch):] if len(per_run) >= sum(runs_per_launch) else []
    by_ahead: dict[int, list] = {0: [], 3: []}
    for count, a in zip(runs_per_launch, ahead):
        taken, per_run = per_run[:count], per_run[count:]
        if a in by_ahead and count == 1 and taken:
            by_ahead[a].append(taken[0])
    if not by_ahead[0] or not by_ahead[3]:
        return {"file": str(path), "summary": "no prefill runs matched the launches"}
    med = lambda xs: float(statistics.median(xs))  # noqa: E731
    names = by_ahead[0][0][1].keys()
    rows = [{"node": n, "us_0_ahead": med([r[1].get(n, 0) for r in by_ahead[0]]),
             "us_3_ahead": med([r[1].get(n, 0) for r in by_ahead[3]])} for n in names]
    rows.sort(key=lambda r: r["us_3_ahead"] - r["us_0_ahead"], reverse=True)
    return {"file": str(path), "nodes": len(rows),
            "run_us": {"0_ahead": med([r[0] for r in by_ahead[0]]), "3_ahead": med([r[0] for r in by_ahead[3]])},
            "node_sum_us": {"0_ahead": sum(r["us_0_ahead"] for r in rows), "3_ahead": sum(r["us_3_ahead"] for r in rows)},
            "grew_most": rows[:8], "slowest_0_ahead": sorted(rows, key=lambda r: -r["us_0_ahead"])[:8]}


if __name__ == "__main__":
    main()
