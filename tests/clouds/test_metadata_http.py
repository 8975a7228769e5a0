"""The metadata HTTP client against raw byte-level servers: framing and failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from albatross.clouds.http import HttpTransportError, request
from albatross.testing.metadata_fakes import free_port

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Reply], Awaitable[str]]]:
    """Start a server whose connections are handled by a test's ``reply``; yields its URL."""
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(reply: Reply) -> str:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await r.readuntil(b"\r\n\r\n")
                await reply(r, w)
                await w.drain()
            finally:
                w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"

    yield start
    for s in servers:
        s.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def sends(data: bytes) -> Reply:
    async def reply(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(data)

    return reply


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1, 2\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nX-A: 1, 2\r\n\r\nhello",  # body ends when the connection closes
    ],
    ids=["content-length", "chunked", "close-delimited"],
)
async def test_reads_status_headers_and_body_in_every_framing(
    raw_server: Callable[[Reply], Awaitable[str]], wire: bytes
) -> None:
    url = await raw_server(sends(wire))
    resp = await request("GET", url, timeout_s=2)
    assert (resp.status, resp.body, resp.headers["x-a"]) == (200, b"hello", "1, 2")


async def test_sends_method_headers_and_body(raw_server: Callable[[Reply], Awaitable[str]]) -> None:
    seen: list[bytes] = []

    async def reply(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await r.readexactly(2))
        w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    url = await raw_server(reply)
    resp = await request("POST", url, headers={"Metadata": "true"}, body=b"{}", timeout_s=2)
    assert resp.status == 404  # any complete response is returned, whatever its status
    assert seen == [b"{}"]


async def test_refused_connection_is_a_transport_error() -> None:
    with pytest.raises(HttpTransportError) as info:
        await request("GET", f"http://127.0.0.1:{free_port()}/", timeout_s=2)
    assert isinstance(info.value.__cause__, OSError)


async def test_a_server_that_never_answers_times_out(
    raw_server: Callable[[Reply], Awaitable[str]],
) -> None:
    async def hang(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    url = await raw_server(hang)
    with pytest.raises(HttpTransportError, match=r"no response within 0\.2 s"):
        await request("GET", url, timeout_s=0.2)


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed before the response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "closed before the response"),
        (b"SPDY/9 banana\r\n\r\n", "malformed HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + b"x" * 64, "larger than 16 bytes"),
    ],
    ids=["truncated-body", "truncated-head", "not-http", "too-large"],
)
async def test_broken_responses_are_transport_errors(
    raw_server: Callable[[Reply], Awaitable[str]], wire: bytes, why: str
) -> None:
    url = await raw_server(sends(wire))
    with pytest.raises(HttpTransportError, match=why):
        await request("GET", url, timeout_s=2, max_body=16)


async def test_only_plain_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="must be http://"):
        await request("GET", "https://169.254.169.254/", timeout_s=1)


async def test_a_header_value_cannot_split_the_request() -> None:
    with pytest.raises(ValueError, match="contains a line break"):
        await request("GET", "http://127.0.0.1:9/", headers={"X": "a\r\nHost: evil"}, timeout_s=1)
