"""A preemption notice on a live gateway: streams finish in place or move, none is lost,
new requests go elsewhere, and the replica is replaced (the local provider)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from e2e_support import (
    ALBATROSS,
    MODEL,
    metric_value,
    sse_events,
    start_serve,
    wait_until,
    write_config,
)

from albatross.testing.llama import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.engine]

TOKEN = "preempt-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LENGTHS = [20, 40, 1000, 1000, 1100, 30]
DEADLINE_S = "1.5"  # 1000 tokens cannot fit in 1.5 - 0.5 s on this model: they must move


def _stream(url: str, prompt: str, n: int, out: dict[str, object]) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    texts: list[str] = []
    with httpx.Client(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as r:
        for ev in sse_events(r.iter_text()):
            if ev.data == "[DONE]":
                break
            d = json.loads(ev.data)
            if "error" in d:
                out["error"] = d["error"]
            elif d["choices"]:
                texts.append(d["choices"][0]["text"])
    out["text"] = "".join(texts)


def test_preemption_notice_drains_by_deadline_and_replaces_the_replica(
    llama_server_bin: Path, slow_model: Path, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "albatross.toml",
        binary=llama_server_bin,
        model_path=slow_model,
        log_dir=tmp_path / "logs",
        port=free_port(),
        ctx_size=1200,
        supervisor={"restart_backoff_initial_s": 0.2},
    )
    with cfg.open("a") as f:  # [[models]] is the last table: these keys belong to it
        f.write('numerics = "exact"\ninstance_type = "c7i.large"\n')
        f.write("price_spot_per_hour = 0.03\nprice_on_demand_per_hour = 0.09\n\n")
        f.write(f'[control]\ntoken = "{TOKEN}"\n\n[spot]\nmargin_s = 0.5\n\n')
        f.write(f'[continuity]\nslot_dir = "{tmp_path / "slots"}"\n')
    served = start_serve(cfg, tmp_path / "serve.log")
    try:
        c = httpx.Client(base_url=served.url, timeout=60, headers=AUTH)
        prompts = [f"Report {i} begins with the words" for i in range(len(LENGTHS))]
        refs = [
            c.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0}).json()
            for p, n in zip(prompts, LENGTHS, strict=True)
        ]
        outs: list[dict[str, object]] = [{} for _ in LENGTHS]
        threads = [
            threading.Thread(target=_stream, args=(served.url, p, n, o))
            for p, n, o in zip(prompts, LENGTHS, outs, strict=True)
        ]
        for t in threads:
            t.start()
        assert wait_until(
            lambda: sum(r["max_tokens"] >= 1000 for r in c.get("/admin/requests").json()["requests"]) == 3, 20
        )
        live = c.get("/admin/requests").json()["requests"]
        by_replica: dict[str, int] = {}
        for r in live:  # where the long streams are: those cannot finish by the deadline
            if r["max_tokens"] >= 1000 and r["replica"]:
                by_replica[r["replica"]] = by_replica.get(r["replica"], 0) + 1
        victim = max(by_replica, key=lambda k: by_replica[k])
        old_pid = next(r["pid"] for r in c.get("/admin/replicas").json()["replicas"] if r["id"] == victim)

        env = dict(os.environ, ALBATROSS_CONTROL_TOKEN=TOKEN)
        cli = subprocess.run(
            [ALBATROSS, "preempt", "--replica", victim, "--deadline-s", DEADLINE_S, "--url", served.url],
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["replicas"] == [victim]

        # A request arriving during the drain goes elsewhere.
        # Draining, or already empty and being replaced (moves can finish within the
        # round trip of this call): either way it admits nothing.
        states = {r["id"]: r["state"] for r in c.get("/admin/replicas").json()["replicas"]}
        assert states[victim] in ("draining", "down", "starting"), states
        fresh: dict[str, object] = {}
        late = threading.Thread(target=_stream, args=(served.url, "A late request", 333, fresh))
        late.start()

        def placed() -> str | None:
            for r in c.get("/admin/requests").json()["requests"]:
                if r["max_tokens"] == 333 and r["replica"]:
                    return str(r["replica"])
            return None

        assert wait_until(lambda: placed() is not None, 20)
        where = placed()
        pid_now = next(r["pid"] for r in c.get("/admin/replicas").json()["replicas"] if r["id"] == victim)
        assert where != victim or pid_now not in (None, old_pid), (where, pid_now)  # or its replacement
        threads.append(late)

        for t in threads:
            t.join(120)
        assert "error" not in fresh and fresh["text"]
        for i, (o, ref) in enumerate(zip(outs, refs, strict=True)):
            assert "error" not in o, (i, o)
            assert o["text"] == ref["choices"][0]["text"], f"stream {i} differs"
        metrics = c.get("/metrics").text
        drained = sum(
            metric_value(metrics, "albatross_migrations_total", reason="drained", path=p)
            for p in ("kv", "prewarm", "reprefill")
        )
        assert drained >= 1, metrics
        # The replacement: the same replica id, a new process, back in the pool.
        assert wait_until(
            lambda: any(
                r["id"] == victim and r["state"] == "ready" and r["pid"] not in (None, old_pid)
                for r in c.get("/admin/replicas").json()["replicas"]
            ),
            20,
        )
        assert "drain of" in served.log()
        # The cost ledger saw it: the preemption survived, tokens served, savings at 2/3.
        cost = subprocess.run(
            [ALBATROSS, "cost", "--url", served.url], env=env, capture_output=True, text=True, timeout=30, check=False
        )
        assert cost.returncode == 0, cost.stderr
        assert victim in cost.stdout and "(67%)" in cost.stdout
        ledger = c.get("/admin/cost").json()
        row = next(r for r in ledger["replicas"] if r["replica"] == victim)
        assert row["preemptions_survived"] == 1 and row["instance_type"] == "c7i.large"
        assert ledger["total"]["tokens"] >= sum(LENGTHS)
    finally:
        assert served.stop() == 0

