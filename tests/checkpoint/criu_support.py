"""Helpers for the CRIU tests: a llama-server started the supervisor's way, and
greedy completions over one kept-alive HTTP connection."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from albatross.supervisor.process import EngineProcess, spawn
from albatross.testing.llama import free_port, healthy

PROMPT = "The albatross glides over the southern ocean"


def alive(pid: int) -> bool:
    """``/proc/PID`` exists (a zombie counts: its pid is still taken)."""
    return os.path.exists(f"/proc/{pid}")


def llama_argv(binary: Path, model: Path, port: int) -> list[str]:
    return [
        str(binary), "--host", "127.0.0.1", "--port", str(port), "-m", str(model),
        "-np", "1", "-c", "512", "-t", "1",
    ]  # fmt: skip


async def wait_healthy(url: str, limit_s: float = 60.0) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            if await asyncio.to_thread(healthy, url):
                return
            await asyncio.sleep(0.05)


@asynccontextmanager
async def spawned_llama(
    binary: Path, model: Path, log: Path
) -> AsyncIterator[tuple[EngineProcess, str]]:
    """A ready llama-server spawned like the supervisor does; stopped afterwards."""
    port = free_port()
    proc = await spawn(llama_argv(binary, model, port), log)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url)
        yield proc, url
    finally:
        await proc.stop(2.0)


def complete(conn: http.client.HTTPConnection, n: int = 24) -> list[int]:
    """Greedy completion of :data:`PROMPT` on ``conn`` (kept alive); its token ids."""
    body = {"prompt": PROMPT, "n_predict": n, "temperature": 0, "return_tokens": True,
            "cache_prompt": False}  # fmt: skip
    conn.request("POST", "/completion", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    data = json.loads(resp.read())
    assert resp.status == 200, data
    tokens: list[int] = data["tokens"]
    return tokens


def connect(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


async def complete_once(url: str) -> list[int]:
    """Greedy completion on a fresh connection."""

    def run() -> list[int]:
        conn = connect(url)
        try:
            return complete(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(run)
