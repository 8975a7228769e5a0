"""Restore into another mount namespace that shares only the image and ipc directories.

The cross-container case: the engine talks to a peer over a unix socket whose path is
in an ipc directory (as vLLM's ZMQ sockets do). That connection cannot be dumped
(its peer is outside the tree), so it is marked external and handed back dead; the
restored engine reconnects by path, which works only because the ipc directory is
the same directory in both namespaces. Everything else of the "container" directory
is hidden from the restored engine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from albatross.checkpoint.criu import Criu, DumpOptions, DumpRecord
from albatross.checkpoint.restored import adopt
from albatross.supervisor.process import spawn

pytestmark = pytest.mark.root

ENGINE = """
import os, socket, sys, time
path, marker = sys.argv[1], sys.argv[2]
def connect():
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            time.sleep(0.05)
s = connect()
s.sendall(b"hello %d\\n" % os.getpid())
while True:
    data = s.recv(100)
    if not data:  # the peer went away: reconnect by path, as ZMQ does
        s = connect()
        s.sendall(b"again %d private=%d\\n" % (os.getpid(), os.path.exists(marker)))
    elif data == b"ping\\n":
        s.sendall(b"pong\\n")
"""

# Runs under `unshare --mount --propagation private`: a fresh tmpfs over the container
# directory, with only images/ and ipc/ bind-mounted back, then holds the namespace
# until its stdin closes.
HOLDER = """
import os, subprocess, sys
base, stage = sys.argv[1], sys.argv[2]
def mount(*args):
    subprocess.run(["mount", *args], check=True)
mount("-t", "tmpfs", "stage", stage)
for d in ("images", "ipc"):
    os.mkdir(os.path.join(stage, d))
    mount("--bind", os.path.join(base, d), os.path.join(stage, d))
mount("-t", "tmpfs", "container", base)
for d in ("images", "ipc"):
    os.mkdir(os.path.join(base, d))
    mount("--move", os.path.join(stage, d), os.path.join(base, d))
print("ready", flush=True)
sys.stdin.read()
"""


def _line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(100)
        assert chunk, "peer closed"
        data += chunk
    return data.decode().strip()


async def test_restore_in_a_mount_namespace_sharing_only_images_and_ipc(
    criu: Criu, tmp_path: Path
) -> None:
    base = tmp_path / "container"
    images, ipc, private = base / "images", base / "ipc", base / "private"
    for d in (images, ipc, private, tmp_path / "stage"):
        d.mkdir(parents=True)
    marker = private / "only-in-the-old-container"
    marker.write_text("x")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(ipc / "peer.sock"))
    listener.listen()
    listener.settimeout(20)
    holder: asyncio.subprocess.Process | None = None
    engine = await spawn(
        [sys.executable, "-c", ENGINE, str(ipc / "peer.sock"), str(marker)], tmp_path / "engine.log"
    )
    restored = None
    try:
        first, _ = await asyncio.to_thread(listener.accept)
        first.settimeout(20)
        assert await asyncio.to_thread(_line, first) == f"hello {engine.pid}"
        result = await criu.dump(engine.pid, images / "img", DumpOptions())
        assert len(result.record.external_unix) == 1  # found by itself: its peer is ours
        await engine.wait()
        first.close()

        holder = await asyncio.create_subprocess_exec(
            "unshare", "--mount", "--propagation", "private", "--",
            sys.executable, "-c", HOLDER, str(base), str(tmp_path / "stage"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"ready\n"
        mnt = Path(f"/proc/{holder.pid}/ns/mnt")
        assert os.readlink(mnt) != os.readlink("/proc/self/ns/mnt")

        pid = await criu.restore(images / "img", mount_ns=mnt)
        restored = adopt(pid, tmp_path / "engine.log")
        assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(mnt)
        again, _ = await asyncio.to_thread(listener.accept)
        again.settimeout(20)
        # Same process, reconnected through the shared ipc directory, and it cannot
        # see the old container's private files.
        assert await asyncio.to_thread(_line, again) == f"again {engine.pid} private=0"
        again.sendall(b"ping\n")
        assert await asyncio.to_thread(_line, again) == "pong"
        again.close()
        assert DumpRecord.read(images / "img").external_unix == result.record.external_unix
    finally:
        if restored is not None:
            await restored.stop(1.0)
        await engine.stop(1.0)
        listener.close()
        if holder is not None:
            assert holder.stdin is not None
            holder.stdin.close()
            async with asyncio.timeout(10):
                await holder.wait()
