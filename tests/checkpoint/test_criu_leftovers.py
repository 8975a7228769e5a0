"""The private CRIU install, and what a dump leaves outside its image when it is not restored."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from albatross.checkpoint.criu import Criu, DumpOptions, DumpRecord
from albatross.checkpoint.install import CRIU_VERSION, install_criu, installed_criu
from albatross.supervisor.process import spawn
from albatross.testing.llama import free_port

pytestmark = pytest.mark.root

# Opens a file, gives it a second name, removes the first: the open file is still
# linked, but not at the path it was opened with, so criu hard-links it back as
# link_remap.N next to it.
HOLD_RENAMED = """
import os, sys, time
d = sys.argv[1]
f = open(os.path.join(d, "a"), "w")
f.write("x")
f.flush()
os.link(os.path.join(d, "a"), os.path.join(d, "b"))
os.unlink(os.path.join(d, "a"))
print("ready", flush=True)
while True:
    time.sleep(1)
"""

LISTEN_AND_HOLD = """
import socket, sys, time
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
conn, _ = srv.accept()
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_install_is_cached_and_runs_criu_through_its_private_root(criu_bin: Path) -> None:
    assert installed_criu() == criu_bin == install_criu(progress=lambda line: None)
    text = criu_bin.read_text()
    assert "--preload" in text and "passcred_shim.so" in text and "exec " in text
    out = subprocess.run([str(criu_bin), "--version"], capture_output=True, text=True)
    assert f"Version: {CRIU_VERSION}" in out.stdout
    check = subprocess.run([str(criu_bin), "check"], capture_output=True, text=True)
    assert "Looks good." in check.stdout + check.stderr


def _says_ready(log: Path) -> bool:
    return log.exists() and "ready" in log.read_text()


async def _until_ready(log: Path) -> None:
    for _ in range(200):
        if _says_ready(log):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the helper process did not get ready; see {log}")


async def test_discard_removes_link_remaps_of_a_dump_never_restored(
    criu: Criu, tmp_path: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    log = tmp_path / "holder.log"
    proc = await spawn([sys.executable, "-c", HOLD_RENAMED, str(files)], log)
    try:
        await _until_ready(log)
        result = await criu.dump(proc.pid, tmp_path / "img", DumpOptions(link_remap=True))
        await proc.wait()
    finally:
        await proc.stop(1.0)
    remaps = sorted(files.glob("link_remap.*"))
    assert remaps and [str(p) for p in remaps] == list(result.record.link_remaps)
    assert criu.discard(tmp_path / "img") == [str(p) for p in remaps]
    assert sorted(p.name for p in files.iterdir()) == ["b"]


async def test_discard_lifts_the_network_lock_of_a_dump_never_restored(
    criu: Criu, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    proc = await spawn([sys.executable, "-c", LISTEN_AND_HOLD, str(port)], log)
    client = None
    try:
        for _ in range(200):
            try:
                client = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.02)
        await _until_ready(log)
        await criu.dump(proc.pid, tmp_path / "img", DumpOptions(tcp_established=True))
        await proc.wait()
    finally:
        await proc.stop(1.0)
        if client is not None:
            client[1].close()
    table = DumpRecord.read(tmp_path / "img").nft_table
    assert table is not None and table.startswith("CRIU-")
    assert criu.discard(tmp_path / "img") == [f"nft table inet {table}"]
    assert criu.discard(tmp_path / "img") == []  # idempotent
