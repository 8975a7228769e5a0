"""Two models taking turns on one (pretend) GPU behind one ``albatross serve``.

The budget fits one model at a time. Model ``a`` is the slow random model (a 1500-token
stream takes seconds), ``b`` a tiny one with another seed. Both ways of running
llama-server are covered: one router process that loads and unloads models
(``discard`` + ``keep_running``) and one process per model, stopped and cold-started
(``discard`` + ``stop``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import Served, metric_value, sse_events, start_serve, toml_str

from albatross.testing.llama import free_port
from albatross.testing.tinymodel import make_tiny_model

pytestmark = pytest.mark.e2e

TOKEN = "switch-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
A_TOKENS = 1500


def _config(
    path: Path, binary: Path, a: Path, b: Path, log_dir: Path, eviction: str, queue_s: float
) -> Path:
    weights, process = eviction.split("+")
    lines = [
        "[gateway]", 'host = "127.0.0.1"', f"port = {free_port()}",
        "[supervisor]", f"log_dir = {toml_str(log_dir)}",
        "[llama_server]", f"binary = {toml_str(binary)}",
        "[control]", f"token = {toml_str(TOKEN)}",
        "[switch]", 'gpu_budget_gib = { "0" = 1.0 }', "min_active_s = 0.0",
        "coalesce_s = 0.0", f"max_wait_s = {queue_s}", f"queue_timeout_s = {queue_s}",
    ]  # fmt: skip
    for name, p in (("a", a), ("b", b)):
        lines += [
            "[[models]]", f"name = {toml_str(name)}", f"path = {toml_str(p)}", "replicas = 1",
            "parallel = 2", "ctx_size = 2048", "threads = 1", "footprint_gib = 1.0",
            f"eviction = {{ weights = {toml_str(weights)}, process = {toml_str(process)} }}",
        ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("switch-b"), seed=1)


def _serve(
    tmp_path: Path, binary: Path, a: Path, b: Path, eviction: str, queue_s: float
) -> Iterator[Served]:
    cfg = _config(tmp_path / "a.toml", binary, a, b, tmp_path / "logs", eviction, queue_s)
    served = start_serve(cfg, tmp_path / "serve.log")
    try:
        yield served
    finally:
        code = served.stop()
        assert code == 0, f"albatross serve exited with {code}:\n{served.log()}"


@pytest.fixture(params=["discard+keep_running", "discard+stop"], ids=["router", "processes"])
def switching_gateway(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    llama_server_bin: Path,
    slow_model: Path,
    second_model: Path,
) -> Iterator[Served]:
    yield from _serve(tmp_path, llama_server_bin, slow_model, second_model, request.param, 60.0)


def test_a_request_for_b_waits_for_a_s_stream_then_b_is_served(
    switching_gateway: Served,
) -> None:
    url = switching_gateway.url
    b_result: dict[str, object] = {}
    a_events = []
    with httpx.Client(timeout=120) as c:
        body = {"model": "a", "prompt": "The albatross", "max_tokens": A_TOKENS, "stream": True}
        with c.stream("POST", f"{url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            events = sse_events(resp.iter_text())
            a_events.append(next(events))  # a is awake and streaming

            def ask_b() -> None:
                r = httpx.post(
                    f"{url}/v1/completions",
                    json={"model": "b", "prompt": "The albatross", "max_tokens": 8},
                    timeout=120,
                )
                b_result["status"], b_result["body"] = r.status_code, r.json()

            t = threading.Thread(target=ask_b)
            t.start()
            a_events.extend(events)
        t.join(120)
        metrics = c.get(f"{url}/metrics").text
        status = c.get(f"{url}/admin/models", headers=AUTH).json()

    # a's stream ran to its end: no error event, every token, [DONE] last.
    datas = [e.data for e in a_events]
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert not [ch for ch in chunks if "error" in ch]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # b was served after the switch, without an error.
    assert b_result["status"] == 200, b_result
    assert b_result["body"]["choices"][0]["text"]  # type: ignore[index]
    assert (
        metric_value(
            metrics, "albatross_switches_total", **{"from": "a", "to": "b", "result": "ok"}
        )
        == 1
    )
    assert metric_value(metrics, "albatross_switch_phase_seconds_count", phase="wake") >= 2
    states = {m["model"]: m["state"] for m in status["models"]}
    assert states == {"a": "asleep", "b": "awake"}


@pytest.fixture
def impatient_gateway(
    tmp_path: Path, llama_server_bin: Path, tiny_model: Path, second_model: Path
) -> Iterator[Served]:
    yield from _serve(
        tmp_path, llama_server_bin, tiny_model, second_model, "discard+keep_running", 1.0
    )


def test_a_held_request_times_out_with_504_naming_its_model(impatient_gateway: Served) -> None:
    url = impatient_gateway.url
    with httpx.Client(timeout=60) as c:
        assert c.post(f"{url}/admin/models/pin", json={"model": "a"}, headers=AUTH).json()["pinned"]
        a = c.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 4})
        assert a.status_code == 200
        # b cannot fit next to the pinned a: a control wake is refused, a request waits.
        refused = c.post(f"{url}/admin/models/wake", json={"model": "b"}, headers=AUTH)
        assert refused.status_code == 409
        b = c.post(f"{url}/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 4})
        assert b.status_code == 504
        msg = b.json()["error"]["message"]
        assert "'b'" in msg and "queue" in msg
        assert c.get(f"{url}/admin/models").status_code == 401
        unpinned = c.post(f"{url}/admin/models/unpin", json={"model": "a"}, headers=AUTH).json()
        assert unpinned["pinned"] is False
        # Once a may go, b is served.
        b = c.post(f"{url}/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 4})
        assert b.status_code == 200
        metrics = c.get(f"{url}/metrics").text
    assert metric_value(metrics, "albatross_switch_queue_depth", model="b") == 0
    assert metric_value(metrics, "albatross_model_awake", model="b") == 1
