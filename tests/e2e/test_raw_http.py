"""Raw HTTP against ``albatross serve``: SSE framing, bad input, health and metrics.

The bad-input cases run while long streams are being generated, and the streams must
not notice: a client's mistake is that client's 4xx, never a 500, never anyone else's
problem.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from e2e_support import MODEL, Served, SSEEvent, metric_value, sse_events

pytestmark = [pytest.mark.e2e, pytest.mark.engine]

MSG = [{"role": "user", "content": "Hello there"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MAX_BODY = 1024 * 1024  # gateway.max_body_bytes default; the e2e config keeps it


def stream_events(client: httpx.Client, path: str, body: dict[str, Any]) -> list[SSEEvent]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_text()))


def check_stream(events: list[SSEEvent], max_tokens: int, kind: str) -> str:
    """Assert a stream ran to ``max_tokens`` without an error; return its text."""
    assert events[-1].data == "[DONE]"
    payloads = [e.json() for e in events[:-1]]
    errors = [p for p in payloads if "error" in p]
    assert not errors, errors
    assert all(e.data != "[DONE]" for e in events[:-1])
    text_events = [
        (e, p) for e, p in zip(events, payloads, strict=False) if p["choices"] and _text(p, kind)
    ]
    ids = [e.id for e, _ in text_events]
    assert None not in ids, "a text event without an id: line"
    assert ids[-1] == max_tokens - 1
    all_ids = [e.id for e in events if e.id is not None]
    assert all(a < b for a, b in itertools.pairwise(all_ids)), f"ids not increasing: {all_ids}"
    finishes = [
        p["choices"][0]["finish_reason"]
        for p in payloads
        if p["choices"] and p["choices"][0]["finish_reason"]
    ]
    assert finishes == ["length"]
    usage = [p["usage"] for p in payloads if p.get("usage")]
    if usage:
        assert usage == [usage[-1]] and usage[-1]["completion_tokens"] == max_tokens
    return "".join(_text(p, kind) for _, p in text_events)


def _text(p: dict[str, Any], kind: str) -> str:
    c = p["choices"][0]
    return str(c["delta"].get("content") or "") if kind == "chat" else str(c["text"])


# ---- SSE framing -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_sse_token_events_carry_strictly_increasing_positions(
    http: httpx.Client, kind: str
) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "temperature": 0, "stream": True}
    body |= {"messages": MSG} if kind == "chat" else {"prompt": "Every morning"}
    events = stream_events(http, CHAT if kind == "chat" else COMPLETIONS, body)
    check_stream(events, 50, kind)


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_every_sse_event_has_a_strictly_increasing_id(http: httpx.Client, kind: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "stream": True}
    body |= {"messages": MSG} if kind == "chat" else {"prompt": "Every morning"}
    body["stream_options"] = {"include_usage": True}
    events = stream_events(http, CHAT if kind == "chat" else COMPLETIONS, body)
    assert events[-1].data == "[DONE]"
    ids = [e.id for e in events[:-1]]
    assert None not in ids, f"events without an id: line: {ids}"
    assert all(a < b for a, b in itertools.pairwise(ids)), f"ids not strictly increasing: {ids}"


# ---- bad input -------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    name: str
    method: str
    path: str
    status: int
    param: str | None
    body: bytes | None = None


def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


BAD = [
    Bad("malformed json", "POST", CHAT, 400, None, b'{"model": "tiny", "messages": ['),
    Bad("empty body", "POST", CHAT, 400, None, b""),
    Bad("missing messages", "POST", CHAT, 400, "messages", _j({"model": MODEL})),
    Bad("empty messages", "POST", CHAT, 400, "messages", _j({"model": MODEL, "messages": []})),
    Bad(
        "wrong-typed content",
        "POST",
        CHAT,
        400,
        "messages[0].content",
        _j({"model": MODEL, "messages": [{"role": "user", "content": 123}]}),
    ),
    Bad(
        "negative max_tokens",
        "POST",
        CHAT,
        400,
        "max_tokens",
        _j({"model": MODEL, "messages": MSG, "max_tokens": -1}),
    ),
    Bad(
        "temperature 3",
        "POST",
        CHAT,
        400,
        "temperature",
        _j({"model": MODEL, "messages": MSG, "temperature": 3}),
    ),
    Bad(
        "unknown model", "POST", CHAT, 404, "model", _j({"model": "no-such-model", "messages": MSG})
    ),
    Bad("tools", "POST", CHAT, 400, "tools", _j({"model": MODEL, "messages": MSG, "tools": []})),
    Bad("n 2", "POST", CHAT, 400, "n", _j({"model": MODEL, "messages": MSG, "n": 2})),
    Bad("unknown foo", "POST", CHAT, 400, "foo", _j({"model": MODEL, "messages": MSG, "foo": 1})),
    Bad("completion without prompt", "POST", COMPLETIONS, 400, "prompt", _j({"model": MODEL})),
    Bad(
        "oversized body",
        "POST",
        COMPLETIONS,
        413,
        None,
        _j({"model": MODEL, "prompt": "a" * (MAX_BODY + 10)}),
    ),
    # Refused by the engine (longer than a slot's context; ids outside the vocabulary):
    # still the client's 4xx, not a 5xx.
    Bad(
        "prompt too long",
        "POST",
        COMPLETIONS,
        400,
        None,
        _j({"model": MODEL, "prompt": "the albatross " * 1500}),
    ),
    Bad(
        "invalid token ids",
        "POST",
        COMPLETIONS,
        400,
        None,
        _j({"model": MODEL, "prompt": [99999, 5]}),
    ),
    Bad("wrong method", "GET", CHAT, 405, None),
    Bad("unknown path", "GET", "/v1/nope", 404, None),
]


def check_bad(client: httpx.Client, bad: Bad) -> None:
    r = client.request(
        bad.method, bad.path, content=bad.body, headers={"content-type": "application/json"}
    )
    assert r.status_code == bad.status, (bad.name, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, (bad.name, err)
    assert err["message"], bad.name
    if bad.param is not None:
        assert err["param"] == bad.param, (bad.name, err)


@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
def test_bad_request_gets_a_4xx_naming_the_field(http: httpx.Client, bad: Bad) -> None:
    check_bad(http, bad)


def test_body_too_large_by_content_length_is_refused_before_the_body(gateway: Served) -> None:
    """413 as soon as the headers announce too much, without reading a byte of body."""
    u = urlsplit(gateway.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), data
    assert json.loads(body)["error"]["code"] == "body_too_large"


def test_405_names_the_allowed_methods(http: httpx.Client) -> None:
    r = http.get(CHAT)
    assert r.status_code == 405
    assert r.headers.get("allow") == "POST"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_sequence_is_answered_once(gateway: Served, http: httpx.Client, stream: bool) -> None:
    """A request ended by a stop sequence gets one response and nothing after it on the
    keep-alive connection (a stray second response would answer the client's next
    request). The stop is the end of a short output, so the engine's final event comes
    right after it, often in the same read: the case that writes the response twice."""
    prompt = "The albatross glides over the ocean"
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    ref = http.post(COMPLETIONS, json=kw).json()["choices"][0]["text"]
    n = 3
    while ref.index(ref[-n:]) != len(ref) - n or not ref[-n:].strip():
        n += 1  # the stop's first occurrence must be the end itself
    stop = ref[-n:]
    body = json.dumps(kw | {"stop": [stop], "stream": stream}).encode()
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    u = urlsplit(gateway.url)
    stray = []
    for i in range(40):
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(request)
            head, rest, extra = _read_response(s)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b'"finish_reason":"stop"' in rest, rest[-300:]
            if not extra:
                s.settimeout(0.03)
                with contextlib.suppress(TimeoutError):
                    extra = s.recv(65536)
            if extra:
                stray.append((i, extra[:300]))
                break
    assert not stray, stray


def _read_response(s: socket.socket) -> tuple[bytes, bytes, bytes]:
    """One HTTP/1.1 response (Content-Length or chunked): head, body as framed, and any
    bytes that came after it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        end = b"\r\n0\r\n\r\n"
        while end not in rest:
            rest += s.recv(65536)
        cut = rest.index(end) + len(end)
    else:
        cut = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < cut:
            rest += s.recv(65536)
    return head, rest[:cut], rest[cut:]


@dataclass
class _Stream:
    body: dict[str, Any]
    path: str
    kind: str
    events: list[SSEEvent] = field(default_factory=list)
    error: BaseException | None = None


def _run_stream(url: str, st: _Stream) -> None:
    try:
        with httpx.Client(base_url=url, timeout=60.0) as c:
            st.events = stream_events(c, st.path, st.body)
    except BaseException as exc:
        st.error = exc


def _in_flight(client: httpx.Client) -> float:
    return metric_value(client.get("/metrics").text, "albatross_requests_in_flight", model=MODEL)


def test_bad_requests_do_not_disturb_streams_in_flight(slow_gateway: Served) -> None:
    """On the slow model an 800-token stream takes seconds, so all four are provably
    being generated (the gateway's in-flight gauge says 4 before and after) while
    every bad request is answered; long enough that a loaded machine starting the four
    unevenly still gets them all running at once."""
    max_tokens = 800
    streams = []
    for i in range(4):
        body: dict[str, Any] = {
            "model": MODEL,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": i,
        }
        if i % 2:
            streams.append(_Stream(body | {"messages": MSG}, CHAT, "chat"))
        else:
            streams.append(_Stream(body | {"prompt": "The storm came"}, COMPLETIONS, "completion"))
    threads = [threading.Thread(target=_run_stream, args=(slow_gateway.url, st)) for st in streams]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=slow_gateway.url, timeout=30.0) as c:
            deadline = time.monotonic() + 10
            while _in_flight(c) < 4:
                assert time.monotonic() < deadline, "the 4 streams never were in flight together"
                time.sleep(0.01)
            for bad in BAD:
                check_bad(c, bad)
            assert _in_flight(c) == 4, "a stream ended before the bad requests were all answered"
    finally:
        for t in threads:
            t.join(60)

    for st in streams:
        assert st.error is None, repr(st.error)
        check_stream(st.events, max_tokens, st.kind)


def _burst(url: str, n: int) -> list[tuple[int, str]]:
    results: list[tuple[int, str]] = []

    def one(i: int) -> None:
        r = httpx.post(
            url + COMPLETIONS,
            json={"model": MODEL, "prompt": f"Request {i}", "max_tokens": 100},
            timeout=60.0,
        )
        ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100
        results.append((200 if ok else r.status_code, "" if ok else r.text))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_more_requests_than_slots_all_complete(gateway: Served) -> None:
    """2 replicas x 4 slots = 8; twelve at once queue on the engines and all finish,
    burst after burst (the pauses let the gateway's idle engine connections age)."""
    failed = [r for r in _burst(gateway.url, 12) if r[0] != 200]
    # Idle engine connections are now a second old: llama-server may close such a
    # connection at any moment, and a request sent on it must not fail (at 33436a6 about
    # one in twelve did, 502 "engine connection lost").
    time.sleep(1.0)
    failed += [r for r in _burst(gateway.url, 12) if r[0] != 200]
    assert not failed, failed


# ---- health and metrics ----------------------------------------------------------


def test_health_reports_two_ready_replicas(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "models": {MODEL: {"ready": 2, "total": 2}}}


def test_metrics_move(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "Count", "max_tokens": 7})
    assert r.status_code == 200
    events = stream_events(
        http, CHAT, {"model": MODEL, "messages": MSG, "max_tokens": 9, "stream": True}
    )
    assert events[-1].data == "[DONE]"
    assert http.post(CHAT, json={"model": MODEL}).status_code == 400
    after = http.get("/metrics")
    assert after.status_code == 200
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text

    for name in (
        "albatross_requests_total",
        "albatross_tokens_total",
        "albatross_time_to_first_token_seconds",
        "albatross_inter_token_seconds",
        "albatross_replica_state",
        "albatross_requests_in_flight",
    ):
        assert f"\n{name}" in text, name

    def moved(name: str, **labels: str) -> float:
        return metric_value(text, name, **labels) - metric_value(before, name, **labels)

    assert moved("albatross_requests_total", endpoint=COMPLETIONS, status="200") == 1
    assert moved("albatross_requests_total", endpoint=CHAT, status="200") == 1
    assert moved("albatross_requests_total", endpoint=CHAT, status="400") == 1
    assert moved("albatross_tokens_total", model=MODEL) == 16
    assert moved("albatross_time_to_first_token_seconds_count", model=MODEL) == 2
    # Inter-token times are observed once per client write, and tokens that arrive
    # together are written together: a short stream on the fast model may be one write.
    # See test_inter_token_histogram_moves for a stream that cannot be.
    assert metric_value(text, "albatross_requests_in_flight", model=MODEL) == 0
    for replica in (f"{MODEL}/0", f"{MODEL}/1"):
        assert metric_value(text, "albatross_replica_state", replica=replica, state="ready") == 1
        assert metric_value(text, "albatross_replica_state", replica=replica) == 1


def test_inter_token_histogram_moves(slow_gateway: Served) -> None:
    """A 200-token stream on the slow model (about 0.4 s) arrives in many engine reads,
    so the gateway writes to the client many times and observes the gaps."""
    with httpx.Client(base_url=slow_gateway.url, timeout=30.0) as c:
        before = c.get("/metrics").text
        body = {"model": MODEL, "prompt": "Slowly", "max_tokens": 200, "stream": True}
        events = stream_events(c, COMPLETIONS, body)
        check_stream(events, 200, "completion")
        text = c.get("/metrics").text
    name = "albatross_inter_token_seconds_count"
    assert metric_value(text, name, model=MODEL) - metric_value(before, name, model=MODEL) >= 2
    assert metric_value(text, "albatross_inter_token_seconds_sum", model=MODEL) > 0
