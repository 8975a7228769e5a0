"""A minimal HTTP/1.1 client for engine APIs, on asyncio protocols and httptools.

Two shapes over one keep-alive :class:`ConnectionPool` per engine: :func:`request_json`
for control calls (whole body), and :meth:`ConnectionPool.exchange`, whose body bytes
are handed to callbacks straight from ``data_received`` so the token hot path never
awaits. Foreign errors (``OSError``,
parser errors, time-outs) are translated into :class:`EngineError` here.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import orjson

from albatross.core.errors import ClientError, EngineError, EngineLost, EngineTimeout


def split_base_url(base_url: str) -> tuple[str, int]:
    u = urlsplit(base_url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"engine base URL {base_url!r} must be http://HOST:PORT")
    return u.hostname, u.port or 80


def build_request(
    method: str,
    host: str,
    port: int,
    path: str,
    body: bytes | None,
    keep_alive: bool = False,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Connection: " + ("keep-alive" if keep_alive else "close"),
        "Accept: */*",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    if body is not None:
        head.append("Content-Type: application/json")
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")


class EngineConnection(asyncio.Protocol):
    """A keep-alive connection to an engine carrying one exchange at a time.

    For each exchange, ``on_head(status)`` is called once the status line and headers
    are in; body bytes (de-chunked) go to ``on_body``; ``on_read_done`` (optional) after
    all the bytes of one socket read were handed over, so a consumer can act once per
    read however many HTTP chunks it held; ``on_end(error)`` exactly once, with
    ``None`` after a complete response and an :class:`EngineError` when the connection
    broke first. A complete response with keep-alive returns the connection to its
    pool; :meth:`close` mid-response closes it (for a generation: cancels it).
    """

    def __init__(self, pool: ConnectionPool | None) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._ended = True
        self._on_head: Callable[[int], None] = _ignore
        self._on_body: Callable[[bytes], None] = _ignore
        self._on_end: Callable[[EngineError | None], None] = _ignore
        self._on_read_done: Callable[[], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._reuse = True

    def send(
        self,
        request: bytes,
        on_head: Callable[[int], None],
        on_body: Callable[[bytes], None],
        on_end: Callable[[EngineError | None], None],
        on_read_done: Callable[[], None] | None = None,
        reuse: bool = True,
    ) -> None:
        assert self.transport is not None and self._ended
        self._reuse = reuse
        self._on_head, self._on_body, self._on_end, self._on_read_done = (
            on_head,
            on_body,
            on_end,
            on_read_done,
        )
        self._parser = httptools.HttpResponseParser(self)
        self._ended = False
        self.transport.write(request)

    def usable(self) -> bool:
        """Idle and still open: the server may close an idle connection at any time
        (llama-server does after bursts), and a FIN not yet processed by the event loop
        shows as a readable socket, so poll it once (one syscall) before reuse."""
        if self.lost or self.transport is None or self.transport.is_closing():
            return False
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        readable, _, _ = select.select([sock.fileno()], [], [], 0)
        return not readable  # an idle connection has nothing to read but EOF

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(EngineError(f"engine sent malformed HTTP: {exc}"))
            self.close()
            return
        if self._on_read_done is not None and not self._ended:
            self._on_read_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._pool is not None:
            self._pool.discard(self)
        self._end(
            EngineLost(f"engine connection lost: {exc or 'closed before the response ended'}")
        )

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self._on_head(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if not self._ended:
            self._on_body(body)

    def on_message_complete(self) -> None:
        reusable = self._reuse and self._parser.should_keep_alive() and not self._ended
        self._end(None)
        if reusable and self._pool is not None:
            self._pool.release(self)
        else:
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


def _ignore(*_: object) -> None:
    return None


class ConnectionPool:
    """Keep-alive connections to one engine.

    An idle connection is reused only while younger than ``idle_s``, well inside
    llama-server's own keep-alive time-out (5 s), so a reused connection is not one the
    server is closing. At most ``max_idle`` are kept; each one holds a server thread.
    """

    def __init__(self, host: str, port: int, *, max_idle: int = 64, idle_s: float = 2.0) -> None:
        self.host, self.port = host, port
        self._max_idle = max_idle
        self._idle_s = idle_s
        self._idle: list[tuple[float, EngineConnection]] = []
        self.connects = 0

    async def exchange(
        self,
        request: bytes,
        on_head: Callable[[int], None],
        on_body: Callable[[bytes], None],
        on_end: Callable[[EngineError | None], None],
        on_read_done: Callable[[], None] | None = None,
        connect_timeout_s: float = 5.0,
        reuse: bool = True,
    ) -> EngineConnection:
        """Send ``request`` on an idle or new connection; raises :class:`EngineError`
        if the engine is unreachable. ``reuse=False``: a new connection, closed after
        the response (llama-server closes its side after a streamed response although
        it announces keep-alive, so such a connection must not go back to the pool)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        conn: EngineConnection | None = None
        while reuse and self._idle:
            t, c = self._idle.pop()
            if now - t < self._idle_s and c.usable():
                conn = c
                break
            c.close()
        if conn is None:
            try:
                async with asyncio.timeout(connect_timeout_s):
                    _, conn = await loop.create_connection(
                        lambda: EngineConnection(self), self.host, self.port
                    )
            except TimeoutError as exc:
                raise EngineTimeout(
                    f"engine {self.host}:{self.port} did not accept a connection in {connect_timeout_s}s"
                ) from exc
            except OSError as exc:
                raise EngineError(
                    f"engine {self.host}:{self.port} unreachable: {exc.strerror or exc}"
                ) from exc
            self.connects += 1
        conn.send(request, on_head, on_body, on_end, on_read_done, reuse)
        return conn

    def release(self, conn: EngineConnection) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append((asyncio.get_running_loop().time(), conn))
        else:
            conn.close()

    def discard(self, conn: EngineConnection) -> None:
        self._idle = [(t, c) for t, c in self._idle if c is not conn]

    def close(self) -> None:
        """Close idle connections (exchanges in flight are left alone)."""
        idle, self._idle = self._idle, []
        for _, c in idle:
            c.close()


async def request_json(
    pool: ConnectionPool,
    method: str,
    path: str,
    body: Any = None,
    timeout_s: float = 30.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """One whole request; returns ``(status, parsed JSON or None)``.

    Raises :class:`EngineError` when the engine is unreachable, breaks the connection
    or answers with something that is not JSON; :class:`EngineTimeout` on time-out.
    """
    payload = None if body is None else orjson.dumps(body)
    where = f"{method} http://{pool.host}:{pool.port}{path}"
    status = 0
    chunks: list[bytes] = []
    done: asyncio.Future[EngineError | None] = asyncio.get_running_loop().create_future()

    def on_head(s: int) -> None:
        nonlocal status
        status = s

    def on_end(err: EngineError | None) -> None:
        if not done.done():
            done.set_result(err)

    conn: EngineConnection | None = None
    try:
        async with asyncio.timeout(timeout_s):
            req = build_request(
                method, pool.host, pool.port, path, payload, keep_alive=True, headers=headers
            )
            connects = pool.connects
            conn = await pool.exchange(req, on_head, chunks.append, on_end)
            err = await done
            if err is not None and status == 0 and pool.connects == connects:
                # A kept-alive connection the engine closed as we sent on it (the
                # liveness check cannot see a close that is still in flight): nothing
                # was answered, so the request is sent once more, on a new connection.
                done = asyncio.get_running_loop().create_future()
                chunks.clear()
                conn = await pool.exchange(req, on_head, chunks.append, on_end, reuse=False)
                err = await done
    except TimeoutError as exc:
        if conn is not None:
            conn.abort()
        raise EngineTimeout(f"{where} took longer than {timeout_s}s") from exc
    if err is not None:
        raise err
    raw = b"".join(chunks)
    if not raw:
        return status, None
    try:
        return status, orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EngineError(f"{where} answered {status} with non-JSON: {raw[:120]!r}") from exc


def error_message(err: Any) -> str:
    """The message of an engine's error object (``{"message": ...}``) or value."""
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


def status_error(status: int, body: bytes) -> EngineError | ClientError:
    """An engine's non-200 answer as ours: a 4xx (e.g. a prompt longer than the
    context) is the request's fault, anything else the engine's."""
    try:
        data = orjson.loads(body)
        msg = error_message(data.get("error", data) if isinstance(data, dict) else data)
    except orjson.JSONDecodeError:
        msg = body[:200].decode("utf-8", "replace")
    if 400 <= status < 500:
        return ClientError(f"engine refused the request: {msg}", code="engine_rejected")
    return EngineError(f"engine answered {status}: {msg}")


async def call_json(pool: ConnectionPool, path: str, body: Any) -> Any:
    """``POST path`` with a JSON body; the parsed answer, or :func:`status_error`."""
    status, data = await request_json(pool, "POST", path, body)
    if status != 200:
        raise status_error(status, orjson.dumps(data))
    return data


async def healthy(pool: ConnectionPool, timeout_s: float) -> bool:
    """``GET /health`` answered 200 within ``timeout_s``; any failure is False."""
    try:
        status, _ = await request_json(pool, "GET", "/health", timeout_s=timeout_s)
    except EngineError:
        return False
    return status == 200
