"""AWS spot interruption notices from the instance metadata service (IMDSv2).

Protocol (as documented by AWS; see RECIPES "Clouds: preemption notices"):

- ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds: N`` (1..21600)
  returns a session token as the body; every metadata ``GET`` carries it as
  ``X-aws-ec2-metadata-token``. An expired or unknown token is answered ``401``.
- ``GET /latest/meta-data/spot/instance-action``: ``404`` = no interruption scheduled;
  ``200 {"action": "terminate"|"stop"|"hibernate", "time": "2026-11-23T10:00:00Z"}`` =
  the instance goes away at ``time`` (about two minutes' notice, best effort).
- ``GET /latest/meta-data/events/recommendations/rebalance``: ``404`` = none;
  ``200 {"noticeTime": "..."}`` = elevated risk of interruption; no deadline yet.

An instance action is reported in preference to a rebalance recommendation: it is the
stronger fact, and the rebalance endpoint is only asked when there is none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from albatross.clouds.base import (
    DEFAULT_TIMEOUT_S,
    NoticeKind,
    NoticeSourceError,
    PreemptionNotice,
    fetch,
    parse_iso8601,
    unexpected_status,
)
from albatross.clouds.http import HttpResponse, Target

TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
MAX_TOKEN_TTL_S = 21600

_ACTIONS: frozenset[NoticeKind] = frozenset({"terminate", "stop", "hibernate"})


class AwsWatcher:
    """Polls IMDSv2 for a spot instance action or a rebalance recommendation.

    The session token is fetched on first use, cached, renewed once 90% of its TTL has
    passed (so a poll never races the expiry), and renewed at once when IMDS answers
    ``401`` (IMDS restarted, or our clock drifted), with that request retried once.
    ``timeout_s`` bounds each request; a poll makes two to four of them.
    """

    name = "aws"

    def __init__(
        self,
        base_url: str = "http://169.254.169.254",
        token_ttl_s: int = MAX_TOKEN_TTL_S,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(
                f"token_ttl_s: {token_ttl_s!r} must be 1..{MAX_TOKEN_TTL_S} (IMDSv2 limit)"
            )
        Target.parse(base_url)  # fail at construction, not on the first poll
        self.base_url = base_url.rstrip("/")
        self.token_ttl_s = token_ttl_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._token: str | None = None
        self._renew_at = 0.0
        self._last: PreemptionNotice | None = None

    async def poll(self) -> PreemptionNotice | None:
        notice: PreemptionNotice | None = None
        action = await self._get(ACTION_PATH)
        if action is not None:
            notice = self._instance_action(action)
        else:
            rebalance = await self._get(REBALANCE_PATH)
            if rebalance is not None:
                notice = self._rebalance(rebalance)
        # IMDS serves the same document until it acts: return the notice first built
        # from it, so noticed_at stays the moment it was first seen.
        if notice is not None and self._last is not None and notice.key == self._last.key:
            return self._last
        self._last = notice
        return notice

    async def acknowledge(self, notice: PreemptionNotice) -> None:
        """AWS has nothing to acknowledge: the action happens at its time regardless."""

    # --- requests -----------------------------------------------------------------

    async def _get(self, path: str) -> bytes | None:
        """The body of a 200, ``None`` for a 404; raises for anything else."""
        url = self.base_url + path
        resp = await self._get_with_token(url, await self._valid_token())
        if resp.status == 401:
            # Rejected although not yet due for renewal: IMDS forgot it. Renew once;
            # a second 401 means tokens are broken, not stale.
            self._token = None
            resp = await self._get_with_token(url, await self._valid_token())
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise unexpected_status(self.name, "GET", url, resp)
        return resp.body

    async def _get_with_token(self, url: str, token: str) -> HttpResponse:
        headers = {"X-aws-ec2-metadata-token": token}
        return await fetch(self.name, "GET", url, headers, timeout_s=self.timeout_s)

    async def _valid_token(self) -> str:
        now = self._clock()
        if self._token is not None and now < self._renew_at:
            return self._token
        url = self.base_url + TOKEN_PATH
        headers = {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)}
        resp = await fetch(self.name, "PUT", url, headers, timeout_s=self.timeout_s)
        if resp.status != 200:
            raise unexpected_status(self.name, "PUT", url, resp)
        token = resp.body.decode("latin-1").strip()
        # The token goes back verbatim in a header: anything but visible ASCII is not a
        # token, and CR/LF in it would split our request.
        if not token or not all("!" <= c <= "~" for c in token):
            raise NoticeSourceError(self.name, f"PUT {url}", f"not a token: {resp.body[:120]!r}")
        self._token = token
        self._renew_at = now + 0.9 * self.token_ttl_s
        return token

    # --- documents ------------------------------------------------------------------

    def _document(self, path: str, body: bytes) -> dict[str, Any]:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise self._format_error(path, body, f"invalid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise self._format_error(path, body, "expected a JSON object")
        return doc

    def _instance_action(self, body: bytes) -> PreemptionNotice:
        doc = self._document(ACTION_PATH, body)
        action, when = doc.get("action"), doc.get("time")
        if action not in _ACTIONS:
            raise self._format_error(
                ACTION_PATH, body, f"action {action!r} is not one of {sorted(_ACTIONS)}"
            )
        deadline = self._time(ACTION_PATH, body, "time", when)
        return PreemptionNotice(
            source=self.name,
            kind=action,
            deadline=deadline,
            noticed_at=self._clock(),
            raw=body.decode("utf-8", "replace"),
        )

    def _rebalance(self, body: bytes) -> PreemptionNotice:
        doc = self._document(REBALANCE_PATH, body)
        # Parsed only to validate the document; a recommendation carries no deadline.
        self._time(REBALANCE_PATH, body, "noticeTime", doc.get("noticeTime"))
        return PreemptionNotice(
            source=self.name,
            kind="rebalance",
            deadline=None,
            noticed_at=self._clock(),
            raw=body.decode("utf-8", "replace"),
        )

    def _time(self, path: str, body: bytes, field: str, value: object) -> float:
        if not isinstance(value, str):
            raise self._format_error(path, body, f"{field!r} {value!r} is not a timestamp string")
        try:
            return parse_iso8601(value)
        except ValueError as exc:
            raise self._format_error(
                path, body, f"{field!r} {value!r} is not an ISO 8601 time"
            ) from exc

    def _format_error(self, path: str, body: bytes, why: str) -> NoticeSourceError:
        return NoticeSourceError(
            self.name, f"GET {self.base_url}{path}", f"{why}; body {body[:120]!r}"
        )
