"""GcpWatcher against a local GCE metadata server: TRUE/FALSE, ETags, wait_for_change."""

from __future__ import annotations

import asyncio

import pytest

from albatross.clouds import GcpWatcher, NoticeSourceError
from albatross.testing.metadata_fakes import FakeClock, FakeGcpMetadata, free_port

PATH = "/computeMetadata/v1/instance/preempted"


async def test_false_then_true_mid_test(gce: FakeGcpMetadata, clock: FakeClock) -> None:
    w = GcpWatcher(gce.url, clock=clock)
    assert await w.poll() is None
    assert gce.requests[0].headers["metadata-flavor"] == "Google"
    assert gce.requests[0].target == PATH
    gce.set_preempted(True)
    notice = await w.poll()
    assert notice is not None
    assert (notice.source, notice.kind, notice.raw) == ("gcp", "preempt", "TRUE")
    assert (notice.noticed_at, notice.deadline) == (clock.now, clock.now + 30)


async def test_the_deadline_counts_from_the_first_true(
    gce: FakeGcpMetadata, clock: FakeClock
) -> None:
    w = GcpWatcher(gce.url, clock=clock)
    gce.set_preempted(True)
    first = await w.poll()
    clock.now += 10
    assert await w.poll() is first  # not slid to now + 30


async def test_long_poll_returns_when_the_value_changes(
    gce: FakeGcpMetadata, clock: FakeClock
) -> None:
    w = GcpWatcher(gce.url, long_poll=True, long_poll_timeout_s=30, clock=clock)
    assert await w.poll() is None  # the first call is a plain GET: it learns the ETag
    etag = gce.etag
    waiting = asyncio.create_task(w.poll())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # held by the server
    gce.set_preempted(True)
    notice = await asyncio.wait_for(waiting, 2)
    assert notice is not None and notice.kind == "preempt"
    q = gce.requests[1].query
    assert (q["wait_for_change"], q["last_etag"], q["timeout_sec"]) == ("true", etag, "30")


async def test_long_poll_answers_at_once_when_the_etag_is_stale(
    gce: FakeGcpMetadata, clock: FakeClock
) -> None:
    w = GcpWatcher(gce.url, long_poll=True, clock=clock)
    await w.poll()
    gce.set_preempted(True)  # changed between two polls: must not be missed
    notice = await asyncio.wait_for(w.poll(), 1)
    assert notice is not None


async def test_long_poll_times_out_server_side_with_no_notice(
    gce: FakeGcpMetadata, clock: FakeClock
) -> None:
    w = GcpWatcher(gce.url, long_poll=True, long_poll_timeout_s=1, timeout_s=0.5, clock=clock)
    await w.poll()
    # The server holds it for timeout_sec = 1 s, longer than timeout_s: still no error.
    assert await w.poll() is None


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        ("500", "unexpected HTTP 500"),
        ("garbage", "expected TRUE or FALSE, got b'MAYBE'"),
        ("hang", "no response within 0.2 s"),
    ],
)
async def test_a_broken_server_is_a_source_error(
    gce: FakeGcpMetadata, clock: FakeClock, fault: str, why: str
) -> None:
    gce.fault = fault
    with pytest.raises(NoticeSourceError, match=why) as info:
        await GcpWatcher(gce.url, timeout_s=0.2, clock=clock).poll()
    assert str(info.value).startswith(f"gcp preemption notices unavailable: GET {gce.url}{PATH}")


async def test_garbage_does_not_advance_the_etag(gce: FakeGcpMetadata, clock: FakeClock) -> None:
    w = GcpWatcher(gce.url, long_poll=True, clock=clock)
    await w.poll()
    etag = gce.etag
    gce.fault = "garbage"
    with pytest.raises(NoticeSourceError):
        await w.poll()
    gce.fault = None
    gce.set_preempted(True)
    assert await asyncio.wait_for(w.poll(), 1) is not None
    assert gce.requests[-1].query["last_etag"] == etag


async def test_connection_refused_is_a_source_error() -> None:
    with pytest.raises(NoticeSourceError, match="gcp preemption notices unavailable"):
        await GcpWatcher(f"http://127.0.0.1:{free_port()}").poll()
