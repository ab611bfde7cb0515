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
or on a model directory already built (`--model-dir DIR`; the shape and precision are then labels only).

Checked on CPU (not in the pytest suite: CI has no onnxruntime-genai) with the CPU onnxruntime-genai 0.18.0
wheel and onnx_ir installed with `pip install --no-deps --target /tmp/oggen`, beside the venv's onnxruntime
1.32 (0.18's loader dlopens `libonnxruntime.so.1`, so link that name to the venv's libonnxruntime.so.1.32.0
inside /tmp/oggen/onnxruntime_genai/), on a random-weight llama (2 layers, hidden 64, 4 heads, 2 KV heads,
head_dim 16, intermediate 128, vocab 1024, tied embeddings, a WordLevel tokenizer as peer_ortgenai.py writes)
saved by transformers to /tmp/tinyog/hf:
    PYTHONPATH=/tmp/oggen python -m onnxruntime_genai.models.builder -i /tmp/tinyog/hf -o /tmp/tinyog/og \
        -p fp32 -e cpu -c /tmp/tinyog/cache
    PYTHONPATH=/tmp/oggen python bench/serve_peer_ortgenai.py tiny-llama fp32 --model-dir /tmp/tinyog/og \
        --concurrency 4 --requests 12 --prompt-len 16 --gen-len 8
-> "mode": "engine", 12 requests of exactly 8 tokens each ("tokens_per_request"), at concurrency 1, 4 and 8
(above the CPU engine's max batch of 4); the engine's greedy tokens equal og.Generator's for the same prompts.
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
    """Closed-loop load on og.Engine: `concurrency` requests in flight, a new one as each finishes.

    The 0.18 engine API: `engine.create_request()` gives a Request, `request.begin_turn(prompt, TurnOptions)`
    queues its prompt; each `engine.run(buffer)` runs one scheduling step and refills `buffer` (and returns it)
    with that step's events, `len(buffer)` of them, `buffer[i]` an EngineEvent whose `flags` say TOKEN (with
    `token`), TURN_FINISHED (with `finish_reason`, `usage`), CAPACITY_BLOCKED, FAILED (with `error_code`).
    """
    import onnxruntime_genai as og

    TOKEN, FINISHED = int(og.EngineEventFlags.TOKEN), int(og.EngineEventFlags.TURN_FINISHED)
    BLOCKED, FAILED = int(og.EngineEventFlags.CAPACITY_BLOCKED), int(og.EngineEventFlags.FAILED)
    model = og.Model(model_dir)
    engine = og.Engine(model)
    caps = engine.get_capabilities()
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(100, 1000, args.prompt_len).astype(np.int32) for _ in range(args.requests)]
    state: dict = {}  # Request -> {"start", "last", "tokens"}; run's events hand back the same Request objects
    ttft, gaps, latencies, per_request = [], [], [], []
    next_prompt = blocked = 0

    def add() -> None:
        nonlocal next_prompt
        options = og.RequestOptions()
        options.set_max_session_tokens(args.prompt_len + args.gen_len)
        request = engine.create_request(options=options)
        turn = og.TurnOptions(request)
        turn.set_max_generated_tokens(args.gen_len)
        turn.set_min_generated_tokens(args.gen_len)  # EOS masked until then: exactly gen_len tokens
        turn.set_do_sample(False)
        state[request] = {"start": time.perf_counter(), "last": None, "tokens": 0}
        request.begin_turn(prompts[next_prompt], turn)
        next_prompt += 1

    buffer = engine.create_event_buffer(max(64, 4 * args.concurrency))
    started = time.perf_counter()
    for _ in range(min(args.concurrency, args.requests)):
        add()
    done = tokens = 0
    while state:
        if not engine.has_pending_requests():
            raise RuntimeError(f"engine idle with {len(state)} requests unfinished")
        engine.run(buffer)
        now = time.perf_counter()
        finished = []
        for i in range(len(buffer)):
            event = buffer[i]
            flags = int(event.flags)
            record = state.get(event.request)
            if flags & FAILED:
                raise RuntimeError(f"engine event FAILED: {event.error_code} ({event.finish_reason})")
            if flags & BLOCKED:
                blocked += 1
            if record is None:
                continue
            if flags & TOKEN:
                record["tokens"] += 1
                tokens += 1
                if record["last"] is None:
                    ttft.append(now - record["start"])
                else:
                    gaps.append(now - record["last"])
                record["last"] = now
            if flags & FINISHED:
                finished.append(event.request)
        for request in finished:
            record = state.pop(request)
            latencies.append(now - record["start"])
            per_request.append(record["tokens"])
            request.close()
            done += 1
            if next_prompt < args.requests:
                add()
    wall = time.perf_counter() - started
    return {"mode": "engine", "requests_ok": done, "wall_s": round(wall, 3), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(done / wall, 3),
            "tokens_per_request": {"min": min(per_request), "max": max(per_request)},
            "engine_max_batch": caps.configured_max_batch_size, "capacity_blocked_events": blocked,
            "ttft": percentiles(ttft), "itl": percentiles(gaps), "latency": percentiles(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", help="llama-1b or smollm2-135m (built by --peer-script); a label with --model-dir")
    parser.add_argument("precision", help="fp16 or int4 (built by --peer-script); a label with --model-dir")
    parser.add_argument("--peer-script", help="path of ../shared/device/peer_ortgenai.py (builds the model; "
                        "its static batch is the fallback)")
    parser.add_argument("--model-dir", help="an already built ONNX Runtime GenAI model directory to load instead")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.peer_script and not args.model_dir:
        parser.error("one of --peer-script and --model-dir is required")

    import onnxruntime as ort

    ort.preload_dlls()
    peer = None
    if args.peer_script:
        spec = importlib.util.spec_from_file_location("peer_ortgenai", args.peer_script)
        peer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peer)
    plain_dir = args.model_dir or peer.build(args.shape, args.precision)[0]
    head = {"peer": "ort-genai-0.18", "shape": args.shape, "precision": args.precision,
            "concurrency": args.concurrency, "prompt_len": args.prompt_len, "gen_len": args.gen_len}
    import onnxruntime_genai as og

    reason = None
    if not hasattr(og, "Engine"):
        reason = f"onnxruntime_genai {getattr(og, '__version__', '?')} has no Engine"
    else:
        try:
            print(json.dumps({**head, **engine_load(plain_dir, args)}), flush=True)
            return 0
        except Exception as exc:  # noqa: BLE001 - the fallback below is the documented comparison then
            reason = f"og.Engine failed: {type(exc).__name__}: {str(exc)[:300]}"
    if peer is None:
        print(json.dumps({**head, "mode": "failed", "why": reason}), flush=True)
        return 1
    static = peer.bench(plain_dir, 32, args.prompt_len, args.gen_len)
    print(json.dumps({**head, "mode": "static-batch", "why": reason, "batch": 32,
                      "output_tokens_per_s": static.get("decode_tps"), "ttft_ms": static.get("ttft_ms")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
