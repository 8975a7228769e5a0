"""Restart back-off policy: pure, so time is just a number here."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from albatross.core.backoff import Backoff


def run_all(policy: Backoff, runs: list[tuple[bool, float]]) -> list[tuple[float, bool]]:
    """Feed runs (came up?, seconds until down); collect (delay, was the run stable?)."""
    now = 1000.0
    out = []
    for came_up, length in runs:
        up_at = now
        if came_up:
            policy = policy.up(now)
        now += length
        delay, policy = policy.down(now)
        # Stability judged on the same float arithmetic as the policy's.
        out.append((delay, came_up and now - up_at >= policy.stable_s))
        now += delay
    return out


def delays(policy: Backoff, runs: list[tuple[bool, float]]) -> list[float]:
    return [d for d, _ in run_all(policy, runs)]


def test_doubles_from_initial_to_max() -> None:
    p = Backoff.create(0.5, 4.0)
    assert delays(p, [(False, 0.1)] * 7) == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_short_runs_that_came_up_still_back_off() -> None:
    p = Backoff.create(1.0, 60.0, stable_s=10.0)
    assert delays(p, [(True, 9.9)] * 4) == [1.0, 2.0, 4.0, 8.0]


def test_stable_run_resets_to_initial() -> None:
    p = Backoff.create(1.0, 60.0, stable_s=10.0)
    assert delays(p, [(False, 0), (False, 0), (False, 0), (True, 10.0), (False, 0)]) == [
        1.0,
        2.0,
        4.0,
        1.0,
        2.0,
    ]


def test_stable_default_is_ten_times_initial() -> None:
    assert Backoff.create(0.5, 30.0).stable_s == 5.0


def test_never_up_never_resets_even_after_long_runs() -> None:
    # A process that hung for an hour without getting ready is not "stable".
    p = Backoff.create(1.0, 8.0)
    assert delays(p, [(False, 3600.0)] * 5) == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_is_immutable() -> None:
    p = Backoff.create(1.0, 8.0)
    p.down(5.0)
    p.up(5.0)
    assert p == Backoff.create(1.0, 8.0)


def test_equal_bounds_give_constant_delay() -> None:
    assert delays(Backoff.create(2.0, 2.0), [(False, 0)] * 3) == [2.0, 2.0, 2.0]


def test_counter_stops_growing_at_the_cap() -> None:
    p = Backoff.create(1.0, 4.0)
    for _ in range(10_000):
        _, p = p.down(0.0)
    assert p.failures == 2


@pytest.mark.parametrize(
    ("initial", "maximum", "stable", "field"),
    [(0.0, 1.0, None, "initial_s"), (2.0, 1.0, None, "max_s"), (1.0, 2.0, 0.0, "stable_s")],
)
def test_rejects_bad_bounds_naming_the_field(
    initial: float, maximum: float, stable: float | None, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        Backoff.create(initial, maximum, stable)


@given(
    initial=st.floats(min_value=1e-3, max_value=10.0),
    factor=st.floats(min_value=1.0, max_value=1e4),
    runs=st.lists(st.tuples(st.booleans(), st.floats(min_value=0.0, max_value=1e5)), max_size=60),
)
def test_delays_bounded_and_monotone_until_reset(
    initial: float, factor: float, runs: list[tuple[bool, float]]
) -> None:
    p = Backoff.create(initial, initial * factor)
    got = run_all(p, runs)
    for i, (d, stable) in enumerate(got):
        assert p.initial_s <= d <= p.max_s
        if stable:
            assert d == p.initial_s  # a stable run resets
        elif i > 0:
            assert d >= got[i - 1][0]  # otherwise never shrinks
