"""The real `tritonserver` (from the nvidia-pytriton wheel) serving packaged tiny-llama and smollm2-135m cpu
bundles through leptonc's Python-backend model: greedy completions through generate and generate_stream equal
`leptonc run`'s, 8 concurrent streams, Triton's and leptonc's counters on the metrics endpoint, a malformed
request answered with an error while the instance keeps serving, a tampered bundle that fails to load with
leptonc's message in Triton's log, and no process left behind after the server stops.

One server per module (both models in one repository); the tampered bundle gets a short-lived one of its own."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli
from leptonc.errors import BackendUnavailableError
from leptonc.triton_repository import TritonOptions, package_triton

MAX_TOKENS = 12
PROMPTS = ("The capital of France is", "Once upon a time, there was", "def fibonacci(n):", "The weather today",
           "In 1492, Columbus", "My favourite food is", "import numpy as np", "Water boils at")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _runtime(work: Path):
    from leptonc.triton_server import prepare_runtime

    try:
        return prepare_runtime(work)
    except BackendUnavailableError as e:  # the only reason to skip: tritonserver cannot run here
        pytest.skip(f"tritonserver cannot run here: {e}")


def _start(runtime, repo: Path, log: Path):
    from leptonc.triton_server import TritonServer

    http, grpc, metrics = _free_ports(3)
    return TritonServer(runtime, repo, log, http_port=http, grpc_port=grpc, metrics_port=metrics,
                        extra=("--exit-timeout-secs", "15"))


def _stop_and_check_no_orphan(server) -> None:
    from leptonc.triton_server import group_members

    pgid = server.process.pid
    server.stop(timeout_s=30)
    assert group_members(pgid) == [], "processes of tritonserver's group outlived it"


@pytest.fixture(scope="module")
def triton(tiny_bundle, smollm2_bundle, tmp_path_factory):
    work = tmp_path_factory.mktemp("triton")
    runtime = _runtime(work)
    repo = work / "models"
    package_triton(tiny_bundle, repo, TritonOptions(name="tiny"))
    package_triton(smollm2_bundle, repo, TritonOptions(name="smollm2"))
    server = _start(runtime, repo, work / "tritonserver.log")
    try:
        server.wait_ready(timeout_s=300)
        from leptonc.triton_server import group_members

        # the server and a Python-backend stub per model instance share its process group (what stop() ends)
        assert len(group_members(server.process.pid)) >= 3
        yield server
    finally:
        _stop_and_check_no_orphan(server)


@pytest.fixture(scope="module")
def reference(tiny_bundle, smollm2_bundle):
    """`leptonc run`'s greedy outputs for every prompt, per model (one CLI run each)."""
    outputs = {}
    for model, bundle, prompts in (("tiny", tiny_bundle, PROMPTS), ("smollm2", smollm2_bundle, PROMPTS[:3])):
        args = [a for p in prompts for a in ("--prompt", p)]
        proc = run_cli("run", bundle, *args, "-n", str(MAX_TOKENS), "--temperature", "0", "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[model] = {o["prompt"]: o for o in json.loads(proc.stdout)["outputs"]}
    return outputs


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.http_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _stream(server, model: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{server.http_url}/v2/models/{model}/generate_stream",
                                     data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def _ids(value) -> list[int]:
    return value if isinstance(value, list) else [value]  # Triton writes a one-element tensor as a scalar


def _greedy(prompt: str) -> dict:
    return {"text_input": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0}


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_generate_and_generate_stream_match_leptonc_run(triton, reference, model):
    for prompt, expected in reference[model].items():
        status, body = _post(triton, f"/v2/models/{model}/generate", _greedy(prompt))
        assert status == 200, body
        assert _ids(body["output_ids"]) == expected["token_ids"], prompt
        assert body["text_output"] == expected["text"]
        assert body["finish_reason"] == expected["finish_reason"]

        events = _stream(triton, model, _greedy(prompt))
        assert "error" not in events[-1], events[-1]
        assert len(events) > 1  # streamed: a response per token, not one at the end
        assert [t for e in events for t in _ids(e["output_ids"])] == expected["token_ids"]
        assert "".join(e["text_output"] for e in events) == expected["text"]
        assert events[-1]["finish_reason"] == expected["finish_reason"]
        assert all("finish_reason" not in e for e in events[:-1])
    if model == "smollm2":  # the real model says something true, not only something consistent
        assert reference[model][PROMPTS[0]]["text"].startswith(" Paris")


def test_eight_concurrent_streams(triton, reference):
    results: dict[str, list[dict]] = {}
    errors: list[BaseException] = []

    def one(prompt: str) -> None:
        try:
            results[prompt] = _stream(triton, "tiny", _greedy(prompt))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert sorted(results) == sorted(PROMPTS)
    for prompt, events in results.items():
        expected = reference["tiny"][prompt]
        assert [t for e in events for t in _ids(e["output_ids"])] == expected["token_ids"], prompt
        assert "".join(e["text_output"] for e in events) == expected["text"]


def _metric(text: str, name: str, model: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scrape(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        return response.read().decode()


def test_metrics_endpoint_shows_triton_and_leptonc_counters(triton, tiny_bundle):
    before = _scrape(triton)
    status, body = _post(triton, "/v2/models/tiny/generate", {"text_input": PROMPTS[1], "max_tokens": 5,
                                                              "stop_at_eos": False})
    assert status == 200, body
    generated = len(_ids(body["output_ids"]))
    assert generated == 5
    from leptonc.bundle import load_bundle
    from leptonc.runtime.tokenizer import load_tokenizer

    prompt_tokens = len(load_tokenizer(load_bundle(tiny_bundle).tokenizer_dir)(PROMPTS[1])["input_ids"])
    deadline = time.monotonic() + 10
    while True:  # leptonc's counters are published when a request ends, beside the response
        after = _scrape(triton)
        grew = (_metric(after, "leptonc_generation_tokens_total", "tiny")
                - _metric(before, "leptonc_generation_tokens_total", "tiny"))
        if grew >= generated or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert grew == generated
    assert (_metric(after, "leptonc_prompt_tokens_total", "tiny")
            - _metric(before, "leptonc_prompt_tokens_total", "tiny")) == prompt_tokens
    assert _metric(after, "nv_inference_request_success", "tiny") >= _metric(before, "nv_inference_request_success",
                                                                              "tiny") + 1
    assert _metric(after, "leptonc_kv_slots", "tiny") >= 1
    assert re.search(r'leptonc_sequences_finished_total\{[^}]*model="tiny"[^}]*reason="length"', after)
    for name in ("nv_inference_request_success", "leptonc_kv_slots"):  # the other model is reported too
        assert re.search(rf'^{name}{{[^}}]*model="smollm2"', after, re.MULTILINE), name


def test_malformed_requests_get_errors_and_the_instance_keeps_serving(triton, reference):
    for body, message in (({"text_input": PROMPTS[0], "temperature": -1.0}, "temperature must be >= 0"),
                          ({"max_tokens": 3}, "text_input is required"),
                          ({"text_input": PROMPTS[0], "top_p": 0.0}, "top_p must be in (0, 1]"),
                          ({"text_input": PROMPTS[0], "max_tokens": 10 ** 7}, "exceeds this bundle's limit"),
                          ({"text_input": PROMPTS[0], "top_k": -3}, "top_k must be >= 0")):
        status, answer = _post(triton, "/v2/models/tiny/generate", body)
        assert status == 400 and message in answer.get("error", ""), (body, status, answer)
    status, answer = _post(triton, "/v2/models/tiny/generate", {"text_input": PROMPTS[0], "max_tokens": "many"})
    assert status >= 400 and "error" in answer  # Triton's own parser refuses it before the model
    with pytest.raises(urllib.error.HTTPError) as refused:  # an error as the first response: no stream at all
        _stream(triton, "tiny", {"text_input": PROMPTS[0], "temperature": -1.0})
    assert refused.value.code == 400  # the body is still one server-sent event holding the error
    body = refused.value.read().decode().strip()
    assert body.startswith("data: ") and "temperature must be >= 0" in json.loads(body[len("data: "):])["error"]
    # the same instance still serves, with the same answer as before
    status, answer = _post(triton, "/v2/models/tiny/generate", _greedy(PROMPTS[0]))
    assert status == 200 and _ids(answer["output_ids"]) == reference["tiny"][PROMPTS[0]]["token_ids"]
    assert triton.process.poll() is None


def test_tampered_bundle_fails_to_load_with_leptonc_message(tiny_bundle, tmp_path):
    runtime = _runtime(tmp_path / "work")
    repo = tmp_path / "models"
    package_triton(tiny_bundle, repo, TritonOptions(name="tampered"))
    data = repo / "tampered" / "1" / "bundle.lepton" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    server = _start(runtime, repo, tmp_path / "tritonserver.log")
    try:
        code = server.wait_exit(timeout_s=120)  # Triton exits when a model fails to load (--exit-on-error)
    finally:
        _stop_and_check_no_orphan(server)
    log = server.log()
    assert code != 0, log[-2000:]
    assert "leptonc: " in log and "file model.onnx.data does not match its sha256 in the manifest" in log, log[-3000:]
    assert re.search(r"tampered\s*\|\s*1\s*\|\s*UNAVAILABLE", log), log[-3000:]


def test_a_client_that_disconnects_cancels_its_sequence(triton):
    import http.client

    before = _scrape(triton)
    host, port = triton.http_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v2/models/tiny/generate_stream", headers={"Content-Type": "application/json"},
                       body=json.dumps({"text_input": PROMPTS[0], "max_tokens": 1900, "stream": True,
                                        "stop_at_eos": False}))
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.sock.close()  # gone after the first token of 1,900
    connection.close()
    reason = 'leptonc_sequences_finished_total{instance="tiny_0_0",model="tiny",reason="cancelled",version="1"}'
    deadline = time.monotonic() + 20
    while True:
        after = _scrape(triton)
        cancelled = _metric(after, reason.split("{")[0], "tiny") - _metric(before, reason.split("{")[0], "tiny")
        if cancelled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert reason in after and cancelled == 1
    generated = (_metric(after, "leptonc_generation_tokens_total", "tiny")
                 - _metric(before, "leptonc_generation_tokens_total", "tiny"))
    assert 1 <= generated < 1900  # its slot was freed early, not run to max_tokens
    assert _metric(after, "leptonc_requests_running", "tiny") == 0
