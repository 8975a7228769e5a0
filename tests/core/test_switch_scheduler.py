"""The switch scheduler on a virtual clock: every scenario is a list of events and the
actions they produce; time is just a number here."""

from __future__ import annotations

from typing import Any

import pytest

from albatross.core import switch
from albatross.core.errors import ModelNotFound
from albatross.core.eviction import (
    STOP,
    EngineKind,
    EvictionPolicy,
    Process,
    Step,
    Weights,
)
from albatross.core.switch import ModelState, Move, SwitchScheduler
from albatross.core.switch_events import (
    Action,
    Admit,
    Event,
    Fail,
    GiveUpWake,
    Hold,
    IllegalTransition,
    PinRequested,
    QueueTimeout,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    Sleep,
    SleepCompleted,
    SleepFailed,
    SleepRequested,
    StartDrain,
    SwitchConflict,
    SwitchDone,
    SwitchRequested,
    SwitchResult,
    Tick,
    TimeOut,
    Undrain,
    UnpinRequested,
    Wake,
    WakeCompleted,
    WakeFailed,
    WakeGaveUp,
    WakeRequested,
)
from albatross.core.switch_policy import ModelSpec, Phase, Policy, SwitchSettings

L1 = EvictionPolicy(Weights.OFFLOAD, Process.KEEP_RUNNING)
L2 = EvictionPolicy(Weights.DISCARD, Process.KEEP_RUNNING)
RESIDENT = EvictionPolicy(Weights.RETAIN, Process.KEEP_RUNNING)


def spec(name: str, gib: float = 10, eviction: EvictionPolicy = L1, **kw: Any) -> ModelSpec:
    return ModelSpec(name, EngineKind.VLLM, eviction, gib, **kw)


def make(*models: ModelSpec, budget: float = 10, **kw: Any) -> SwitchScheduler:
    kw.setdefault("min_active_s", 0.0)
    kw.setdefault("coalesce_s", 0.0)
    return SwitchScheduler(SwitchSettings(tuple(models), {"0": budget}, **kw))


def of(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def awake(s: SwitchScheduler, model: str, t: float = 0.0) -> None:
    """Bring ``model`` up through the scheduler with a request that finishes at once."""
    rid = f"boot-{model}-{t}"
    acts = s.handle(RequestArrived(t, rid, model))
    assert of(acts, Wake), acts
    s.handle(WakeCompleted(t, model, 1.0))
    s.handle(RequestFinished(t, rid))
    assert s.state(model) is ModelState.AWAKE


# ---- the state table -------------------------------------------------------------------


def test_table_lists_the_documented_moves() -> None:
    S, M = ModelState, Move
    assert switch._TABLE == {
        (S.ASLEEP, M.WAKE): S.WAKING,
        (S.WAKING, M.WOKE): S.AWAKE,
        (S.WAKING, M.WAKE_FAILED): S.ASLEEP,
        (S.AWAKE, M.DRAIN): S.DRAINING,
        (S.DRAINING, M.UNDRAIN): S.AWAKE,
        (S.AWAKE, M.EVICT): S.EVICTING,
        (S.DRAINING, M.EVICT): S.EVICTING,
        (S.EVICTING, M.SLEPT): S.ASLEEP,
        (S.EVICTING, M.SLEEP_FAILED): S.EVICTING,
    }


@pytest.mark.parametrize(
    "event",
    [
        WakeCompleted(1, "a", 1.0),
        WakeFailed(1, "a", 1.0, "boom"),
        SleepCompleted(1, "a", 1.0),
        SleepFailed(1, "a", "boom"),
        RequestFinished(1, "never-admitted"),
    ],
)
def test_an_event_that_does_not_fit_raises_and_changes_nothing(event: Event) -> None:
    s = make(spec("a"), spec("b"))
    s.handle(RequestArrived(0, "r1", "b"))  # b is waking, a asleep
    before = (s.state("a"), s.state("b"), s.queued(), s.wakeup_at())
    with pytest.raises(IllegalTransition):
        s.handle(event)
    assert (s.state("a"), s.state("b"), s.queued(), s.wakeup_at()) == before


def test_a_request_id_twice_is_refused() -> None:
    s = make(spec("a"))
    s.handle(RequestArrived(0, "r1", "a"))
    with pytest.raises(IllegalTransition, match="twice"):
        s.handle(RequestArrived(0, "r1", "a"))
    assert s.queued() == [("r1", "a")]


def test_an_unknown_model_is_a_404_naming_the_known_ones() -> None:
    s = make(spec("a"), spec("b"))
    with pytest.raises(ModelNotFound) as e:
        s.handle(RequestArrived(0, "r1", "zzz"))
    assert e.value.status == 404
    assert "'zzz'" in e.value.message and "a, b" in e.value.message
    assert s.queued() == []


# ---- serving -----------------------------------------------------------------------------


def test_first_request_cold_starts_its_model_then_is_admitted() -> None:
    s = make(spec("a"))
    acts = s.handle(RequestArrived(0, "r1", "a"))
    assert acts == [Hold("r1", "a", 60.0), Wake("a", (Step.START_PROCESS,), 1)]
    assert s.state("a") is ModelState.WAKING
    acts = s.handle(WakeCompleted(4.0, "a", 4.0))
    assert of(acts, Admit) == [Admit("r1", "a", 4.0)]
    assert s.in_flight("a") == 1


def test_a_request_for_an_awake_model_is_admitted_at_once() -> None:
    s = make(spec("a"))
    awake(s, "a")
    assert s.handle(RequestArrived(5, "r2", "a")) == [Admit("r2", "a", 0.0)]


def test_request_for_b_while_a_streams_a_finishes_then_b_is_served() -> None:
    """The issue's scenario: A's stream completes, B is served after the switch, no error."""
    s = make(spec("a"), spec("b"))
    awake(s, "a")
    assert s.handle(RequestArrived(1, "ra", "a")) == [Admit("ra", "a", 0.0)]
    acts = s.handle(RequestArrived(2, "rb", "b"))
    assert acts == [Hold("rb", "b", 62.0), StartDrain("a", 1, "b")]
    # While a's stream runs, a is never put to sleep, however much time passes.
    for t in (3, 10, 50):
        assert not of(s.handle(Tick(t)), Sleep)
    assert s.state("a") is ModelState.DRAINING
    acts = s.handle(RequestFinished(55, "ra"))
    assert acts == [Sleep("a", L1, (Step.VLLM_SLEEP_1,))]
    acts = s.handle(SleepCompleted(56, "a", 1.0))
    assert acts == [Wake("b", (Step.START_PROCESS,), 1)]
    acts = s.handle(WakeCompleted(59, "b", 3.0))
    assert of(acts, Admit) == [Admit("rb", "b", 57.0)]
    assert of(acts, SwitchDone) == [
        SwitchDone(
            ("a",), "b", SwitchResult.OK, {Phase.DRAIN: 53.0, Phase.SLEEP: 1.0, Phase.WAKE: 3.0}
        )
    ]
    assert not of(acts, TimeOut) and not of(acts, Fail)


def test_requests_for_a_draining_model_wait_and_are_served_after_switching_back() -> None:
    s = make(spec("a"), spec("b"))
    awake(s, "a")
    s.handle(RequestArrived(1, "ra", "a"))
    s.handle(RequestArrived(2, "rb", "b"))
    assert s.handle(RequestArrived(3, "ra2", "a")) == [Hold("ra2", "a", 63.0)]
    s.handle(RequestFinished(4, "ra"))
    s.handle(SleepCompleted(5, "a", 1.0))
    s.handle(WakeCompleted(6, "b", 1.0))
    # b's request is admitted; a's waiting request now makes b drain in turn (FIFO).
    assert s.state("b") is ModelState.DRAINING
    acts = s.handle(RequestFinished(7, "rb"))
    assert of(acts, Sleep) == [Sleep("b", L1, (Step.VLLM_SLEEP_1,))]
    acts = s.handle(SleepCompleted(8, "b", 1.0))
    assert acts == [Wake("a", (Step.VLLM_WAKE_UP,), 1)]  # a was slept at level 1
    acts = s.handle(WakeCompleted(9, "a", 1.0))
    assert of(acts, Admit) == [Admit("ra2", "a", 6.0)]


def test_models_that_fit_together_are_awake_together() -> None:
    s = make(spec("a"), spec("b"), budget=20)
    awake(s, "a")
    s.handle(RequestArrived(1, "ra", "a"))
    acts = s.handle(RequestArrived(2, "rb", "b"))
    assert acts == [Hold("rb", "b", 62.0), Wake("b", (Step.START_PROCESS,), 1)]
    s.handle(WakeCompleted(3, "b", 1.0))
    assert sorted(s.awake()) == ["a", "b"]
    assert s.resident_gib("0") == 20


def test_the_least_recently_used_idle_model_is_evicted() -> None:
    s = make(spec("a"), spec("b"), spec("c"), budget=20)
    awake(s, "a", 0)
    awake(s, "b", 1)
    s.handle(RequestArrived(2, "ra", "a"))
    s.handle(RequestFinished(3, "ra"))  # a used last
    acts = s.handle(RequestArrived(4, "rc", "c"))
    assert of(acts, Sleep) == [Sleep("b", L1, (Step.VLLM_SLEEP_1,))]


def test_an_idle_model_is_evicted_before_a_busy_one() -> None:
    s = make(spec("a"), spec("b"), spec("c"), budget=20)
    awake(s, "a", 0)
    awake(s, "b", 1)
    s.handle(RequestArrived(2, "ra", "a"))  # a busy
    s.handle(RequestArrived(3, "rb", "b"))
    s.handle(RequestFinished(4, "rb"))  # b idle, used more recently than a
    acts = s.handle(RequestArrived(5, "rc", "c"))
    assert of(acts, Sleep) == [Sleep("b", L1, (Step.VLLM_SLEEP_1,))]
    assert not of(acts, StartDrain)


def test_several_small_models_are_evicted_for_a_big_one() -> None:
    s = make(spec("a", 5), spec("b", 5), spec("big", 10), budget=10)
    awake(s, "a", 0)
    awake(s, "b", 1)
    acts = s.handle(RequestArrived(2, "r", "big"))
    assert sorted(x.model for x in of(acts, Sleep)) == ["a", "b"]
    assert not of(s.handle(SleepCompleted(3, "a", 1)), Wake)  # b still holds memory
    assert of(s.handle(SleepCompleted(3, "b", 1)), Wake)


def test_a_resident_policy_model_is_never_evicted() -> None:
    s = make(spec("a", 5, RESIDENT), spec("b", 5), spec("c", 5), budget=10)
    awake(s, "a", 0)
    awake(s, "b", 1)
    acts = s.handle(RequestArrived(2, "rc", "c"))
    assert [x.model for x in of(acts, Sleep)] == ["b"]


# ---- queue time-outs -------------------------------------------------------------------


def test_a_request_that_waits_too_long_gets_a_clear_504() -> None:
    s = make(spec("a"), spec("b", pinned=True), queue_timeout_s=30, max_wait_s=30)
    awake(s, "b")
    s.handle(RequestArrived(1, "ra", "a"))
    assert s.wakeup_at() == 31
    acts = s.handle(Tick(31))
    (t,) = of(acts, TimeOut)
    assert (t.request_id, t.model) == ("ra", "a")
    assert isinstance(t.error, QueueTimeout) and t.error.status == 504
    assert t.error.message == (
        "model 'a' was not ready in time: the request waited 30.0 s in the queue (limit 30 s); "
        "model 'a' needs 10 GiB but only 0 of 10 GiB are free on GPU '0' (pinned or resident models)"
    )
    assert s.queued() == []


def test_unpinning_lets_the_waiting_model_in() -> None:
    s = make(spec("a"), spec("b", pinned=True))
    awake(s, "b")
    assert not of(s.handle(RequestArrived(1, "ra", "a")), Sleep)
    acts = s.handle(UnpinRequested(2, "b"))
    assert of(acts, Sleep) == [Sleep("b", L1, (Step.VLLM_SLEEP_1,))]


def test_a_request_whose_model_wakes_at_its_deadline_is_served() -> None:
    s = make(spec("a"), queue_timeout_s=10, max_wait_s=10)
    s.handle(RequestArrived(0, "r", "a"))
    acts = s.handle(WakeCompleted(10, "a", 10))
    assert of(acts, Admit) == [Admit("r", "a", 10)]
    assert not of(acts, TimeOut)


def test_a_cancelled_request_leaves_the_queue_and_the_switch_for_it_is_abandoned() -> None:
    s = make(spec("a"), spec("b"))
    awake(s, "a")
    s.handle(RequestArrived(1, "ra", "a"))
    s.handle(RequestArrived(2, "rb", "b"))
    assert s.state("a") is ModelState.DRAINING
    acts = s.handle(RequestCancelled(3, "rb"))
    assert acts == [Undrain("a"), SwitchDone(("a",), "b", SwitchResult.ABANDONED, {})]
    assert s.state("a") is ModelState.AWAKE
    assert s.handle(RequestArrived(4, "ra2", "a")) == [Admit("ra2", "a", 0.0)]
    assert s.handle(RequestCancelled(5, "unknown")) == []


# ---- thrashing and cost-aware switching ------------------------------------------------


def test_a_model_stays_awake_for_the_minimum_active_time() -> None:
    s = make(spec("a"), spec("b"), min_active_s=10)
    awake(s, "a", 0)
    assert not of(s.handle(RequestArrived(1, "rb", "b")), Sleep)
    assert s.wakeup_at() == 10
    assert not of(s.handle(Tick(9.99)), Sleep)
    assert of(s.handle(Tick(10)), Sleep) == [Sleep("a", L1, (Step.VLLM_SLEEP_1,))]


def test_cost_aware_coalesces_requests_before_interrupting_a_busy_model() -> None:
    s = make(spec("a"), spec("b"), policy=Policy.COST_AWARE, coalesce_s=5, max_wait_s=30)
    awake(s, "a")
    s.handle(RequestArrived(0, "ra", "a"))
    assert s.handle(RequestArrived(1, "rb1", "b")) == [Hold("rb1", "b", 61)]
    assert s.wakeup_at() == 6
    assert s.handle(RequestArrived(2, "ra2", "a")) == [Admit("ra2", "a", 0.0)]  # a keeps serving
    s.handle(RequestArrived(3, "rb2", "b"))
    acts = s.handle(Tick(6))
    assert acts == [StartDrain("a", 2, "b")]
    s.handle(RequestFinished(7, "ra"))
    s.handle(RequestFinished(8, "ra2"))
    s.handle(SleepCompleted(9, "a", 1))
    acts = s.handle(WakeCompleted(10, "b", 1))
    assert [a.request_id for a in of(acts, Admit)] == ["rb1", "rb2"]  # one switch for both


def test_cost_aware_switches_at_once_when_the_awake_model_is_idle() -> None:
    s = make(spec("a"), spec("b"), policy=Policy.COST_AWARE, coalesce_s=5, max_wait_s=30)
    awake(s, "a")
    acts = s.handle(RequestArrived(1, "rb", "b"))
    assert of(acts, Sleep) == [Sleep("a", L1, (Step.VLLM_SLEEP_1,))]


def test_cost_aware_does_not_hold_back_past_the_maximum_wait() -> None:
    s = make(
        spec("a", sleep_prior_s=0),
        spec("b", wake_prior_s=25),
        policy=Policy.COST_AWARE,
        coalesce_s=10,
        max_wait_s=30,
    )
    awake(s, "a")
    s.handle(RequestArrived(0, "ra", "a"))
    s.handle(RequestArrived(0, "rb", "b"))
    assert s.wakeup_at() == 5  # 30 s bound minus 25 s of expected wake
    assert s.handle(Tick(5)) == [StartDrain("a", 1, "b")]


def test_cost_aware_prefers_more_requests_per_second_of_switching() -> None:
    s = make(spec("a"), spec("b"), spec("c"), policy=Policy.COST_AWARE, coalesce_s=5)
    awake(s, "a")
    s.handle(RequestArrived(0, "ra", "a"))
    s.handle(RequestArrived(0, "rb", "b"))  # the oldest, but alone
    for i in range(3):
        s.handle(RequestArrived(0, f"rc{i}", "c"))
    assert s.handle(Tick(5)) == [StartDrain("a", 1, "c")]
    s.handle(RequestFinished(6, "ra"))
    acts = s.handle(SleepCompleted(7, "a", 1))
    assert of(acts, Wake) == [Wake("c", (Step.START_PROCESS,), 1)]


def test_fifo_serves_the_oldest_request_first() -> None:
    s = make(spec("a"), spec("b"), spec("c"))
    awake(s, "a")
    s.handle(RequestArrived(0, "ra", "a"))
    s.handle(RequestArrived(0, "rb", "b"))
    for i in range(3):
        s.handle(RequestArrived(1, f"rc{i}", "c"))
    s.handle(RequestFinished(2, "ra"))
    acts = s.handle(SleepCompleted(3, "a", 1))
    assert of(acts, Wake) == [Wake("b", (Step.START_PROCESS,), 1)]


def test_measured_switch_costs_feed_the_estimate() -> None:
    s = make(spec("a", wake_prior_s=10), cost_alpha=0.5)
    s.handle(RequestArrived(0, "r", "a"))
    s.handle(WakeCompleted(20, "a", 20))
    assert s.costs.estimate("a", Phase.WAKE) == 15
    assert s.costs.samples[("a", Phase.WAKE)] == 1


# ---- failures ----------------------------------------------------------------------------


def test_a_failed_wake_is_retried_with_back_off_then_given_up_with_a_clear_503() -> None:
    s = make(spec("a"), max_wake_attempts=3, wake_backoff_initial_s=1, wake_backoff_max_s=8)
    s.handle(RequestArrived(0, "r1", "a"))
    acts = s.handle(WakeFailed(1, "a", 1, "CUDA out of memory"))
    assert of(acts, SwitchDone)[0].result is SwitchResult.FAILED
    assert not of(acts, Wake) and s.wakeup_at() == 2
    assert of(s.handle(Tick(2)), Wake) == [Wake("a", (Step.START_PROCESS,), 2)]
    s.handle(WakeFailed(3, "a", 1, "CUDA out of memory"))
    assert s.wakeup_at() == 5  # doubled
    assert of(s.handle(Tick(5)), Wake) == [Wake("a", (Step.START_PROCESS,), 3)]
    s.handle(RequestArrived(5.5, "r2", "a"))
    acts = s.handle(WakeFailed(6, "a", 1, "CUDA out of memory"))
    (give_up,) = of(acts, GiveUpWake)
    assert give_up.retry_after_s == 4
    assert [(f.request_id, f.error) for f in of(acts, Fail)] == [
        ("r1", give_up.error),
        ("r2", give_up.error),
    ]
    err = give_up.error
    assert isinstance(err, WakeGaveUp) and err.status == 503
    assert err.message == (
        "model 'a' failed to wake 3 times in a row; last error: CUDA out of memory; retry in 4 s"
    )
    assert ("Retry-After", "4") in err.headers
    # During the back-off a new request is answered at once, not queued for nothing.
    (f,) = s.handle(RequestArrived(7, "r3", "a"))
    assert isinstance(f, Fail) and "retry in 3 s" in f.error.message
    # After it, the model is tried again.
    acts = s.handle(RequestArrived(10, "r4", "a"))
    assert of(acts, Wake) == [Wake("a", (Step.START_PROCESS,), 1)]


def test_a_failed_sleep_falls_back_to_stop_and_the_next_wake_is_a_cold_start() -> None:
    s = make(spec("a", eviction=L2), spec("b"))
    awake(s, "a")
    acts = s.handle(RequestArrived(1, "rb", "b"))
    assert of(acts, Sleep) == [Sleep("a", L2, (Step.VLLM_SLEEP_2,))]
    acts = s.handle(SleepFailed(2, "a", "timed out"))
    assert acts == [Sleep("a", STOP, (Step.STOP_PROCESS,), fallback=True)]
    s.handle(SleepCompleted(3, "a", 1))
    s.handle(WakeCompleted(4, "b", 1))
    s.handle(RequestArrived(5, "ra", "a"))
    s.handle(RequestFinished(6, "rb"))
    acts = s.handle(SleepCompleted(7, "b", 1))
    assert of(acts, Wake) == [Wake("a", (Step.START_PROCESS,), 1)]


def test_after_sleep_level_2_a_wake_reloads_weights_and_resets_the_prefix_cache() -> None:
    s = make(spec("a", eviction=L2), spec("b"))
    awake(s, "a")
    s.handle(RequestArrived(1, "rb", "b"))
    s.handle(SleepCompleted(2, "a", 1))
    s.handle(WakeCompleted(3, "b", 1))
    s.handle(RequestFinished(3, "rb"))
    s.handle(RequestArrived(4, "ra", "a"))
    wake = of(s.handle(SleepCompleted(5, "b", 1)), Wake)
    assert wake == [
        Wake(
            "a",
            (Step.VLLM_WAKE_UP, Step.VLLM_RELOAD_WEIGHTS, Step.VLLM_RESET_PREFIX_CACHE),
            1,
        )
    ]


# ---- control API ---------------------------------------------------------------------------


def test_a_pinned_model_cannot_be_put_to_sleep() -> None:
    s = make(spec("a", pinned=True))
    awake(s, "a")
    with pytest.raises(SwitchConflict, match="pinned") as e:
        s.handle(SleepRequested(1, "a"))
    assert e.value.status == 409
    assert s.state("a") is ModelState.AWAKE


def test_control_sleep_drains_then_sleeps() -> None:
    s = make(spec("a"))
    awake(s, "a")
    s.handle(RequestArrived(1, "r", "a"))
    assert s.handle(SleepRequested(2, "a")) == [StartDrain("a", 1, "control")]
    assert s.handle(RequestFinished(3, "r")) == [Sleep("a", L1, (Step.VLLM_SLEEP_1,))]
    s.handle(SleepCompleted(4, "a", 1))
    assert s.state("a") is ModelState.ASLEEP


def test_wake_refuses_when_it_does_not_fit_and_switch_evicts() -> None:
    s = make(spec("a"), spec("b"), min_active_s=100)
    awake(s, "a")
    with pytest.raises(SwitchConflict, match="only 0 of 10 GiB are free"):
        s.handle(WakeRequested(1, "b"))
    assert s.state("b") is ModelState.ASLEEP
    # switch ignores the minimum active time (an operator decision) but not pins.
    assert of(s.handle(SwitchRequested(2, "b")), Sleep) == [Sleep("a", L1, (Step.VLLM_SLEEP_1,))]
    assert of(s.handle(SleepCompleted(3, "a", 1)), Wake) == [Wake("b", (Step.START_PROCESS,), 1)]


def test_switch_refuses_when_pins_leave_no_room() -> None:
    s = make(spec("a", pinned=True), spec("b"))
    awake(s, "a")
    with pytest.raises(SwitchConflict, match="pinned and resident models hold 10 of 10 GiB"):
        s.handle(SwitchRequested(1, "b"))


def test_wake_when_it_fits() -> None:
    s = make(spec("a"), spec("b"), budget=20)
    awake(s, "a")
    assert s.handle(WakeRequested(1, "b")) == [Wake("b", (Step.START_PROCESS,), 1)]
    s.handle(WakeCompleted(2, "b", 1))
    assert sorted(s.awake()) == ["a", "b"]


def test_pinning_a_draining_model_cancels_its_drain() -> None:
    s = make(spec("a"), spec("b"))
    awake(s, "a")
    s.handle(RequestArrived(1, "ra", "a"))
    s.handle(RequestArrived(2, "rb", "b"))
    acts = s.handle(PinRequested(3, "a"))
    assert acts[0] == Undrain("a")
    assert s.state("a") is ModelState.AWAKE and s.pinned("a")
    assert not of(s.handle(RequestFinished(4, "ra")), Sleep)


def test_time_never_goes_backwards() -> None:
    s = make(spec("a"), queue_timeout_s=10, max_wait_s=10)
    s.handle(RequestArrived(100, "r1", "a"))
    s.handle(RequestArrived(50, "r2", "a"))  # computed earlier, delivered later
    assert s.handle(Tick(109)) == []
    assert [a.request_id for a in of(s.handle(Tick(110)), TimeOut)] == ["r1", "r2"]
