"""Checkpoint and restore of one supervised engine replica, with its image bookkeeping.

:class:`ReplicaCheckpointer` is what :class:`~albatross.supervisor.supervisor.Supervisor`
calls (its ``images`` argument): ``checkpoint`` dumps a replica's process into a new
image of the store, ``restore`` starts the replica from its newest image. The rules:

- before a dump the image's size is estimated (the tree's anonymous memory, which is
  what criu writes; file-backed model weights stay in the model file) and checked
  against the disk budget; with ``on_budget_exceeded = "stop"`` the engine is stopped
  without an image instead, and the outcome says so;
- an image is verified (sha256 of every file) before a restore. A missing, damaged or
  unrestorable image raises :class:`RestoreFailed` with the reason, after the image
  was deleted and whatever its dump left behind (the nftables lock, ``link_remap``
  files) was removed: the caller starts the engine cold, and the next run does not
  trip over the same image again;
- after a successful restore the image is kept (its metadata records the new pid) or
  deleted, as configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from albatross.checkpoint.criu import Criu, CriuError, DumpOptions, tree_pids
from albatross.checkpoint.install import installed_criu
from albatross.checkpoint.restored import adopt
from albatross.checkpoint.s3 import S3Error, S3Images
from albatross.checkpoint.store import BudgetError, Image, ImageCorruptError, ImageStore
from albatross.config import CheckpointConfig
from albatross.supervisor.process import EngineProcess

logger = logging.getLogger("albatross.checkpoint")


class CheckpointSetupError(Exception):
    """Raised when checkpointing is configured but criu cannot be found: install it
    (``python -m albatross.checkpoint.install``, as root) or set ``checkpoint.criu``."""


class RestoreFailed(Exception):
    """Raised by :meth:`ReplicaCheckpointer.restore`; the message says which image and
    why (missing, damaged, criu's own error). The image is already deleted: start cold."""


@dataclass(frozen=True)
class CheckpointOutcome:
    """What :meth:`ReplicaCheckpointer.checkpoint` did."""

    image: Image | None
    """The new image; None when the budget policy stopped the engine without one."""
    message: str
    size_bytes: int = 0
    dump_seconds: float = 0.0


def anonymous_bytes(pids: list[int]) -> int:
    """Anonymous memory of ``pids`` (``smaps_rollup``): about what a dump writes."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue  # a thread id, or gone
        for line in text.splitlines():
            if line.startswith("Anonymous:"):
                total += int(line.split()[1]) * 1024
    return total


class ReplicaCheckpointer:
    """Images of replicas in ``store``, dumped and restored with ``criu``."""

    def __init__(
        self,
        criu: Criu,
        store: ImageStore,
        *,
        keep_after_restore: bool = False,
        on_budget_exceeded: str = "refuse",
        tcp_established: bool = True,
        s3: S3Images | None = None,
        stop_grace_s: float = 5.0,
    ) -> None:
        if on_budget_exceeded not in ("refuse", "stop"):
            raise ValueError(
                f"on_budget_exceeded = {on_budget_exceeded!r}: must be 'refuse' or 'stop'"
            )
        self.criu = criu
        self.store = store
        self.keep_after_restore = keep_after_restore
        self.on_budget_exceeded = on_budget_exceeded
        self.tcp_established = tcp_established
        self.s3 = s3
        self.stop_grace_s = stop_grace_s

    @classmethod
    def from_config(
        cls, cfg: CheckpointConfig, *, stop_grace_s: float = 5.0
    ) -> ReplicaCheckpointer:
        """Raises CheckpointSetupError when no criu is configured or installed."""
        binary = cfg.criu.expanduser() if cfg.criu is not None else installed_criu()
        if binary is None:
            raise CheckpointSetupError(
                "checkpoint.enabled needs CRIU: run `python -m albatross.checkpoint.install` "
                "as root, or set checkpoint.criu to a criu executable"
            )
        if not os.access(binary, os.X_OK):
            raise CheckpointSetupError(f"checkpoint.criu = {str(binary)!r}: not an executable file")
        s3 = (
            S3Images.connect(cfg.s3_bucket, cfg.s3_prefix, cfg.s3_endpoint_url)
            if cfg.s3_bucket
            else None
        )
        return cls(
            Criu(binary),
            ImageStore(cfg.image_dir, budget_bytes=cfg.disk_budget_bytes),
            keep_after_restore=cfg.keep_after_restore,
            on_budget_exceeded=cfg.on_budget_exceeded,
            tcp_established=cfg.tcp_established,
            s3=s3,
            stop_grace_s=stop_grace_s,
        )

    def has_image(self, replica_id: str) -> bool:
        """A complete local image exists (remote ones are fetched by :meth:`restore`)."""
        return self.store.latest(replica_id) is not None

    async def checkpoint(
        self, replica_id: str, proc: EngineProcess, base_url: str
    ) -> CheckpointOutcome:
        """Dump ``proc`` (it stops) into a new image of ``replica_id``.

        Raises BudgetError (policy ``refuse``) or CriuError; the engine then keeps
        running. With policy ``stop`` an over-budget engine is stopped and the outcome
        has no image.
        """
        pids = tree_pids(proc.pid)
        try:
            self.store.admit(anonymous_bytes(pids), what=f"a checkpoint of {replica_id}")
        except BudgetError as exc:
            if self.on_budget_exceeded == "refuse":
                raise
            await proc.stop(self.stop_grace_s)
            msg = f"stopped without an image (policy on_budget_exceeded=stop): {exc}"
            logger.warning("replica %s: %s", replica_id, msg)
            return CheckpointOutcome(None, msg)
        argv = _cmdline(pids)  # read now: the dump ends the process
        image = self.store.new_image(replica_id)
        try:
            result = await self.criu.dump(
                proc.pid, image.path, DumpOptions(tcp_established=self.tcp_established)
            )
        except CriuError:
            self.store.delete(image)
            raise
        info: dict[str, Any] = {
            "replica": replica_id,
            "engine": Path(argv[0]).name if argv else None,
            "argv": argv,
            "base_url": base_url,
            "pid": proc.pid,
            "dump_seconds": result.seconds,
            "criu": str(self.criu.binary),
        }
        try:
            meta = await asyncio.to_thread(self.store.finish, image, info)
        except BudgetError as exc:
            self.criu.discard(image.path)
            if self.on_budget_exceeded == "refuse":
                raise
            msg = f"stopped without an image (policy on_budget_exceeded=stop): {exc}"
            logger.warning("replica %s: %s", replica_id, msg)
            return CheckpointOutcome(None, msg)
        if self.s3 is not None:
            try:
                await asyncio.to_thread(self.s3.upload, image)
            except S3Error as exc:
                logger.warning("replica %s: image kept locally only: %s", replica_id, exc)
        size = int(meta["size_bytes"])
        msg = f"checkpointed to {image.path} ({size / (1 << 20):.1f} MiB in {result.seconds:.2f} s)"
        logger.info("replica %s: %s", replica_id, msg)
        return CheckpointOutcome(image, msg, size, result.seconds)

    async def restore(self, replica_id: str, log_path: Path) -> tuple[EngineProcess, str]:
        """Start ``replica_id`` from its newest image; return the process and base URL.

        Raises RestoreFailed (image deleted, leftovers removed) when there is no image,
        it is damaged, or criu cannot restore it.
        """
        image = self.store.latest(replica_id)
        if image is None and self.s3 is not None:
            try:
                image = await asyncio.to_thread(self.s3.download, self.store, replica_id)
            except S3Error as exc:
                raise RestoreFailed(f"no local image of {replica_id}, and {exc}") from exc
        if image is None:
            raise RestoreFailed(f"no image of {replica_id} in {self.store.root}")
        try:
            meta = await asyncio.to_thread(self.store.verify, image)
            pid = await self.criu.restore(image.path)
        except (ImageCorruptError, CriuError) as exc:
            removed = self.criu.discard(image.path)
            self.store.delete(image)
            extra = f"; removed {', '.join(removed)}" if removed else ""
            raise RestoreFailed(f"{exc} (image deleted{extra})") from exc
        try:
            proc = adopt(pid, log_path)
        except ProcessLookupError as exc:
            self.store.delete(image)
            raise RestoreFailed(f"restored pid {pid} of {image.path} exited at once") from exc
        if self.keep_after_restore:
            with contextlib.suppress(OSError, ImageCorruptError):
                self.store.record_restore(image, pid)
        else:
            self.store.delete(image)
        logger.info("replica %s: restored pid %d from %s", replica_id, pid, image.path)
        return proc, str(meta["base_url"])


def _cmdline(pids: list[int]) -> list[str]:
    try:
        raw = Path(f"/proc/{pids[0]}/cmdline").read_bytes()
    except (OSError, IndexError):
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
