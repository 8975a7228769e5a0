"""Continuity of one stream across replicas: when to continue, how, and when to give up.

Theory of operation
-------------------
A stream is generated in *legs*: each leg is one generation on one replica, starting
at the journal's frontier. The stream's phase changes only through the table below.

    ROUTING  --leg_started-->  STREAMING  --finished-->  DONE
       ^                          |  |
       |                          |  +--move_requested-->  MOVING --leg_started--> STREAMING
       +------ leg_failed --------+                          |
       +------ move_failed ----------------------------------+

``leg_failed`` (the replica died, reset the connection, reported an error, stalled past
the stall timeout, or was lost by the supervisor) leads back to ROUTING when the stream
may still be continued, else to FAILED: after more than ``max_migrations`` failures, or
when the request cannot be continued exactly (``continuable=False``: guided decoding). A planned move that
fails (``move_failed``) falls back to ROUTING, i.e. to a re-prefill on any replica;
``client_gone`` ends any live phase. An event the table does not list for a phase
raises :class:`IllegalStreamTransition` and leaves the state unchanged.

Paths of a move (:func:`choose_path`): ``kv`` ships the sequence's KV cache (the target
then prefills one token), ``prewarm`` has the target prefill while the source keeps
decoding and cuts over at a position, ``reprefill`` sends prompt + emitted ids to the
target. An unplanned failure can only re-prefill: the source is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class Phase(StrEnum):
    ROUTING = "routing"
    STREAMING = "streaming"
    MOVING = "moving"
    DONE = "done"
    FAILED = "failed"


class StreamEvent(StrEnum):
    LEG_STARTED = "leg_started"
    LEG_FAILED = "leg_failed"
    MOVE_REQUESTED = "move_requested"
    MOVE_FAILED = "move_failed"
    FINISHED = "finished"
    CLIENT_GONE = "client_gone"


class FailureReason(StrEnum):
    """Why a leg ended early (the ``reason`` label of the migration metrics)."""

    CRASHED = "crashed"  # connection reset / closed mid-stream
    ENGINE_ERROR = "engine_error"  # the engine reported an error
    STALLED = "stalled"  # no token within the stall timeout
    REPLICA_LOST = "replica_lost"  # the supervisor saw the process go
    DRAINED = "drained"  # planned: the replica is being drained
    MOVED = "moved"  # planned: this request was asked to move


class MovePath(StrEnum):
    KV = "kv"
    PREWARM = "prewarm"
    REPREFILL = "reprefill"


class IllegalStreamTransition(Exception):
    """Raised for an event the table does not allow in the current phase; nothing changes."""


P, V = Phase, StreamEvent
_TABLE: dict[tuple[Phase, StreamEvent], Phase] = {
    (P.ROUTING, V.LEG_STARTED): P.STREAMING,
    (P.ROUTING, V.LEG_FAILED): P.ROUTING,  # the continuation itself failed to start
    (P.ROUTING, V.CLIENT_GONE): P.DONE,
    (P.STREAMING, V.FINISHED): P.DONE,
    (P.STREAMING, V.LEG_FAILED): P.ROUTING,
    (P.STREAMING, V.MOVE_REQUESTED): P.MOVING,
    (P.STREAMING, V.CLIENT_GONE): P.DONE,
    (P.MOVING, V.LEG_STARTED): P.STREAMING,
    (P.MOVING, V.MOVE_FAILED): P.ROUTING,
    (P.MOVING, V.LEG_FAILED): P.ROUTING,
    (P.MOVING, V.FINISHED): P.DONE,  # the source finished before the cut-over
    (P.MOVING, V.CLIENT_GONE): P.DONE,
}


@dataclass(frozen=True, slots=True)
class StreamState:
    phase: Phase = Phase.ROUTING
    migrations: int = 0
    """Legs started after the first (planned and unplanned)."""
    legs: int = 0
    failures: int = 0
    """Legs that failed (including attempts that never started)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What follows from an event: the new state and, when the stream cannot go on, why."""

    state: StreamState
    give_up: str | None = None


def step(
    state: StreamState, event: StreamEvent, *, max_migrations: int, continuable: bool = True
) -> Verdict:
    """Apply ``event``. Raises :class:`IllegalStreamTransition` (state unchanged)."""
    nxt = _TABLE.get((state.phase, event))
    if nxt is None:
        raise IllegalStreamTransition(f"{event.value} is not allowed while {state.phase.value}")
    if event is StreamEvent.LEG_STARTED:
        migrations = state.migrations + (1 if state.legs > 0 else 0)
        return Verdict(replace(state, phase=nxt, legs=state.legs + 1, migrations=migrations))
    if event is StreamEvent.LEG_FAILED:
        failed = replace(state, failures=state.failures + 1)
        if not continuable:
            return Verdict(
                replace(failed, phase=Phase.FAILED),
                "the request cannot be continued exactly on another replica",
            )
        if failed.failures > max_migrations:
            return Verdict(
                replace(failed, phase=Phase.FAILED),
                f"the stream failed {failed.failures} times, more than max_migrations ({max_migrations})",
            )
        return Verdict(replace(failed, phase=nxt))
    if event is StreamEvent.MOVE_REQUESTED and not continuable:
        # A planned move of a request that cannot be continued: finish it in place.
        return Verdict(state)
    return Verdict(replace(state, phase=nxt))


def choose_path(
    requested: MovePath | None,
    *,
    source_kv: bool,
    target_kv: bool,
    shared_slot_dir: bool,
) -> MovePath:
    """The fastest path a planned move can take between two live replicas.

    KV transfer needs both engines to save/restore slots through a directory they
    share; otherwise pre-warm, which needs nothing but token-id prompts. A requested
    path is honoured when it is possible, else the choice falls back the same way.
    """
    kv_ok = source_kv and target_kv and shared_slot_dir
    if requested is MovePath.REPREFILL:
        return MovePath.REPREFILL
    if requested is MovePath.PREWARM:
        return MovePath.PREWARM
    return MovePath.KV if kv_ok else MovePath.PREWARM
