"""The per-stream continuity state machine and the move path policy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from albatross.core import continuity
from albatross.core.continuity import (
    IllegalStreamTransition,
    MovePath,
    Phase,
    StreamEvent,
    StreamState,
    choose_path,
    step,
)

P, V = Phase, StreamEvent


def test_happy_path_first_leg_is_not_a_migration() -> None:
    s = step(StreamState(), V.LEG_STARTED, max_migrations=3).state
    assert s == StreamState(P.STREAMING, migrations=0, legs=1)
    assert step(s, V.FINISHED, max_migrations=3).state.phase is P.DONE


def test_failure_then_continuation_counts_a_migration() -> None:
    s = step(StreamState(), V.LEG_STARTED, max_migrations=3).state
    v = step(s, V.LEG_FAILED, max_migrations=3)
    assert v.give_up is None and v.state.phase is P.ROUTING and v.state.failures == 1
    s = step(v.state, V.LEG_STARTED, max_migrations=3).state
    assert s.phase is P.STREAMING and s.migrations == 1 and s.legs == 2


def test_more_failures_than_the_limit_give_up_naming_it() -> None:
    s = StreamState()
    for _ in range(2):
        s = step(s, V.LEG_STARTED, max_migrations=2).state
        v = step(s, V.LEG_FAILED, max_migrations=2)
        assert v.give_up is None
        s = v.state
    s = step(s, V.LEG_STARTED, max_migrations=2).state
    v = step(s, V.LEG_FAILED, max_migrations=2)
    assert v.state.phase is P.FAILED
    assert v.give_up is not None and "max_migrations" in v.give_up


def test_zero_migrations_gives_up_at_the_first_failure() -> None:
    s = step(StreamState(), V.LEG_STARTED, max_migrations=0).state
    assert step(s, V.LEG_FAILED, max_migrations=0).give_up is not None


def test_failures_before_any_leg_started_count_too() -> None:
    # A replica that refuses connections must not make a stream retry forever.
    s = StreamState()
    for _ in range(3):
        v = step(s, V.LEG_FAILED, max_migrations=3)
        assert v.give_up is None
        s = v.state
    assert step(s, V.LEG_FAILED, max_migrations=3).give_up is not None


def test_not_continuable_gives_up_at_once_and_a_planned_move_stays() -> None:
    s = step(StreamState(), V.LEG_STARTED, max_migrations=5).state
    v = step(s, V.LEG_FAILED, max_migrations=5, continuable=False)
    assert v.state.phase is P.FAILED and v.give_up is not None and "continued exactly" in v.give_up
    stay = step(s, V.MOVE_REQUESTED, max_migrations=5, continuable=False)
    assert stay.state == s and stay.give_up is None


def test_planned_move_goes_through_moving() -> None:
    s = step(StreamState(), V.LEG_STARTED, max_migrations=1).state
    s = step(s, V.MOVE_REQUESTED, max_migrations=1).state
    assert s.phase is P.MOVING
    s = step(s, V.LEG_STARTED, max_migrations=1).state
    assert s.phase is P.STREAMING and s.migrations == 1
    moving = step(step(s, V.MOVE_REQUESTED, max_migrations=1).state, V.MOVE_FAILED, max_migrations=1)
    assert moving.state.phase is P.ROUTING


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", list(StreamEvent))
def test_unlisted_transitions_raise_and_change_nothing(phase: Phase, event: StreamEvent) -> None:
    s = StreamState(phase, migrations=1, legs=2, failures=1)
    if (phase, event) in continuity._TABLE:
        step(s, event, max_migrations=10)
        return
    with pytest.raises(IllegalStreamTransition):
        step(s, event, max_migrations=10)
    assert s == StreamState(phase, migrations=1, legs=2, failures=1)  # frozen: unchanged


def test_terminal_phases_accept_nothing() -> None:
    for phase in (P.DONE, P.FAILED):
        assert not any(p is phase for p, _ in continuity._TABLE)


@given(st.lists(st.sampled_from(list(StreamEvent)), max_size=30), st.integers(0, 4))
def test_failures_never_exceed_the_limit_without_failing(events: list[StreamEvent], limit: int) -> None:
    s = StreamState()
    for e in events:
        try:
            v = step(s, e, max_migrations=limit)
        except IllegalStreamTransition:
            continue
        s = v.state
        if s.failures > limit:
            assert s.phase is P.FAILED and v.give_up is not None
        assert s.migrations <= max(s.legs - 1, 0)


@pytest.mark.parametrize(
    ("requested", "kv_ok", "shared", "expected"),
    [
        (None, True, True, MovePath.KV),
        (None, True, False, MovePath.PREWARM),
        (None, False, True, MovePath.PREWARM),
        (MovePath.KV, True, True, MovePath.KV),
        (MovePath.KV, False, True, MovePath.PREWARM),
        (MovePath.KV, True, False, MovePath.PREWARM),
        (MovePath.PREWARM, True, True, MovePath.PREWARM),
        (MovePath.REPREFILL, True, True, MovePath.REPREFILL),
        (MovePath.REPREFILL, False, False, MovePath.REPREFILL),
    ],
)
def test_choose_path(requested: MovePath | None, kv_ok: bool, shared: bool, expected: MovePath) -> None:
    assert choose_path(requested, source_kv=kv_ok, target_kv=kv_ok, shared_slot_dir=shared) is expected
