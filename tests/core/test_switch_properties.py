"""Invariants of the switch scheduler under random traffic, on a virtual clock.

A small discrete-event simulation plays the runtime: it performs every action the
scheduler returns (a wake or sleep takes a drawn time and may fail, an admitted stream
runs for a drawn time) and feeds the outcome back as an event, ticking at
``wakeup_at``. Hypothesis draws the models, the budget, the policy and the traffic.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from albatross.core.eviction import EngineKind, EvictionPolicy, Process, Weights
from albatross.core.switch import ModelState, SwitchScheduler
from albatross.core.switch_events import (
    Admit,
    Event,
    Fail,
    PinRequested,
    QueueTimeout,
    RequestArrived,
    RequestFinished,
    Sleep,
    SleepCompleted,
    SleepFailed,
    SleepRequested,
    StartDrain,
    SwitchConflict,
    SwitchRequested,
    Tick,
    TimeOut,
    UnpinRequested,
    Wake,
    WakeCompleted,
    WakeFailed,
    WakeRequested,
)
from albatross.core.switch_policy import ModelSpec, Policy, SettingsError, SwitchSettings

EPS = 1e-9
POLICIES = [
    EvictionPolicy(Weights.OFFLOAD, Process.KEEP_RUNNING),
    EvictionPolicy(Weights.DISCARD, Process.KEEP_RUNNING),
    EvictionPolicy(Weights.DISCARD, Process.STOP),
    EvictionPolicy(Weights.RETAIN, Process.KEEP_RUNNING),
]


@st.composite
def switch_settings(draw: st.DrawFn) -> SwitchSettings:
    n = draw(st.integers(2, 4))
    gpus = draw(st.sampled_from([("0",), ("0", "1")]))
    models = tuple(
        ModelSpec(
            name=f"m{i}",
            engine=EngineKind.VLLM,
            eviction=draw(st.sampled_from(POLICIES[:3] if i == 0 else POLICIES)),
            footprint_gib=draw(st.sampled_from([2.0, 4.0, 6.0, 10.0])),
            gpu=draw(st.sampled_from(gpus)),
            pinned=draw(st.booleans()) and draw(st.booleans()),
            wake_prior_s=draw(st.sampled_from([0.0, 3.0, 20.0])),
        )
        for i in range(n)
    )
    timeout = draw(st.sampled_from([20.0, 60.0]))
    try:
        return SwitchSettings(
            models,
            {g: 10.0 for g in gpus},
            policy=draw(st.sampled_from(list(Policy))),
            queue_timeout_s=timeout,
            min_active_s=draw(st.sampled_from([0.0, 5.0, 15.0])),
            coalesce_s=draw(st.sampled_from([0.0, 2.0, 8.0])),
            max_wait_s=timeout,
            max_wake_attempts=draw(st.integers(1, 3)),
        )
    except SettingsError:
        assume(False)
        raise


@dataclass
class Sim:
    """Plays the runtime and checks invariants after every event."""

    sched: SwitchScheduler
    durations: list[float]
    failures: list[bool]
    controls: bool = False
    heap: list[tuple[float, int, Event]] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    stream_s: dict[str, float] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)
    outcome: dict[str, list[str]] = field(default_factory=dict)
    streaming: dict[str, set[str]] = field(default_factory=dict)
    woke_at: dict[str, float] = field(default_factory=dict)
    draws: int = 0
    now: float = 0.0

    def at(self, t: float, ev: Event) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), ev))

    def draw(self) -> tuple[float, bool]:
        i = self.draws
        self.draws += 1
        return self.durations[i % len(self.durations)], self.failures[i % len(self.failures)]

    def run(self) -> None:
        for _ in range(20_000):
            w = self.sched.wakeup_at()
            if self.heap and (w is None or self.heap[0][0] <= w):
                t, _, ev = heapq.heappop(self.heap)
            elif w is not None:
                t, ev = w, Tick(w)
            else:
                return
            self.now = t
            self.step(ev)
        raise AssertionError("the simulation did not settle")

    def step(self, ev: Event) -> None:
        if isinstance(ev, RequestArrived):
            self.arrived[ev.request_id] = ev.now
        if isinstance(ev, RequestFinished):
            for s in self.streaming.values():
                s.discard(ev.request_id)
        try:
            actions = self.sched.handle(ev)
        except SwitchConflict:
            assert isinstance(ev, SleepRequested | WakeRequested | SwitchRequested)
            return
        s = self.sched
        if isinstance(ev, WakeCompleted):
            self.woke_at[ev.model] = self.now
        for gpu, budget in s.settings.gpu_budget_gib.items():
            assert s.resident_gib(gpu) <= budget + EPS, "more resident than the budget allows"
        for i, a in enumerate(actions):
            if isinstance(a, Admit):
                # Awake when admitted: still awake, or drained by a later action of this step.
                later = [x for x in actions[i:] if isinstance(x, StartDrain) and x.model == a.model]
                assert s.state(a.model) is ModelState.AWAKE or (
                    s.state(a.model) is ModelState.DRAINING and later
                )
                assert a.waited_s <= s.settings.queue_timeout_s + EPS
                self.outcome.setdefault(a.request_id, []).append("admit")
                self.streaming.setdefault(a.model, set()).add(a.request_id)
                self.at(self.now + self.stream_s[a.request_id], RequestFinished(0, a.request_id))
            elif isinstance(a, TimeOut):
                assert isinstance(a.error, QueueTimeout)
                waited = self.now - self.arrived[a.request_id]
                assert abs(waited - s.settings.queue_timeout_s) < EPS  # ticked at the deadline
                self.outcome.setdefault(a.request_id, []).append("timeout")
            elif isinstance(a, Fail):
                self.outcome.setdefault(a.request_id, []).append("fail")
            elif isinstance(a, Sleep):
                assert not self.streaming.get(a.model), "evicted a model with streams in flight"
                spec = s.settings.spec(a.model)
                assert not spec.eviction.resident
                if not self.controls:
                    assert not s.pinned(a.model)
                    awake_for = self.now - self.woke_at[a.model]
                    assert awake_for >= s.settings.min_active_s - EPS, "thrashing"
                d, fails = self.draw()
                if fails and not a.fallback:
                    self.at(self.now + d, SleepFailed(0, a.model, "sleep failed"))
                else:
                    self.at(self.now + d, SleepCompleted(0, a.model, d))
            elif isinstance(a, Wake):
                d, fails = self.draw()
                if fails:
                    self.at(self.now + d, WakeFailed(0, a.model, d, "wake failed"))
                else:
                    self.at(self.now + d, WakeCompleted(0, a.model, d))

    def check_end(self) -> None:
        s = self.sched
        assert s.queued() == [], "a request was left waiting"
        assert all(not v for v in self.streaming.values())
        for rid in self.arrived:
            assert len(self.outcome.get(rid, [])) == 1, (rid, self.outcome.get(rid))


def fix_times(ev: Event, t: float) -> Event:
    """Events are queued with now=0 and stamped when delivered."""
    return type(ev)(t, *[getattr(ev, f) for f in ev.__dataclass_fields__ if f != "now"])


class StampedSim(Sim):
    def step(self, ev: Event) -> None:
        super().step(fix_times(ev, self.now))


traffic = st.lists(
    st.tuples(
        st.floats(0, 120, allow_nan=False).map(lambda x: round(x, 1)),
        st.integers(0, 3),
        st.floats(0, 30, allow_nan=False).map(lambda x: round(x, 1)),
    ),
    min_size=1,
    max_size=40,
)
durations = st.lists(st.floats(0.1, 25, allow_nan=False), min_size=1, max_size=8)


def simulate(
    cfg: SwitchSettings,
    reqs: list[tuple[float, int, float]],
    durs: list[float],
    fails: list[bool],
    controls: list[tuple[float, int, int]] = (),  # type: ignore[assignment]
) -> StampedSim:
    sim = StampedSim(SwitchScheduler(cfg), durs, fails, controls=bool(controls))
    names = [m.name for m in cfg.models]
    for i, (t, m, length) in enumerate(reqs):
        rid = f"r{i}"
        sim.stream_s[rid] = length
        sim.at(t, RequestArrived(0, rid, names[m % len(names)]))
    kinds = [PinRequested, UnpinRequested, SleepRequested, WakeRequested, SwitchRequested]
    for t, k, m in controls:
        sim.at(t, kinds[k](0, names[m % len(names)]))
    sim.run()
    return sim


slow = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)


@slow
@given(switch_settings(), traffic, durations)
def test_every_request_is_admitted_or_timed_out_within_budget_and_without_thrashing(
    cfg: SwitchSettings, reqs: list[tuple[float, int, float]], durs: list[float]
) -> None:
    sim = simulate(cfg, reqs, durs, [False])
    sim.check_end()
    outcomes = [o[0] for o in sim.outcome.values()]
    assert "fail" not in outcomes  # nothing failed, so nothing is answered 503


@slow
@given(switch_settings(), traffic, durations, st.lists(st.booleans(), min_size=1, max_size=8))
def test_invariants_hold_when_wakes_and_sleeps_fail(
    cfg: SwitchSettings,
    reqs: list[tuple[float, int, float]],
    durs: list[float],
    fails: list[bool],
) -> None:
    simulate(cfg, reqs, durs, fails).check_end()


@slow
@given(
    switch_settings(),
    traffic,
    durations,
    st.lists(
        st.tuples(
            st.floats(0, 120).map(lambda x: round(x, 1)), st.integers(0, 4), st.integers(0, 3)
        ),
        max_size=10,
    ),
)
def test_invariants_hold_under_control_commands(
    cfg: SwitchSettings,
    reqs: list[tuple[float, int, float]],
    durs: list[float],
    controls: list[tuple[float, int, int]],
) -> None:
    simulate(cfg, reqs, durs, [False], controls).check_end()


def test_a_lone_model_serves_every_request_in_order() -> None:
    """A concrete run of the simulation, so a broken simulator cannot pass silently."""
    cfg = SwitchSettings(
        (ModelSpec("a", EngineKind.VLLM, POLICIES[0], 10.0),), {"0": 10.0}, min_active_s=0
    )
    sim = simulate(cfg, [(0, 0, 5), (1, 0, 5), (2, 0, 5)], [3.0], [False])
    sim.check_end()
    assert all(o == ["admit"] for o in sim.outcome.values())
    assert sim.sched.state("a") is ModelState.AWAKE


@slow
@given(
    switch_settings(),
    st.lists(st.tuples(st.integers(0, 3), st.floats(0, 2)), min_size=1, max_size=12),
    st.lists(st.floats(0.1, 2), min_size=1, max_size=4),
)
def test_sparse_traffic_is_always_served(
    cfg: SwitchSettings, reqs: list[tuple[int, float]], durs: list[float]
) -> None:
    """Liveness: with no pins and requests far enough apart, nobody times out."""
    assume(not any(m.pinned for m in cfg.models))
    assume(cfg.min_active_s == 0.0)
    spaced = [(i * 20.0, m, length) for i, (m, length) in enumerate(reqs)]
    sim = simulate(cfg, spaced, durs, [False])
    sim.check_end()
    assert all(o == ["admit"] for o in sim.outcome.values()), sim.outcome


def test_alternating_traffic_switches_and_serves_everyone() -> None:
    cfg = SwitchSettings(
        (
            ModelSpec("a", EngineKind.VLLM, POLICIES[0], 10.0),
            ModelSpec("b", EngineKind.VLLM, POLICIES[1], 10.0),
        ),
        {"0": 10.0},
        min_active_s=0,
        coalesce_s=0,
    )
    reqs = [(4.0 * i, i % 2, 1.0) for i in range(10)]
    sim = simulate(cfg, reqs, [0.5], [False])
    sim.check_end()
    assert all(o == ["admit"] for o in sim.outcome.values())
    assert sim.draws == 2 * len(reqs) - 1  # every request after the first: a sleep and a wake
