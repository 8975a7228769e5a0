"""LocalWatcher: in-process triggers, each handed out once."""

from __future__ import annotations

import asyncio

import pytest

from albatross.clouds import LocalWatcher
from albatross.testing.metadata_fakes import FakeClock


async def test_a_trigger_is_polled_once(clock: FakeClock) -> None:
    w = LocalWatcher(clock=clock)
    assert await w.poll() is None
    made = w.trigger(45)
    assert (made.source, made.kind, made.deadline, made.noticed_at) == (
        "local",
        "terminate",
        clock.now + 45,
        clock.now,
    )
    assert await w.poll() is made
    assert await w.poll() is None


async def test_triggers_are_distinct_and_in_order(clock: FakeClock) -> None:
    w = LocalWatcher(clock=clock)
    a = w.trigger(30, kind="stop")
    b = w.trigger(30, kind="stop")  # same deadline, still a second notice
    assert a.key != b.key
    assert [await w.poll(), await w.poll(), await w.poll()] == [a, b, None]


async def test_unknown_deadline(clock: FakeClock) -> None:
    notice = LocalWatcher(clock=clock).trigger(None, kind="rebalance")
    assert notice.deadline is None and notice.deadline_or(clock.now, 10) == clock.now + 10


async def test_waiting_poll_returns_as_soon_as_triggered() -> None:
    w = LocalWatcher(wait_s=5)
    asyncio.get_running_loop().call_later(0.02, w.trigger, 30)
    notice = await asyncio.wait_for(w.poll(), 1)
    assert notice is not None


async def test_waiting_poll_gives_up_after_wait_s() -> None:
    assert await LocalWatcher(wait_s=0.02).poll() is None


def test_a_negative_deadline_is_refused() -> None:
    with pytest.raises(ValueError, match="deadline_s_from_now: -1 must be >= 0"):
        LocalWatcher().trigger(-1)
