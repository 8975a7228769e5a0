"""Real CRIU on a real llama-server: dump, restore, same answers, same TCP connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from criu_support import alive, complete, complete_once, connect, spawned_llama

from albatross.checkpoint.criu import (
    DUMP_INFO,
    Criu,
    CriuError,
    DumpOptions,
    DumpRecord,
    ImageMissingError,
)
from albatross.checkpoint.restored import adopt

pytestmark = [pytest.mark.root, pytest.mark.engine]


async def test_idle_engine_restores_and_answers_exactly_as_before(
    criu: Criu, llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    log = tmp_path / "engine.log"
    images = tmp_path / "img"
    async with spawned_llama(llama_server_bin, tiny_model, log) as (proc, url):
        before = await complete_once(url)
        result = await criu.dump(proc.pid, images, DumpOptions(tcp_established=True))
        assert await proc.wait() == -9  # criu ends the dumped process
        record = DumpRecord.read(images)
        assert record.pid == proc.pid and not record.shell_job  # setsid: a session leader
        assert result.seconds > 0
        pid = await criu.restore(images)
        restored = adopt(pid, log)
        try:
            assert pid == proc.pid  # same pid: the next dump names it
            assert await complete_once(url) == before
            assert restored.returncode is None
        finally:
            assert await restored.stop(2.0) in (0, -15)
    assert (images / DUMP_INFO).stat().st_mode & 0o777 == 0o600
    assert not [p for p in images.iterdir() if p.stat().st_mode & 0o077]  # owner-only


async def test_client_connection_open_during_the_dump_continues(
    criu: Criu, llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    log = tmp_path / "engine.log"
    images = tmp_path / "img"
    async with spawned_llama(llama_server_bin, tiny_model, log) as (proc, url):
        conn = connect(url)
        try:
            before = await asyncio.to_thread(complete, conn)
            assert conn.sock is not None
            sock, local = conn.sock, conn.sock.getsockname()
            await criu.dump(proc.pid, images, DumpOptions(tcp_established=True))
            await proc.wait()
            assert DumpRecord.read(images).nft_table is not None  # the connection was locked
            restored = adopt(await criu.restore(images), log)
            try:
                # Same socket object, same local port: no reconnect happened.
                assert await asyncio.to_thread(complete, conn) == before
                assert conn.sock is sock and sock.getsockname() == local
            finally:
                await restored.stop(2.0)
        finally:
            conn.close()
    # The restore lifted the lock: the `criu` fixture checks no CRIU-* table is left.


async def test_missing_and_damaged_images_are_named_in_the_error(
    criu: Criu, llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ImageMissingError, match=r"no such image directory"):
        await criu.restore(tmp_path / "nothing-here")
    with pytest.raises(CriuError, match=r"no process 999999999"):
        await criu.dump(999_999_999, tmp_path / "never")
    images = tmp_path / "img"
    async with spawned_llama(llama_server_bin, tiny_model, tmp_path / "engine.log") as (proc, _):
        await criu.dump(proc.pid, images, DumpOptions(tcp_established=True))
        await proc.wait()
    core = next(images.glob("core-*.img"))
    core.write_bytes(core.read_bytes()[:40])  # truncated: criu cannot read it
    with pytest.raises(CriuError) as info:
        await criu.restore(images)
    err = info.value
    assert err.action == "restore" and err.log_path == images / "restore.log"
    assert err.errors, "criu's own error lines are quoted"
    assert str(images) in str(err) and "criu said:" in str(err)
    assert not alive(DumpRecord.read(images).pid)  # nothing was started
    assert criu.discard(images) == [f"nft table inet {DumpRecord.read(images).nft_table}"]
