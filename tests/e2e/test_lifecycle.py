"""Starting, stopping and crashing ``albatross serve``: every test here runs its own.

What a user relies on: Ctrl-C stops everything and leaves no process behind; a
SIGKILLed gateway takes its engines with it; a bad config is refused with exit code 2
and a message naming the key and the value; a crashed replica comes back by itself while
the other one keeps serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SLOW_CTX, StartServe
from e2e_support import (
    ALBATROSS,
    MODEL,
    SSEEvent,
    alive,
    descendants,
    health,
    metric_value,
    ready_count,
    sse_events,
    wait_until,
    write_config,
)

from albatross.testing.llama import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.engine]


def _replica_pids(served: Any) -> set[int]:
    pids = {r.pid for r in served.replicas().values()}
    assert len(pids) == 2, served.log()
    return pids


def test_ctrl_c_mid_stream_exits_0_and_leaves_no_process(
    serve_factory: StartServe, slow_model: Path
) -> None:
    served = serve_factory(model_path=slow_model, ctx_size=SLOW_CTX)
    family = descendants(served.proc.pid)
    replica_pids = _replica_pids(served)
    assert replica_pids <= family, (replica_pids, family)

    # A long stream is being generated when Ctrl-C comes.
    got: list[SSEEvent] = []
    started = threading.Event()
    failure: list[BaseException] = []

    def stream() -> None:
        body = {"model": MODEL, "prompt": "Far away", "max_tokens": 2000, "stream": True}
        try:
            with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30.0) as r:
                for ev in sse_events(r.iter_text()):
                    got.append(ev)
                    started.set()
        except httpx.HTTPError as exc:  # a cut stream is fine here; a hang is not
            failure.append(exc)
        finally:
            started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(10) and got, failure
    family |= descendants(served.proc.pid)

    served.proc.send_signal(signal.SIGINT)
    try:
        code = served.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"albatross serve still running 10 s after SIGINT:\n{served.log()}")
    assert code == 0, served.log()
    assert "albatross: stopping" in served.log()
    left = {pid for pid in family if alive(pid)}
    assert not left, f"processes left after Ctrl-C: {left}"
    t.join(10)
    assert not t.is_alive(), "the client's stream hangs after the gateway stopped"


def test_sigkill_of_serve_takes_the_replicas_down(serve_factory: StartServe) -> None:
    served = serve_factory()
    family = descendants(served.proc.pid)
    replica_pids = _replica_pids(served)
    assert replica_pids <= family
    os.kill(served.proc.pid, signal.SIGKILL)
    assert served.proc.wait(5) == -signal.SIGKILL
    # PR_SET_PDEATHSIG: the kernel sends each engine SIGTERM when serve dies.
    assert wait_until(lambda: not any(alive(p) for p in family), 5), [p for p in family if alive(p)]


def test_killed_replica_is_restarted_while_the_other_serves(serve_factory: StartServe) -> None:
    # A longer first back-off than the default 0.5 s leaves a clear outage to work in.
    served = serve_factory(supervisor={"restart_backoff_initial_s": 1.0})
    before = served.replicas()
    victim = before[f"{MODEL}/0"]
    body = {"model": MODEL, "prompt": "During the outage", "max_tokens": 8}
    with httpx.Client(base_url=served.url, timeout=30.0) as c:
        assert ready_count(health(c, served.url)[1]) == 2
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert wait_until(lambda: ready_count(health(c, served.url)[1]) == 1, 2), "loss not noticed"

        served_during_outage = 0
        while True:
            status, h = health(c, served.url)
            assert status == 200, h  # one ready replica is still "ok"
            if ready_count(h) == 2:
                break
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 8
            served_during_outage += 1
            assert time.monotonic() - killed_at < 10, (
                f"replica not back after 10 s:\n{served.log()}"
            )
            time.sleep(0.02)
        assert served_during_outage >= 3, served_during_outage

        after = served.replicas()
        assert after[f"{MODEL}/0"].pid != victim.pid
        assert after[f"{MODEL}/1"] == before[f"{MODEL}/1"]
        assert not alive(victim.pid)
        metrics = c.get("/metrics").text
        assert metric_value(metrics, "albatross_replica_losses_total", replica=f"{MODEL}/0") == 1
        assert (
            metric_value(metrics, "albatross_replica_state", replica=f"{MODEL}/0", state="ready")
            == 1
        )
        # Both replicas serve again: enough concurrent requests to need both.
        results: list[int] = []

        def one() -> None:
            results.append(
                httpx.post(served.url + "/v1/completions", json=body, timeout=30.0).status_code
            )

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [200] * 6


# ---- invalid configuration ---------------------------------------------------------


def _bad_config(tmp_path: Path, binary: Path, model: Path, case: str) -> Path:
    cfg = tmp_path / "bad.toml"
    common: dict[str, Any] = {"binary": binary, "model_path": model, "log_dir": tmp_path / "logs"}
    if case == "unknown key":
        write_config(cfg, port=free_port(), gateway={"bogus_key": 1}, **common)
    elif case == "port 70000":
        write_config(cfg, port=70000, **common)
    elif case == "replicas -1":
        write_config(cfg, port=free_port(), replicas=-1, **common)
    elif case == "empty models":
        cfg.write_text("models = []\n")
    elif case == "not TOML":
        cfg.write_text("[gateway\nport = = 8000\n")
    elif case == "missing file":
        cfg = tmp_path / "does-not-exist.toml"
    else:
        raise AssertionError(case)
    return cfg


BAD_CONFIGS = {
    # case: what stderr must name (the key and the value, or the file and the problem)
    "unknown key": ["gateway.bogus_key", "1", "unknown key"],
    "port 70000": ["gateway.port", "70000"],
    "replicas -1": ["models.0.replicas", "-1"],
    "empty models": ["models", "[]"],
    "not TOML": ["bad.toml", "TOML"],
    "missing file": ["does-not-exist.toml", "cannot read"],
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_invalid_config_exits_2_naming_key_and_value(
    case: str, tmp_path: Path, llama_server_bin: Path, tiny_model: Path
) -> None:
    cfg = _bad_config(tmp_path, llama_server_bin, tiny_model, case)
    r = subprocess.run(
        [ALBATROSS, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    for word in BAD_CONFIGS[case]:
        assert word in r.stderr, (word, r.stderr)
    assert "Traceback" not in r.stderr
    assert "serving" not in r.stdout
    assert not (tmp_path / "logs").exists(), "replicas were started for a bad config"


def test_invalid_port_option_exits_2(
    tmp_path: Path, llama_server_bin: Path, tiny_model: Path
) -> None:
    cfg = write_config(
        tmp_path / "ok.toml",
        binary=llama_server_bin,
        model_path=tiny_model,
        log_dir=tmp_path / "logs",
        port=free_port(),
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [ALBATROSS, "serve", "--config", str(cfg), "--port", "70000"],
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    try:
        wait_until(lambda: proc.poll() is not None or "serving" in log.read_text(), 15)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(15)
    text = log.read_text()
    assert proc.returncode == 2, (proc.returncode, text)
    assert "70000" in text and "port" in text
