"""A minimal HTTP/1.1 client for engine APIs, on asyncio protocols and httptools.

Two shapes: :func:`request_json` for control calls (one connection, whole body), and
:class:`StreamingResponse`, whose body bytes are handed to a callback straight from
``data_received`` so the token hot path never awaits. Foreign errors (``OSError``,
parser errors, time-outs) are translated into :class:`EngineError` here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import orjson

from albatross.core.errors import EngineError, EngineTimeout


def split_base_url(base_url: str) -> tuple[str, int]:
    u = urlsplit(base_url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"engine base URL {base_url!r} must be http://HOST:PORT")
    return u.hostname, u.port or 80


def build_request(method: str, host: str, port: int, path: str, body: bytes | None, keep_alive: bool = False) -> bytes:
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Connection: " + ("keep-alive" if keep_alive else "close"),
        "Accept: */*",
    ]
    if body is not None:
        head.append("Content-Type: application/json")
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")


class StreamingResponse(asyncio.Protocol):
    """One request whose response body is streamed to ``on_body``.

    ``on_head(status)`` is called once the status line and headers are in; body bytes
    (de-chunked) go to ``on_body``; ``on_end(error)`` is called exactly once, with
    ``None`` after a complete response and an :class:`EngineError` when the connection
    broke first.
    """

    def __init__(
        self,
        request: bytes,
        on_head: Callable[[int], None],
        on_body: Callable[[bytes], None],
        on_end: Callable[[EngineError | None], None],
    ) -> None:
        self._request = request
        self._on_head = on_head
        self._on_body = on_body
        self._on_end = on_end
        self._parser = httptools.HttpResponseParser(self)
        self._ended = False
        self.transport: asyncio.Transport | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(EngineError(f"engine sent malformed HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(EngineError(f"engine connection lost: {exc or 'closed before the response ended'}"))

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self._on_head(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if not self._ended:
            self._on_body(body)

    def on_message_complete(self) -> None:
        self._end(None)
        self.close()

    def _end(self, error: EngineError | None) -> None:
        if not self._ended:
            self._ended = True
            self._on_end(error)

    def close(self) -> None:
        """Close the connection; for a generation this cancels it on the engine."""
        self._ended = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self._ended = True
        if self.transport is not None:
            self.transport.abort()


async def open_stream(
    host: str,
    port: int,
    request: bytes,
    on_head: Callable[[int], None],
    on_body: Callable[[bytes], None],
    on_end: Callable[[EngineError | None], None],
    connect_timeout_s: float = 5.0,
) -> StreamingResponse:
    """Connect and send ``request``; raises :class:`EngineError` if the engine is unreachable."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout_s):
            _, proto = await loop.create_connection(
                lambda: StreamingResponse(request, on_head, on_body, on_end), host, port
            )
    except TimeoutError as exc:
        raise EngineTimeout(f"engine {host}:{port} did not accept a connection in {connect_timeout_s}s") from exc
    except OSError as exc:
        raise EngineError(f"engine {host}:{port} unreachable: {exc.strerror or exc}") from exc
    return proto


async def request_json(
    base_url: str, method: str, path: str, body: Any = None, timeout_s: float = 30.0
) -> tuple[int, Any]:
    """One whole request; returns ``(status, parsed JSON or None)``.

    Raises :class:`EngineError` when the engine is unreachable, breaks the connection
    or answers with something that is not JSON; :class:`EngineTimeout` on time-out.
    """
    host, port = split_base_url(base_url)
    payload = None if body is None else orjson.dumps(body)
    status = 0
    chunks: list[bytes] = []
    done: asyncio.Future[EngineError | None] = asyncio.get_running_loop().create_future()

    def on_head(s: int) -> None:
        nonlocal status
        status = s

    def on_end(err: EngineError | None) -> None:
        if not done.done():
            done.set_result(err)

    proto: StreamingResponse | None = None
    try:
        async with asyncio.timeout(timeout_s):
            proto = await open_stream(host, port, build_request(method, host, port, path, payload), on_head, chunks.append, on_end)
            err = await done
    except TimeoutError as exc:
        if proto is not None:
            proto.abort()
        raise EngineTimeout(f"{method} {base_url}{path} took longer than {timeout_s}s") from exc
    if err is not None:
        raise err
    raw = b"".join(chunks)
    if not raw:
        return status, None
    try:
        return status, orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EngineError(f"{method} {base_url}{path} answered {status} with non-JSON: {raw[:120]!r}") from exc
