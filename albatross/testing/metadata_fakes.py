"""Local stand-ins for the clouds' metadata services, speaking their documented formats.

Each fake is a small HTTP/1.1 server on 127.0.0.1 (one request per connection, like the
real services' clients use them) whose state a test changes mid-test: a notice appears,
a token expires, the service breaks and recovers. The formats, headers and statuses are
those of RECIPES "Clouds: preemption notices" and the clouds' documentation; a request
that the real service would refuse (no token, no ``Metadata`` header) is refused here too.

Faults common to all fakes (``server.fault``): ``"500"`` answers 500, ``"hang"`` accepts
the request and never answers, ``"garbage"`` answers 200 with a body that is not in the
documented format.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson


class FakeClock:
    """Wall-clock stand-in shared by a watcher and a fake; tests move it by hand."""

    def __init__(self, now: float = 1_795_427_880.0) -> None:  # 2026-11-23T09:58:00Z
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    """A loopback port nobody listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.target).query).items()}


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}


class FakeServer:
    """Serves ``handle`` on 127.0.0.1; records every request in ``requests``."""

    garbage: bytes = b"{not json"

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.fault: str | None = None
        self.requests: list[Request] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):  # handlers parked by the "hang" fault
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def handle(self, req: Request) -> Response:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            req = await self._read(reader)
            self.requests.append(req)
            if self.fault == "hang":
                await asyncio.Event().wait()
            elif self.fault == "500":
                resp = Response(500, b"Internal Server Error")
            elif self.fault == "garbage":
                resp = Response(200, self.garbage)
            else:
                resp = await self.handle(req)
            head = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Error')}"]
            head += [f"{k}: {v}" for k, v in resp.headers.items()]
            head += [f"Content-Length: {len(resp.body)}", "Connection: close"]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + resp.body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up (its time-out): nothing to answer
        except asyncio.CancelledError:
            # close() cancels parked handlers; ending normally keeps asyncio's stream
            # callback (3.11) from logging the cancellation as an error.
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._tasks.discard(task)

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Request:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        line, *lines = head.split("\r\n")
        method, target, _ = line.split(" ", 2)
        headers = {}
        for h in lines:
            if h:
                name, _, value = h.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return Request(method, target, headers, body)


NOT_FOUND_HTML = b"""<?xml version="1.0" encoding="iso-8859-1"?>
<html><head><title>404 - Not Found</title></head><body><h1>404 - Not Found</h1></body></html>
"""


class FakeImds(FakeServer):
    """AWS IMDSv2 (tokens required) with spot instance-action and rebalance documents."""

    garbage = b'{"action": "terminate", "ti'

    def __init__(self, clock: FakeClock, port: int = 0) -> None:
        super().__init__(port)
        self.clock = clock
        self.tokens: dict[str, float] = {}  # token -> expiry on the fake clock
        self.instance_action: dict[str, Any] | None = None
        self.rebalance: dict[str, Any] | None = None
        self.token_puts = 0
        self.rejected = 0
        self.refuse_all_tokens = False  # as if IMDS lost every token as soon as issued

    async def handle(self, req: Request) -> Response:
        if req.path == "/latest/api/token":
            if req.method != "PUT":
                return Response(405)
            ttl = req.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return Response(400)
            token = secrets.token_urlsafe(24)
            self.tokens[token] = self.clock() + int(ttl)
            self.token_puts += 1
            return Response(200, token.encode(), {"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": ttl})
        presented = req.headers.get("x-aws-ec2-metadata-token")
        stale = presented is None or self.tokens.get(presented, 0.0) <= self.clock()
        if stale or self.refuse_all_tokens:
            self.rejected += 1
            return Response(401)
        doc = {
            "/latest/meta-data/spot/instance-action": self.instance_action,
            "/latest/meta-data/events/recommendations/rebalance": self.rebalance,
        }.get(req.path)
        if doc is None:
            return Response(404, NOT_FOUND_HTML, {"Content-Type": "text/html"})
        return Response(200, orjson.dumps(doc), {"Content-Type": "text/plain"})


class FakeGcpMetadata(FakeServer):
    """GCE metadata server: ``instance/preempted`` with ETags and ``wait_for_change``."""

    garbage = b"MAYBE"

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self._preempted = False
        self._version = 0
        self._changed = asyncio.Event()

    @property
    def etag(self) -> str:
        return f"{self._version:016x}"

    def set_preempted(self, value: bool) -> None:
        if value != self._preempted:
            self._preempted = value
            self._version += 1
            self._changed.set()
            self._changed = asyncio.Event()

    async def handle(self, req: Request) -> Response:
        if req.headers.get("metadata-flavor") != "Google":
            return Response(403, b"Missing Metadata-Flavor:Google header.")
        if req.path != "/computeMetadata/v1/instance/preempted":
            return Response(404)
        q = req.query
        if q.get("wait_for_change") == "true" and q.get("last_etag") in (None, self.etag):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), float(q.get("timeout_sec", "3600")))
        body = b"TRUE" if self._preempted else b"FALSE"
        return Response(
            200,
            body,
            {"Metadata-Flavor": "Google", "ETag": self.etag, "Content-Type": "application/text"},
        )


class FakeAzureImds(FakeServer):
    """Azure IMDS Scheduled Events (api-version 2020-07-01) with StartRequests."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.events: list[dict[str, Any]] = []
        self.incarnation = 1
        self.acknowledged: list[str] = []

    def schedule(self, **event: Any) -> dict[str, Any]:
        """Add an event; fields default to a spot eviction of ``vm-1`` as Azure sends it."""
        full = {
            "EventId": "602d9444-d2cd-49c7-8624-8643e7171297",
            "EventType": "Preempt",
            "ResourceType": "VirtualMachine",
            "Resources": ["vm-1"],
            "EventStatus": "Scheduled",
            "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT",
            "Description": "",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        } | event
        self.events.append(full)
        self.incarnation += 1
        return full

    async def handle(self, req: Request) -> Response:
        if req.headers.get("metadata") != "true":
            return Response(400, b'{"error":"Bad request. Required metadata header not specified"}')
        if req.path != "/metadata/scheduledevents":
            return Response(404)
        if req.query.get("api-version") != "2020-07-01":
            return Response(
                400, b'{"error":"Bad request. api-version is invalid or was not specified"}'
            )
        if req.method == "POST":
            return self._start_requests(req.body)
        doc = {"DocumentIncarnation": self.incarnation, "Events": self.events}
        return Response(200, orjson.dumps(doc), {"Content-Type": "application/json"})

    def _start_requests(self, body: bytes) -> Response:
        try:
            ids = [r["EventId"] for r in orjson.loads(body)["StartRequests"]]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return Response(400, b'{"error":"Bad request"}')
        for event in self.events:
            if event["EventId"] in ids:
                # Approved: the platform starts it; NotBefore is cleared once started.
                event["EventStatus"], event["NotBefore"] = "Started", ""
        self.acknowledged += ids
        self.incarnation += 1
        return Response(200)


class InThread:
    """Runs a fake on an event loop of its own thread, for tests that are not async
    (end-to-end tests driving other processes). :meth:`call` changes its state on that
    loop, so a change is never seen half-made by a request being served."""

    def __init__(self, fake: FakeServer) -> None:
        import threading

        self.fake = fake
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> InThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def call(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)
