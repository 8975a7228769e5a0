"""GCP spot/preemptible VM notices from the metadata server.

Protocol (documented by Google; see RECIPES "Clouds: preemption notices"):

- ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``
  (requests without it are refused with ``403``) answers ``TRUE`` or ``FALSE`` and an
  ``ETag`` for that value.
- ``?wait_for_change=true&last_etag=E&timeout_sec=T`` long-polls: it answers at once if
  the value's ETag is no longer ``E``, else when it changes, else after ``T`` seconds
  with the unchanged value. Without ``last_etag`` it would wait for the *next* change
  and miss a ``TRUE`` that is already there, so the first call is always a plain GET.

Spot VMs get 30 s from ``TRUE`` to the stop; the deadline is counted from the first
poll that saw ``TRUE`` and kept while it stays ``TRUE``, so repeated polls return the
same notice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import quote

from albatross.clouds.base import (
    DEFAULT_TIMEOUT_S,
    NoticeSourceError,
    PreemptionNotice,
    fetch,
    unexpected_status,
)
from albatross.clouds.http import Target

PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
SPOT_LEAD_S = 30.0
"""From the preemption notice to the ACPI stop, for spot and preemptible VMs."""


class GcpWatcher:
    """Checks ``instance/preempted``; optionally long-polls it.

    With ``long_poll=True`` each :meth:`poll` after the first waits up to
    ``long_poll_timeout_s`` for the value to change, so a notice arrives as soon as
    the metadata server has it; run :func:`~albatross.clouds.watch.watch` with a short
    (or zero) interval then, since ``poll`` itself paces the loop.
    """

    name = "gcp"

    def __init__(
        self,
        base_url: str = "http://metadata.google.internal",
        *,
        long_poll: bool = False,
        long_poll_timeout_s: int = 60,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if long_poll_timeout_s < 1:
            raise ValueError(f"long_poll_timeout_s: {long_poll_timeout_s!r} must be at least 1")
        Target.parse(base_url)
        self.base_url = base_url.rstrip("/")
        self.long_poll = long_poll
        self.long_poll_timeout_s = long_poll_timeout_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._etag: str | None = None
        self._notice: PreemptionNotice | None = None

    async def poll(self) -> PreemptionNotice | None:
        url = self.base_url + PREEMPTED_PATH
        timeout_s = self.timeout_s
        if self.long_poll and self._etag is not None:
            url += (
                f"?wait_for_change=true&last_etag={quote(self._etag, safe='')}"
                f"&timeout_sec={self.long_poll_timeout_s}"
            )
            # The server holds the request up to timeout_sec by design; only a wait
            # beyond that is a failure.
            timeout_s += self.long_poll_timeout_s
        resp = await fetch(
            self.name, "GET", url, {"Metadata-Flavor": "Google"}, timeout_s=timeout_s
        )
        if resp.status != 200:
            raise unexpected_status(self.name, "GET", url, resp)
        value = resp.body.strip()
        if value not in (b"TRUE", b"FALSE"):
            raise NoticeSourceError(
                self.name, f"GET {url}", f"expected TRUE or FALSE, got {resp.body[:120]!r}"
            )
        # Kept only after a valid answer: a garbage reply must not advance the ETag past
        # a value we never understood.
        self._etag = resp.headers.get("etag") or None
        if value == b"FALSE":
            self._notice = None
            return None
        if self._notice is None:
            now = self._clock()
            self._notice = PreemptionNotice(
                source=self.name,
                kind="preempt",
                deadline=now + SPOT_LEAD_S,
                noticed_at=now,
                raw=value.decode(),
            )
        return self._notice

    async def acknowledge(self, notice: PreemptionNotice) -> None:
        """GCP has nothing to acknowledge."""
