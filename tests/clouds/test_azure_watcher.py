"""AzureWatcher against a local Scheduled Events endpoint, acknowledgement included."""

from __future__ import annotations

import calendar

import orjson
import pytest

from albatross.clouds import AzureWatcher, LocalWatcher, NoticeSourceError
from albatross.testing.metadata_fakes import FakeAzureImds, FakeClock, free_port

NOT_BEFORE_EPOCH = float(calendar.timegm((2016, 9, 19, 18, 29, 47)))


async def test_no_events_then_a_preempt_event_mid_test(
    azure_imds: FakeAzureImds, clock: FakeClock
) -> None:
    w = AzureWatcher(azure_imds.url, clock=clock)
    assert await w.poll() is None
    req = azure_imds.requests[0]
    assert (req.target, req.headers["metadata"]) == (
        "/metadata/scheduledevents?api-version=2020-07-01",
        "true",
    )
    event = azure_imds.schedule()
    notice = await w.poll()
    assert notice is not None
    assert (notice.source, notice.kind, notice.event_id) == ("azure", "preempt", event["EventId"])
    assert (notice.deadline, notice.noticed_at) == (NOT_BEFORE_EPOCH, clock.now)
    assert orjson.loads(notice.raw) == event


async def test_events_that_keep_the_vm_are_ignored(
    azure_imds: FakeAzureImds, clock: FakeClock
) -> None:
    azure_imds.schedule(EventType="Freeze", EventId="f")
    azure_imds.schedule(EventType="Reboot", EventId="r")
    assert await AzureWatcher(azure_imds.url, clock=clock).poll() is None
    azure_imds.schedule(EventType="Terminate", EventId="t")
    notice = await AzureWatcher(azure_imds.url, clock=clock).poll()
    assert notice is not None and (notice.kind, notice.event_id) == ("terminate", "t")


async def test_only_events_for_this_vm_count_when_it_is_named(
    azure_imds: FakeAzureImds, clock: FakeClock
) -> None:
    azure_imds.schedule(Resources=["vm-2"], EventId="other")
    assert await AzureWatcher(azure_imds.url, vm_name="vm-1", clock=clock).poll() is None
    assert await AzureWatcher(azure_imds.url, clock=clock).poll() is not None
    azure_imds.schedule(Resources=["vm-1", "vm-3"], EventId="mine")
    notice = await AzureWatcher(azure_imds.url, vm_name="vm-1", clock=clock).poll()
    assert notice is not None and notice.event_id == "mine"


async def test_the_earliest_eviction_is_reported(
    azure_imds: FakeAzureImds, clock: FakeClock
) -> None:
    azure_imds.schedule(EventId="late", NotBefore="Mon, 19 Sep 2016 18:35:00 GMT")
    azure_imds.schedule(EventId="early", NotBefore="Mon, 19 Sep 2016 18:29:47 GMT")
    notice = await AzureWatcher(azure_imds.url, clock=clock).poll()
    assert notice is not None and notice.event_id == "early"


async def test_an_event_without_not_before_gets_30_s_from_first_sight(
    azure_imds: FakeAzureImds, clock: FakeClock
) -> None:
    azure_imds.schedule(NotBefore="", EventStatus="Started")
    w = AzureWatcher(azure_imds.url, clock=clock)
    first = await w.poll()
    clock.now += 12
    again = await w.poll()
    assert first is not None and again is not None
    assert first.deadline == again.deadline == first.noticed_at + 30
    assert first.key == again.key


async def test_acknowledge_posts_start_requests_with_the_event_id(
    azure_imds: FakeAzureImds, clock: FakeClock
) -> None:
    event = azure_imds.schedule()
    w = AzureWatcher(azure_imds.url, clock=clock)
    notice = await w.poll()
    assert notice is not None
    await w.acknowledge(notice)
    post = azure_imds.requests[-1]
    assert (post.method, post.headers["metadata"]) == ("POST", "true")
    assert orjson.loads(post.body) == {"StartRequests": [{"EventId": event["EventId"]}]}
    assert azure_imds.acknowledged == [event["EventId"]]
    # Approved events start and lose their NotBefore; it is still the same notice.
    after = await w.poll()
    assert after is not None and after.key == notice.key


async def test_acknowledge_refuses_a_notice_from_elsewhere(azure_imds: FakeAzureImds) -> None:
    other = LocalWatcher().trigger(30)
    with pytest.raises(ValueError, match="no Azure EventId"):
        await AzureWatcher(azure_imds.url).acknowledge(other)
    assert azure_imds.requests == []


async def test_a_failed_acknowledge_is_a_source_error(azure_imds: FakeAzureImds) -> None:
    azure_imds.schedule()
    w = AzureWatcher(azure_imds.url)
    notice = await w.poll()
    assert notice is not None
    azure_imds.fault = "500"
    with pytest.raises(NoticeSourceError, match=r"POST .*scheduledevents.*unexpected HTTP 500"):
        await w.acknowledge(notice)


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (
            {"NotBefore": "tomorrow, probably"},
            "NotBefore 'tomorrow, probably' .* is not an RFC 1123 date",
        ),
        ({"NotBefore": "Mon, 32 Sep 2016 18:29:47 GMT"}, "is not an RFC 1123 date"),
        ({"NotBefore": 1474309787}, "is not a string"),
        ({"EventId": ""}, "Preempt event without an EventId"),
    ],
)
async def test_events_out_of_format_are_source_errors(
    azure_imds: FakeAzureImds, clock: FakeClock, event: dict[str, object], why: str
) -> None:
    azure_imds.schedule(**event)
    with pytest.raises(NoticeSourceError, match=why) as info:
        await AzureWatcher(azure_imds.url, clock=clock).poll()
    assert info.value.source == "azure"


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        ("500", "unexpected HTTP 500"),
        ("garbage", "invalid JSON"),
        ("hang", "no response within 0.2 s"),
    ],
)
async def test_a_broken_endpoint_is_a_source_error(
    azure_imds: FakeAzureImds, clock: FakeClock, fault: str, why: str
) -> None:
    azure_imds.fault = fault
    with pytest.raises(NoticeSourceError, match=why) as info:
        await AzureWatcher(azure_imds.url, timeout_s=0.2, clock=clock).poll()
    assert str(info.value).startswith(
        f"azure preemption notices unavailable: GET {azure_imds.url}/metadata/scheduledevents"
    )


async def test_a_document_without_an_events_list_is_a_source_error(
    azure_imds: FakeAzureImds,
) -> None:
    azure_imds.garbage = b'{"DocumentIncarnation": 3, "Events": {}}'
    azure_imds.fault = "garbage"
    with pytest.raises(NoticeSourceError, match="'Events' list"):
        await AzureWatcher(azure_imds.url).poll()


async def test_connection_refused_is_a_source_error() -> None:
    with pytest.raises(NoticeSourceError, match="azure preemption notices unavailable"):
        await AzureWatcher(f"http://127.0.0.1:{free_port()}").poll()
