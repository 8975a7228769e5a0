"""AwsWatcher against a local IMDSv2 that checks tokens and serves the spot documents."""

from __future__ import annotations

import calendar

import pytest

from albatross.clouds import AwsWatcher, NoticeSourceError
from albatross.testing.metadata_fakes import FakeClock, FakeImds, free_port

ACTION_TIME = "2026-11-23T10:00:00Z"
ACTION_EPOCH = float(calendar.timegm((2026, 11, 23, 10, 0, 0)))


def watcher_for(
    imds: FakeImds, clock: FakeClock, token_ttl_s: int = 21600, timeout_s: float = 2.0
) -> AwsWatcher:
    return AwsWatcher(imds.url, token_ttl_s, timeout_s=timeout_s, clock=clock)


async def test_no_notice_then_an_instance_action_mid_test(imds: FakeImds, clock: FakeClock) -> None:
    w = watcher_for(imds, clock)
    assert await w.poll() is None
    imds.instance_action = {"action": "terminate", "time": ACTION_TIME}
    clock.now += 5
    notice = await w.poll()
    assert notice is not None
    assert (notice.source, notice.kind, notice.deadline) == ("aws", "terminate", ACTION_EPOCH)
    assert (notice.noticed_at, notice.event_id) == (clock.now, None)
    assert notice.raw == '{"action":"terminate","time":"2026-11-23T10:00:00Z"}'


@pytest.mark.parametrize("action", ["stop", "hibernate"])
async def test_every_documented_action_becomes_its_kind(
    imds: FakeImds, clock: FakeClock, action: str
) -> None:
    imds.instance_action = {"action": action, "time": ACTION_TIME}
    notice = await watcher_for(imds, clock).poll()
    assert notice is not None and notice.kind == action


async def test_the_same_document_gives_the_same_notice(imds: FakeImds, clock: FakeClock) -> None:
    w = watcher_for(imds, clock)
    imds.instance_action = {"action": "terminate", "time": ACTION_TIME}
    first = await w.poll()
    clock.now += 5
    assert await w.poll() is first  # noticed_at stays the first sighting


async def test_rebalance_is_an_early_signal_without_deadline(
    imds: FakeImds, clock: FakeClock
) -> None:
    imds.rebalance = {"noticeTime": "2026-11-23T09:50:00Z"}
    notice = await watcher_for(imds, clock).poll()
    assert notice is not None
    assert (notice.kind, notice.deadline) == ("rebalance", None)
    assert notice.deadline_or(clock.now) == clock.now + 30


async def test_an_instance_action_wins_over_a_rebalance(imds: FakeImds, clock: FakeClock) -> None:
    imds.rebalance = {"noticeTime": "2026-11-23T09:50:00Z"}
    imds.instance_action = {"action": "stop", "time": ACTION_TIME}
    notice = await watcher_for(imds, clock).poll()
    assert notice is not None and notice.kind == "stop"


async def test_token_is_requested_with_its_ttl_and_reused(imds: FakeImds, clock: FakeClock) -> None:
    w = watcher_for(imds, clock, token_ttl_s=600)
    for _ in range(3):
        assert await w.poll() is None
        clock.now += 5
    puts = [r for r in imds.requests if r.method == "PUT"]
    assert len(puts) == 1
    assert puts[0].headers["x-aws-ec2-metadata-token-ttl-seconds"] == "600"
    gets = [r for r in imds.requests if r.method == "GET"]
    assert len(gets) == 6  # instance-action + rebalance per poll, all with the token
    assert imds.rejected == 0


async def test_token_is_renewed_before_it_expires(imds: FakeImds, clock: FakeClock) -> None:
    w = watcher_for(imds, clock, token_ttl_s=100)
    await w.poll()
    clock.now += 89  # 89% of the TTL: still the first token
    await w.poll()
    assert imds.token_puts == 1
    clock.now += 2  # past 90%: renewed before IMDS would refuse it at 100%
    await w.poll()
    assert (imds.token_puts, imds.rejected) == (2, 0)


async def test_a_refused_token_is_renewed_and_the_request_retried(
    imds: FakeImds, clock: FakeClock
) -> None:
    w = watcher_for(imds, clock)
    await w.poll()
    imds.tokens.clear()  # IMDS forgot every token (e.g. restarted)
    imds.instance_action = {"action": "terminate", "time": ACTION_TIME}
    notice = await w.poll()
    assert notice is not None and notice.kind == "terminate"
    assert (imds.token_puts, imds.rejected) == (2, 1)


async def test_a_token_refused_twice_is_a_source_error(imds: FakeImds, clock: FakeClock) -> None:
    w = watcher_for(imds, clock, token_ttl_s=10)
    imds.refuse_all_tokens = True
    with pytest.raises(NoticeSourceError, match="unexpected HTTP 401") as info:
        await w.poll()
    assert info.value.source == "aws" and imds.token_puts == 2


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"action": "explode", "time": ACTION_TIME}, "action 'explode' is not one of"),
        ({"action": "terminate", "time": "in two minutes"}, "is not an ISO 8601 time"),
        ({"action": "terminate", "time": 1795428000}, "is not a timestamp string"),
        ({"action": "terminate"}, "'time' None"),
        (["terminate"], "expected a JSON object"),
    ],
)
async def test_documents_out_of_format_are_source_errors(
    imds: FakeImds, clock: FakeClock, doc: object, why: str
) -> None:
    imds.instance_action = doc  # type: ignore[assignment]
    with pytest.raises(NoticeSourceError, match=why) as info:
        await watcher_for(imds, clock).poll()
    assert str(info.value).startswith(f"aws preemption notices unavailable: GET {imds.url}")


async def test_a_bad_rebalance_time_is_a_source_error(imds: FakeImds, clock: FakeClock) -> None:
    imds.rebalance = {"noticeTime": "yesterday"}
    with pytest.raises(NoticeSourceError, match="rebalance: 'noticeTime' 'yesterday'"):
        await watcher_for(imds, clock).poll()


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        ("500", "unexpected HTTP 500"),
        ("garbage", "not a token"),
        ("hang", "no response within 0.2 s"),
    ],
)
async def test_a_broken_imds_is_a_source_error_naming_the_url(
    imds: FakeImds, clock: FakeClock, fault: str, why: str
) -> None:
    imds.fault = fault
    w = watcher_for(imds, clock, timeout_s=0.2)
    with pytest.raises(NoticeSourceError) as info:
        await w.poll()
    assert info.value.source == "aws"
    assert imds.url in info.value.url
    assert why in str(info.value)


async def test_invalid_json_is_a_source_error(imds: FakeImds, clock: FakeClock) -> None:
    w = watcher_for(imds, clock)
    await w.poll()  # token in hand
    imds.fault = "garbage"
    with pytest.raises(NoticeSourceError, match="invalid JSON") as info:
        await w.poll()
    assert info.value.url == f"GET {imds.url}/latest/meta-data/spot/instance-action"


async def test_connection_refused_is_a_source_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(NoticeSourceError, match="aws preemption notices unavailable: PUT") as info:
        await AwsWatcher(url).poll()
    assert isinstance(info.value.__cause__, Exception)


def test_configuration_is_checked_at_construction() -> None:
    with pytest.raises(ValueError, match=r"token_ttl_s: 0 must be 1\.\.21600"):
        AwsWatcher(token_ttl_s=0)
    with pytest.raises(ValueError, match="must be http://"):
        AwsWatcher("169.254.169.254")
