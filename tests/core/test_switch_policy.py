"""Switch settings validation, the cost history and the pure choosers."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from albatross.core.eviction import (
    EngineKind,
    EvictionPolicy,
    EvictionPolicyError,
    Process,
    Weights,
)
from albatross.core.switch_policy import (
    CostHistory,
    ModelSpec,
    Phase,
    Policy,
    Resident,
    SettingsError,
    SwitchSettings,
    Waiting,
    choose_target,
    choose_victims,
)

L1 = EvictionPolicy(Weights.OFFLOAD, Process.KEEP_RUNNING)


def spec(name: str = "a", gib: float = 10, **kw: Any) -> ModelSpec:
    return ModelSpec(name, EngineKind.VLLM, kw.pop("eviction", L1), gib, **kw)


@pytest.mark.parametrize(
    ("models", "kw", "message"),
    [
        ((), {}, "models = (): at least one model is needed"),
        ((spec("a"), spec("a")), {}, "names must be unique; repeated: a"),
        ((spec(gib=0),), {}, "models['a'].footprint_gib = 0: must be > 0"),
        ((spec(gib=11),), {}, "models['a'].footprint_gib = 11: must fit the budget of GPU '0'"),
        ((spec(gpu="7"),), {}, "models['a'].gpu = '7': no memory budget for that GPU"),
        ((spec(),), {"min_active_s": -1}, "min_active_s = -1: must be >= 0"),
        ((spec(),), {"coalesce_s": 40, "max_wait_s": 30}, "coalesce_s (40) <= max_wait_s (30)"),
        ((spec(),), {"max_wait_s": 90}, "max_wait_s (90) <= queue_timeout_s (60.0)"),
        ((spec(),), {"cost_alpha": 0}, "cost_alpha = 0: must be in (0, 1]"),
        ((spec(),), {"max_wake_attempts": 0}, "max_wake_attempts = 0: must be >= 1"),
        (
            (spec("a", 6, pinned=True), spec("b", 6, pinned=True)),
            {},
            "the pinned and resident models on it need 12 GiB together",
        ),
        (
            (
                spec("a", 6, eviction=EvictionPolicy(Weights.RETAIN, Process.KEEP_RUNNING)),
                spec("b", 6),
            ),
            {},
            "models['b'].footprint_gib = 6: cannot fit next to the resident models",
        ),
    ],
)
def test_settings_errors_name_the_key_the_value_and_the_rule(
    models: tuple[ModelSpec, ...], kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        SwitchSettings(models, {"0": 10}, **kw)


def test_an_impossible_eviction_policy_is_rejected_at_start() -> None:
    bad = EvictionPolicy(Weights.OFFLOAD, Process.KEEP_RUNNING)
    with pytest.raises(EvictionPolicyError, match="model 'x' \\(engine llama-server\\)"):
        SwitchSettings((ModelSpec("x", EngineKind.LLAMA_SERVER, bad, 1),), {"0": 10})


def test_settings_are_frozen_values() -> None:
    s = SwitchSettings((spec(),), {"0": 10})
    with pytest.raises(TypeError):
        s.gpu_budget_gib["0"] = 99  # type: ignore[index]
    assert s.spec("a").footprint_gib == 10


def test_cost_history_starts_at_the_prior_and_moves_by_alpha() -> None:
    h = CostHistory.from_settings(
        SwitchSettings((spec(wake_prior_s=10),), {"0": 10}, cost_alpha=0.25)
    )
    assert h.estimate("a", Phase.WAKE) == 10
    h2 = h.measured("a", Phase.WAKE, 30)
    assert h2.estimate("a", Phase.WAKE) == 15
    assert h.estimate("a", Phase.WAKE) == 10  # a value
    assert h2.measured("a", Phase.WAKE, -5).estimate("a", Phase.WAKE) == 11.25  # clamped at 0


@given(st.floats(0, 100), st.lists(st.floats(0, 100), min_size=1, max_size=20), st.floats(0.01, 1))
def test_the_estimate_stays_within_the_prior_and_the_measurements(
    prior: float, samples: list[float], alpha: float
) -> None:
    h = CostHistory(alpha, {("m", Phase.WAKE): prior})
    for x in samples:
        h = h.measured("m", Phase.WAKE, x)
    lo, hi = min([prior, *samples]), max([prior, *samples])
    assert lo - 1e-6 <= h.estimate("m", Phase.WAKE) <= hi + 1e-6


def r(
    name: str, gib: float = 5, since: float = 0, used: float = 0, busy: int = 0, ok: bool = True
) -> Resident:
    return Resident(name, gib, ok, since, used, busy)


def test_victims_lru_idle_first_and_only_as_many_as_needed() -> None:
    cands = [r("a", used=5), r("b", used=1, busy=1), r("c", used=3)]
    assert choose_victims(5, 0, cands, now=100, min_active_s=0) == ("c",)
    assert choose_victims(10, 0, cands, now=100, min_active_s=0) == ("c", "a")
    assert choose_victims(15, 0, cands, now=100, min_active_s=0) == ("c", "a", "b")
    assert choose_victims(5, 5, cands, now=100, min_active_s=0) == ()


def test_victims_respect_pins_and_the_minimum_active_time() -> None:
    cands = [r("pinned", ok=False), r("young", since=95)]
    assert choose_victims(5, 0, cands, now=100, min_active_s=10) is None
    assert choose_victims(5, 0, cands, now=105, min_active_s=10) == ("young",)


def w(
    model: str,
    oldest: float,
    count: int = 1,
    cost: float = 1,
    busy: bool = True,
    forced: bool = False,
) -> Waiting:
    return Waiting(model, oldest, count, cost, busy, forced)


def test_fifo_is_oldest_first_and_never_waits() -> None:
    ws = [w("b", 2, count=9), w("c", 1)]
    assert choose_target(ws, 2, Policy.FIFO, coalesce_s=5, max_wait_s=30) == "c"


def test_cost_aware_waits_for_the_window_unless_nobody_is_busy() -> None:
    assert choose_target([w("b", 0)], 4, Policy.COST_AWARE, 5, 30) is None
    assert choose_target([w("b", 0)], 5, Policy.COST_AWARE, 5, 30) == "b"
    assert choose_target([w("b", 0, busy=False)], 0, Policy.COST_AWARE, 5, 30) == "b"
    assert choose_target([w("b", 0, forced=True)], 0, Policy.COST_AWARE, 5, 30) == "b"


def test_cost_aware_urgent_first_then_requests_per_second() -> None:
    ws = [w("cheap", 10, count=2, cost=1), w("dear", 10, count=4, cost=8), w("old", 0, cost=26)]
    assert choose_target(ws, 15, Policy.COST_AWARE, 5, 30) == "old"  # 15 + 26 >= 30
    assert choose_target(ws[:2], 15, Policy.COST_AWARE, 5, 30) == "cheap"  # 2/1 > 4/8
