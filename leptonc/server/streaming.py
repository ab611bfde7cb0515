"""From the engine's thread to a request's coroutine, cheaply: one wake-up of the event loop per burst of
events, and the events a slow consumer has not taken yet merged into one.

The engine calls `on_event` on its own thread, once per request per decode step: at batch 64 on a GPU that is
tens of thousands of events a second. Handing each one over with `loop.call_soon_threadsafe` would write to the
loop's self-pipe and wake it once per event; the `EventDispatcher` instead appends (sink, event) under a lock and
schedules one drain while none is pending, so a step's 64 events cost the loop one wake-up. Each request's
`EventSink` keeps its events in order; `take()` returns everything pending as one `Event` (token ids and text
concatenated, the finish reason and error of the last), so a stream whose writer falls behind sends fewer,
larger chunks instead of falling further behind, and one that keeps up sends one chunk per event.
`EventStreamResponse` sends a stream's chunks with one plain task per response watching for the client to leave
(Starlette's StreamingResponse runs a task group per response: on the dev VM, 510 against 360 µs of the server's
CPU per request, `bench/serve_http.py --requests 2048 --gen-len 1 --prompt-len 128`).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque

from starlette.responses import Response

from leptonc.runtime.batching import Event


def merge(events: list[Event]) -> Event:
    """Consecutive events of one request as one: the same tokens and text, the last one's finish reason."""
    if len(events) == 1:
        return events[0]
    last = events[-1]
    ids = tuple(t for e in events for t in e.token_ids)
    return Event(ids, "".join(e.text for e in events), last.finish_reason, last.error)


class EventSink:
    """One request's events on the loop's thread, in the order the engine emitted them."""

    __slots__ = ("_events", "_waiter")

    def __init__(self) -> None:
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, event: Event) -> None:  # the loop's thread (EventDispatcher's drain)
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> Event:
        """Every event that arrived since the last take, merged; waits for one if there is none."""
        while not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if len(self._events) == 1:
            return self._events.popleft()
        events = list(self._events)
        self._events.clear()
        return merge(events)


class EventDispatcher:
    """Carries events from any thread to their sinks on one event loop, waking the loop once per burst."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[EventSink, Event]] = []
        self._scheduled = False
        self.wakeups = 0  # drains scheduled so far (how many bursts the events came in)

    def sink(self) -> tuple[EventSink, callable]:
        """A new sink and the `on_event` callback (for `engine.submit`) that feeds it."""
        sink = EventSink()
        return sink, lambda event: self.post(sink, event)

    def post(self, sink: EventSink, event: Event) -> None:  # any thread; never blocks beyond the short lock
        with self._lock:
            self._pending.append((sink, event))
            if self._scheduled:
                return
            self._scheduled = True
            self.wakeups += 1
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed (the server is gone); nobody is listening
            pass

    def _drain(self) -> None:  # the loop's thread
        with self._lock:
            batch, self._pending = self._pending, []
            self._scheduled = False
        for sink, event in batch:
            sink.put(event)


class SseChunks:
    """Server-sent events of one response whose fields other than the choice never change: the constant
    part is serialized once, and each chunk adds only its text, finish reason and token ids."""

    def __init__(self, head: dict, choice_key: str) -> None:
        opening = json.dumps(head, ensure_ascii=False)[:-1]  # without its closing brace
        self._prefix = f'data: {opening}, "choices": [{{"index": 0, {choice_key}'.encode()

    def chunk(self, payload: str, finish: str | None, token_ids) -> bytes:
        """`payload`: the choice's JSON text after its key (a string, or a delta object)."""
        finish_json = "null" if finish is None else f'"{finish}"'
        ids = ", ".join(map(str, token_ids))
        return self._prefix + (f'{payload}, "logprobs": null, "finish_reason": {finish_json}, '
                               f'"token_ids": [{ids}]}}]}}\n\n').encode()


class EventStreamResponse(Response):
    """A text/event-stream response for a request in the engine: its chunks as they come, and the request cancelled
    the moment its client disconnects. What Starlette's StreamingResponse does, for the ASGI servers of spec 2.3
    (uvicorn's), without its task group per response: one plain task waits on `receive` for the disconnect."""

    media_type = "text/event-stream"

    def __init__(self, chunks, on_disconnect) -> None:  # no Response.__init__: there is no body to render
        self.chunks, self.on_disconnect = chunks, on_disconnect
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    async def __call__(self, scope, receive, send) -> None:
        async def watch() -> None:
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # noqa: BLE001 - a receive channel that fails is a client gone too
                pass
            self.on_disconnect()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                if watcher.done():  # the client went away: the request is cancelled, the stream ends
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            await self.chunks.aclose()


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def json_text(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
