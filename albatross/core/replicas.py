"""Replica health states and the routing policy.

Theory of operation
-------------------
A replica is in the routing pool only while READY. Its state changes only through the
table below, fed by past-tense events from the supervisor (``Started``, ``Lost``) and
the health checker (``CheckPassed``, ``CheckFailed``) and the control API (``Drain``,
``Undrain``: a draining replica takes no new requests while its streams are moved
off; it stays draining until undrained or lost). ``health_failures`` consecutive
failed checks take a READY replica out of the pool (UNHEALTHY); one passed check
brings it back. An event the table does not list for a state raises
:class:`IllegalTransition` and leaves the replica unchanged.

Routing is least-loaded: the READY replica of the model with the fewest requests in
flight; ties go to the one after the previously chosen, so equal replicas share work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class ReplicaState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    DOWN = "down"


class Event(StrEnum):
    STARTED = "started"  # the process answers its health endpoint
    CHECK_PASSED = "check_passed"
    CHECK_FAILED = "check_failed"
    LOST = "lost"  # the process exited or was stopped
    DRAIN = "drain"  # planned: take it out of the pool and move its requests off
    UNDRAIN = "undrain"


class IllegalTransition(Exception):
    """Raised for an event the state table does not allow; nothing changes."""


S, E = ReplicaState, Event
# (state, event) -> next state; CHECK_FAILED from READY is special-cased by the counter.
_TABLE: dict[tuple[ReplicaState, Event], ReplicaState] = {
    (S.STARTING, E.STARTED): S.READY,
    (S.STARTING, E.LOST): S.DOWN,
    (S.STARTING, E.CHECK_FAILED): S.STARTING,
    (S.STARTING, E.CHECK_PASSED): S.STARTING,
    (S.READY, E.CHECK_PASSED): S.READY,
    (S.READY, E.CHECK_FAILED): S.READY,
    (S.READY, E.LOST): S.DOWN,
    (S.READY, E.STARTED): S.READY,
    (S.UNHEALTHY, E.CHECK_PASSED): S.READY,
    (S.UNHEALTHY, E.CHECK_FAILED): S.UNHEALTHY,
    (S.UNHEALTHY, E.LOST): S.DOWN,
    (S.UNHEALTHY, E.STARTED): S.READY,
    (S.DOWN, E.STARTED): S.READY,
    (S.DOWN, E.LOST): S.DOWN,
    (S.DOWN, E.CHECK_FAILED): S.DOWN,  # a check that was in flight when it died
    (S.DOWN, E.CHECK_PASSED): S.DOWN,
    (S.READY, E.DRAIN): S.DRAINING,
    (S.UNHEALTHY, E.DRAIN): S.DRAINING,
    (S.STARTING, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.UNDRAIN): S.READY,
    (S.DRAINING, E.CHECK_PASSED): S.DRAINING,
    (S.DRAINING, E.CHECK_FAILED): S.DRAINING,
    (S.DRAINING, E.LOST): S.DOWN,
    (S.DRAINING, E.STARTED): S.DRAINING,
    (S.DOWN, E.DRAIN): S.DOWN,  # nothing to drain
    (S.DOWN, E.UNDRAIN): S.DOWN,
    (S.STARTING, E.UNDRAIN): S.STARTING,
    (S.READY, E.UNDRAIN): S.READY,
    (S.UNHEALTHY, E.UNDRAIN): S.UNHEALTHY,
}


@dataclass(frozen=True, slots=True)
class Health:
    state: ReplicaState = ReplicaState.STARTING
    failures: int = 0
    """Consecutive failed checks."""


def transition(h: Health, event: Event, threshold: int) -> Health:
    """The replica's health after ``event``. Raises :class:`IllegalTransition`."""
    nxt = _TABLE.get((h.state, event))
    if nxt is None:
        raise IllegalTransition(f"{event.value} is not allowed in state {h.state.value}")
    if event is Event.CHECK_FAILED:
        failures = h.failures + 1
        if h.state is ReplicaState.READY and failures >= threshold:
            nxt = ReplicaState.UNHEALTHY
        return Health(nxt, failures)
    return Health(nxt, 0)


@dataclass(frozen=True, slots=True)
class Candidate:
    replica_id: str
    state: ReplicaState
    in_flight: int


def pick(candidates: Iterable[Candidate], last: str | None) -> str | None:
    """Least-loaded READY replica; on ties the first after ``last`` in order. ``None`` if none."""
    candidates_list = list(candidates)
    ready = [c for c in candidates_list if c.state is ReplicaState.READY]
    if not ready:
        return None
    least = min(c.in_flight for c in ready)
    order = [c.replica_id for c in candidates_list]
    tied = [c.replica_id for c in ready if c.in_flight == least]
    if last is not None and last in order:
        # Rotate by position in the given order: the first tied replica after `last`.
        i = order.index(last)
        for rid in order[i + 1 :] + order[: i + 1]:
            if rid in tied:
                return rid
    return tied[0]
