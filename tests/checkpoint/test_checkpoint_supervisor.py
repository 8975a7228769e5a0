"""A supervised llama-server replica: checkpointed, restored warm, or cold when its
image is damaged or gone. Real CRIU, real engine, real image store."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from criu_support import alive, complete_once, llama_argv, wait_healthy

from albatross.checkpoint.criu import Criu, DumpRecord
from albatross.checkpoint.engine import CheckpointOutcome, ReplicaCheckpointer
from albatross.checkpoint.store import METADATA, BudgetError, ImageStore
from albatross.config import SupervisorConfig
from albatross.supervisor.supervisor import ReplicaSpec, Supervisor
from albatross.testing.llama import healthy

pytestmark = [pytest.mark.root, pytest.mark.engine]

CONFIG = SupervisorConfig(
    ready_timeout_s=30.0,
    health_interval_s=0.2,
    health_timeout_s=2.0,
    health_failures=3,
    restart_backoff_initial_s=0.2,
    restart_backoff_max_s=1.0,
    stop_grace_s=2.0,
)
RID = "tiny/0"


@dataclass
class Events:
    seen: list[tuple[str, str]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def replica_ready(self, replica_id: str, base_url: str, pid: int) -> None:
        self.seen.append(("ready", base_url))
        self.urls.append(base_url)

    def replica_lost(self, replica_id: str, reason: str) -> None:
        self.seen.append(("lost", reason))


async def _probe(url: str) -> bool:
    return await asyncio.to_thread(healthy, url)


@dataclass
class Rig:
    sup: Supervisor
    events: Events
    images: ReplicaCheckpointer
    store: ImageStore


@pytest.fixture
async def rig(
    criu: Criu, llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> AsyncIterator[Rig]:
    store = ImageStore(tmp_path / "images")
    images = ReplicaCheckpointer(criu, store, stop_grace_s=2.0)
    events = Events()
    spec = ReplicaSpec(
        RID, lambda port: llama_argv(llama_server_bin, tiny_model, port), tmp_path / "tiny.log"
    )
    sup = Supervisor([spec], CONFIG, events, _probe, images=images)
    await sup.start()
    try:
        yield Rig(sup, events, images, store)
    finally:
        await sup.close()


async def _checkpoint(rig: Rig) -> tuple[CheckpointOutcome, int]:
    pid = rig.sup.pid(RID)
    assert pid is not None
    outcome = await rig.sup.checkpoint(RID)
    assert isinstance(outcome, CheckpointOutcome) and outcome.image is not None
    return outcome, pid


async def test_checkpointed_replica_is_restored_warm(rig: Rig) -> None:
    url = rig.events.urls[-1]
    before = await complete_once(url)
    outcome, pid = await _checkpoint(rig)
    assert outcome.image is not None
    image = outcome.image.path
    meta = rig.store.verify(outcome.image)
    assert meta["engine"] == "llama-server" and "--port" in meta["argv"]
    assert meta["kernel"] == os.uname().release and meta["size_bytes"] > 0
    assert meta["base_url"] == url and meta["pid"] == pid
    # Owner-only, all the way from the store's root down.
    for path in [rig.store.root, *image.parents[: len(image.relative_to(rig.store.root).parts)]]:
        if path.is_relative_to(rig.store.root):
            assert path.stat().st_mode & 0o777 == 0o700, path
    assert {p.stat().st_mode & 0o777 for p in image.iterdir()} == {0o600}
    await asyncio.sleep(0.5)  # let the supervisor notice the exit
    assert rig.events.seen[-1][0] == "lost" and "checkpointed" in rig.events.seen[-1][1]
    assert rig.sup.pid(RID) is None  # parked: not restarted behind our back

    await rig.sup.restore(RID)
    assert rig.events.seen[-1] == ("ready", url)  # same port: the restored process
    assert rig.sup.pid(RID) == pid
    assert await complete_once(url) == before
    assert not image.exists()  # keep_after_restore=False


async def test_damaged_image_is_reported_and_the_replica_starts_cold(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    before = await complete_once(rig.events.urls[-1])
    outcome, pid = await _checkpoint(rig)
    assert outcome.image is not None
    record = DumpRecord.read(outcome.image.path)
    pages = next(outcome.image.path.glob("pages-*.img"))
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit of memory: criu would restore it
    pages.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="albatross.supervisor"):
        await rig.sup.restore(RID)
    assert f"{pages.name} does not match its sha256" in caplog.text
    assert "starting cold" in caplog.text
    assert rig.sup.pid(RID) not in (None, pid)  # a new, cold process
    assert await complete_once(rig.events.urls[-1]) == before
    assert not outcome.image.path.exists()  # the bad image is gone
    assert record.nft_table is not None  # its lock was removed (checked by the criu fixture)


async def test_missing_image_is_reported_and_the_replica_starts_cold(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    before = await complete_once(rig.events.urls[-1])
    outcome, _ = await _checkpoint(rig)
    assert outcome.image is not None
    rig.images.criu.discard(outcome.image.path)
    shutil.rmtree(rig.store.root)
    with caplog.at_level(logging.WARNING, logger="albatross.supervisor"):
        await rig.sup.restore(RID)
    assert f"no image of {RID} in {rig.store.root}" in caplog.text
    url = rig.events.urls[-1]
    await wait_healthy(url)
    assert await complete_once(url) == before


async def test_budget_refuses_or_stops(rig: Rig) -> None:
    rig.store.budget_bytes = 1024
    pid = rig.sup.pid(RID)
    with pytest.raises(BudgetError, match=r"budget"):
        await rig.sup.checkpoint(RID)
    assert rig.sup.pid(RID) == pid  # refused: still running, still ours
    assert not list(rig.store.root.rglob(METADATA))
    rig.images.on_budget_exceeded = "stop"
    outcome = await rig.sup.checkpoint(RID)
    assert isinstance(outcome, CheckpointOutcome) and outcome.image is None
    assert "stopped without an image" in outcome.message and "disk_budget_bytes" in outcome.message
    assert pid is not None and not alive(pid)
