"""The watch loop: once per distinct notice, failures logged sparingly, recovery.

The loop runs on a fake clock and a fake ``sleep`` that advances it; a test ends the
loop by raising :class:`Done` from ``sleep`` once it has seen enough.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from albatross.clouds import (
    AwsWatcher,
    AzureWatcher,
    GcpWatcher,
    LocalWatcher,
    NoticeWatcher,
    PreemptionNotice,
    watch,
)
from albatross.testing.metadata_fakes import (
    FakeAzureImds,
    FakeClock,
    FakeGcpMetadata,
    FakeImds,
    free_port,
)

TERMINATE = {"action": "terminate", "time": "2026-11-23T10:00:00Z"}


class Done(Exception):
    """Raised by the fake sleep to end ``watch``."""


class Loop:
    """Drives ``watch``: fake sleep on a fake clock, a hook per sleep, a sleep budget."""

    def __init__(self, clock: FakeClock, max_sleeps: int) -> None:
        self.clock = clock
        self.max_sleeps = max_sleeps
        self.sleeps: list[float] = []
        self.notices: list[PreemptionNotice] = []
        self.hooks: dict[int, Callable[[], object]] = {}

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.now += seconds
        hook = self.hooks.get(len(self.sleeps))
        if hook is not None:
            result = hook()
            if asyncio.iscoroutine(result):
                await result
        if len(self.sleeps) >= self.max_sleeps:
            raise Done

    async def run(self, watcher: NoticeWatcher, interval_s: float = 5.0, **kw: int) -> None:
        with pytest.raises(Done):
            await watch(watcher, interval_s, self.notices.append, self.clock, self.sleep, **kw)


async def test_the_same_notice_served_repeatedly_is_delivered_once(
    imds: FakeImds, clock: FakeClock
) -> None:
    imds.instance_action = TERMINATE
    loop = Loop(clock, max_sleeps=6)
    await loop.run(AwsWatcher(imds.url, clock=clock))
    assert len(loop.notices) == 1
    assert loop.sleeps == [5.0] * 6
    assert sum(r.path.endswith("instance-action") for r in imds.requests) == 6


async def test_a_rebalance_then_the_instance_action_are_two_notices(
    imds: FakeImds, clock: FakeClock
) -> None:
    imds.rebalance = {"noticeTime": "2026-11-23T09:50:00Z"}
    loop = Loop(clock, max_sleeps=6)
    loop.hooks[3] = lambda: setattr(imds, "instance_action", TERMINATE)
    await loop.run(AwsWatcher(imds.url, clock=clock))
    assert [n.kind for n in loop.notices] == ["rebalance", "terminate"]


@pytest.mark.parametrize("fault", ["500", "garbage", "hang"])
async def test_a_failing_source_is_logged_and_the_notice_delivered_after_recovery(
    imds: FakeImds, clock: FakeClock, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    imds.instance_action = TERMINATE
    imds.fault = fault
    loop = Loop(clock, max_sleeps=6)
    loop.hooks[3] = lambda: setattr(imds, "fault", None)
    with caplog.at_level(logging.WARNING, logger="albatross.clouds"):
        await loop.run(AwsWatcher(imds.url, clock=clock, timeout_s=0.1))
    assert [n.kind for n in loop.notices] == ["terminate"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(
        f"aws preemption notices unavailable: PUT {imds.url}/latest/api/token"
    )
    assert lines[1] == "aws preemption notices readable again after 3 failed polls over 15 s"
    assert lines[2].startswith("aws preemption notice: terminate in ")
    assert len(lines) == 3


async def test_connection_refused_until_the_service_starts(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    imds = FakeImds(clock, port=port)
    imds.instance_action = TERMINATE
    loop = Loop(clock, max_sleeps=5)
    loop.hooks[2] = imds.start
    try:
        with caplog.at_level(logging.WARNING, logger="albatross.clouds"):
            await loop.run(AwsWatcher(imds.url, clock=clock))
    finally:
        await imds.close()
    assert len(loop.notices) == 1
    assert "Connect call failed" in caplog.records[0].getMessage()


async def test_repeated_failures_are_logged_first_then_every_nth(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    loop = Loop(clock, max_sleeps=30)
    with caplog.at_level(logging.WARNING, logger="albatross.clouds"):
        await loop.run(AwsWatcher(url, clock=clock), log_every=10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4  # failures 1, 10, 20, 30
    assert all(line.startswith(f"aws preemption notices unavailable: PUT {url}") for line in lines)
    assert lines[1].endswith("; 10 polls in a row have failed over 45 s, still polling")


async def test_failures_back_off_to_the_minimum_error_interval(clock: FakeClock) -> None:
    loop = Loop(clock, max_sleeps=3)
    await loop.run(GcpWatcher(f"http://127.0.0.1:{free_port()}"), interval_s=0)
    assert loop.sleeps == [1.0, 1.0, 1.0]  # a zero interval must not spin on a dead source


async def test_gcp_long_poll_delivers_once(gce: FakeGcpMetadata, clock: FakeClock) -> None:
    async def preempt_later() -> None:
        asyncio.get_running_loop().call_later(0.05, gce.set_preempted, True)

    # Poll 1 is a plain GET (FALSE); poll 2 long-polls and is answered by the change.
    loop = Loop(clock, max_sleeps=2)
    loop.hooks[1] = preempt_later
    w = GcpWatcher(gce.url, long_poll=True, long_poll_timeout_s=5, clock=clock)
    await asyncio.wait_for(loop.run(w, interval_s=0), 2)
    assert [n.kind for n in loop.notices] == ["preempt"]
    assert "wait_for_change=true" in gce.requests[1].target


async def test_azure_event_delivered_once_then_acknowledged(
    azure_imds: FakeAzureImds, clock: FakeClock
) -> None:
    azure_imds.schedule(EventId="e-1")
    w = AzureWatcher(azure_imds.url, clock=clock)
    acks: list[asyncio.Task[None]] = []
    loop = Loop(clock, max_sleeps=4)

    def on_notice(n: PreemptionNotice) -> None:
        loop.notices.append(n)
        acks.append(asyncio.create_task(w.acknowledge(n)))

    with pytest.raises(Done):
        await watch(w, 1.0, on_notice, clock, loop.sleep)
    await asyncio.gather(*acks)
    assert [n.event_id for n in loop.notices] == ["e-1"]
    assert azure_imds.acknowledged == ["e-1"]


async def test_local_triggers_each_delivered(clock: FakeClock) -> None:
    w = LocalWatcher(clock=clock)
    loop = Loop(clock, max_sleeps=4)
    loop.hooks[1] = lambda: w.trigger(30)
    loop.hooks[2] = lambda: w.trigger(30)
    await loop.run(w, interval_s=0.5)
    assert len(loop.notices) == 2


async def test_an_exception_from_on_notice_ends_the_loop(clock: FakeClock) -> None:
    w = LocalWatcher(clock=clock)
    w.trigger(30)

    def broken(n: PreemptionNotice) -> None:
        raise RuntimeError("consumer bug")

    loop = Loop(clock, max_sleeps=10)
    with pytest.raises(RuntimeError, match="consumer bug"):
        await watch(w, 1.0, broken, clock, loop.sleep)
