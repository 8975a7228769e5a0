"""What every engine's streamed generation shares: an SSE body read off an
:class:`~albatross.engines.http_client.EngineConnection` and handed to a
:class:`~albatross.engines.base.TokenSink`.

:class:`SSEGeneration` does the plumbing — cancel, back-pressure, the error body of a
non-200 answer, splitting the body into ``data:`` events, one ``on_batch`` per socket
read, ending exactly once — and each engine's subclass reads one event's payload
(:meth:`SSEGeneration._payload`). It is the hot path of every token: the per-event
work stays in the subclass, the loop here does no more than find event boundaries.
"""

from __future__ import annotations

from typing import Any

import orjson

from albatross.core.errors import ClientError, EngineError
from albatross.engines.base import TokenSink
from albatross.engines.http_client import EngineConnection, status_error


class SSEGeneration:
    """One streamed generation; subclasses implement :meth:`_payload`, and end it with
    :meth:`_fail` or by setting ``_done`` and calling the sink's ``on_finish``."""

    __slots__ = ("_buf", "_done", "_err_body", "_got", "_proto", "_sink", "_status")

    def __init__(self, sink: TokenSink) -> None:
        self._sink = sink
        self._buf = b""
        self._status = 0
        self._err_body = b""
        self._done = False
        self._got = False  # tokens handed to the sink since the last on_batch
        self._proto: EngineConnection | None = None

    def _payload(self, payload: bytes) -> None:
        """One event's ``data:`` payload."""
        raise NotImplementedError

    def _ended(self, error: EngineError | None) -> None:
        """The connection ended (after a 200) before the generation did."""
        self._fail(error or EngineError("engine ended the stream without a final event"))

    # Generation protocol
    def cancel(self) -> None:
        self._done = True
        if self._proto is not None:
            self._proto.close()

    def pause(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.pause_reading()

    def resume(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.resume_reading()

    # EngineConnection callbacks
    def on_head(self, status: int) -> None:
        self._status = status

    def on_body(self, data: bytes) -> None:
        if self._status != 200:
            self._err_body += data
            return
        buf = self._buf + data if self._buf else data
        start = 0
        while not self._done:
            end = buf.find(b"\n\n", start)
            if end == -1:
                break
            block = buf[start:end]
            start = end + 2
            if block.startswith(b"data: "):  # else ":" keep-alive pings, event names
                self._payload(block[6:])
        self._buf = buf[start:] if start < len(buf) else b""

    def on_read_done(self) -> None:
        """One socket read is consumed: tokens that arrived together leave together."""
        if self._got:
            self._got = False
            self._sink.on_batch()

    def on_end(self, error: EngineError | None) -> None:
        if self._done:
            return
        if self._status not in (0, 200):
            self._fail(status_error(self._status, self._err_body))
        else:
            self._ended(error)

    def _json(self, payload: bytes) -> Any:
        """The payload parsed, or None after failing the generation for it."""
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._fail(EngineError(f"engine sent a malformed event: {payload[:120]!r}"))
            return None

    def _fail(self, error: EngineError | ClientError) -> None:
        if self._done:
            return
        self._done = True
        if self._proto is not None:
            self._proto.close()
        self._sink.on_error(error)
