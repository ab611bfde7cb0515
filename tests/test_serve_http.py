"""`leptonc serve` as a real process on localhost, driven by the official `openai` client (and raw HTTP
where a client would refuse to send the bad request)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_engine import run_alone

API_KEY = "test-key"


class ServerProcess:
    """`leptonc serve BUNDLE --port 0 ...` in a subprocess; the port read from its "serving ... on" line."""

    def __init__(self, bundle, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "leptonc", "serve", str(bundle), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            found = re.search(r"serving (\S+) on (http://\S+)", line)
            if found:
                self.model, self.url = found[1], found[2]
                break
        else:
            self.proc.kill()
        if not hasattr(self, "url"):
            self.proc.kill()
            raise AssertionError("the server did not start: " + "".join(self.log) + self.proc.stderr.read())
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", API_KEY), max_retries=0, **kw)

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics").text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}"
                                     if sample.labels else "")
                values[key] = sample.value
        return values

    def wait_idle(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["leptonc_requests_running"] == 0 and m["leptonc_kv_slots_used"] == 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=5)
        return code


def _post(server, path: str, body, headers=None, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                               **(headers or {})}, **kw)


def _error(response: httpx.Response, status: int) -> dict:
    """An OpenAI-shaped error with the documented status, and no traceback in it."""
    assert response.status_code == status, (response.status_code, response.text)
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# every test of `tiny_server` runs against both ways to serve: the engine in the server's process, and in one of its own
ENGINE_MODES = {"engine-in-server": ("--engine-in-server",), "engine-process": ("--engine-process",)}


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def tiny_server(tiny_bundle, request):
    server = ServerProcess(tiny_bundle, "--api-key", API_KEY, "--max-queue", "4", *ENGINE_MODES[request.param])
    yield server
    assert server.stop() == 0
    assert "Traceback" not in "".join(server.log)


def test_a_stop_string_ends_the_request_and_frees_its_slot(tiny_server, tiny_bundle):
    # the stop string is found where the text is made (with --engine-process: the server's process, which tells the
    # engine's process to free the slot)
    alone = run_alone(tiny_bundle, ["Stop here: "], [30])[0]
    stop = alone.text[len(alone.text) // 2:][:3]
    assert stop.strip(), alone.text
    before = tiny_server.metrics()
    response = tiny_server.client().completions.create(model=tiny_server.model, prompt="Stop here: ", max_tokens=30,
                                                       temperature=0, stop=[stop])
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.text == alone.text[:alone.text.find(stop)]
    after = tiny_server.wait_idle()
    assert after["leptonc_requests_running"] == 0 and after["leptonc_kv_slots_used"] == 0
    key = "leptonc_sequences_finished_total{reason=stop}"
    assert after[key] == before[key] + 1


PROMPTS = [f"Client {i} writes " + "more words " * (i * 5 % 13) for i in range(16)]
MAX_TOKENS = [4 + (i * 7) % 29 for i in range(16)]


def test_sixteen_concurrent_requests_each_match_their_run_alone(tiny_server, tiny_bundle):
    reference = run_alone(tiny_bundle, PROMPTS, MAX_TOKENS)
    client = tiny_server.client()
    before = tiny_server.metrics()

    def complete(i):
        if i % 2:  # half of them streamed
            chunks = list(client.completions.create(model=tiny_server.model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i],
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
            tokens = [t for c in chunks for choice in c.choices for t in choice.model_extra["token_ids"]]
            text = "".join(choice.text for c in chunks for choice in c.choices)
            finish = [choice.finish_reason for c in chunks for choice in c.choices][-1]
            return tokens, text, finish, chunks[-1].usage
        response = client.completions.create(model=tiny_server.model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i],
                                             temperature=0)
        choice = response.choices[0]
        return choice.model_extra["token_ids"], choice.text, choice.finish_reason, response.usage

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(complete, range(16)))
    for (tokens, text, finish, usage), alone in zip(results, reference):
        assert (tokens, text) == (alone.token_ids, alone.text)
        assert finish == {"eos": "stop"}.get(alone.finish_reason, alone.finish_reason)
        assert usage.completion_tokens == len(alone.token_ids) and usage.prompt_tokens == len(alone.prompt_ids)
    after = tiny_server.wait_idle()
    sent_prompt = sum(len(g.prompt_ids) for g in reference)
    assert after["leptonc_prompt_tokens_total"] - before["leptonc_prompt_tokens_total"] == sent_prompt
    assert (after["leptonc_generation_tokens_total"] - before["leptonc_generation_tokens_total"]
            == sum(len(g.token_ids) for g in reference))
    key = "leptonc_http_requests_total{endpoint=completions,status=200}"
    assert after[key] - before.get(key, 0) == 16
    assert after["leptonc_time_to_first_token_seconds_count"] - before["leptonc_time_to_first_token_seconds_count"] == 16
    assert after["leptonc_kv_slots"] == 16 and after["leptonc_requests_queued"] == 0


def test_a_gpu_layout_bundle_is_warmed_up_before_it_serves(right_padded_bundle):
    # the GPU's K/V block layout (BlockKvSlots), here on the CPU: every decode batch size and a spread of prefill shapes
    # run before the "serving" line (on a GPU bundle: each batch size's CUDA graph captured); then 16 concurrent
    # greedy requests (one prefill run takes their first tokens from the graph) each get their tokens run alone
    reference = run_alone(right_padded_bundle, PROMPTS, MAX_TOKENS)
    server = ServerProcess(right_padded_bundle)
    try:
        started = "".join(server.log)
        assert re.search(r"warmed up in [\d.]+ s: 5 decode batch sizes, \d+ prefill shapes", started), started
        assert "engine in the server's process" in started  # a CPU bundle's default (a CUDA bundle's: its own)
        client = server.client()

        def complete(i):
            response = client.completions.create(model=server.model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i],
                                                 temperature=0)
            return response.choices[0].model_extra["token_ids"]

        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(complete, range(16))) == [g.token_ids for g in reference]
        assert server.wait_idle()["leptonc_kv_slots_used"] == 0
    finally:
        assert server.stop() == 0
    assert "Traceback" not in "".join(server.log)
    cold = ServerProcess(right_padded_bundle, "--no-warmup")
    try:
        assert "warmed up" not in "".join(cold.log)
    finally:
        assert cold.stop() == 0


@pytest.mark.parametrize("kind, extra, said", [
    ("completion", {"frequency_penalty": 0.5}, "frequency_penalty: not supported"),
    ("chat", {"presence_penalty": -1}, "presence_penalty: not supported"),
    ("completion", {"logit_bias": {"50256": -100}}, "logit_bias: not supported"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format: only type text"),
    ("completion", {"best_of": 3}, "best_of: only best_of=1"),
    ("completion", {"suffix": "end"}, "suffix: not supported"),
    ("chat", {"functions": [{"name": "f"}]}, "functions: not supported"),
    ("chat", {"top_logprobs": 2}, "top_logprobs: not supported"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content: only text parts"),
])
def test_fields_that_would_change_the_output_are_refused_not_ignored(kind, extra, said):
    from leptonc.server.models import ChatCompletionRequest, CompletionRequest

    if kind == "chat":
        body = ChatCompletionRequest(**{"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra})
    else:
        body = CompletionRequest(**{"model": "m", "prompt": "hi", **extra})
    assert body.unsupported().startswith(said), body.unsupported()


def test_defaults_that_clients_send_are_accepted():
    """What OpenAI's and other clients send by default changes nothing and is not refused."""
    from leptonc.server.models import ChatCompletionRequest

    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                 frequency_penalty=0, presence_penalty=0.0, logit_bias={}, n=1, best_of=None,
                                 response_format={"type": "text"}, tools=[], top_logprobs=0)
    assert body.unsupported() is None and body.messages[0].text() == "hi"


def test_bad_requests_get_documented_errors(tiny_server):
    url, model = tiny_server.url, tiny_server.model
    good = {"model": model, "prompt": "hello", "max_tokens": 2}
    assert _error(_post(tiny_server, "/v1/completions", b'{"model": "x", "prompt": '), 400)["code"] == "invalid_json"
    assert _error(_post(tiny_server, "/v1/completions", {**good, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    for bad in (0, -3):
        assert "max_tokens" in _error(_post(tiny_server, "/v1/completions", {**good, "max_tokens": bad}), 400)["message"]
    beyond = _error(_post(tiny_server, "/v1/completions", {**good, "max_tokens": 4096}), 400)
    assert "limit of 2048 tokens" in beyond["message"]
    too_long = _error(_post(tiny_server, "/v1/completions", {**good, "prompt": "word " * 2100}), 400)
    assert "at most 2048" in too_long["message"]
    assert _error(_post(tiny_server, "/v1/completions", b"x" * (2 << 20)), 413)["code"] == "request_too_large"
    assert _error(_post(tiny_server, "/v1/completions", {"model": model}), 400)["param"] == "prompt"
    refused = _error(_post(tiny_server, "/v1/completions", {**good, "frequency_penalty": 0.5}), 400)
    assert (refused["param"], refused["code"]) == ("frequency_penalty", "unsupported_parameter")
    # no key, a wrong key: 401; /health and /metrics stay open
    assert _error(httpx.post(url + "/v1/completions", json=good), 401)["code"] == "invalid_api_key"
    assert _error(_post(tiny_server, "/v1/completions", good, {"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        tiny_server.client(api_key="wrong").models.list()
    assert httpx.get(url + "/health").json()["status"] == "ok"
    # the server still serves
    assert tiny_server.client().completions.create(**good).usage.completion_tokens >= 1
    assert tiny_server.wait_idle()["leptonc_requests_running"] == 0


def test_ten_times_slots_plus_queue_gets_429_then_recovers(tiny_server):
    import asyncio

    capacity = 16 + 4  # slots + --max-queue
    body = {"model": tiny_server.model, "prompt": "flood", "max_tokens": 48, "ignore_eos": True}

    async def flood():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                                     limits=httpx.Limits(max_connections=None)) as client:
            return await asyncio.gather(*(client.post(tiny_server.url + "/v1/completions", json=body)
                                          for _ in range(10 * capacity)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429} and statuses.count(200) >= capacity, statuses
    for r in responses:
        if r.status_code == 429:
            assert _error(r, 429)["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 48
    m = tiny_server.wait_idle()
    assert m["leptonc_requests_running"] == 0 and m["leptonc_kv_slots_used"] == 0
    assert m["leptonc_http_requests_total{endpoint=completions,status=429}"] == statuses.count(429)
    again = tiny_server.client().completions.create(model=tiny_server.model, prompt="flood", max_tokens=3,
                                                    extra_body={"ignore_eos": True})
    assert again.usage.completion_tokens == 3


def test_client_disconnect_mid_stream_frees_the_slot(tiny_server):
    before = tiny_server.metrics()["leptonc_sequences_finished_total{reason=cancelled}"]
    body = {"model": tiny_server.model, "prompt": "a very long answer", "max_tokens": 1900, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert tiny_server.metrics()["leptonc_requests_running"] == 1
    m = tiny_server.wait_idle()  # closed after the first chunk: cancelled long before 1,900 tokens
    assert m["leptonc_requests_running"] == 0 and m["leptonc_kv_slots_used"] == 0
    assert m["leptonc_sequences_finished_total{reason=cancelled}"] == before + 1


@pytest.mark.parametrize("mode", list(ENGINE_MODES))
def test_sigterm_under_load_finishes_in_flight_and_exits_0(tiny_bundle, tmp_path, mode):
    # (served with --stream-interval 4: a stream's tokens leave four at a time after the first, and --trace: the
    # scheduler's timeline is written when it stops, by the engine's process where it has one)
    trace = tmp_path / "trace.json"
    server = ServerProcess(tiny_bundle, "--grace", "30", "--stream-interval", "4", "--trace", str(trace),
                           *ENGINE_MODES[mode])
    client = server.client()
    streaming = threading.Barrier(5)  # the four streams have their first tokens, and the test goes on

    def stream(i):
        chunks = client.completions.create(model=server.model, prompt=f"load {i}", max_tokens=150, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        tokens = carrying = 0
        for chunk in chunks:
            if not tokens:
                streaming.wait(60)
            count = len(chunk.choices[0].model_extra["token_ids"])
            tokens, carrying = tokens + count, carrying + (count > 0)
            finish = chunk.choices[0].finish_reason
        assert carrying <= 1 + -(-149 // 4), carrying  # the first token alone, then at most one chunk per four
        return tokens, finish

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, i) for i in range(4)]
        streaming.wait(60)  # every request is in flight: SIGTERM must let each one finish
        server.proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=60) for f in futures]
    assert results == [(150, "length")] * 4
    assert server.proc.wait(timeout=60) == 0
    log = "".join(server.log)
    assert "Traceback" not in log
    with pytest.raises(openai.APIConnectionError):  # no longer listening
        client.models.list()
    timeline = json.loads(trace.read_text())
    assert f"wrote the scheduler's timeline to {trace}" in log
    spans = [e for e in timeline["traceEvents"] if e["ph"] == "X"]
    totals = timeline["otherData"]["totals"]
    assert totals["prefill"]["count"] >= 1 and all(e["args"]["tokens"] > 0 for e in spans if e["name"] == "prefill")
    steps = sum(totals.get(name, {"count": 0})["count"] for name in ("decode", "launch"))
    assert steps >= 149  # 150 tokens each, the first from the prefill: a step runs at once ("decode") or is queued


def test_an_engine_process_that_dies_fails_its_requests_and_the_server_says_so(tiny_bundle):
    import psutil

    server = ServerProcess(tiny_bundle, "--engine-process")
    client = server.client()
    chunks = client.completions.create(model=server.model, prompt="long", max_tokens=1900, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert next(iter(chunks)).choices[0].model_extra["token_ids"]
    (engine,) = [p for p in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    engine.kill()
    with pytest.raises(openai.APIError, match="engine"):  # the stream ends with the error, not a hang
        for _ in chunks:
            pass
    deadline = time.monotonic() + 30
    while (health := httpx.get(server.url + "/health")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health.status_code == 503 and "engine's process exited" in health.text
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=server.model, prompt="after", max_tokens=2)
    assert refused.value.status_code == 503
    code = server.stop()
    log = "".join(server.log)
    assert code == 8 and "the engine stopped: the engine's process exited" in log and "Traceback" not in log


def test_an_engine_process_that_cannot_load_its_bundle_exits_with_the_bundle_error(tmp_path):
    broken = tmp_path / "broken.lepton"
    broken.mkdir()
    proc = subprocess.run([sys.executable, "-m", "leptonc", "serve", str(broken), "--port", "0", "--engine-process"],
                          capture_output=True, text=True, timeout=120)
    direct = subprocess.run([sys.executable, "-m", "leptonc", "serve", str(broken), "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert proc.returncode == direct.returncode != 0, (proc.stderr, direct.stderr)
    assert "Traceback" not in proc.stderr and direct.stderr.strip().splitlines()[-1] in proc.stderr


def test_serve_trace_into_a_missing_folder_is_refused_before_loading(tiny_bundle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "leptonc", "serve", str(tiny_bundle), "--port", "0", "--trace",
                           str(tmp_path / "nowhere" / "t.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_smollm2_completions_and_chat_match_run_alone(smollm2_bundle):
    from leptonc.bundle import load_bundle
    from leptonc.runtime import open_bundle_runner
    from leptonc.runtime.batching import BatchingEngine, EngineConfig
    from leptonc.runtime.generate import SamplingConfig, generate

    prompts = ["The capital of France is", "Water boils at"]
    messages = [[{"role": "user", "content": "What is the capital of France?"}]]
    engine = BatchingEngine.from_bundle(smollm2_bundle, EngineConfig(verify=False, num_slots=1))
    chat_ids = [engine.apply_chat_template(m) for m in messages]
    engine.shutdown(0)
    runner = open_bundle_runner(load_bundle(smollm2_bundle))
    cfg = SamplingConfig(max_new_tokens=8)
    plain = [generate(runner, engine.tokenizer, [p], cfg, eos_ids=engine.eos_ids).outputs[0] for p in prompts]
    chat = [generate(runner, engine.tokenizer, ["chat"], cfg, eos_ids=engine.eos_ids, prompt_ids=[ids]).outputs[0]
            for ids in chat_ids]
    runner.release()
    assert plain[0].text.startswith(" Paris")

    server = ServerProcess(smollm2_bundle, "--api-key", API_KEY)
    try:
        client = server.client()
        with ThreadPoolExecutor(4) as pool:
            done = pool.map(lambda p: client.completions.create(model=server.model, prompt=p, max_tokens=8,
                                                                temperature=0), prompts)
            streamed = pool.map(lambda p: "".join(c.choices[0].text for c in client.completions.create(
                model=server.model, prompt=p, max_tokens=8, temperature=0, stream=True)), prompts)
            chats = pool.map(lambda m: client.chat.completions.create(model=server.model, messages=m, max_tokens=8,
                                                                      temperature=0), messages)
            chat_streams = pool.map(lambda m: "".join(c.choices[0].delta.content or "" for c in
                                                      client.chat.completions.create(model=server.model, messages=m,
                                                                                     max_tokens=8, temperature=0,
                                                                                     stream=True)), messages)
            done, streamed, chats, chat_streams = list(done), list(streamed), list(chats), list(chat_streams)
        for response, text, alone in zip(done, streamed, plain):
            assert response.choices[0].model_extra["token_ids"] == alone.token_ids
            assert response.choices[0].text == text == alone.text
        for response, text, alone in zip(chats, chat_streams, chat):
            assert response.choices[0].model_extra["token_ids"] == alone.token_ids
            assert response.choices[0].message.content == text == alone.text
            assert response.usage.prompt_tokens == len(alone.prompt_ids)
        m = server.wait_idle()
        assert m["leptonc_generation_tokens_total"] == 2 * sum(len(g.token_ids) for g in plain + chat)
    finally:
        assert server.stop() == 0


def test_bench_serve_reports_throughput_and_latency(tiny_server, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")  # a mounted secret, read from a file rather than the command line
    proc = subprocess.run([sys.executable, "-m", "leptonc", "bench-serve", tiny_server.url, "--concurrency", "4",
                           "--requests", "8", "--prompt-len", "16", "--gen-len", "8", "--json",
                           "--api-key-file", str(key_file)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["requests_ok"] == 8 and report["output_tokens"] == 64
    assert report["output_tokens_per_s"] > 0 and report["ttft"]["p99_ms"] >= report["ttft"]["p50_ms"] > 0
    assert report["itl"]["p50_ms"] is not None


def test_a_stream_whose_loop_falls_behind_gets_merged_chunks_with_exactly_its_tokens(tiny_server):
    # While a stream runs, a request with a 1 MB prompt holds the event loop for a second or two (the loop tokenizes
    # it, with Python's lock released, before refusing it as too long): the engine goes on, the stream's events pile
    # up, and they leave merged, a chunk carrying many tokens. The client still gets exactly the tokens and text of
    # the same request not streamed, and /metrics still counts one inter-token gap per token.
    request = {"model": tiny_server.model, "prompt": "a story told while the loop is busy", "max_tokens": 1800,
               "temperature": 0, "extra_body": {"ignore_eos": True}}
    client = tiny_server.client()
    whole = client.completions.create(**request).choices[0]
    before = tiny_server.metrics()
    started = threading.Event()

    def stream():
        chunks = []
        for chunk in client.completions.create(**request, stream=True):
            chunks.append(chunk)
            started.set()
        return chunks

    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream)
        assert started.wait(60)
        huge = {"model": tiny_server.model, "prompt": "word " * 200_000, "max_tokens": 1}
        assert _error(_post(tiny_server, "/v1/completions", huge), 400)["code"] == "context_length_exceeded"
        chunks = streaming.result(timeout=120)
    tokens = [t for c in chunks for choice in c.choices for t in choice.model_extra["token_ids"]]
    assert tokens == whole.model_extra["token_ids"] and len(tokens) == 1800
    assert "".join(choice.text for c in chunks for choice in c.choices) == whole.text
    assert chunks[-1].choices[0].finish_reason == "length"
    sizes = [len(choice.model_extra["token_ids"]) for c in chunks for choice in c.choices]
    assert max(sizes) >= 50 and len(chunks) < len(tokens), sizes
    after = tiny_server.wait_idle()
    itl = "leptonc_inter_token_latency_seconds_count"
    assert after[itl] - before[itl] == 1799
    ttft = "leptonc_time_to_first_token_seconds_count"
    assert after[ttft] - before[ttft] == 1


@pytest.mark.parametrize("mode", [["--concurrency", "4"], ["--rate", "40"]])
def test_bench_serve_spreads_clients_over_worker_processes(tiny_server, mode):
    proc = subprocess.run([sys.executable, "-m", "leptonc", "bench-serve", tiny_server.url, *mode, "--workers", "2",
                           "--requests", "8", "--prompt-len", "16", "--gen-len", "8", "--json", "--api-key", API_KEY],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["workers"] == 2 and report["config"]["workers"] == 2
    assert report["requests_ok"] == 8 and report["output_tokens"] == 64 and report["statuses"] == {"200": 8}
    assert report["ttft"]["p99_ms"] >= report["ttft"]["p50_ms"] > 0 and report["itl"]["p50_ms"] is not None
    assert report["wall_s"] > 0 and report["output_tokens_per_s"] > 0
