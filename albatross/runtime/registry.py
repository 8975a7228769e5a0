"""Live and recently ended streams: who is on which replica, what to resume, what stalled.

The registry owns the tasks it starts (moves triggered by a drain, the watchdog) and
ends them in :meth:`Registry.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from albatross.config import ContinuityConfig
from albatross.core.continuity import FailureReason, MovePath
from albatross.core.errors import AlbatrossError, EngineLost
from albatross.runtime.stream import Cut, StreamSession

log = logging.getLogger("albatross.registry")
WATCH_INTERVAL_S = 0.1


class Registry:
    def __init__(self, continuity: ContinuityConfig) -> None:
        self._cfg = continuity
        self.live: dict[str, StreamSession] = {}
        self.retained: dict[str, StreamSession] = {}
        self._tasks: set[asyncio.Task[object]] = set()

    def add(self, s: StreamSession) -> None:
        self.retained.pop(s.request_id, None)
        self.live[s.request_id] = s

    def retire(self, s: StreamSession) -> None:
        self.live.pop(s.request_id, None)
        s.ended_at = time.perf_counter()
        if s.stream and self._cfg.journal_retention_s > 0:
            self.retained[s.request_id] = s

    def get(self, request_id: str) -> StreamSession | None:
        return self.live.get(request_id) or self.retained.get(request_id)

    def on_replica(self, replica_id: str) -> list[StreamSession]:
        return [
            s
            for s in self.live.values()
            if s.leg is not None and s.leg.replica.replica_id == replica_id
        ]

    def replica_lost(self, replica_id: str, planned: bool) -> None:
        """Pool listener: a replica went down (continue its streams elsewhere) or is
        being drained (move them off while it still runs)."""
        for s in self.on_replica(replica_id):
            if planned:
                self.spawn(self._drain_one(s))
            else:
                s.cut(
                    Cut(
                        "failed",
                        FailureReason.REPLICA_LOST,
                        EngineLost(f"replica {replica_id} was lost"),
                    )
                )

    async def _drain_one(self, s: StreamSession) -> None:
        from albatross.runtime.moves import move

        path = None if self._cfg.move_path == "auto" else MovePath(self._cfg.move_path)
        try:
            await move(s, None, path, FailureReason.DRAINED)
        except AlbatrossError as exc:
            log.warning("drain: %s stays where it is: %s", s.request_id, exc.message)

    def spawn(self, coro: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def watch(self) -> None:
        """Fail stalled legs and forget journals past their retention, forever."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.perf_counter()
            for s in list(self.live.values()):
                s.check_stall(now)
            horizon = now - self._cfg.journal_retention_s
            for rid, s in list(self.retained.items()):
                if s.ended_at is not None and s.ended_at < horizon:
                    del self.retained[rid]

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
