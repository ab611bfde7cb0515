"""The pieces between the engine's events and the wire, without a model: the dispatcher that carries events from
the engine's thread to the event loop, the merging of the events a slow stream has not sent yet, the server's
SSE chunks, and the load generator's reading of them."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from leptonc.errors import InputError
from leptonc.runtime.batching import Event
from leptonc.server.loadgen import LoadConfig, chunk_tokens
from leptonc.server.streaming import EventDispatcher, SseChunks, merge

TRICKY = ['plain', ' "token_ids": [1, 2, 3]', '"error": {"message": "no"}', 'back\\slash \\"quoted\\"', 'ends "error',
          'line\nbreak', 'üñí — 中文 😀', '', '"token_ids":[9]}]}', '\\', '{"error": 1}']


def test_dispatcher_delivers_every_event_in_order_with_one_wakeup_per_burst():
    steps, streams = 300, 32

    async def main():
        dispatcher = EventDispatcher(asyncio.get_running_loop())
        sinks = [dispatcher.sink() for _ in range(streams)]

        def engine():  # one event per stream per step, as the engine's thread emits them
            for step in range(steps):
                for _, on_event in sinks:
                    on_event(Event((step,), f"{step},", "length" if step == steps - 1 else None))
                if step % 20 == 0:
                    time.sleep(0.001)

        async def consume(sink, slow: bool):
            got = []
            while not got or got[-1].finish_reason is None:
                got.append(await sink.take())
                if slow:
                    await asyncio.sleep(0.002)  # behind the engine: what piled up comes merged
            return got

        thread = threading.Thread(target=engine)
        thread.start()
        results = await asyncio.gather(*(consume(sink, i % 2 == 1) for i, (sink, _) in enumerate(sinks)))
        thread.join()
        return results, dispatcher.wakeups

    results, wakeups = asyncio.run(main())
    for got in results:
        assert [t for e in got for t in e.token_ids] == list(range(steps))
        assert "".join(e.text for e in got) == "".join(f"{s}," for s in range(steps))
        assert got[-1].finish_reason == "length" and all(e.finish_reason is None for e in got[:-1])
    assert wakeups < steps * streams / 8  # bursts, not one wake-up per event
    assert any(len(got) < steps / 2 for got in results)  # the slow consumers got merged events


def test_a_consumer_that_keeps_up_gets_each_event_as_it_was():
    async def main():
        dispatcher = EventDispatcher(asyncio.get_running_loop())
        sink, on_event = dispatcher.sink()
        sent = [Event((1, 2), "ab"), Event((3,), "c"), Event((), "", "stop")]
        got = []
        for event in sent:
            threading.Thread(target=on_event, args=(event,)).start()
            got.append(await sink.take())
        return sent, got

    sent, got = asyncio.run(main())
    assert got == sent


def test_merge_keeps_tokens_text_and_the_last_finish():
    events = [Event((1,), "a"), Event((), ""), Event((2, 3), "bc"), Event((4,), "d", "error", "boom")]
    assert merge(events) == Event((1, 2, 3, 4), "abcd", "error", "boom")
    assert merge(events[:1]) is events[0]


def test_a_dispatcher_whose_loop_is_gone_drops_events_quietly():
    loop = asyncio.new_event_loop()
    dispatcher = EventDispatcher(loop)
    loop.close()
    _, on_event = dispatcher.sink()
    on_event(Event((1,), "a"))  # no exception on the engine's thread


def test_sse_chunks_are_the_json_the_dict_would_give():
    head = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m \"quoted\" ü"}
    chunks = SseChunks(head, '"text": ')
    for text in TRICKY:
        for finish, ids in ((None, (5, 6)), ("length", ()), ("stop", (7,))):
            raw = chunks.chunk(json.dumps(text, ensure_ascii=False), finish, ids)
            assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
            assert json.loads(raw[6:]) == {**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                                "finish_reason": finish, "token_ids": list(ids)}]}
    chat = SseChunks({**head, "object": "chat.completion.chunk"}, '"delta": ')
    raw = chat.chunk('{"content": "hi"}', None, (1,))
    assert json.loads(raw[6:])["choices"][0]["delta"] == {"content": "hi"}


def test_loadgen_counts_token_ids_as_a_json_parse_would():
    for text in TRICKY:
        for ids in ([], [1], [1, 2, 3]):
            for separators in ((",", ":"), (", ", ": ")):
                chunk = {"id": "x", "choices": [{"index": 0, "text": text, "token_ids": ids}]}
                escaped = text != "üñí — 中文 😀"  # that one raw, as the server sends it
                payload = json.dumps(chunk, separators=separators, ensure_ascii=escaped).encode()
                assert chunk_tokens(payload) == len(ids), payload
    error = json.dumps({"error": {"message": "generation failed: boom", "type": "server_error"}}).encode()
    assert chunk_tokens(error) == "generation failed: boom"
    usage = json.dumps({"id": "x", "choices": [], "usage": {"completion_tokens": 3}}).encode()
    assert chunk_tokens(usage) == 0


def test_loadgen_workers_default_to_the_clients_up_to_half_the_cpus(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert LoadConfig(url="http://x", concurrency=64, requests=512).worker_count() == 8
    assert LoadConfig(url="http://x", concurrency=3, requests=512).worker_count() == 3
    assert LoadConfig(url="http://x", concurrency=64, requests=2).worker_count() == 2
    assert LoadConfig(url="http://x", concurrency=None, rate=5.0, requests=100).worker_count() == 8
    assert LoadConfig(url="http://x", concurrency=4, requests=64, workers=2).worker_count() == 2
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert LoadConfig(url="http://x", concurrency=64, requests=512).worker_count() == 1
    with pytest.raises(InputError, match="--workers must be >= 1"):
        LoadConfig(url="http://x", workers=0)
