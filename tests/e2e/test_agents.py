"""Engine hosts apart from the gateway: ``albatross agent`` processes on loopback.

A gateway with no replica of its own, two agents with one replica each. Agent A watches
a local AWS IMDSv2 stand-in, agent B a local Azure Scheduled Events stand-in. A spot
notice on A's metadata service drains A's replica through the gateway (streams finish in
place or move to B, token-identical), a replacement EC2 host is launched at once (an
EC2 API served by moto on loopback), A's engine is replaced and registers back. Then an
Azure eviction on B: drained to A, and acknowledged only after the drain. Finally B
stops and deregisters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from e2e_support import (
    ALBATROSS,
    MODEL,
    Served,
    metric_value,
    sse_events,
    start_serve,
    toml_str,
    wait_until,
)

from albatross.testing.llama import free_port
from albatross.testing.metadata_fakes import FakeAzureImds, FakeImds, InThread

pytestmark = [pytest.mark.e2e, pytest.mark.engine]

TOKEN = "agents-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REGION = "us-east-1"
MOTO_AMI = "ami-12c6146b"  # one of moto's built-in images
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
}
_AGENT_UP = re.compile(r"albatross agent (\S+): serving")
STREAMS, LONG, LEAD_S = 4, 2000, 5
"""Four 2000-token streams, two on each replica (free slots first): the notified host
always carries streams that cannot finish within the notice's LEAD_S, and the other
host has free slots for them. The lead leaves time for pre-warm moves, which with
``numerics = "exact"`` prefill at about decoding speed."""


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def _agent_config(
    path: Path, host: str, gateway: str, binary: Path, model: Path, spot: dict[str, object]
) -> Path:
    lines = [
        f'[agent]\nhost_id = "{host}"\ngateway_url = "{gateway}"\nheartbeat_s = 1.0',
        "drain_poll_s = 0.1\ndrain_on_stop_s = 20",
        f'[control]\ntoken = "{TOKEN}"',
        f"[supervisor]\nlog_dir = {toml_str(path.parent / f'logs-{host}')}",
        "restart_backoff_initial_s = 0.2",
        f"[llama_server]\nbinary = {toml_str(binary)}",
        "[spot]\n" + "\n".join(f"{k} = {toml_str(v)}" for k, v in spot.items()),
        f'[[models]]\nname = "{MODEL}"\npath = {toml_str(model)}\nreplicas = 1\nparallel = 4',
        'ctx_size = 2304\nthreads = 1\nnumerics = "exact"\ninstance_type = "c7i.large"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _start_agent(config: Path, log_path: Path) -> AgentProc:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [ALBATROSS, "agent", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    a = AgentProc(proc, log_path)
    if not wait_until(lambda: _AGENT_UP.search(a.log()) is not None or proc.poll() is not None, 60):
        a.stop()
        raise RuntimeError(f"agent not up:\n{a.log()}")
    if proc.poll() is not None:
        raise RuntimeError(f"agent exited with {proc.returncode}:\n{a.log()}")
    return a


def _stream(url: str, prompt: str, n: int, out: dict[str, object]) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    texts: list[str] = []
    try:
        with (
            httpx.Client(base_url=url, timeout=120) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            out["status"] = r.status_code
            for ev in sse_events(r.iter_text()):
                if ev.data == "[DONE]":
                    break
                d = json.loads(ev.data)
                out.setdefault("id", d.get("id"))
                if "error" in d:
                    out["error"] = d["error"]
                elif d["choices"]:
                    texts.append(d["choices"][0]["text"])
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    out["text"] = "".join(texts)


def _replicas(c: httpx.Client) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in c.get("/admin/replicas").json()["replicas"]}


def _run_streams(
    c: httpx.Client, url: str, tag: str, on_victim: str
) -> tuple[list[threading.Thread], list[dict[str, object]], list[str]]:
    """:data:`STREAMS` streams of one prompt (a reference first, as a plain request);
    returns once each replica carries two of them."""
    prompt = f"{tag} begins with the words"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": LONG, "temperature": 0}
    ref = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
    outs: list[dict[str, object]] = [{} for _ in range(STREAMS)]
    threads = [threading.Thread(target=_stream, args=(url, prompt, LONG, o)) for o in outs]
    for t in threads:
        t.start()

    def spread() -> bool:
        live = c.get("/admin/requests").json()["requests"]
        return sum(r["replica"] == on_victim for r in live) == STREAMS // 2 and len(live) == STREAMS

    assert wait_until(spread, 30), c.get("/admin/requests").json()
    return threads, outs, [ref] * STREAMS


def _check_streams(
    c: httpx.Client,
    threads: list[threading.Thread],
    outs: list[dict[str, object]],
    refs: list[str],
) -> None:
    for t in threads:
        t.join(120)
    for i, (o, ref) in enumerate(zip(outs, refs, strict=True)):
        assert o.get("status") == 200 and "error" not in o, (i, o)
        if o["text"] != ref:
            legs = c.get(f"/admin/requests/{o['id']}").json()
            common = next(
                (k for k, (x, y) in enumerate(zip(str(o["text"]), ref, strict=False)) if x != y),
                None,
            )
            raise AssertionError(f"stream {i} differs from its reference at char {common}: {legs}")


@pytest.fixture
def moto_ec2() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_two_agents_survive_aws_and_azure_notices(
    llama_server_bin: Path, slow_model: Path, tmp_path: Path, moto_ec2: str
) -> None:
    gw_cfg = tmp_path / "gateway.toml"
    gw_cfg.write_text(
        f'[gateway]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f"[supervisor]\nlog_dir = {toml_str(tmp_path / 'logs-gw')}\nhealth_interval_s = 0.5\n"
        f'[control]\ntoken = "{TOKEN}"\n'
        "[spot]\nmargin_s = 0.5\n"
        f'[spot.aws]\nregion = "{REGION}"\nimage_id = "{MOTO_AMI}"\n'
        f'instance_types = ["c7i.large"]\nendpoint_url = "{moto_ec2}"\n'
        'tags = { fleet = "albatross-test" }\n'
        f'[[models]]\nname = "{MODEL}"\nreplicas = 0\ninstance_type = "c7i.large"\n'
        "price_spot_per_hour = 0.03\nprice_on_demand_per_hour = 0.09\n"
    )
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)  # inherited by the gateway (its boto3 talks to moto)
    imds = FakeImds(clock=time.time)
    azure = FakeAzureImds()
    gw: Served | None = None
    agents: list[AgentProc] = []
    try:
        with InThread(imds) as imds_thread, InThread(azure) as azure_thread:
            gw = start_serve(gw_cfg, tmp_path / "gateway.log")
            for host, spot in (
                ("host-a", {"source": "aws", "base_url": imds.url, "poll_interval_s": 0.2}),
                (
                    "host-b",
                    {
                        "source": "azure",
                        "base_url": azure.url,
                        "poll_interval_s": 0.2,
                        "vm_name": "host-b",
                    },
                ),
            ):
                cfg = _agent_config(
                    tmp_path / f"{host}.toml", host, gw.url, llama_server_bin, slow_model, spot
                )
                agents.append(_start_agent(cfg, tmp_path / f"{host}.log"))
            a_id, b_id = f"{MODEL}@host-a/0", f"{MODEL}@host-b/0"
            c = httpx.Client(base_url=gw.url, timeout=60, headers=AUTH)
            assert wait_until(
                lambda: (
                    {r["state"] for r in _replicas(c).values()} == {"ready"}
                    and len(_replicas(c)) == 2
                ),
                30,
            ), _replicas(c)
            reps = _replicas(c)
            assert reps[a_id]["host"] == "host-a" and reps[b_id]["host"] == "host-b"
            a_pid = reps[a_id]["pid"]

            # ---- AWS: a spot interruption notice on host A's metadata service ----------
            threads, outs, refs = _run_streams(c, gw.url, "Report", a_id)
            when = datetime.fromtimestamp(time.time() + LEAD_S, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            imds_thread.call(
                setattr, imds, "instance_action", {"action": "terminate", "time": when}
            )
            assert wait_until(lambda: _replicas(c)[a_id]["state"] == "draining", 10), agents[
                0
            ].log()
            late: dict[str, object] = {}
            late_t = threading.Thread(target=_stream, args=(gw.url, "A late request", 333, late))
            late_t.start()

            def placed() -> str | None:
                for r in c.get("/admin/requests").json()["requests"]:
                    if r["max_tokens"] == 333 and r["replica"]:
                        return str(r["replica"])
                return None

            assert wait_until(lambda: placed() is not None or not late_t.is_alive(), 20)
            assert placed() in (None, b_id)  # None: it already finished, on B
            late_t.join(120)
            # The late request is served, not compared: an unpinned request that starts
            # on an engine while streams are pre-warmed into it can come out different
            # from the same request alone (seen 1 time in 6; see README: Exactness).
            assert late.get("status") == 200 and "error" not in late and late["text"], late
            _check_streams(c, threads, outs, refs)

            metrics = c.get("/metrics").text
            moved = sum(
                metric_value(metrics, "albatross_migrations_total", reason="drained", path=p)
                for p in ("kv", "prewarm", "reprefill")
            )
            # A's two streams cannot finish before the deadline; B has 2 free slots.
            assert moved >= 1, (
                [ln for ln in metrics.splitlines() if "migrations" in ln],
                [c.get(f"/admin/requests/{o['id']}").json()["legs"] for o in outs],
            )

            # The replacement host, launched at the notice through the EC2 API.
            assert wait_until(
                lambda: any(
                    x["state"] == "running" for x in c.get("/admin/replicas").json()["launches"]
                ),
                30,
            ), c.get("/admin/replicas").json()["launches"]
            [launch] = c.get("/admin/replicas").json()["launches"]
            assert launch["replaces"] == "host-a" and launch["lifecycle"] == "spot"
            ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_ec2)
            [inst] = [
                i
                for res in ec2.describe_instances()["Reservations"]
                for i in res["Instances"]
                if i["InstanceId"] == launch["host_id"]
            ]
            tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
            assert tags["fleet"] == "albatross-test" and "host-a" in tags["albatross:reason"]
            assert inst["InstanceType"] == "c7i.large"

            # Host A's agent restarted its engine once drained; the new one registered.
            assert wait_until(
                lambda: (
                    _replicas(c)[a_id]["state"] == "ready"
                    and _replicas(c)[a_id]["pid"] not in (None, a_pid)
                ),
                30,
            ), (_replicas(c), agents[0].log())
            assert "reported the aws notice" in agents[0].log()
            cost = c.get("/admin/cost").json()
            row = next(r for r in cost["replicas"] if r["replica"] == a_id)
            assert row["preemptions_survived"] == 1 and row["instance_type"] == "c7i.large"

            # ---- Azure: an eviction on host B, acknowledged once drained ----------------
            threads, outs, refs = _run_streams(c, gw.url, "Memo", b_id)
            not_before = format_datetime(
                datetime.fromtimestamp(time.time() + LEAD_S, UTC), usegmt=True
            )
            # An eviction of another VM of the availability set first: not ours, ignored.
            azure_thread.call(lambda: azure.schedule(EventId="evict-x", Resources=["host-x"]))
            azure_thread.call(
                lambda: azure.schedule(
                    EventId="evict-b", Resources=["host-b"], NotBefore=not_before
                )
            )
            assert wait_until(lambda: _replicas(c)[b_id]["state"] == "draining", 10), agents[
                1
            ].log()
            assert wait_until(lambda: azure.acknowledged == ["evict-b"], 30), agents[1].log()
            # Acknowledged means "evict me now": nothing may still run there.
            assert _replicas(c)[b_id]["in_flight"] == 0
            _check_streams(c, threads, outs, refs)

            # ---- B stops: it drains, stops its engine and deregisters -------------------
            assert agents[1].stop() == 0, agents[1].log()
            assert wait_until(lambda: b_id not in _replicas(c), 10), _replicas(c)
            r = c.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "Still", "max_tokens": 5, "temperature": 0},
            )
            assert r.status_code == 200, r.text
    finally:
        for a in agents:
            a.stop()
        if gw is not None:
            assert gw.stop() == 0, gw.log()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _gateway_only(tmp_path: Path) -> Served:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f'[gateway]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f"[supervisor]\nlog_dir = {toml_str(tmp_path / 'logs-gw')}\n"
        f'[control]\ntoken = "{TOKEN}"\n[[models]]\nname = "{MODEL}"\nreplicas = 0\n'
    )
    return start_serve(cfg, tmp_path / "gateway.log")


GOOD = {"replica": "tiny@h/0", "model": MODEL, "host": "h", "url": None, "slots": 4}
BAD_REGISTRATIONS = [
    # body change, status, what the error must name
    ({"model": "nope"}, 400, "model"),
    ({"slots": 0}, 400, "slots"),
    ({"slots": "4"}, 400, "slots"),
    ({"url": "https://x:1"}, 400, "url"),
    ({"url": "http://x:1/v1"}, 400, "url"),
    ({"host": ""}, 400, "host"),
    ({"replica": "has space"}, 400, "replica"),
    ({"colour": "red"}, 400, "colour"),
    ({"replica": None}, 400, "replica"),
]


def test_registration_input_is_checked_and_conflicts_refused(tmp_path: Path) -> None:
    gw = _gateway_only(tmp_path)
    try:
        c = httpx.Client(base_url=gw.url, timeout=10, headers=AUTH)
        assert httpx.post(gw.url + "/admin/replicas", json=GOOD).status_code == 401
        for change, status, field in BAD_REGISTRATIONS:
            body = {k: v for k, v in {**GOOD, **change}.items() if v is not None or k == "url"}
            r = c.post("/admin/replicas", json=body)
            assert r.status_code == status, (change, r.text)
            assert r.json()["error"]["param"] == field, (change, r.text)
        # A replica reported gone, then up; another host may not take its id.
        assert c.post("/admin/replicas", json=GOOD).json()["state"] == "down"
        up = {**GOOD, "url": f"http://127.0.0.1:{free_port()}", "pid": 4242}
        assert c.post("/admin/replicas", json=up).json()["state"] == "ready"
        r = c.post("/admin/replicas", json={**up, "host": "intruder"})
        assert r.status_code == 409 and "host 'h'" not in r.text and "'h'" in r.text, r.text
        r = c.request("PUT", "/admin/replicas", json=GOOD)
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {
            "GET",
            "POST",
            "DELETE",
        }
        r = c.request("DELETE", "/admin/replicas", json={"replica": "tiny@h/0"})
        assert r.status_code == 200 and r.json()["state"] == "removed"
        assert "tiny@h/0" not in _replicas(c)
        r = c.post("/admin/preempt", json={"replicas": ["tiny@h/0"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "replicas", r.text
    finally:
        assert gw.stop() == 0, gw.log()


def test_agent_refused_by_the_gateway_exits_2(
    tmp_path: Path, llama_server_bin: Path, tiny_model: Path
) -> None:
    gw = _gateway_only(tmp_path)
    try:
        cfg = _agent_config(tmp_path / "a.toml", "h", gw.url, llama_server_bin, tiny_model, {})
        cfg.write_text(cfg.read_text().replace(f'name = "{MODEL}"', 'name = "other"'))
        r = subprocess.run(
            [ALBATROSS, "agent", "--config", str(cfg)], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "refused" in r.stderr and "'other'" in r.stderr and "is not a model" in r.stderr
        no_gw = tmp_path / "b.toml"
        no_gw.write_text(cfg.read_text().replace(f'gateway_url = "{gw.url}"\n', ""))
        r = subprocess.run(
            [ALBATROSS, "agent", "--config", str(no_gw)], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2 and "agent.gateway_url" in r.stderr, r.stderr
    finally:
        assert gw.stop() == 0, gw.log()
