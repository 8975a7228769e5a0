"""The drain planner on a virtual clock: plain numbers in, decisions out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from albatross.core.drain import Decision, InFlight, plan_drain

NOW = 1_000.0


def test_thirty_seconds_of_notice_short_streams_stay_long_ones_move() -> None:
    # 20 ms per token, 30 s notice, 5 s margin: 1250 tokens fit.
    plan = plan_drain(
        NOW,
        NOW + 30,
        [InFlight("short", 100, 300), InFlight("long", 10, 4000), InFlight("exact", 0, 1250)],
        seconds_per_token=0.02,
        free_slots_elsewhere=4,
    )
    assert plan.stop_admitting
    assert plan.ids(Decision.FINISH_IN_PLACE) == ["short", "exact"]
    assert plan.ids(Decision.MIGRATE_NOW) == ["long"]
    by_id = {p.request_id: p for p in plan.requests}
    assert by_id["short"].expected_end == pytest.approx(NOW + 200 * 0.02)
    assert by_id["exact"].expected_end == pytest.approx(NOW + 25)


def test_one_token_past_the_budget_moves() -> None:
    plan = plan_drain(NOW, NOW + 30, [InFlight("r", 0, 1251)], seconds_per_token=0.02, free_slots_elsewhere=1)
    assert plan.ids(Decision.MIGRATE_NOW) == ["r"]


def test_no_room_elsewhere_longest_move_first_rest_at_risk() -> None:
    reqs = [InFlight("a", 0, 3000), InFlight("b", 0, 9000), InFlight("c", 0, 6000)]
    plan = plan_drain(NOW, NOW + 30, reqs, seconds_per_token=0.02, free_slots_elsewhere=2)
    assert plan.ids(Decision.MIGRATE_NOW) == ["b", "c"]
    assert plan.ids(Decision.AT_RISK) == ["a"]
    assert [p.request_id for p in plan.requests] == ["a", "b", "c"]  # input order kept


def test_constrained_stream_that_does_not_fit_is_at_risk_not_moved() -> None:
    plan = plan_drain(
        NOW, NOW + 30, [InFlight("json", 0, 5000, continuable=False)], seconds_per_token=0.02, free_slots_elsewhere=8
    )
    assert plan.ids(Decision.AT_RISK) == ["json"]
    assert "cannot be continued" in plan.requests[0].why


def test_deadline_already_past_moves_everything_that_can_move() -> None:
    plan = plan_drain(NOW, NOW - 1, [InFlight("a", 5, 10)], seconds_per_token=0.01, free_slots_elsewhere=1)
    assert plan.ids(Decision.MIGRATE_NOW) == ["a"]


def test_replanning_on_a_later_tick_moves_a_stream_that_slowed_down() -> None:
    r = InFlight("r", 0, 1000)
    first = plan_drain(NOW, NOW + 30, [r], seconds_per_token=0.02, free_slots_elsewhere=1)
    assert first.ids(Decision.FINISH_IN_PLACE) == ["r"]
    # Ten seconds later it emitted only 200 tokens: 50 ms per token now.
    later = plan_drain(NOW + 10, NOW + 30, [InFlight("r", 200, 1000)], seconds_per_token=0.05, free_slots_elsewhere=1)
    assert later.ids(Decision.MIGRATE_NOW) == ["r"]


def test_nonsense_input_is_refused() -> None:
    with pytest.raises(ValueError):
        plan_drain(NOW, NOW + 30, [], seconds_per_token=-1, free_slots_elsewhere=0)


@given(
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000), st.booleans()), max_size=30),
    st.floats(0, 0.2),
    st.integers(0, 10),
    st.floats(0, 120),
)
def test_every_stream_gets_one_decision_and_moves_never_exceed_room(
    rows: list[tuple[int, int, bool]], spt: float, room: int, notice: float
) -> None:
    reqs = [InFlight(f"r{i}", e, e + extra, c) for i, (e, extra, c) in enumerate(rows)]
    plan = plan_drain(NOW, NOW + notice, reqs, seconds_per_token=spt, free_slots_elsewhere=room)
    assert [p.request_id for p in plan.requests] == [r.request_id for r in reqs]
    assert len(plan.ids(Decision.MIGRATE_NOW)) <= room
    for p, r in zip(plan.requests, reqs, strict=True):
        fits = NOW + (r.max_tokens - r.emitted) * spt <= NOW + notice - 5.0
        assert (p.decision is Decision.FINISH_IN_PLACE) == fits
        if p.decision is Decision.MIGRATE_NOW:
            assert r.continuable
