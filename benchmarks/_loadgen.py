"""A cheap streaming load generator for OpenAI-style SSE endpoints, plus CPU meters.

Shared by the benchmarks. It must not distort a 2-core machine, so it is built the way
the gateway is: asyncio (uvloop) Protocols on raw connections, httptools to de-chunk,
and per SSE event only a few byte searches. No JSON is parsed on the token path; the
final usage event (``stream_options.include_usage``) is the only one decoded.

Per stream it records (all ``time.perf_counter()`` seconds):

- ``start``: just before connecting; ``head``: response head received;
- ``first``: first event that carries text; ``token_times``: every such event;
- ``end``: end of the response (or of the failure);
- ``events`` (content-carrying events), ``last_id`` (the last SSE ``id:`` line, which
  the albatross gateway sets to the journal position of the event's last token) and
  ``usage_tokens`` (``usage.completion_tokens`` of the usage event, or
  ``tokens_predicted`` of the final event of llama-server's native ``/completion``).

A stream is complete at ``data: [DONE]`` (OpenAI) or at an event with ``"stop":true``
(llama-server's native ``/completion``, with ``CHAT_MARKER`` as the content marker).

One timestamp is taken per ``data_received`` call and shared by the events in it, so
events that arrived together get the same time, as a client would see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import orjson

COMPLETION_MARKER = b'"text":"'
"""Content marker of ``/v1/completions`` events."""
CHAT_MARKER = b'"content":"'
"""Content marker of ``/v1/chat/completions`` and llama-server ``/completion`` events."""
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- requests ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Target:
    """One request to send: where, and the exact bytes of the HTTP/1.1 request."""

    host: str
    port: int
    request: bytes


def build_post(host: str, port: int, path: str, body: Any) -> bytes:
    """An HTTP/1.1 POST with a JSON body, ``Connection: close``."""
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + payload


def split_url(url: str) -> tuple[str, int]:
    """``http://HOST:PORT`` -> (HOST, PORT)."""
    rest = url.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.partition(":")
    return host, int(port or 80)


def post_target(base_url: str, path: str, body: Any) -> Target:
    host, port = split_url(base_url)
    return Target(host, port, build_post(host, port, path, body))


# ---- one stream --------------------------------------------------------------------
@dataclass(slots=True)
class StreamResult:
    start: float = 0.0
    head: float = 0.0
    first: float = 0.0
    end: float = 0.0
    status: int = 0
    events: int = 0
    last_id: int | None = None
    usage_tokens: int | None = None
    done: bool = False
    error: str | None = None
    token_times: list[float] = field(default_factory=list)
    text: list[str] | None = None  # only with collect_text

    @property
    def tokens(self) -> int:
        """Tokens delivered: usage if sent, else last ``id:`` + 1, else content events."""
        if self.usage_tokens is not None:
            return self.usage_tokens
        if self.last_id is not None:
            return self.last_id + 1
        return self.events

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.done

    @property
    def ttft(self) -> float:
        return self.first - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start


class _StreamProtocol(asyncio.Protocol):
    __slots__ = (
        "_buf",
        "_collect",
        "_done",
        "_marker",
        "_mlen",
        "_now",
        "_parser",
        "_request",
        "r",
        "transport",
    )

    def __init__(
        self,
        request: bytes,
        result: StreamResult,
        done: asyncio.Future[None],
        marker: bytes,
        collect: bool,
    ) -> None:
        self._request = request
        self.r = result
        self._done = done
        self._marker = marker
        self._mlen = len(marker)
        self._collect = collect
        self._parser = httptools.HttpResponseParser(self)
        self._buf = b""
        self._now = 0.0
        self.transport: asyncio.Transport | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._now = time.perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(f"malformed HTTP from server: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._now = time.perf_counter()
        self._finish(f"connection lost before the response ended: {exc}")

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.r.status = self._parser.get_status_code()
        self.r.head = self._now

    def on_body(self, body: bytes) -> None:
        r = self.r
        if r.status != 200:
            self._buf += body
            return
        buf = self._buf + body if self._buf else body
        now = self._now
        marker, mlen = self._marker, self._mlen
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            ev = buf[start:end]
            start = end + 2
            if ev[:4] == b"id: ":
                nl = ev.find(b"\n")
                r.last_id = int(ev[4:nl])
            i = ev.find(marker)
            if i >= 0 and ev[i + mlen : i + mlen + 1] != b'"':
                if not r.events:
                    r.first = now
                r.events += 1
                r.token_times.append(now)
                if self._collect:
                    self._text(ev)
            elif ev.endswith(b"[DONE]"):
                r.done = True
            elif b'"stop":true' in ev:
                # llama-server's native /completion: no [DONE]; the last event says stop.
                r.done = True
                d = ev.find(b"data: ")
                with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                    r.usage_tokens = orjson.loads(ev[d + 6 :])["tokens_predicted"]
            elif b'"usage":{' in ev:
                d = ev.find(b"data: ")
                try:
                    r.usage_tokens = orjson.loads(ev[d + 6 :])["usage"]["completion_tokens"]
                except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                    r.error = f"bad usage event: {exc}"
        self._buf = buf[start:] if start < len(buf) else b""

    def _text(self, ev: bytes) -> None:
        assert self.r.text is not None
        obj = orjson.loads(ev[ev.find(b"data: ") + 6 :])
        ch = obj["choices"][0]
        self.r.text.append(ch["delta"]["content"] if "delta" in ch else ch["text"])

    def on_message_complete(self) -> None:
        if self.r.status != 200:
            self._finish(f"HTTP {self.r.status}: {self._buf[:300]!r}")
        else:
            self._finish(None)

    def _finish(self, error: str | None) -> None:
        if self._done.done():
            return
        r = self.r
        r.end = self._now
        if error is not None and r.error is None:
            r.error = error
        self._done.set_result(None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def stream_once(
    target: Target,
    *,
    marker: bytes = COMPLETION_MARKER,
    collect_text: bool = False,
    timeout_s: float = 300.0,
) -> StreamResult:
    """Send one streaming request and read it to the end. Never raises for HTTP or
    connection errors: they land in ``result.error``."""
    loop = asyncio.get_running_loop()
    r = StreamResult(text=[] if collect_text else None)
    done: asyncio.Future[None] = loop.create_future()
    transport: asyncio.BaseTransport | None = None
    r.start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                lambda: _StreamProtocol(target.request, r, done, marker, collect_text),
                target.host,
                target.port,
            )
            await done
    except TimeoutError:
        r.end = time.perf_counter()
        r.error = f"no complete response within {timeout_s:g} s"
    except OSError as exc:
        r.end = time.perf_counter()
        r.error = f"cannot connect to {target.host}:{target.port}: {exc}"
    finally:
        if transport is not None and not transport.is_closing():
            transport.close()
    return r


# ---- a round of concurrent streams -----------------------------------------------------
@dataclass(slots=True)
class RoundResult:
    results: list[StreamResult]
    t0: float
    t1: float

    @property
    def wall(self) -> float:
        return self.t1 - self.t0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0

    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.results if r.events]

    def e2es(self) -> list[float]:
        return [r.e2e for r in self.results]

    def gaps(self) -> list[float]:
        """Inter-token gaps: per stream, between successive content events; pooled."""
        out: list[float] = []
        for r in self.results:
            t = r.token_times
            out.extend(b - a for a, b in itertools.pairwise(t))
        return out

    def failures(self, expected_tokens: int | None = None) -> list[str]:
        bad = []
        for i, r in enumerate(self.results):
            if not r.ok:
                bad.append(
                    f"stream {i}: {r.error or ('no [DONE]' if not r.done else f'HTTP {r.status}')}"
                )
            elif expected_tokens is not None and r.tokens != expected_tokens:
                bad.append(
                    f"stream {i}: {r.tokens} tokens (events {r.events}), expected {expected_tokens}"
                )
        return bad


async def run_round(
    targets: Sequence[Target],
    *,
    marker: bytes = COMPLETION_MARKER,
    timeout_s: float = 300.0,
    pause_gc: bool = True,
) -> RoundResult:
    """Launch one stream per target at once and wait for all of them."""
    if pause_gc:
        gc.disable()
    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(stream_once(t, marker=marker, timeout_s=timeout_s) for t in targets)
        )
        t1 = max((r.end for r in results), default=t0)
    finally:
        if pause_gc:
            gc.enable()
    return RoundResult(list(results), t0, t1)


# ---- Prometheus histograms (a server's own view) ------------------------------------------
def scrape_histogram(base_url: str, name: str, timeout_s: float = 5.0) -> dict[float, float]:
    """Cumulative bucket counts ``{le: count}`` of histogram ``name`` at ``/metrics``
    (summed over label sets). Blocking; call between rounds."""
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode()
    out: dict[float, float] = {}
    prefix = name + "_bucket{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, _, value = line.rpartition(" ")
        le = labels.split('le="', 1)[1].split('"', 1)[0]
        key = float("inf") if le == "+Inf" else float(le)
        out[key] = out.get(key, 0.0) + float(value)
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` (0..1) of what was observed
    between two scrapes; NaN when nothing was."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    if not counts or counts[-1] <= 0:
        return float("nan")
    target = q * counts[-1]
    for le, c in zip(les, counts, strict=True):
        if c >= target:
            return le
    return float("inf")


# ---- statistics --------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    """Percentile ``q`` (0..100), linear between closest ranks; NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- CPU meters --------------------------------------------------------------------
def proc_cpu_split_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of process ``pid`` (all its threads, not its children), seconds."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def proc_cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads, not its children), seconds."""
    u, s = proc_cpu_split_s(pid)
    return u + s


def proc_schedstat_s(pid: int) -> tuple[float, float]:
    """(on-CPU time, time runnable but waiting for a CPU) summed over all threads of
    ``pid``, from schedstat (ns resolution), seconds."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):  # a thread that just ended
            f = (task / "schedstat").read_bytes().split()
            run += int(f[0])
            wait += int(f[1])
    return run / 1e9, wait / 1e9


def proc_cpu_exact_s(pid: int) -> float:
    """On-CPU time of all threads of ``pid`` from schedstat (ns resolution), seconds."""
    return proc_schedstat_s(pid)[0]


def machine_cpu_s() -> float:
    """Busy CPU time of the whole machine (all cores) from /proc/stat, seconds.

    user + nice + system + irq + softirq; idle, iowait and steal are not ours.
    """
    with open("/proc/stat", "rb") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in parts[1:8])
    return (user + nice + system + irq + softirq) / _CLK_TCK


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass(slots=True)
class CpuSnapshot:
    """CPU meters read together; subtract two to get a round's use."""

    machine: float
    self_: float
    procs: dict[int, tuple[float, float, float, float, float]]
    """pid -> (utime + stime, schedstat run time, utime, stime, schedstat run-queue wait), seconds"""

    @classmethod
    def take(cls, pids: Sequence[int] = ()) -> CpuSnapshot:
        procs = {}
        for pid in pids:
            try:
                u, s = proc_cpu_split_s(pid)
                run, wait = proc_schedstat_s(pid)
                procs[pid] = (u + s, run, u, s, wait)
            except OSError:
                procs[pid] = (float("nan"),) * 5
        return cls(machine_cpu_s(), self_cpu_s(), procs)

    def since(self, before: CpuSnapshot) -> CpuSnapshot:
        return CpuSnapshot(
            self.machine - before.machine,
            self.self_ - before.self_,
            {
                pid: tuple(a - b for a, b in zip(v, before.procs[pid], strict=True))  # type: ignore[misc]
                for pid, v in self.procs.items()
                if pid in before.procs
            },
        )
