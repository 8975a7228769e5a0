"""Azure spot eviction notices from the Scheduled Events endpoint of IMDS.

Protocol (documented by Microsoft; see RECIPES "Clouds: preemption notices"):

- ``GET /metadata/scheduledevents?api-version=2020-07-01`` with ``Metadata: true``
  answers ``{"DocumentIncarnation": n, "Events": [...]}``; each event has ``EventId``,
  ``EventType`` (``Freeze``, ``Reboot``, ``Redeploy``, ``Preempt``, ``Terminate``),
  ``ResourceType``, ``Resources`` (the VM names it applies to), ``EventStatus``
  (``Scheduled``/``Started``), ``NotBefore`` (an RFC 1123 date, empty once started),
  ``Description``, ``EventSource`` and ``DurationInSeconds``.
- a ``POST`` of ``{"StartRequests": [{"EventId": id}]}`` to the same URL acknowledges an
  event: it may then start before ``NotBefore``. Spot evictions give at least 30 s.

``Preempt`` (spot eviction) and ``Terminate`` (the VM is being deleted, e.g. scale-in)
end this VM and become notices; the other types keep the VM and are ignored here. The
document lists events for every VM of an availability set or scale-set placement group,
so with ``vm_name`` set only events naming this VM count; without it every eviction is
taken as ours (safe: a needless drain, never a missed one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from albatross.clouds.base import (
    DEFAULT_LEAD_S,
    DEFAULT_TIMEOUT_S,
    NoticeKind,
    NoticeSourceError,
    PreemptionNotice,
    fetch,
    parse_rfc1123,
    unexpected_status,
)
from albatross.clouds.http import Target

EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
_KINDS: dict[str, NoticeKind] = {"Preempt": "preempt", "Terminate": "terminate"}


class AzureWatcher:
    """Polls Scheduled Events; :meth:`acknowledge` sends the ``StartRequests`` POST."""

    name = "azure"

    def __init__(
        self,
        base_url: str = "http://169.254.169.254",
        *,
        vm_name: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        Target.parse(base_url)
        self.url = base_url.rstrip("/") + EVENTS_PATH
        self.vm_name = vm_name
        self.timeout_s = timeout_s
        self._clock = clock
        # EventId -> when first seen: the notice's noticed_at, and the base of the
        # deadline of an event without NotBefore, so neither slides with every poll.
        self._first_seen: dict[str, float] = {}

    async def poll(self) -> PreemptionNotice | None:
        """The ending event with the earliest deadline, or ``None``."""
        resp = await fetch(
            self.name, "GET", self.url, {"Metadata": "true"}, timeout_s=self.timeout_s
        )
        if resp.status != 200:
            raise unexpected_status(self.name, "GET", self.url, resp)
        events = self._events(resp.body)
        now = self._clock()
        notices = [n for e in events if (n := self._notice(e, resp.body, now)) is not None]
        current = {n.event_id for n in notices}
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in current}
        if not notices:
            return None
        return min(notices, key=lambda n: n.deadline_or(now))

    async def acknowledge(self, notice: PreemptionNotice) -> None:
        """Approve the event: Azure may then evict at once rather than at ``NotBefore``.

        Raises :class:`NoticeSourceError` if the POST fails; ``ValueError`` for a notice
        that did not come from Azure (no ``EventId`` to send).
        """
        if notice.source != self.name or notice.event_id is None:
            raise ValueError(f"notice {notice.key!r} has no Azure EventId to acknowledge")
        body = orjson.dumps({"StartRequests": [{"EventId": notice.event_id}]})
        headers = {"Metadata": "true", "Content-Type": "application/json"}
        resp = await fetch(
            self.name, "POST", self.url, headers, body=body, timeout_s=self.timeout_s
        )
        if resp.status != 200:
            raise unexpected_status(self.name, "POST", self.url, resp)

    def _events(self, body: bytes) -> list[dict[str, Any]]:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise self._format_error(body, f"invalid JSON ({exc})") from exc
        events = doc.get("Events") if isinstance(doc, dict) else None
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise self._format_error(body, "expected an object with an 'Events' list of objects")
        return events

    def _notice(self, event: dict[str, Any], body: bytes, now: float) -> PreemptionNotice | None:
        event_type = event.get("EventType")
        kind = _KINDS.get(event_type) if isinstance(event_type, str) else None
        if kind is None:
            return None
        resources = event.get("Resources", [])
        if (
            self.vm_name is not None
            and isinstance(resources, list)
            and self.vm_name not in resources
        ):
            return None
        event_id = event.get("EventId")
        if not isinstance(event_id, str) or not event_id:
            raise self._format_error(body, f"{event.get('EventType')} event without an EventId")
        not_before = event.get("NotBefore", "")
        if not isinstance(not_before, str):
            raise self._format_error(
                body, f"NotBefore {not_before!r} of event {event_id} is not a string"
            )
        first_seen = self._first_seen.setdefault(event_id, now)
        if not_before:
            try:
                deadline = parse_rfc1123(not_before)
            except ValueError as exc:
                raise self._format_error(
                    body, f"NotBefore {not_before!r} of event {event_id} is not an RFC 1123 date"
                ) from exc
        else:
            # Empty once the event has started: assume the shortest documented notice.
            deadline = first_seen + DEFAULT_LEAD_S
        return PreemptionNotice(
            source=self.name,
            kind=kind,
            deadline=deadline,
            noticed_at=first_seen,
            event_id=event_id,
            raw=orjson.dumps(event).decode(),
        )

    def _format_error(self, body: bytes, why: str) -> NoticeSourceError:
        return NoticeSourceError(self.name, f"GET {self.url}", f"{why}; body {body[:120]!r}")
