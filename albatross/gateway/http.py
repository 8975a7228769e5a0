"""The gateway's HTTP/1.1 server: an asyncio protocol over httptools.

Why not a framework: every token of every stream passes through here, and a streaming
response must be able to reach its raw socket and hand it over without closing it
(connection migration moves the socket to another host mid-body). So a response is
written straight to the transport: one ``write`` per batch of tokens, chunked framing
done here, no per-token coroutine switch.

Contract of a handler: ``async (Request) -> None``; it must answer with
:meth:`Connection.respond` or with :meth:`Connection.start_stream`,
:meth:`Connection.send_chunk`... :meth:`Connection.end_stream`. Requests on one
connection are answered in order (pipelined requests wait their turn). A client that
goes away fires the callbacks registered with :meth:`Connection.on_disconnect`.

Moving a connection to another gateway mid-response (``runtime/gateway_move.py``):
the source calls :meth:`Connection.freeze_writes` (every later write is dropped, so
the client's bytes end at a chunk boundary), waits for :meth:`Connection.unsent` to be
0 and takes the socket out with :meth:`Connection.detach_socket`; the target wraps the
restored socket in :meth:`Connection.adopted` and finishes the response with
:meth:`Connection.serve_adopted`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import cast

import httptools

from albatross.core.errors import AlbatrossError, BodyTooLarge, ClientError, InternalError

log = logging.getLogger("albatross.gateway")

Handler = Callable[["Request"], Awaitable[None]]
ErrorRenderer = Callable[[AlbatrossError], tuple[int, bytes]]

_REASONS = {s.value: s.phrase for s in HTTPStatus}


class Request:
    __slots__ = ("body", "conn", "headers", "keep_alive", "method", "path", "query")

    def __init__(
        self,
        conn: Connection,
        method: str,
        url: bytes,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.conn = conn
        self.keep_alive = keep_alive
        self.method = method
        parsed = httptools.parse_url(url)
        self.path = (parsed.path or b"/").decode("latin-1")
        self.query = (parsed.query or b"").decode("latin-1")
        self.headers = headers
        self.body = body


class Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, handler: Handler, render_error: ErrorRenderer, max_body: int) -> None:
        self._handler = handler
        self._render_error = render_error
        self._max_body = max_body
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_len = 0
        self._too_large = False
        self._queue: deque[Request] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._keep_alive = True
        self._disconnect_cbs: list[Callable[[], None]] = []
        self._drain: asyncio.Event = asyncio.Event()
        self._drain.set()
        self._pause_cbs: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self._response_started = False
        self._frozen = False
        self._in_message = False
        self._body_open = False
        self._adopting = False
        self.transport: asyncio.Transport | None = None
        self.closed = False

    # ---- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail_fast(ClientError("protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            if self._too_large:
                return
            self._fail_fast(ClientError(f"malformed HTTP request: {exc}", code="bad_http"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._drain.set()
        cbs, self._disconnect_cbs = self._disconnect_cbs, []
        for cb in cbs:
            cb()

    def pause_writing(self) -> None:
        self._drain.clear()
        for pause, _ in self._pause_cbs:
            pause()

    def resume_writing(self) -> None:
        self._drain.set()
        for _, resume in self._pause_cbs:
            resume()

    # ---- httptools callbacks -------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        cl = self._headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > self._max_body:
            self._reject_body()
        elif (
            self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None
        ):
            # curl sends this for bodies over 1 KiB and waits ~1 s unless answered.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return
        self._body_len += len(body)
        if self._body_len > self._max_body:
            self._reject_body()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._too_large:
            return
        method = self._parser.get_method().decode("latin-1")
        keep = bool(self._parser.should_keep_alive())
        self._queue.append(
            Request(self, method, self._url, self._headers, b"".join(self._body), keep)
        )
        if not self._adopting and (self._worker is None or self._worker.done()):
            self._worker = asyncio.get_running_loop().create_task(self._serve())

    # ---- request processing -------------------------------------------------------
    async def _serve(self) -> None:
        while self._queue and not self.closed:
            req = self._queue.popleft()
            self._response_started = False
            # Keep-alive belongs to each request: a later pipelined "Connection:
            # close" must not cut the answer to an earlier one.
            self._keep_alive = req.keep_alive
            try:
                await self._handler(req)
            except AlbatrossError as exc:
                self._answer_error(exc)
            except Exception:  # the edge: a bug must not kill the connection silently
                log.exception("unhandled error answering %s %s", req.method, req.path)
                self._answer_error(InternalError("internal error; see the gateway log"))
            self._disconnect_cbs.clear()
            self._pause_cbs.clear()
            if not self._keep_alive:
                self.close()
                return

    def _answer_error(self, exc: AlbatrossError) -> None:
        if self.closed:
            return
        if self._response_started:
            # Headers are out: the only honest thing left is to cut the connection.
            self.close()
            return
        status, body = self._render_error(exc)
        self.respond(status, body, headers=exc.headers)

    def _reject_body(self) -> None:
        self._too_large = True
        status, body = self._render_error(BodyTooLarge(self._max_body))
        self._keep_alive = False
        self.respond(status, body, close=True)

    def _fail_fast(self, exc: ClientError) -> None:
        status, body = self._render_error(exc)
        self.respond(status, body, close=True)

    # ---- responses -------------------------------------------------------
    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if not self._keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        close: bool = False,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Send a whole response."""
        if self.transport is None or self.closed or self._frozen:
            return
        if close:
            self._keep_alive = False
        self._response_started = True
        head = self._head(
            status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers]
        )
        self.transport.write(head + body)
        if close:
            self.close()

    def start_stream(
        self, status: int = 200, content_type: str = "text/event-stream", first: bytes = b""
    ) -> None:
        """Send the head of a chunked response (and optionally its first chunk)."""
        if self.transport is None or self.closed or self._frozen:
            return
        self._response_started = True
        if self._body_open:
            # A response begun on another gateway: its head is out, the body goes on.
            self._body_open = False
            self.send_chunk(first)
            return
        head = self._head(
            status,
            [
                ("Content-Type", content_type),
                ("Cache-Control", "no-cache"),
                ("X-Accel-Buffering", "no"),
                ("Transfer-Encoding", "chunked"),
            ],
        )
        if first:
            head += b"%x\r\n%b\r\n" % (len(first), first)
        self.transport.write(head)

    def send_chunk(self, data: bytes) -> None:
        """One chunk, one syscall."""
        if data and self.transport is not None and not self.closed and not self._frozen:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def end_stream(self, last: bytes = b"") -> None:
        if self.transport is None or self.closed or self._frozen:
            return
        if last:
            self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last))
        else:
            self.transport.write(b"0\r\n\r\n")

    def on_disconnect(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` if the client goes away while the current request is answered."""
        if self.closed:
            cb()
        else:
            self._disconnect_cbs.append(cb)

    def on_backpressure(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """Register what to do when the client reads slower than tokens arrive."""
        self._pause_cbs.append((pause, resume))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ---- moving to another gateway -------------------------------------------------
    @property
    def keep_alive(self) -> bool:
        """Whether the request being answered lets the connection serve another."""
        return self._keep_alive

    @property
    def idle(self) -> bool:
        """No request being answered, queued or half received."""
        busy = self._worker is not None and not self._worker.done()
        return not busy and not self._queue and not self._in_message

    def freeze_writes(self) -> None:
        """Drop every later write: the client's bytes end where they are now, at a chunk
        boundary (each write is whole chunks). Bytes already written still drain."""
        self._frozen = True

    def unsent(self) -> int:
        """Bytes written but still in the transport's buffer (not yet in the kernel)."""
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    def detach_socket(self) -> socket.socket:
        """Take the TCP connection out of the event loop without ending it.

        Returns a blocking socket on a duplicate of the descriptor; the transport then
        closes its own descriptor, which is not the last one, so no FIN or RST goes
        out. Call it after :meth:`freeze_writes` and once :meth:`unsent` is 0: bytes
        still in the transport's buffer would be lost. The disconnect callbacks run
        (the request's generation stops here).
        """
        if self.transport is None or self.closed:
            raise ConnectionError("the connection is closed")
        self.transport.pause_reading()
        raw = self.transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(True)
        self._frozen = True
        self.transport.abort()
        return sock

    @classmethod
    def adopted(
        cls,
        handler: Handler,
        render_error: ErrorRenderer,
        max_body: int,
        *,
        keep_alive: bool,
        head_sent: bool,
    ) -> Connection:
        """A connection restored from another gateway, in the middle of a response.

        No request is parsed until that response ends (pipelined ones wait, as usual);
        if ``head_sent``, the next :meth:`start_stream` writes only its first chunk.
        Attach it with ``loop.create_connection(lambda: conn, sock=sock)``.
        """
        conn = cls(handler, render_error, max_body)
        conn._keep_alive = keep_alive
        conn._body_open = head_sent
        conn._response_started = head_sent
        conn._adopting = True
        return conn

    def serve_adopted(self, respond: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Finish the response begun on another gateway with ``respond()``; then close,
        or serve the requests that came meanwhile, as the original request asked."""
        self._worker = asyncio.get_running_loop().create_task(self._finish_adopted(respond))
        self._adopting = False
        return self._worker

    async def _finish_adopted(self, respond: Callable[[], Awaitable[None]]) -> None:
        try:
            await respond()
        except AlbatrossError as exc:
            self._answer_error(exc)
        except Exception:  # the edge, as in _serve
            log.exception("unhandled error finishing a moved response")
            self._answer_error(InternalError("internal error; see the gateway log"))
        self._disconnect_cbs.clear()
        self._pause_cbs.clear()
        if not self._keep_alive:
            self.close()
            return
        await self._serve()


async def serve(
    handler: Handler, render_error: ErrorRenderer, host: str, port: int, max_body: int
) -> asyncio.Server:
    """Start listening; returns the server (already serving)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: Connection(handler, render_error, max_body),
        host,
        port,
        reuse_address=True,
        backlog=1024,
    )
