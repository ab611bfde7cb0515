"""The serving peer: ONNX Runtime GenAI 0.18's own continuous-batching engine (`onnxruntime_genai.Engine`)
under the load `leptonc bench-serve` puts on `leptonc serve`: N clients, each one request after another,
prompts of `--prompt-len` random token ids, exactly `--gen-len` new tokens each (greedy), `--requests` in all.

ONNX Runtime GenAI has no HTTP server, so its engine is driven in-process (no HTTP, no JSON, no
detokenization: everything leptonc's figure pays for and this one does not). Output tokens/s and
requests/s over the run's wall time; time to first token and inter-token latency as the engine hands
each token out, p50/p99, in the JSON keys `leptonc bench-serve --json` uses.

Where this onnxruntime_genai has no `Engine` (or it fails on this model), the script says so and measures
the peer's static batch at its limit (32) instead, as the comparison's fallback: `"mode": "static-batch"`.

Runs on the GPU machine beside ../shared/device/peer_ortgenai.py, which builds the peer's model:
    python3 bench/serve_peer_ortgenai.py --peer-script PATH/peer_ortgenai.py llama-1b fp16 --concurrency 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import numpy as np


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    arr = np.asarray(values) * 1000
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3),
            "mean_ms": round(float(arr.mean()), 3)}


def engine_load(model_dir: str, args) -> dict:
    """Closed-loop load on og.Engine: `concurrency` requests in flight, a new one as each finishes."""
    import onnxruntime_genai as og

    model = og.Model(model_dir)
    engine = og.Engine(model)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(100, 1000, args.prompt_len).astype(np.int32) for _ in range(args.requests)]
    state: dict = {}  # request -> {"start", "last", "tokens"}
    ttft, gaps, latencies = [], [], []
    next_prompt = 0

    def add() -> None:
        nonlocal next_prompt
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=args.prompt_len + args.gen_len,
                                  min_length=args.prompt_len + args.gen_len, do_sample=False)
        request = og.Request(params)
        request.add_tokens(prompts[next_prompt])
        next_prompt += 1
        state[request] = {"start": time.perf_counter(), "last": None, "tokens": 0}
        engine.add_request(request)

    started = time.perf_counter()
    for _ in range(min(args.concurrency, args.requests)):
        add()
    done = tokens = 0
    while state:
        request = engine.step()
        if request is None:
            continue
        now = time.perf_counter()
        record = state.get(request)
        if record is None:
            continue
        while request.has_unseen_tokens():
            request.get_unseen_token()
            record["tokens"] += 1
            tokens += 1
            if record["last"] is None:
                ttft.append(now - record["start"])
            else:
                gaps.append(now - record["last"])
            record["last"] = now
        if request.is_done():
            latencies.append(now - record["start"])
            engine.remove_request(request)
            del state[request]
            done += 1
            if next_prompt < args.requests:
                add()
    wall = time.perf_counter() - started
    return {"mode": "engine", "requests_ok": done, "wall_s": round(wall, 3), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(done / wall, 3),
            "ttft": percentiles(ttft), "itl": percentiles(gaps), "latency": percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=["llama-1b", "smollm2-135m"])
    parser.add_argument("precision", choices=["fp16", "int4"])
    parser.add_argument("--peer-script", required=True, help="path of ../shared/device/peer_ortgenai.py")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import onnxruntime as ort

    ort.preload_dlls()
    spec = importlib.util.spec_from_file_location("peer_ortgenai", args.peer_script)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    plain_dir, _ = peer.build(args.shape, args.precision)
    head = {"peer": "ort-genai-0.18", "shape": args.shape, "precision": args.precision,
            "concurrency": args.concurrency, "prompt_len": args.prompt_len, "gen_len": args.gen_len}
    import onnxruntime_genai as og

    reason = None
    if not hasattr(og, "Engine"):
        reason = f"onnxruntime_genai {getattr(og, '__version__', '?')} has no Engine"
    else:
        try:
            print(json.dumps({**head, **engine_load(plain_dir, args)}), flush=True)
            return
        except Exception as exc:  # noqa: BLE001 - the fallback below is the documented comparison then
            reason = f"og.Engine failed: {type(exc).__name__}: {str(exc)[:300]}"
    static = peer.bench(plain_dir, 32, args.prompt_len, args.gen_len)
    print(json.dumps({**head, "mode": "static-batch", "why": reason, "batch": 32,
                      "output_tokens_per_s": static.get("decode_tps"), "ttft_ms": static.get("ttft_ms")}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
