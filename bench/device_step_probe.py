"""Where a decode step's time goes on the GPU (bench only): for a CUDA bundle, after a 128-token
prefill at batch B, time in one process
  full    - runner.decode_tokens(token) as `leptonc bench` times it (inputs in, replay, the greedy tokens
            to the host: only they where the graph has a next_token output);
  full_logits - runner.decode(token): the same step with the logits copied to the host instead;
  replay  - the bound decode step alone, repeated (one captured-graph replay + ORT's end-of-run sync);
  async   - the same with ORT's end-of-run synchronisation off, synchronised once at the end (GPU time);
  inputs  - only the per-step input copies (ids, positions, the [B, capacity] mask: one buffer);
  logits  - only the logits copy to the host; token - only the next_token copy.

    python3 bench/device_step_probe.py BUNDLE OUT.json [--batch 1] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def timed(fn, n: int) -> float:
    """Median of 5 blocks of n calls, in ms per call."""
    blocks = []
    for _ in range(5):
        s = time.perf_counter()
        for _ in range(n):
            fn()
        blocks.append((time.perf_counter() - s) * 1e3 / n)
    return round(statistics.median(blocks), 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner

    bundle = load_bundle(args.bundle, verify=False)
    r = open_bundle_runner(bundle)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, min(1000, bundle.io["vocab_size"]), size=(args.batch, 128), dtype=np.int64)
    logits = r.prefill(ids, np.ones_like(ids), last_only=True)
    tok = logits.argmax(-1)
    for _ in range(5):
        tok = r.decode(tok).argmax(-1)
    result = {"bundle": str(args.bundle), "batch": args.batch, "runner": r.describe()}
    result["full_ms"] = timed(lambda: r.decode_tokens(tok), args.steps)
    result["full_logits_ms"] = timed(lambda: r.decode(tok), args.steps)
    state = r._decode_state(args.batch)
    binding, ro = state["binding"], state["run_options"]
    result["replay_ms"] = timed(lambda: r.session.run_with_iobinding(binding, ro), args.steps)
    ro_async = r._run_options(r._graph_ids.get(args.batch, -1)) if r.cuda_graph else r.ort.RunOptions()
    ro_async.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def burst():
        for _ in range(args.steps):
            r.session.run_with_iobinding(binding, ro_async)
        binding.synchronize_outputs()

    result["async_ms"] = round(timed(burst, 1) / args.steps, 4)
    ids1 = np.ones((args.batch, 1), np.int64)
    if "inputs" in state:  # right-padded: one buffer
        result["inputs_ms"] = timed(lambda: state["inputs"].update_inplace(state["host_inputs"]), args.steps)
    else:
        result["inputs_ms"] = timed(lambda: (state["ids"].update_inplace(ids1), state["pos"].update_inplace(ids1)),
                                    args.steps)
    result["logits_ms"] = timed(lambda: state["logits"].numpy(), args.steps)
    if "next_token" in state:
        result["token_ms"] = timed(lambda: state["next_token"].numpy(), args.steps)
    out = r.decode(tok)
    result["argmax_ms"] = timed(lambda: out.argmax(-1), args.steps)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
