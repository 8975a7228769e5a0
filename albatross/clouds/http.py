"""A tiny HTTP/1.1 client for cloud metadata services (one request per connection).

Metadata endpoints sit on a link-local address or on loopback in tests, answer in
milliseconds and are polled every few seconds, so keep-alive and pooling buy nothing:
each :func:`request` opens a connection, sends ``Connection: close``, reads one response
and closes. It never consults proxy settings — a metadata address reached through a
proxy would answer for the proxy's host, not ours.

Contract: :func:`request` returns the status, the headers and the raw (de-chunked) body
of any complete response, whatever its status — interpreting a 404 or a 500 is the
caller's business. Everything that keeps a complete response from arriving (refused or
reset connection, time-out, malformed HTTP, an oversized body) raises
:class:`HttpTransportError`, chained to the foreign error that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

MAX_BODY = 1 << 20
"""Metadata documents are a few hundred bytes; a larger body is garbage, not data."""


class HttpTransportError(Exception):
    """No complete HTTP response came back; ``reason`` says why in a few words.

    Raised by :func:`request`; the watchers turn it into ``NoticeSourceError`` with the
    source and URL attached. Retrying later may succeed.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    """Header names lower-cased; repeated headers joined with ``", "``."""
    body: bytes


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL points: host and port to connect to, and the request target."""

    host: str
    port: int
    path: str  # path and query, as sent on the request line

    @classmethod
    def parse(cls, url: str) -> Target:
        """Split an ``http://`` URL; raises ``ValueError`` naming the URL and the rule."""
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"metadata URL {url!r} must be http://HOST[:PORT]/PATH")
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        return cls(u.hostname, u.port or 80, path)


@dataclass(slots=True)
class _Collector:
    """httptools callbacks: gathers one response."""

    limit: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    headers_done: bool = False
    complete: bool = False
    too_large: bool = False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, chunk: bytes) -> None:
        if len(self.body) + len(chunk) > self.limit:
            self.too_large = True
        else:
            self.body += chunk

    def on_message_complete(self) -> None:
        self.complete = True

    def ends_at_close(self) -> bool:
        """True when the body is delimited by the connection closing (RFC 9112 6.3)."""
        return "content-length" not in self.headers and "chunked" not in self.headers.get(
            "transfer-encoding", ""
        )


def _encode(method: str, target: Target, headers: Mapping[str, str], body: bytes | None) -> bytes:
    lines = [f"{method} {target.path} HTTP/1.1", f"Host: {target.host}", "Connection: close"]
    for k, v in headers.items():
        if any(c in k + v for c in "\r\n"):
            raise ValueError(f"header {k!r}: {v!r} contains a line break")
        lines.append(f"{k}: {v}")
    if body is not None or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body or b'')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout_s: float,
    max_body: int = MAX_BODY,
) -> HttpResponse:
    """Send one request and return the complete response (any status).

    ``timeout_s`` bounds the whole exchange: connect, send and read. Raises
    ``ValueError`` for a URL that is not ``http://`` and :class:`HttpTransportError`
    when no complete response arrives in time.
    """
    target = Target.parse(url)
    raw = _encode(method, target, headers or {}, body)
    got = _Collector(max_body)
    parser = httptools.HttpResponseParser(got)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            writer.write(raw)
            await writer.drain()
            while not got.complete:
                data = await reader.read(65536)
                if not data:
                    # httptools has no feed_eof: a close-delimited body ends here, any
                    # other response that has not completed was cut short.
                    if got.headers_done and got.ends_at_close():
                        break
                    raise HttpTransportError("connection closed before the response was complete")
                parser.feed_data(data)
                if got.too_large:
                    raise HttpTransportError(f"response body larger than {max_body} bytes")
    except TimeoutError as exc:
        raise HttpTransportError(f"no response within {timeout_s:g} s") from exc
    except httptools.HttpParserError as exc:
        raise HttpTransportError(f"malformed HTTP response: {exc}") from exc
    except OSError as exc:
        # ConnectionRefusedError, ConnectionResetError, unreachable network, DNS
        # failure (socket.gaierror) — all OSError; strerror is the readable part.
        raise HttpTransportError(str(exc) or type(exc).__name__) from exc
    finally:
        if writer is not None:
            # Abort, not close: with the response read (or abandoned) there is nothing
            # to flush, and a graceful close could wait on a peer that hangs.
            writer.transport.abort()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return HttpResponse(parser.get_status_code(), got.headers, bytes(got.body))
