"""Live HTTP streams moved between two real gateways, mid-response, in namespaces.

``albatross serve`` runs in gateway A's namespace and in gateway B's, each with its own
llama-server replica (``numerics = "exact"``: a re-prefilled continuation equals an
uninterrupted run); clients run in the client namespace and reach the VIP through the
router. ``albatross migrate-gateway --to gw-b`` moves every connection while the
streams run. What a client would notice is checked: the text is token-identical to a
reference run with nothing moved, SSE ids only grow (no duplicate, no gap), the
response ends with ``[DONE]``, and the client neither sent nor received a RST (its
namespace's SNMP counters). The gateways' own namespaces are not asserted on: a
gateway cancels an engine generation by closing that connection, which may reset it
on their loopback.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netmove_fixtures import needs_root

from albatross.testing.gatewayrig import MODEL, PORT, GatewayPair
from albatross.testing.netns import Topology, topology
from albatross.testing.tinymodel import make_tiny_model

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.engine, needs_root]

TOKENS = 1800
"""Long enough (over a second on the slow model) to be moved mid-stream."""
PROMPT = [{"role": "user", "content": "Tell me a long story about an albatross."}]


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model made about 6x slower to decode, so a stream lasts."""
    return make_tiny_model(
        tmp_path_factory.mktemp("slowmodel"), hidden=512, layers=4, ffn=1024, name="slow"
    )


@pytest.fixture
def pair(
    llama_server_bin: Path, slow_model: Path, tmp_path: Path
) -> Iterator[tuple[Topology, GatewayPair]]:
    with (
        topology() as topo,
        GatewayPair(
            topo, tmp_path, binary=llama_server_bin, model_path=slow_model, parallel=8
        ) as gw,
    ):
        yield topo, gw


def body(max_tokens: int = TOKENS) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 7,
        "stream": True,
    }


def client_resets(topo: Topology) -> dict[str, int]:
    c = topo.client.counters()
    return {k: c[k] for k in ("Tcp.OutRsts", "Tcp.EstabResets", "Tcp.AttemptFails")}


def sse(topo: Topology, gw: GatewayPair, conns: int, max_tokens: int = TOKENS) -> Any:
    return gw.client(
        sys.executable, "-m", "albatross.testing.sseclient", "--host", topo.vip,
        "--port", str(PORT), "--conns", str(conns), "--timeout", "240",
        "--body", json.dumps(body(max_tokens)),
    )  # fmt: skip


def finish(proc: Any, timeout_s: float = 300) -> Any:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err[-2000:]
    return out


def assert_whole(stream: dict[str, Any], reference: str) -> None:
    assert stream["errors"] == [] and stream["status"] == 200, stream["errors"]
    assert stream["done"] and stream["ended"]
    ids = stream["ids"]
    assert ids[0] == -1 and ids.count(-1) == 1  # one role event, never repeated
    assert all(a < b for a, b in itertools.pairwise(ids)), ids  # no duplicate
    assert stream["text"] == reference  # no gap, token-identical


def reference_text(topo: Topology, gw: GatewayPair, max_tokens: int = TOKENS) -> str:
    ref = json.loads(finish(sse(topo, gw, 1, max_tokens)))["conns"][0]
    assert ref["errors"] == [] and ref["done"]
    text: str = ref["text"]
    assert len(text) > 100
    return text


OPENAI_SCRIPT = """
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=240)
body = json.loads(sys.argv[2])
body.pop("stream")
parts, finish, role = [], None, 0
for chunk in client.chat.completions.create(stream=True, **body):
    for choice in chunk.choices:
        role += choice.delta.role == "assistant"
        parts.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
print(json.dumps({"text": "".join(parts), "finish": finish, "roles": role}))
"""


def test_openai_and_curl_streams_move_to_gateway_b_mid_stream(
    pair: tuple[Topology, GatewayPair],
) -> None:
    topo, gw = pair
    reference = reference_text(topo, gw)
    before = client_resets(topo)
    url = f"http://{topo.vip}:{PORT}"
    openai_client = gw.client(sys.executable, "-c", OPENAI_SCRIPT, url + "/v1", json.dumps(body()))
    gw.wait_position("a", 1)  # the client library takes a while to import: curl goes second
    curl = gw.client(
        "curl", "-sS", "-N", "--fail-with-body", "-H", "Content-Type: application/json",
        "-d", json.dumps(body()), url + "/v1/chat/completions",
    )  # fmt: skip
    gw.wait_position("a", 60, count=2)
    moved = gw.migrate("a", "gw-b")
    assert moved["connections"] == 2 and moved["moved"] == 2, moved
    assert moved["failed"] == [] and moved.get("rolled_back") is None

    out = json.loads(finish(openai_client))
    assert out == {"text": reference, "finish": "length", "roles": 1}

    raw = finish(curl)
    events = [block for block in raw.split("\n\n") if block.strip()]
    assert events[-1] == "data: [DONE]"
    ids = [int(line[3:]) for e in events for line in e.split("\n") if line.startswith("id:")]
    assert ids[0] == -1 and all(a < b for a, b in itertools.pairwise(ids)), ids
    text = ""
    for e in events[:-1]:
        data = json.loads(e.split("data: ", 1)[1])
        for choice in data["choices"]:
            text += choice["delta"].get("content") or ""
    assert text == reference

    assert client_resets(topo) == before  # no RST sent or received by the client
    status_b = gw.get("b", "/admin/migrate-gateway")
    assert status_b["vip_held"] and status_b["history"][-1]["moved"] == 2
    assert not gw.get("a", "/admin/migrate-gateway")["vip_held"]
    # The streams were continued on B's own replica, not on A's.
    assert "adopted 2 of 2 connections from gw-a" in gw.log("b")


def test_hundred_connections_move_at_once_and_back(pair: tuple[Topology, GatewayPair]) -> None:
    topo, gw = pair
    reference = reference_text(topo, gw, 120)
    before = client_resets(topo)
    clients = sse(topo, gw, 100, 120)
    gw.wait_position("a", 20, count=8)
    moved = gw.migrate("a", "gw-b")
    assert moved["connections"] == 100 and moved["moved"] == 100, moved
    report = json.loads(finish(clients))["conns"]
    assert len(report) == 100
    for stream in report:
        assert_whole(stream, reference)
    assert client_resets(topo) == before
    # And back: B now holds the VIP and moves a new stream to A.
    again = sse(topo, gw, 1)
    gw.wait_position("b", 60)
    back = gw.migrate("b", "gw-a")
    assert back["moved"] == 1, back
    assert_whole(json.loads(finish(again))["conns"][0], reference_text(topo, gw))
    assert client_resets(topo) == before


def test_a_preemption_notice_on_gateway_a_moves_its_streams_to_b(
    pair: tuple[Topology, GatewayPair],
) -> None:
    import signal

    topo, gw = pair
    reference = reference_text(topo, gw)
    before = client_resets(topo)
    clients = sse(topo, gw, 2)
    gw.wait_position("a", 60, count=2)
    # SIGUSR1 = a notice for this whole host (as a cloud notice would be): gateway A
    # hands its connections to its first peer while its replicas drain.
    gw.procs["a"].send_signal(signal.SIGUSR1)
    report = json.loads(finish(clients))["conns"]
    assert len(report) == 2
    for stream in report:
        assert_whole(stream, reference)
    assert client_resets(topo) == before
    status_b = gw.get("b", "/admin/migrate-gateway")
    assert status_b["vip_held"] and status_b["history"][-1]["moved"] == 2, status_b
    assert "preemption notice (signal)" in gw.log("a")


def test_a_failed_handoff_gives_the_connections_back_to_a(
    pair: tuple[Topology, GatewayPair],
) -> None:
    topo, gw = pair
    reference = reference_text(topo, gw)
    before = client_resets(topo)
    gw.procs["b"].terminate()  # the peer is gone: its handoff port refuses
    gw.procs["b"].wait(30)
    clients = sse(topo, gw, 2)
    gw.wait_position("a", 60, count=2)
    moved = gw.migrate("a", "gw-b")
    assert moved["rolled_back"] is True and moved["moved"] == 2, moved
    report = json.loads(finish(clients))["conns"]
    for stream in report:
        assert_whole(stream, reference)
    assert client_resets(topo) == before
    assert gw.get("a", "/admin/migrate-gateway")["vip_held"]
