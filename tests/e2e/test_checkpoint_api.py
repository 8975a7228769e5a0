"""Warm restarts through the control API: an idle replica is checkpointed with CRIU,
restored as the same process, and answers exactly as before."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from e2e_support import MODEL, start_serve, write_config

from albatross.testing.llama import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.engine, pytest.mark.root]

TOKEN = "checkpoint-test-token-0123456789"


def test_checkpoint_and_restore_a_replica_through_the_control_api(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "albatross.toml",
        binary=llama_server_bin,
        model_path=tiny_model,
        log_dir=tmp_path / "logs",
        port=free_port(),
    )
    text = cfg.read_text()
    cfg.write_text(
        f'[control]\ntoken = "{TOKEN}"\n'
        f'[checkpoint]\nenabled = true\nimage_dir = "{tmp_path / "images"}"\n' + text
    )
    served = start_serve(cfg, tmp_path / "serve.log")
    try:
        c = httpx.Client(
            base_url=served.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 24, "temperature": 0}
        before = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        rid = f"{MODEL}/0"
        pid = next(r["pid"] for r in c.get("/admin/replicas").json()["replicas"] if r["id"] == rid)
        r = c.post("/admin/checkpoint", json={"replica": rid})
        assert r.status_code == 200, r.text
        state = {x["id"]: x for x in c.get("/admin/replicas").json()["replicas"]}[rid]
        assert state["state"] == "down" and state["pid"] is None
        # While it is parked, the other replica serves.
        assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == before
        assert c.post("/admin/checkpoint", json={"replica": rid}).status_code == 409
        r = c.post("/admin/restore", json={"replica": rid})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "ready" and r.json()["pid"] == pid  # the same process
        for _ in range(4):  # both replicas, the restored one included, answer the same
            assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == before
        assert c.post("/admin/restore", json={"replica": rid}).status_code == 409
        r = c.post("/admin/checkpoint", json={"replica": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "replica"
    finally:
        assert served.stop() == 0, served.log()
