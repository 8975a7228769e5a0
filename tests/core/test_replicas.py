"""Replica health table, failure threshold and least-loaded routing."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from albatross.core import replicas
from albatross.core.replicas import (
    Candidate,
    Event,
    Health,
    IllegalTransition,
    ReplicaState,
    pick,
    transition,
)

S, E = ReplicaState, Event

# (state, event) -> next state, written out independently of the module's table.
EXPECTED = {
    (S.STARTING, E.STARTED): S.READY,
    (S.STARTING, E.LOST): S.DOWN,
    (S.STARTING, E.CHECK_FAILED): S.STARTING,
    (S.STARTING, E.CHECK_PASSED): S.STARTING,
    (S.READY, E.CHECK_PASSED): S.READY,
    (S.READY, E.CHECK_FAILED): S.READY,  # below the threshold
    (S.READY, E.LOST): S.DOWN,
    (S.READY, E.STARTED): S.READY,
    (S.UNHEALTHY, E.CHECK_PASSED): S.READY,
    (S.UNHEALTHY, E.CHECK_FAILED): S.UNHEALTHY,
    (S.UNHEALTHY, E.LOST): S.DOWN,
    (S.UNHEALTHY, E.STARTED): S.READY,
    (S.DOWN, E.STARTED): S.READY,
    (S.DOWN, E.LOST): S.DOWN,
    (S.DOWN, E.CHECK_FAILED): S.DOWN,
    (S.DOWN, E.CHECK_PASSED): S.DOWN,
    # planned drains (control API)
    (S.READY, E.DRAIN): S.DRAINING,
    (S.UNHEALTHY, E.DRAIN): S.DRAINING,
    (S.STARTING, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.UNDRAIN): S.READY,
    (S.DRAINING, E.CHECK_PASSED): S.DRAINING,
    (S.DRAINING, E.CHECK_FAILED): S.DRAINING,
    (S.DRAINING, E.LOST): S.DOWN,
    (S.DRAINING, E.STARTED): S.DRAINING,
    (S.DOWN, E.DRAIN): S.DOWN,
    (S.DOWN, E.UNDRAIN): S.DOWN,
    (S.STARTING, E.UNDRAIN): S.STARTING,
    (S.READY, E.UNDRAIN): S.READY,
    (S.UNHEALTHY, E.UNDRAIN): S.UNHEALTHY,
}


@pytest.mark.parametrize(("state", "event"), list(EXPECTED), ids=[f"{s}-{e}" for s, e in EXPECTED])
def test_every_listed_transition(state: ReplicaState, event: Event) -> None:
    h = Health(state, 0)
    after = transition(h, event, threshold=3)
    assert after.state is EXPECTED[(state, event)]
    assert after.failures == (1 if event is E.CHECK_FAILED else 0)
    assert h == Health(state, 0)  # a value: the input is never changed


def test_the_table_covers_every_state_and_event() -> None:
    assert set(replicas._TABLE) == {(s, e) for s in S for e in E}
    assert replicas._TABLE == EXPECTED


@pytest.mark.parametrize(("state", "event"), list(EXPECTED), ids=[f"{s}-{e}" for s, e in EXPECTED])
def test_unlisted_transition_raises_and_changes_nothing(
    state: ReplicaState, event: Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every pair is listed today, so unlist one to exercise the rule.
    monkeypatch.delitem(replicas._TABLE, (state, event))
    h = Health(state, 2)
    with pytest.raises(IllegalTransition):
        transition(h, event, threshold=3)
    assert h == Health(state, 2)


def test_health_is_frozen() -> None:
    h = Health()
    assert h == Health(S.STARTING, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.state = S.READY  # type: ignore[misc]


def run(events: list[Event], threshold: int, start: Health | None = None) -> list[Health]:
    h = start or Health()
    out = []
    for e in events:
        h = transition(h, e, threshold)
        out.append(h)
    return out


def test_ready_stays_ready_until_threshold_consecutive_failures() -> None:
    hs = run([E.STARTED] + [E.CHECK_FAILED] * 4, threshold=3)
    assert [(h.state, h.failures) for h in hs] == [
        (S.READY, 0),
        (S.READY, 1),
        (S.READY, 2),
        (S.UNHEALTHY, 3),
        (S.UNHEALTHY, 4),
    ]


def test_one_pass_brings_an_unhealthy_replica_back() -> None:
    hs = run([E.CHECK_FAILED, E.CHECK_PASSED], threshold=1, start=Health(S.READY))
    assert hs[0] == Health(S.UNHEALTHY, 1)
    assert hs[1] == Health(S.READY, 0)


def test_a_pass_resets_the_failure_count() -> None:
    events = [E.CHECK_FAILED, E.CHECK_FAILED, E.CHECK_PASSED, E.CHECK_FAILED, E.CHECK_FAILED]
    hs = run(events, threshold=3, start=Health(S.READY))
    assert all(h.state is S.READY for h in hs)
    assert hs[-1].failures == 2
    assert transition(hs[-1], E.CHECK_FAILED, 3).state is S.UNHEALTHY


def test_threshold_one_takes_ready_out_at_the_first_failure() -> None:
    assert transition(Health(S.READY), E.CHECK_FAILED, 1) == Health(S.UNHEALTHY, 1)


def test_failures_outside_ready_do_not_make_unhealthy() -> None:
    assert run([E.CHECK_FAILED] * 5, threshold=2)[-1] == Health(S.STARTING, 5)
    assert run([E.CHECK_FAILED] * 5, threshold=2, start=Health(S.DOWN))[-1] == Health(S.DOWN, 5)
    # Once started, the count begins afresh.
    assert transition(Health(S.STARTING, 5), E.STARTED, 2) == Health(S.READY, 0)


def test_lost_goes_down_from_anywhere_and_started_brings_it_back() -> None:
    for s in S:
        assert transition(Health(s, 1), E.LOST, 3) == Health(S.DOWN, 0)
    assert transition(Health(S.DOWN), E.STARTED, 3) == Health(S.READY, 0)


@given(
    st.lists(st.sampled_from(list(E)), max_size=40),
    st.integers(1, 5),
)
def test_ready_never_has_threshold_failures(events: list[Event], threshold: int) -> None:
    h = Health()
    for e in events:
        prev = h
        h = transition(h, e, threshold)
        if h.state is S.READY:
            assert h.failures < threshold
        if prev.state is S.READY and e is E.CHECK_FAILED:
            assert (h.state is S.UNHEALTHY) == (prev.failures + 1 >= threshold)


# ---- routing ------------------------------------------------------------------------


def c(rid: str, in_flight: int = 0, state: ReplicaState = S.READY) -> Candidate:
    return Candidate(rid, state, in_flight)


def test_pick_least_loaded() -> None:
    assert pick([c("a", 3), c("b", 1), c("c", 2)], None) == "b"


def test_pick_ignores_replicas_that_are_not_ready() -> None:
    cands = [c("a", 0, S.STARTING), c("b", 0, S.UNHEALTHY), c("c", 0, S.DOWN), c("d", 9)]
    assert pick(cands, None) == "d"


def test_pick_none_when_none_ready() -> None:
    assert pick([], None) is None
    assert pick([c("a", 0, S.DOWN), c("b", 0, S.UNHEALTHY), c("c", 0, S.STARTING)], "a") is None


def test_pick_accepts_any_iterable() -> None:
    assert pick(iter([c("a", 1), c("b", 0)]), None) == "b"


def test_ties_rotate() -> None:
    cands = [c("a"), c("b"), c("c"), c("busy", 5)]
    last = None
    seen = []
    for _ in range(6):
        last = pick(cands, last)
        seen.append(last)
    assert seen == ["a", "b", "c", "a", "b", "c"]


def test_rotation_skips_a_previous_choice_that_is_no_longer_tied() -> None:
    assert pick([c("a"), c("b", 1), c("c")], "a") == "c"
    assert pick([c("a"), c("b"), c("c")], "gone") == "a"


def test_rotation_reaches_every_tied_replica_in_candidate_order() -> None:
    cands = [c(f"m/{i}") for i in range(11)]
    last = None
    seen = set()
    for _ in range(len(cands)):
        last = pick(cands, last)
        seen.add(last)
    assert seen == {x.replica_id for x in cands}


candidates = st.lists(
    st.builds(
        Candidate,
        replica_id=st.text(alphabet="abcdef", min_size=1, max_size=3),
        state=st.sampled_from(list(S)),
        in_flight=st.integers(0, 5),
    ),
    max_size=10,
    unique_by=lambda x: x.replica_id,
)


@given(candidates, st.none() | st.text(alphabet="abcdef", max_size=3))
def test_pick_returns_a_ready_replica_with_minimal_load(
    cands: list[Candidate], last: str | None
) -> None:
    got = pick(cands, last)
    ready = [x for x in cands if x.state is S.READY]
    if not ready:
        assert got is None
        return
    chosen = next(x for x in cands if x.replica_id == got)
    assert chosen.state is S.READY
    assert chosen.in_flight == min(x.in_flight for x in ready)
