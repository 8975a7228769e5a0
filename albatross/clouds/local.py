"""Notices raised inside this process: a signal handler, a CLI command, the control API.

Used where no cloud tells us (bare metal, a drill, tests) and to rehearse a preemption
on a real cloud. :meth:`LocalWatcher.trigger` queues a notice; :meth:`LocalWatcher.poll`
hands each queued notice out exactly once, in trigger order.

Not thread-safe: call ``trigger`` on the event loop's thread (signal handlers installed
with ``loop.add_signal_handler`` run there; from another thread use
``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from itertools import count

from albatross.clouds.base import DEFAULT_LEAD_S, NoticeKind, PreemptionNotice


class LocalWatcher:
    """An in-process notice source.

    ``wait_s`` makes :meth:`poll` wait up to that long for a trigger when none is
    queued (``None`` = answer at once), so a ``watch`` loop with a zero interval
    reacts to a trigger immediately instead of at its next tick.
    """

    name = "local"

    def __init__(
        self, *, wait_s: float | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.wait_s = wait_s
        self._clock = clock
        self._pending: deque[PreemptionNotice] = deque()
        self._ids = count(1)
        self._triggered = asyncio.Event()

    def trigger(
        self, deadline_s_from_now: float | None = DEFAULT_LEAD_S, kind: NoticeKind = "terminate"
    ) -> PreemptionNotice:
        """Queue a notice whose deadline is ``deadline_s_from_now`` seconds away
        (``None`` = unknown) and return it. Each trigger is a distinct notice."""
        if deadline_s_from_now is not None and deadline_s_from_now < 0:
            raise ValueError(f"deadline_s_from_now: {deadline_s_from_now!r} must be >= 0")
        now = self._clock()
        notice = PreemptionNotice(
            source=self.name,
            kind=kind,
            deadline=None if deadline_s_from_now is None else now + deadline_s_from_now,
            noticed_at=now,
            event_id=f"local-{next(self._ids)}",
            raw=f"trigger({deadline_s_from_now!r}, kind={kind!r})",
        )
        self._pending.append(notice)
        self._triggered.set()
        return notice

    async def poll(self) -> PreemptionNotice | None:
        """The oldest notice not handed out yet, or ``None``; never raises."""
        if not self._pending and self.wait_s is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.wait_s):
                    await self._triggered.wait()
        if not self._pending:
            return None
        notice = self._pending.popleft()
        if not self._pending:
            self._triggered.clear()
        return notice

    async def acknowledge(self, notice: PreemptionNotice) -> None:
        """Nothing to acknowledge in process."""
