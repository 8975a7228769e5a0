"""Preemption notices and the one interface every notice source implements.

A :class:`PreemptionNotice` is a past-tense fact: "this instance was told it goes
away". A :class:`NoticeWatcher` checks one source for it (a cloud's metadata service,
or an in-process trigger); :func:`albatross.clouds.watch.watch` polls a watcher forever
and hands each distinct notice over once.

What must stay true:

- ``poll`` answers "no notice" with ``None`` and raises :class:`NoticeSourceError` only
  when it could not find out (transport trouble, an unexpected status, a body not in the
  documented format). A missing notice and a broken source must never look alike: the
  first is routine, the second means we are flying blind and is logged.
- the same notice polled twice compares equal on :attr:`PreemptionNotice.key`, so that
  it is acted on once; watchers that compute a deadline themselves (GCP, an Azure event
  without ``NotBefore``) remember the first one instead of sliding it forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal, Protocol

from albatross.clouds import http

NoticeKind = Literal["terminate", "stop", "hibernate", "preempt", "rebalance"]

DEFAULT_LEAD_S = 30.0
"""Notice assumed when a source gives no deadline: the shortest any cloud gives (GCP,
Azure). Planning for less time than we have only costs a few early migrations."""

DEFAULT_TIMEOUT_S = 2.0
"""Per request to a metadata service: it is link-local and answers in milliseconds, so a
slow answer is a broken one, and a poll must not eat a 30 s notice."""


@dataclass(frozen=True, slots=True)
class PreemptionNotice:
    """This instance was told it will go away (or, for ``rebalance``, that it may soon)."""

    source: str
    """``"aws"``, ``"gcp"``, ``"azure"`` or ``"local"``."""
    kind: NoticeKind
    deadline: float | None
    """Wall-clock epoch seconds when the instance goes away; ``None`` = the source did
    not say (use :meth:`deadline_or`)."""
    noticed_at: float
    """Epoch seconds when this process first saw the notice."""
    event_id: str | None = None
    """The source's id for the event: Azure's ``EventId`` (needed to acknowledge it), a
    sequence number for local triggers; ``None`` for AWS and GCP."""
    raw: str = ""
    """The body the notice was read from, for logs."""

    @property
    def key(self) -> tuple[str, str | None, float | None]:
        """Identity for de-duplication: the event id where the source has one, else
        kind and deadline (AWS serves the same action and time until it acts)."""
        if self.event_id is not None:
            return (self.source, self.event_id, None)
        return (self.source, self.kind, self.deadline)

    def deadline_or(self, now: float, default_lead_s: float = DEFAULT_LEAD_S) -> float:
        """The deadline, or ``now + default_lead_s`` when the source gave none."""
        return self.deadline if self.deadline is not None else now + default_lead_s


class NoticeSourceError(Exception):
    """A notice source could not be read: we do not know whether a notice is pending.

    Raised by :meth:`NoticeWatcher.poll` and :meth:`NoticeWatcher.acknowledge` on
    time-outs, refused connections, unexpected HTTP statuses (5xx, 401 after a token
    refresh, ...), bodies that are not in the documented format and unparsable dates;
    never for "no notice" (AWS's 404, GCP's ``FALSE``, Azure's empty event list).
    Retrying later may succeed; :func:`~albatross.clouds.watch.watch` logs it and keeps
    polling. The foreign error, if any, is the ``__cause__``.
    """

    def __init__(self, source: str, url: str, reason: str) -> None:
        super().__init__(f"{source} preemption notices unavailable: {url}: {reason}")
        self.source = source
        self.url = url
        self.reason = reason


class NoticeWatcher(Protocol):
    """One source of preemption notices."""

    name: str
    """The source, as in :attr:`PreemptionNotice.source`."""

    async def poll(self) -> PreemptionNotice | None:
        """Check once. ``None`` = no notice now; raises :class:`NoticeSourceError` when the
        source cannot tell. May return the same notice on every call while it stands."""
        ...

    async def acknowledge(self, notice: PreemptionNotice) -> None:
        """Tell the source we are ready for the event to proceed (Azure: lets it start
        before ``NotBefore``, so call it only once drained); a no-op elsewhere."""
        ...


async def fetch(
    source: str,
    method: str,
    url: str,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    body: bytes | None = None,
) -> http.HttpResponse:
    """:func:`http.request` with transport errors translated into :class:`NoticeSourceError`."""
    try:
        return await http.request(method, url, headers=headers, body=body, timeout_s=timeout_s)
    except http.HttpTransportError as exc:
        raise NoticeSourceError(source, f"{method} {url}", exc.reason) from exc


def unexpected_status(
    source: str, method: str, url: str, resp: http.HttpResponse
) -> NoticeSourceError:
    """The error for a status the documented protocol does not produce."""
    snippet = resp.body[:120].decode("utf-8", "replace")
    return NoticeSourceError(
        source, f"{method} {url}", f"unexpected HTTP {resp.status}: {snippet!r}"
    )


def parse_iso8601(text: str) -> float:
    """``2026-11-23T10:00:00Z`` -> epoch seconds; ``ValueError`` if not ISO 8601.

    A time without a zone is taken as UTC: metadata services document UTC, and the
    local zone of this host has nothing to do with the cloud's clock."""
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def parse_rfc1123(text: str) -> float:
    """``Mon, 19 Sep 2016 18:29:47 GMT`` -> epoch seconds; ``ValueError`` otherwise."""
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, IndexError) as exc:  # email.utils raises these on some garbage
        raise ValueError(f"not an RFC 1123 date: {text!r}") from exc
    # "-0000" ("UTC, origin unknown") parses naive; as above, naive means UTC.
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
