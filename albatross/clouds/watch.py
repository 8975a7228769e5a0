"""The polling loop around a :class:`~albatross.clouds.base.NoticeWatcher`.

:func:`watch` is the only place that paces polls and decides what a failed poll means:
nothing for the plan (we keep what we know), a warning for the operator, since a broken
metadata source means a preemption could arrive unseen. Warnings are throttled — the
first failure, then every ``log_every``-th in a row, then one line on recovery — so a
source that is down for an hour writes a handful of lines, not 720.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn

from albatross.clouds.base import NoticeSourceError, NoticeWatcher, PreemptionNotice

log = logging.getLogger("albatross.clouds")

AWS_POLL_INTERVAL_S = 5.0
"""AWS recommends checking for an instance action every 5 s."""


async def watch(
    watcher: NoticeWatcher,
    interval_s: float,
    on_notice: Callable[[PreemptionNotice], None],
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    *,
    min_error_interval_s: float = 1.0,
    log_every: int = 12,
) -> NoReturn:
    """Poll ``watcher`` forever; call ``on_notice`` once per distinct notice.

    Distinct means a new :attr:`PreemptionNotice.key` (same event id, or same kind and
    deadline, = same notice), so a notice that the source keeps serving is delivered
    once, and a later, different one (a rebalance, then the instance action) again.
    ``on_notice`` is called on the loop and must not block; an exception from it
    propagates and ends the loop (a broken consumer is a bug, not a source failure).

    After a failed poll the next one comes ``max(interval_s, min_error_interval_s)``
    later, so a zero interval (for long-polling watchers) does not spin on a source that
    fails fast. Runs until cancelled.
    """
    if log_every < 1:
        raise ValueError(f"log_every: {log_every!r} must be at least 1")
    seen: set[object] = set()
    failures = 0
    failing_since = 0.0
    while True:
        try:
            notice = await watcher.poll()
        except NoticeSourceError as exc:
            failures += 1
            if failures == 1:
                failing_since = clock()
                log.warning("%s; still polling", exc)
            elif failures % log_every == 0:
                log.warning(
                    "%s; %d polls in a row have failed over %.0f s, still polling",
                    exc,
                    failures,
                    clock() - failing_since,
                )
            await sleep(max(interval_s, min_error_interval_s))
            continue
        if failures:
            log.warning(
                "%s preemption notices readable again after %d failed polls over %.0f s",
                watcher.name,
                failures,
                clock() - failing_since,
            )
            failures = 0
        if notice is not None and notice.key not in seen:
            seen.add(notice.key)
            _log_notice(notice, clock())
            on_notice(notice)
        await sleep(interval_s)


def _log_notice(notice: PreemptionNotice, now: float) -> None:
    if notice.deadline is None:
        log.warning("%s preemption notice: %s, no deadline given", notice.source, notice.kind)
    elif notice.deadline >= now:
        log.warning(
            "%s preemption notice: %s in %.0f s", notice.source, notice.kind, notice.deadline - now
        )
    else:  # a late sighting, or our clock is ahead of the cloud's
        log.warning(
            "%s preemption notice: %s, deadline passed %.0f s ago",
            notice.source,
            notice.kind,
            now - notice.deadline,
        )
