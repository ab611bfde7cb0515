"""A small HTTP/1.1 client for streamed POSTs, the one `leptonc bench-serve` reads server-sent events with.

httpx parses each chunk of a chunked body through h11 in pure Python, some tens of microseconds a chunk, which
caps one process well below the tens of thousands of events a second a GPU server sends. Here a chunk costs two
reads of asyncio's buffered stream. It speaks only what the load generator needs: POST with a JSON body,
keep-alive connections reused one request at a time, chunked, sized or read-to-close bodies, http and https.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from contextlib import asynccontextmanager
from urllib.parse import urlsplit


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 as this client reads it."""


class Response:
    def __init__(self, connection: "_Connection", status: int, headers: dict[str, str]):
        self._connection, self.status_code, self.headers = connection, status, headers
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._length = int(length) if length is not None and not self.chunked else None
        self.complete = False  # the whole body was read (the connection may serve another request)

    async def aiter_bytes(self):
        """The body as it arrives: one piece per chunk of a chunked body."""
        reader = self._connection.reader
        if self.chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if not size:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the empty line
                        pass
                    break
                data = await reader.readexactly(size + 2)
                yield data[:-2]
        elif self._length is not None:
            left = self._length
            while left:
                data = await reader.read(min(left, 1 << 16))
                if not data:
                    raise ProtocolError(f"the connection closed {left} bytes before the body's end")
                left -= len(data)
                yield data
        else:
            self._connection.reusable = False
            while data := await reader.read(1 << 16):
                yield data
        self.complete = True

    async def aread(self) -> bytes:
        return b"".join([block async for block in self.aiter_bytes()])


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.reusable = reader, writer, True

    def close(self) -> None:
        self.writer.close()


class SseClient:
    """POSTs to one server, over connections kept alive between requests (as httpx's AsyncClient would)."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None):
        parts = urlsplit(base_url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        host = self._host if parts.port is None else f"{self._host}:{parts.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {host}\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\n{extra}"
        self._idle: list[_Connection] = []

    async def __aenter__(self) -> "SseClient":
        return self

    async def __aexit__(self, *exc) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    async def _send(self, connection: _Connection, path: str, body: bytes) -> Response:
        request = f"POST {self._prefix}{path} HTTP/1.1\r\n{self._head}Content-Length: {len(body)}\r\n\r\n"
        connection.writer.write(request.encode() + body)
        head = await connection.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x response: {status_line[:80]!r}")
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if headers.get("connection", "").lower() == "close" or version == "HTTP/1.0":
            connection.reusable = False
        return Response(connection, int(rest[:3]), headers)

    @asynccontextmanager
    async def stream(self, method: str, path: str, json: dict):  # noqa: A002 - httpx's name for the body
        """`POST path` with a JSON body; the response, whose body is read inside the block."""
        if method != "POST":
            raise ValueError("this client only POSTs")
        body = _dumps(json)
        connection, response = None, None
        while self._idle:  # a kept-alive connection the server may have closed meanwhile: then a fresh one
            connection = self._idle.pop()
            try:
                response = await self._send(connection, path, body)
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                connection.close()
                connection = None
        if response is None:
            reader, writer = await asyncio.open_connection(self._host, self._port, ssl=self._ssl, limit=1 << 20)
            connection = _Connection(reader, writer)
            try:
                response = await self._send(connection, path, body)
            except BaseException:
                connection.close()
                raise
        try:
            yield response
        finally:
            if response.complete and connection.reusable:
                self._idle.append(connection)
            else:
                connection.close()


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
