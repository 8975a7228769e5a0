"""A gateway with managed replicas, its control API, and an SSE client that keeps every event.

Shared by ``chaos.py`` and ``migration_stall.py`` (``gateway_overhead.py`` runs the
gateway over external endpoints instead). Pieces:

- :data:`MODELS` / :func:`make_model`: the tiny test model and a ~90M-parameter random
  Llama built the same way (:func:`albatross.testing.tinymodel.make_tiny_model`);
- :func:`start_managed`: ``albatross serve`` with ``replicas`` managed llama-servers, a
  control token, continuity settings; waits until every replica is ready and, on exit,
  also kills replica processes a dead gateway left behind;
- :class:`Admin`: ``/admin`` calls and ``/metrics`` counters (blocking, urllib);
- :func:`sse_stream`: one streaming request on a raw asyncio connection that records each
  text event (arrival time, SSE id, raw ``data``), error events, the final event's id,
  ``[DONE]`` and the usage event. The text is decoded after the stream
  (:meth:`SseResult.text`), not on the token path. A ``hook`` runs after every read
  and may close the connection (a client that leaves).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))


import _loadgen as lg
from gateway_overhead import start_gateway

from albatross.config import LlamaServerConfig
from albatross.engines.llama_build import llama_server_binary
from albatross.testing.llama import free_port
from albatross.testing.tinymodel import make_tiny_model

TOKEN = "albatross-bench-control-token"
MODEL_NAME = "bench"
READY_TIMEOUT_S = 120.0

# ---- models ------------------------------------------------------------------------
MODELS: dict[str, dict[str, int]] = {
    "tiny": {},  # make_tiny_model's defaults: hidden 128, 2 layers, 4 heads, 2 KV heads
    "100m": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 4, "ffn": 2560},
}
_DEFAULTS = {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 256, "vocab": 512}


def model_params(kind: str) -> int:
    """Parameter count of model ``kind`` (vocab taken as 512; the real one is a little less)."""
    s = {**_DEFAULTS, **MODELS[kind]}
    h, f, v, hd = s["hidden"], s["ffn"], s["vocab"], s["hidden"] // s["heads"]
    per_layer = 2 * h * h + 2 * s["kv_heads"] * hd * h + 3 * h * f + 2 * h
    return 2 * v * h + s["layers"] * per_layer + h


def make_model(directory: Path, kind: str, context: int = 8192) -> Path:
    return make_tiny_model(directory, name=kind, context=context, **MODELS[kind])


# ---- processes ---------------------------------------------------------------------
@dataclass
class Managed:
    url: str
    admin: Admin
    gateway_pid: int
    log: Path
    logs: Path
    slot_dir: Path
    replicas: int
    parallel: int
    ctx_size: int


def _kill_leftovers(binary: Path, pids: set[int]) -> None:
    """SIGKILL replica processes (by pid, checked against the binary) the gateway left."""
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(str(binary).encode()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_managed(
    stack: ExitStack,
    model_path: Path,
    *,
    replicas: int,
    parallel: int,
    ctx_size: int,
    threads: int = 1,
    max_migrations: int = 20,
    stall_timeout_s: float = 10.0,
    restart_backoff_s: float = 0.5,
    max_tokens_limit: int = 8192,
    work: Path | None = None,
    numerics: str = "fast",
) -> Managed:
    """``albatross serve`` over ``replicas`` managed llama-servers of ``model_path``
    (``parallel`` slots of ``ctx_size`` tokens each), control API on; returns once every
    replica is ready. Everything is stopped when ``stack`` closes."""
    binary = llama_server_binary(LlamaServerConfig())
    if work is None:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="albatross-bench-")))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    slot_dir = work / "slots"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = work / "gateway.toml"
    cfg.write_text(
        f'[gateway]\nhost = "127.0.0.1"\nport = {port}\nmax_tokens_limit = {max_tokens_limit}\n\n'
        f'[supervisor]\nlog_dir = "{logs}"\nrestart_backoff_initial_s = {restart_backoff_s}\n'
        f"restart_backoff_max_s = {max(restart_backoff_s, 2.0)}\n\n"
        f'[continuity]\nslot_dir = "{slot_dir}"\nmax_migrations = {max_migrations}\n'
        f"stall_timeout_s = {stall_timeout_s}\n\n"
        f'[control]\ntoken = "{TOKEN}"\n\n'
        f'[llama_server]\nbinary = "{binary}"\n\n'
        f'[[models]]\nname = "{MODEL_NAME}"\npath = "{model_path}"\nreplicas = {replicas}\n'
        f"threads = {threads}\nctx_size = {ctx_size}\nparallel = {parallel}\n"
        f'numerics = "{numerics}"\n'
    )
    admin = Admin(url)
    # Registered before the gateway's own stop, so it runs after it.
    stack.callback(lambda: _kill_leftovers(binary, admin.seen_pids))
    gw_log = logs / "gateway.log"
    gw = start_gateway(stack, cfg, url, gw_log, profile=None)
    admin.wait_ready(replicas)
    return Managed(url, admin, gw.pid, gw_log, logs, slot_dir, replicas, parallel, ctx_size)


# ---- control API and metrics -------------------------------------------------------
class Admin:
    """Blocking calls to ``/admin`` (bearer token) and ``/metrics``."""

    def __init__(self, base_url: str, token: str = TOKEN) -> None:
        self.base = base_url
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.seen_pids: set[int] = set()

    def _call(self, path: str, body: Any = None, timeout_s: float = 30.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None

    def replicas(self) -> list[dict[str, Any]]:
        rs: list[dict[str, Any]] = self._call("/admin/replicas")["replicas"]
        self.seen_pids.update(r["pid"] for r in rs if r.get("pid"))
        return rs

    def requests(self) -> list[dict[str, Any]]:
        return list(self._call("/admin/requests")["requests"])

    def request(self, request_id: str) -> dict[str, Any]:
        return dict(self._call(f"/admin/requests/{request_id}"))

    def move(self, request_id: str, path: str, to: str | None = None) -> dict[str, Any]:
        return dict(self._call("/admin/move", {"request": request_id, "to": to, "path": path}))

    def wait_ready(
        self, n: int, timeout_s: float = READY_TIMEOUT_S, not_pids: frozenset[int] = frozenset()
    ) -> list[dict[str, Any]]:
        """Wait until ``n`` replicas are ready with a pid not in ``not_pids``."""
        deadline = time.monotonic() + timeout_s
        while True:
            rs = self.replicas()
            ready = [
                r for r in rs if r["state"] == "ready" and r["pid"] and r["pid"] not in not_pids
            ]
            if len(ready) >= n:
                return rs
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas not ready after {timeout_s:g} s: {rs}")
            time.sleep(0.05)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as resp:
            return str(resp.read().decode())


def counters(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of metric ``name`` (exact name, e.g. ``albatross_migrations_total``) by label set."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head == name:
            out[()] = float(value)
            continue
        if not head.startswith(name + "{"):
            continue
        labels = []
        for part in head[len(name) + 1 : -1].split('",'):
            k, _, v = part.partition('="')
            labels.append((k, v.rstrip('"')))
        out[tuple(labels)] = float(value)
    return out


def delta(
    before: dict[tuple[tuple[str, str], ...], float],
    after: dict[tuple[tuple[str, str], ...], float],
) -> dict[tuple[tuple[str, str], ...], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


# ---- an SSE client that keeps every event -----------------------------------------------
@dataclass(slots=True)
class SseResult:
    start: float = 0.0
    head: float = 0.0
    end: float = 0.0
    status: int = 0
    done: bool = False  # data: [DONE] seen
    closed_by_client: bool = False
    error: str | None = None  # HTTP error, dropped connection, timeout
    times: list[float] = field(default_factory=list)  # per text event
    ids: list[int | None] = field(default_factory=list)  # per text event
    datas: list[bytes] = field(default_factory=list)  # per text event, raw JSON
    error_events: list[bytes] = field(default_factory=list)
    final_id: int | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    response_id: str | None = None

    @property
    def last_id(self) -> int:
        for i in reversed(self.ids):
            if i is not None:
                return i
        return -1

    def text(self) -> str:
        out = []
        for d in self.datas:
            ch = orjson.loads(d)["choices"][0]
            out.append((ch["delta"].get("content") or "") if "delta" in ch else ch["text"])
        return "".join(out)

    def gaps(self) -> list[float]:
        t = self.times
        return [b - a for a, b in itertools.pairwise(t)]


Hook = Callable[[SseResult, "_SseProtocol"], None]


class _SseProtocol(asyncio.Protocol):
    def __init__(
        self, request: bytes, r: SseResult, done: asyncio.Future[None], hook: Hook | None
    ) -> None:
        self._request = request
        self.r = r
        self._done = done
        self._hook = hook
        self._parser = httptools.HttpResponseParser(self)
        self._buf = b""
        self._now = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._now = time.perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(f"malformed HTTP from server: {exc}")
            return
        if self._hook is not None and not self._done.done():
            self._hook(self.r, self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._now = time.perf_counter()
        self._finish(f"connection lost before the response ended ({exc})")

    def close(self) -> None:
        """The client leaves (not an error)."""
        self.r.closed_by_client = True
        self._finish(None)

    def on_headers_complete(self) -> None:
        self.r.status = self._parser.get_status_code()
        self.r.head = self._now

    def on_body(self, body: bytes) -> None:
        r = self.r
        buf = self._buf + body if self._buf else body
        if r.status != 200:
            self._buf = buf
            return
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            self._event(buf[start:end])
            start = end + 2
        self._buf = buf[start:]

    def _event(self, ev: bytes) -> None:
        r = self.r
        eid: int | None = None
        d = ev.find(b"data: ")
        if d < 0:
            return
        if ev.startswith(b"id: "):
            eid = int(ev[4 : ev.find(b"\n")])
        data = ev[d + 6 :]
        if data == b"[DONE]":
            r.done = True
        elif data.startswith(b'{"error"'):
            r.error_events.append(data)
        elif b'"usage":{' in data:
            r.usage = orjson.loads(data)["usage"]
        elif b'"finish_reason":null' in data:
            if r.response_id is None:
                r.response_id = orjson.loads(data)["id"]
            if b'"text":""' in data or b'"content":""' in data:
                return  # the chat role event
            r.times.append(self._now)
            r.ids.append(eid)
            r.datas.append(data)
        else:
            r.final_id = eid
            i = data.find(b'"finish_reason":"')
            r.finish_reason = data[i + 17 : data.find(b'"', i + 17)].decode() if i >= 0 else None

    def on_message_complete(self) -> None:
        if self.r.status != 200:
            self._finish(f"HTTP {self.r.status}: {self._buf[:300]!r}")
        else:
            self._finish(None)

    def _finish(self, error: str | None) -> None:
        if self._done.done():
            return
        self.r.end = self._now
        if error is not None and self.r.error is None:
            self.r.error = error
        self._done.set_result(None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def sse_stream(
    target: lg.Target, *, hook: Hook | None = None, timeout_s: float = 600.0
) -> SseResult:
    """One streaming request read to its end (or until ``hook`` closes it). Never raises
    for HTTP or connection errors: they land in ``result.error``."""
    loop = asyncio.get_running_loop()
    r = SseResult()
    done: asyncio.Future[None] = loop.create_future()
    transport: asyncio.BaseTransport | None = None
    r.start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                lambda: _SseProtocol(target.request, r, done, hook), target.host, target.port
            )
            await done
    except TimeoutError:
        r.end = time.perf_counter()
        r.error = f"no complete response within {timeout_s:g} s"
    except OSError as exc:
        r.end = time.perf_counter()
        r.error = f"cannot connect: {exc}"
    finally:
        if transport is not None and not transport.is_closing():
            transport.close()
    return r


def fmt_ms(x: float) -> str:
    return "-" if x != x else f"{x * 1e3:.1f}"


def keep_logs(logs: Path, name: str) -> Path:
    """Copy a run's logs (the gateway's work dir is deleted at exit) to a kept folder."""
    keep = Path(tempfile.mkdtemp(prefix=f"albatross-{name}-logs-"))
    for f in logs.iterdir():
        (keep / f.name).write_bytes(f.read_bytes())
    print(f"logs kept in {keep}")
    return keep
