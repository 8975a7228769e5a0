"""Deadline-aware drain planning: what to do with each stream when a replica is going away.

Theory of operation
-------------------
A preemption notice gives a deadline (AWS ~120 s, GCP and Azure ~30 s; plan for 30).
The replica stops admitting new requests at once. For each stream in flight on it the
planner compares the worst-case time to finish in place — the tokens it may still
emit (``max_tokens - emitted``) times the replica's measured time per output token —
with the time left before ``deadline - margin``:

- it fits: **finish in place** (no move, no stall at all);
- it does not fit and the stream can be continued exactly: **migrate now**, while the
  source still runs (a planned move: KV or pre-warm, about one decode step of stall);
  the streams that would take longest go first, as many as the other replicas have
  free slots for;
- it does not fit and cannot be continued (constrained decoding), or there is no room
  elsewhere: **at risk** — it stays and is continued from its journal (re-prefill) if
  the replica dies under it, or fails with a clear error if it cannot be continued.

The planner is pure and is meant to be called again on every tick with fresh progress:
a stream that was on track and slowed down is moved on a later tick.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

DEFAULT_MARGIN_S = 5.0
"""Kept free before the deadline: the time a move itself needs, plus slack."""


class Decision(StrEnum):
    FINISH_IN_PLACE = "finish_in_place"
    MIGRATE_NOW = "migrate_now"
    AT_RISK = "at_risk"


@dataclass(frozen=True, slots=True)
class InFlight:
    request_id: str
    emitted: int
    max_tokens: int
    continuable: bool = True


@dataclass(frozen=True, slots=True)
class RequestPlan:
    request_id: str
    decision: Decision
    expected_end: float
    """When it would finish in place (worst case), on the same clock as ``now``."""
    why: str


@dataclass(frozen=True, slots=True)
class DrainPlan:
    stop_admitting: bool
    requests: tuple[RequestPlan, ...]

    def ids(self, decision: Decision) -> list[str]:
        return [r.request_id for r in self.requests if r.decision is decision]


def plan_drain(
    now: float,
    deadline: float,
    in_flight: list[InFlight],
    *,
    seconds_per_token: float,
    free_slots_elsewhere: int,
    margin_s: float = DEFAULT_MARGIN_S,
) -> DrainPlan:
    """Decide per stream; see the module docstring. Raises ValueError on nonsense input."""
    if seconds_per_token < 0 or free_slots_elsewhere < 0 or margin_s < 0:
        raise ValueError("seconds_per_token, free_slots_elsewhere and margin_s must be >= 0")
    budget_end = deadline - margin_s
    plans: dict[str, RequestPlan] = {}
    late: list[tuple[float, InFlight]] = []
    for r in in_flight:
        remaining = max(r.max_tokens - r.emitted, 0)
        end = now + remaining * seconds_per_token
        if end <= budget_end:
            plans[r.request_id] = RequestPlan(
                r.request_id,
                Decision.FINISH_IN_PLACE,
                end,
                f"{remaining} tokens fit before the deadline",
            )
        elif not r.continuable:
            plans[r.request_id] = RequestPlan(
                r.request_id,
                Decision.AT_RISK,
                end,
                "does not fit and cannot be continued exactly elsewhere",
            )
        else:
            late.append((end, r))
    # Longest first: they gain the most from moving, and lose the most if they stay.
    late.sort(key=lambda t: (-t[0], t[1].request_id))
    room = free_slots_elsewhere
    for end, r in late:
        if room > 0:
            room -= 1
            plans[r.request_id] = RequestPlan(
                r.request_id,
                Decision.MIGRATE_NOW,
                end,
                "would run past the deadline; moved while the source runs",
            )
        else:
            plans[r.request_id] = RequestPlan(
                r.request_id, Decision.AT_RISK, end, "no free slot on another replica"
            )
    return DrainPlan(stop_admitting=True, requests=tuple(plans[r.request_id] for r in in_flight))
