"""The gateway's HTTP/1.1 server, on a real socket, with small test handlers.

Raw sockets check framing, pipelining and connection handling byte for byte; httpx
checks that an ordinary client reads what the server writes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from albatross.core.errors import InvalidField
from albatross.gateway.errors import error_response
from albatross.gateway.http import Request, serve

MAX_BODY = 1024
Start = Callable[..., Awaitable[int]]


async def echo(req: Request) -> None:
    body = {
        "method": req.method,
        "path": req.path,
        "query": req.query,
        "body": req.body.decode("latin-1"),
        "headers": req.headers,
    }
    req.conn.respond(200, orjson.dumps(body))


class App:
    """Routes by path to small handlers; records what it saw."""

    def __init__(self) -> None:
        self.disconnected = asyncio.Event()
        self.stream_started = asyncio.Event()
        self.errors: list[BaseException] = []

    async def __call__(self, req: Request) -> None:
        path = req.path
        if path.startswith("/sleep/"):
            # Answer after a delay, so pipelined requests would finish out of order.
            await asyncio.sleep(float(path.rsplit("/", 1)[1]))
            req.conn.respond(200, path.encode(), content_type="text/plain")
        elif path == "/client-error":
            raise InvalidField("temperature", 9, "must be <= 2")
        elif path == "/boom":
            raise RuntimeError("a bug in a handler")
        elif path == "/stream":
            req.conn.start_stream(first=b"data: 0\n\n")
            for i in range(1, 5):
                await asyncio.sleep(0)
                req.conn.send_chunk(b"data: %d\n\n" % i)
            req.conn.send_chunk(b"")  # an empty chunk must not end the body
            req.conn.end_stream(b"data: [DONE]\n\n")
        elif path == "/hang":
            req.conn.on_disconnect(self.disconnected.set)
            req.conn.start_stream()
            req.conn.send_chunk(b"data: first\n\n")
            self.stream_started.set()
            # Stream until the client goes away (bounded, so a failing test ends).
            for _ in range(500):
                if self.disconnected.is_set():
                    return
                await asyncio.sleep(0.01)
                req.conn.send_chunk(b": ping\n\n")
        elif path == "/fail-mid-stream":
            req.conn.start_stream()
            req.conn.send_chunk(b"data: partial\n\n")
            raise RuntimeError("engine died mid-stream")
        else:
            await echo(req)


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    servers: list[asyncio.Server] = []

    async def _start(
        handler: Callable[[Request], Awaitable[None]], max_body: int = MAX_BODY
    ) -> int:
        server = await serve(handler, error_response, "127.0.0.1", 0, max_body)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield _start
    for s in servers:
        s.close()
        await s.wait_closed()


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
async def port(start: Start, app: App) -> int:
    return await start(app)


# ---- a tiny HTTP/1.1 response reader ----------------------------------------------------


class Response:
    def __init__(
        self, status: int, headers: dict[str, str], body: bytes, chunks: list[bytes]
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.chunks = chunks

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(r: asyncio.StreamReader) -> Response:
    async with asyncio.timeout(5):
        head = await r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {}
        for line in lines[1:]:
            if line:
                k, v = line.split(": ", 1)
                assert k.lower() not in headers, f"duplicate header {k}"
                headers[k.lower()] = v
        chunks: list[bytes] = []
        if headers.get("transfer-encoding") == "chunked":
            assert "content-length" not in headers
            while True:
                size = int((await r.readuntil(b"\r\n"))[:-2], 16)
                data = await r.readexactly(size + 2)
                assert data.endswith(b"\r\n")
                if size == 0:
                    break
                chunks.append(data[:-2])
            body = b"".join(chunks)
        else:
            body = await r.readexactly(int(headers["content-length"]))
        return Response(int(status), headers, body, chunks)


async def closed_by_server(r: asyncio.StreamReader) -> bool:
    """True when the server closes the connection (EOF) with nothing more sent."""
    try:
        async with asyncio.timeout(2):
            return await r.read() == b""
    except (ConnectionResetError, TimeoutError):
        return False


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_openai_error(resp: Response, status: int) -> dict[str, Any]:
    assert resp.status == status
    assert resp.headers["content-type"] == "application/json"
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return dict(err)


# ---- tests ------------------------------------------------------------------------


async def test_request_is_parsed_and_answered(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.post("/v1/x?a=1&b=2", content=b'{"k": "v"}', headers={"X-Test": "Yes"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    got = r.json()
    assert got["method"] == "POST"
    assert got["path"] == "/v1/x"
    assert got["query"] == "a=1&b=2"
    assert got["body"] == '{"k": "v"}'
    assert got["headers"]["x-test"] == "Yes"  # names lower-cased, values kept


async def test_keep_alive_two_requests_on_one_connection(port: int) -> None:
    r, w = await connect(port)
    w.write(get("/one"))
    first = await read_response(r)
    w.write(post("/two", b"payload"))
    second = await read_response(r)
    assert first.json()["path"] == "/one"
    assert second.json() | {"headers": None} == {
        "method": "POST",
        "path": "/two",
        "query": "",
        "body": "payload",
        "headers": None,
    }
    assert "connection" not in first.headers and "connection" not in second.headers
    # Still open: a third request works.
    w.write(get("/three"))
    assert (await read_response(r)).json()["path"] == "/three"
    w.close()


async def test_httpx_reuses_the_connection(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        a = await client.get("/a")
        b = await client.get("/b")
    assert a.json()["path"] == "/a" and b.json()["path"] == "/b"


async def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    r, w = await connect(port)
    # The first takes longest: answers must still come back in request order.
    w.write(get("/sleep/0.2") + get("/sleep/0.1") + post("/echo", b"x") + get("/sleep/0"))
    got = [await read_response(r) for _ in range(4)]
    assert [g.body for g in got[:2]] == [b"/sleep/0.2", b"/sleep/0.1"]
    assert got[2].json()["body"] == "x"
    assert got[3].body == b"/sleep/0"
    w.close()


async def test_pipelined_requests_split_across_writes(port: int) -> None:
    r, w = await connect(port)
    data = get("/sleep/0.05") + post("/echo", b"hello") + get("/last")
    for i in range(0, len(data), 7):
        w.write(data[i : i + 7])
        await w.drain()
    got = [await read_response(r) for _ in range(3)]
    assert got[0].body == b"/sleep/0.05"
    assert got[1].json()["body"] == "hello"
    assert got[2].json()["path"] == "/last"
    w.close()


async def test_content_length_over_max_body_is_413_and_closes(port: int) -> None:
    r, w = await connect(port)
    w.write(post("/echo", b"x" * (MAX_BODY + 1)))
    resp = await read_response(r)
    err = assert_openai_error(resp, 413)
    assert err["code"] == "body_too_large"
    assert str(MAX_BODY) in err["message"]
    assert resp.headers.get("connection") == "close"
    assert await closed_by_server(r)
    w.close()


async def test_content_length_over_max_body_is_refused_before_the_body_arrives(port: int) -> None:
    r, w = await connect(port)
    head = post("/echo", b"x" * (10 * MAX_BODY)).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    w.write(head)  # the body never comes: the server must not wait for it
    assert_openai_error(await read_response(r), 413)
    assert await closed_by_server(r)
    w.close()


async def test_body_at_max_body_is_accepted(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        resp = await client.post("/echo", content=b"y" * MAX_BODY)
    assert resp.status_code == 200
    assert resp.json()["body"] == "y" * MAX_BODY


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def test_chunked_upload_is_joined(port: int) -> None:
    r, w = await connect(port)
    w.write(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(b"abc", b"def", b"g")
    )
    assert (await read_response(r)).json()["body"] == "abcdefg"
    w.close()


async def test_chunked_upload_over_max_body_is_413(port: int) -> None:
    r, w = await connect(port)
    part = b"z" * 300
    w.write(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(part, part, part, part)
    )
    resp = await read_response(r)
    assert_openai_error(resp, 413)
    assert await closed_by_server(r)
    w.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT A REQUEST\r\n\r\n",
        b"GET / HTTP/9\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    ],
    ids=["words", "bad-version", "nul-in-target", "tls"],
)
async def test_malformed_request_is_400_and_closes(port: int, raw: bytes) -> None:
    r, w = await connect(port)
    w.write(raw)
    resp = await read_response(r)
    err = assert_openai_error(resp, 400)
    assert err["type"] == "invalid_request_error"
    assert await closed_by_server(r)
    w.close()


async def test_client_error_becomes_its_status_with_openai_body(port: int) -> None:
    r, w = await connect(port)
    w.write(get("/client-error"))
    resp = await read_response(r)
    status, body = error_response(InvalidField("temperature", 9, "must be <= 2"))
    assert resp.status == status == 400
    assert resp.body == body
    err = assert_openai_error(resp, 400)
    assert err["param"] == "temperature"
    # A client error does not cost the connection.
    w.write(get("/after"))
    assert (await read_response(r)).json()["path"] == "/after"
    w.close()


async def test_handler_bug_is_500_and_the_server_keeps_serving(port: int) -> None:
    r, w = await connect(port)
    w.write(get("/boom"))
    err = assert_openai_error(await read_response(r), 500)
    assert "a bug in a handler" not in err["message"]  # internals stay in the log
    assert err["type"] == "internal_error"
    w.close()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/fine")).json()["path"] == "/fine"
        assert (await client.get("/boom")).status_code == 500
        assert (await client.get("/fine-again")).status_code == 200


async def test_streaming_response_is_chunked_and_readable(port: int) -> None:
    r, w = await connect(port)
    w.write(get("/stream"))
    resp = await read_response(r)
    assert resp.status == 200
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.chunks == [b"data: %d\n\n" % i for i in range(5)] + [b"data: [DONE]\n\n"]
    # The connection stays usable after a stream.
    w.write(get("/next"))
    assert (await read_response(r)).json()["path"] == "/next"
    w.close()


async def test_httpx_reads_a_stream(port: int) -> None:
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
        client.stream("GET", "/stream") as resp,
    ):
        assert resp.status_code == 200
        lines = [line async for line in resp.aiter_lines() if line]
    assert lines == [f"data: {i}" for i in range(5)] + ["data: [DONE]"]


async def test_on_disconnect_fires_when_client_closes_mid_stream(port: int, app: App) -> None:
    r, w = await connect(port)
    w.write(get("/hang"))
    async with asyncio.timeout(5):
        head = await r.readuntil(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        await app.stream_started.wait()
    assert not app.disconnected.is_set()
    w.close()
    await w.wait_closed()
    async with asyncio.timeout(2):
        await app.disconnected.wait()


async def test_on_disconnect_registered_after_close_fires_at_once(start: Start) -> None:
    fired: list[str] = []
    gone = asyncio.Event()

    async def late(req: Request) -> None:
        for _ in range(200):
            if req.conn.closed:
                break
            await asyncio.sleep(0.01)
        req.conn.on_disconnect(lambda: fired.append("late"))
        gone.set()

    port = await start(late)
    _, w = await connect(port)
    w.write(get("/"))
    await w.drain()
    await asyncio.sleep(0.05)
    w.close()
    async with asyncio.timeout(5):
        await gone.wait()
    assert fired == ["late"]


async def test_error_after_stream_started_cuts_the_connection(port: int) -> None:
    r, w = await connect(port)
    w.write(get("/fail-mid-stream"))
    async with asyncio.timeout(5):
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        rest = await r.read()  # until EOF: no terminating chunk, no second response
    assert b"data: partial" in rest
    assert not rest.endswith(b"0\r\n\r\n")
    assert b"HTTP/1.1" not in rest
    w.close()


async def test_connection_close_is_honoured(port: int) -> None:
    r, w = await connect(port)
    w.write(get("/bye", "Connection: close"))
    resp = await read_response(r)
    assert resp.status == 200
    assert resp.headers["connection"] == "close"
    assert await closed_by_server(r)
    w.close()


async def test_http10_without_keep_alive_closes(port: int) -> None:
    r, w = await connect(port)
    w.write(b"GET /old HTTP/1.0\r\n\r\n")
    resp = await read_response(r)
    assert resp.json()["path"] == "/old"
    assert await closed_by_server(r)
    w.close()


async def test_httpx_connection_close(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        resp = await client.get("/x", headers={"Connection": "close"})
        assert resp.headers["connection"] == "close"
        assert (await client.get("/y")).status_code == 200  # httpx opens a new one


async def test_pipelined_request_then_connection_close_answers_both(port: int) -> None:
    r, w = await connect(port)
    w.write(get("/sleep/0.05") + get("/last", "Connection: close"))
    first = await read_response(r)
    assert first.body == b"/sleep/0.05"
    last = await read_response(r)  # raises IncompleteReadError today
    assert last.json()["path"] == "/last"
    assert await closed_by_server(r)
    w.close()
