"""A client that goes away stops its generation on the engine, not just in the gateway.

Runs on ``slow_gateway``: 2000 tokens take about 4 s there, so an engine that kept
generating for the vanished client would still be busy when the test looks, 2 s later.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from e2e_support import MODEL, Served, metric_value, sse_events, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.engine]

MAX_TOKENS = 2000
WINDOW_S = 2.0


def _slots(url: str) -> list[dict[str, Any]]:
    # llama-server's GET /slots: one object per slot with "id" and "is_processing"
    # (tools/server/README.md); this build lists further fields only for busy slots.
    r = httpx.get(url + "/slots", timeout=5.0)
    r.raise_for_status()
    slots: list[dict[str, Any]] = r.json()
    return slots


def _busy_slots(served: Served) -> list[tuple[str, int]]:
    return [
        (info.replica_id, s["id"])
        for info in served.replicas().values()
        for s in _slots(info.url)
        if s["is_processing"]
    ]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_client_disconnect_cancels_generation_on_the_engine(
    slow_gateway: Served, kind: str
) -> None:
    replicas = slow_gateway.replicas()
    assert len(replicas) == 2, slow_gateway.log()
    assert wait_until(lambda: not _busy_slots(slow_gateway), 10), "replicas busy before the test"

    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "temperature": 0,
    }
    if kind == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "Go on"}]
    else:
        path, body["prompt"] = "/v1/completions", "Once upon a time"

    log_sizes = {rid: info.log_path.stat().st_size for rid, info in replicas.items()}
    with httpx.Client(base_url=slow_gateway.url, timeout=30.0) as c:
        with c.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            # Keep the generator referenced: dropping it would close the response
            # (httpcore closes a half-read stream) before the checks below.
            events = sse_events(r.iter_text())
            seen = 0
            while seen < 5:
                seen += next(events).id is not None
            # The generation is under way on some replica right now.
            busy = _busy_slots(slow_gateway)
            assert len(busy) == 1, busy
            assert (
                metric_value(c.get("/metrics").text, "albatross_requests_in_flight", model=MODEL)
                == 1
            )
            events.close()
        # Leaving the block closed the connection with the stream unfinished.
        closed_at = time.monotonic()

        def gateway_idle() -> bool:
            text = c.get("/metrics").text
            return metric_value(text, "albatross_requests_in_flight", model=MODEL) == 0

        assert wait_until(gateway_idle, WINDOW_S), "gateway still counts the request in flight"

    assert wait_until(
        lambda: not _busy_slots(slow_gateway), WINDOW_S - (time.monotonic() - closed_at)
    ), (
        f"engine slots still generating {WINDOW_S} s after the client left: {_busy_slots(slow_gateway)}"
    )
    # And it was cancelled, cut short, not run to its end in the meantime: llama-server
    # logs "stop: cancel task" and "release: id N | task T | stop processing: n_tokens = K".
    rid, slot_id = busy[0]
    with replicas[rid].log_path.open("rb") as f:
        f.seek(log_sizes[rid])
        engine_log = f.read().decode(errors="replace")
    assert "cancel task" in engine_log, engine_log[-2000:]
    released = re.findall(
        rf"release: id +{slot_id} \| task \d+ \| stop processing: n_tokens = (\d+)", engine_log
    )
    assert released, engine_log[-2000:]
    assert int(released[-1]) < MAX_TOKENS // 2, engine_log[-2000:]

    # The replicas still serve: the cancelled slot is free for the next request.
    with httpx.Client(base_url=slow_gateway.url, timeout=30.0) as c:
        r2 = c.post("/v1/completions", json={"model": MODEL, "prompt": "Again", "max_tokens": 5})
        assert r2.status_code == 200
        assert r2.json()["usage"]["completion_tokens"] == 5


def test_client_disconnect_cancels_a_non_streaming_generation(slow_gateway: Served) -> None:
    """No body has been sent yet when the client goes; the engine must stop all the same."""
    replicas = slow_gateway.replicas()
    assert wait_until(lambda: not _busy_slots(slow_gateway), 10), "replicas busy before the test"
    log_sizes = {rid: info.log_path.stat().st_size for rid, info in replicas.items()}
    body = json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": MAX_TOKENS}).encode()
    u = urlsplit(slow_gateway.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        assert wait_until(lambda: len(_busy_slots(slow_gateway)) == 1, 5), "never started"
        busy = _busy_slots(slow_gateway)
    closed_at = time.monotonic()
    assert wait_until(lambda: not _busy_slots(slow_gateway), WINDOW_S), (
        f"engine slots still generating {WINDOW_S} s after the client left: {_busy_slots(slow_gateway)}"
    )
    assert time.monotonic() - closed_at < WINDOW_S
    rid, _ = busy[0]
    with replicas[rid].log_path.open("rb") as f:
        f.seek(log_sizes[rid])
        engine_log = f.read().decode(errors="replace")
    assert "cancel task" in engine_log, engine_log[-2000:]
