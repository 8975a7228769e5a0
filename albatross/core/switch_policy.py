"""Settings of the switch scheduler, its cost history, and the policies that decide.

Theory of operation
-------------------
Models share a GPU by taking turns: a model is *resident* (awake, waking, draining or
being put to sleep: its memory is in use) or *asleep*. The models resident on one GPU
must fit its memory budget together; the scheduler (``core/switch.py``) never starts a
wake that would exceed it. When a model with waiting requests does not fit, others
must be evicted first, and two questions arise, answered here as pure functions that
return a decision:

- **whom to serve next** (:func:`choose_target`): ``fifo`` serves the model of the
  oldest waiting request, as soon as possible. ``cost_aware`` coalesces: a switch that
  interrupts a busy model waits until the oldest request for the target has waited
  ``coalesce_s`` (so several requests are served by one switch), unless waiting longer
  would push it past ``max_wait_s`` given the switch's estimated cost; among models
  whose turn has come it prefers the most waiting requests per second of switch cost,
  and an urgent one (close to ``max_wait_s``) before any other.
- **whom to evict** (:func:`choose_victims`): never a pinned or resident-policy model,
  never one awake for less than ``min_active_s`` (no thrashing: a model that was just
  woken serves at least that long); idle ones before busy ones (a busy one must drain
  first), least recently used first, as few as fit the target.

The switch cost is estimated from measured history: an exponentially weighted moving
average per (model, phase), starting from the configured prior
(:class:`CostHistory`). All times are seconds on the caller's monotonic clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

from albatross.core.eviction import EngineKind, EvictionPolicy, HostTools, validate


class Policy(StrEnum):
    FIFO = "fifo"
    COST_AWARE = "cost_aware"


class Phase(StrEnum):
    DRAIN = "drain"
    SLEEP = "sleep"
    WAKE = "wake"


class SettingsError(ValueError):
    """A switch setting breaks a rule; the message names the key, the value and the rule."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model behind the endpoint."""

    name: str
    engine: EngineKind
    eviction: EvictionPolicy
    footprint_gib: float
    """GPU memory the model holds while resident (weights + KV cache + runtime)."""
    gpu: str = "0"
    pinned: bool = False
    """Pinned at start (the control API can unpin it): never evicted."""
    wake_prior_s: float = 10.0
    """Expected wake time before any was measured."""
    sleep_prior_s: float = 2.0


@dataclass(frozen=True, slots=True)
class SwitchSettings:
    """Everything the scheduler needs; validated on construction, frozen after."""

    models: tuple[ModelSpec, ...]
    gpu_budget_gib: Mapping[str, float]
    policy: Policy = Policy.FIFO
    queue_timeout_s: float = 60.0
    """A request waits at most this long for its model; then it is answered 504."""
    min_active_s: float = 10.0
    coalesce_s: float = 2.0
    max_wait_s: float = 30.0
    cost_alpha: float = 0.3
    """Weight of the newest measurement in the switch-cost average."""
    max_wake_attempts: int = 3
    wake_backoff_initial_s: float = 1.0
    wake_backoff_max_s: float = 30.0
    tools: HostTools = field(default_factory=HostTools)

    def __post_init__(self) -> None:
        # A read-only copy: the settings are a value, shared by whoever holds them.
        object.__setattr__(self, "gpu_budget_gib", MappingProxyType(dict(self.gpu_budget_gib)))
        _check(self)

    def spec(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    ok = value >= 0 if zero_ok else value > 0
    if not ok:
        rule = "must be >= 0" if zero_ok else "must be > 0"
        raise SettingsError(f"{key} = {value!r}: {rule}")


def _check(s: SwitchSettings) -> None:
    if not s.models:
        raise SettingsError("models = (): at least one model is needed")
    names = [m.name for m in s.models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SettingsError(f"models: names must be unique; repeated: {', '.join(dup)}")
    for gpu, budget in s.gpu_budget_gib.items():
        _positive(f"gpu_budget_gib[{gpu!r}]", budget)
    for m in s.models:
        key = f"models[{m.name!r}]"
        _positive(f"{key}.footprint_gib", m.footprint_gib)
        _positive(f"{key}.wake_prior_s", m.wake_prior_s, zero_ok=True)
        _positive(f"{key}.sleep_prior_s", m.sleep_prior_s, zero_ok=True)
        if m.gpu not in s.gpu_budget_gib:
            raise SettingsError(
                f"{key}.gpu = {m.gpu!r}: no memory budget for that GPU; "
                f"gpu_budget_gib has {sorted(s.gpu_budget_gib)}"
            )
        if m.footprint_gib > s.gpu_budget_gib[m.gpu]:
            raise SettingsError(
                f"{key}.footprint_gib = {m.footprint_gib!r}: must fit the budget of GPU "
                f"{m.gpu!r} ({s.gpu_budget_gib[m.gpu]} GiB)"
            )
        validate(m.name, m.engine, m.eviction, s.tools)
    for gpu, budget in s.gpu_budget_gib.items():
        on_gpu = [m for m in s.models if m.gpu == gpu]
        held = sum(m.footprint_gib for m in on_gpu if m.eviction.resident or m.pinned)
        if held > budget:
            raise SettingsError(
                f"gpu_budget_gib[{gpu!r}] = {budget!r}: the pinned and resident "
                f"models on it need {held:g} GiB together"
            )
        # Resident models never leave, so every other model must fit next to all of them.
        resident = sum(m.footprint_gib for m in on_gpu if m.eviction.resident)
        for m in on_gpu:
            if not m.eviction.resident and m.footprint_gib + resident > budget:
                raise SettingsError(
                    f"models[{m.name!r}].footprint_gib = {m.footprint_gib!r}: cannot fit next to "
                    f"the resident models on GPU {gpu!r} ({resident:g} of {budget:g} GiB)"
                )
    _positive("queue_timeout_s", s.queue_timeout_s)
    _positive("min_active_s", s.min_active_s, zero_ok=True)
    _positive("coalesce_s", s.coalesce_s, zero_ok=True)
    _positive("max_wait_s", s.max_wait_s)
    if not s.coalesce_s <= s.max_wait_s <= s.queue_timeout_s:
        raise SettingsError(
            f"coalesce_s ({s.coalesce_s}) <= max_wait_s ({s.max_wait_s}) <= queue_timeout_s "
            f"({s.queue_timeout_s}) must hold: a request cannot be held back longer than it may wait"
        )
    if not 0 < s.cost_alpha <= 1:
        raise SettingsError(f"cost_alpha = {s.cost_alpha!r}: must be in (0, 1]")
    if s.max_wake_attempts < 1:
        raise SettingsError(f"max_wake_attempts = {s.max_wake_attempts!r}: must be >= 1")
    _positive("wake_backoff_initial_s", s.wake_backoff_initial_s)
    if s.wake_backoff_max_s < s.wake_backoff_initial_s:
        raise SettingsError(
            f"wake_backoff_max_s = {s.wake_backoff_max_s!r}: must be >= wake_backoff_initial_s"
        )


@dataclass(frozen=True, slots=True)
class CostHistory:
    """Switch cost per (model, phase): an EWMA of measured durations over a prior.

    A value: :meth:`measured` returns a new history. The prior counts as the first
    sample, so one slow outlier moves the estimate by ``alpha`` of the difference.
    """

    alpha: float
    priors: Mapping[tuple[str, Phase], float]
    estimates: Mapping[tuple[str, Phase], float] = field(default_factory=dict)
    samples: Mapping[tuple[str, Phase], int] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, s: SwitchSettings) -> CostHistory:
        priors: dict[tuple[str, Phase], float] = {}
        for m in s.models:
            priors[(m.name, Phase.WAKE)] = m.wake_prior_s
            priors[(m.name, Phase.SLEEP)] = m.sleep_prior_s
            priors[(m.name, Phase.DRAIN)] = 0.0
        return cls(alpha=s.cost_alpha, priors=priors)

    def estimate(self, model: str, phase: Phase) -> float:
        key = (model, phase)
        return self.estimates.get(key, self.priors.get(key, 0.0))

    def measured(self, model: str, phase: Phase, seconds: float) -> CostHistory:
        """A new history with one more measurement (negative durations count as 0)."""
        key = (model, phase)
        old = self.estimate(model, phase)
        new = old + self.alpha * (max(seconds, 0.0) - old)
        return replace(
            self,
            estimates={**self.estimates, key: new},
            samples={**self.samples, key: self.samples.get(key, 0) + 1},
        )


@dataclass(frozen=True, slots=True)
class Resident:
    """A resident model as the victim chooser sees it."""

    name: str
    footprint_gib: float
    evictable: bool
    """Not pinned, not a resident policy, awake (not waking or already going)."""
    awake_since: float
    last_used: float
    in_flight: int


def choose_victims(
    need_gib: float,
    free_gib: float,
    candidates: Sequence[Resident],
    now: float,
    min_active_s: float,
) -> tuple[str, ...] | None:
    """The models to evict so that ``need_gib`` fits, or ``None`` if it cannot fit now.

    ``free_gib`` is the budget left over all resident models. Idle ones go first, then
    least recently used; a model awake for less than ``min_active_s`` is not eligible
    (``None`` is then a "not yet": the caller asks again once it is).
    """
    if need_gib <= free_gib:
        return ()
    eligible = [c for c in candidates if c.evictable and now - c.awake_since >= min_active_s]
    eligible.sort(key=lambda c: (c.in_flight > 0, c.last_used, c.name))
    chosen: list[str] = []
    for c in eligible:
        chosen.append(c.name)
        free_gib += c.footprint_gib
        if need_gib <= free_gib:
            return tuple(chosen)
    return None


@dataclass(frozen=True, slots=True)
class Waiting:
    """The requests waiting for one sleeping model, as the target chooser sees them."""

    model: str
    oldest: float
    """Arrival time of the oldest waiting request."""
    count: int
    switch_cost_s: float
    """Estimated time from deciding to switch until it is awake (sleeps + wake)."""
    interrupts_busy: bool
    """The switch must drain a model that is serving streams."""
    forced: bool = False
    """Asked for by the control API: served first, never held back."""


def turn_at(w: Waiting, policy: Policy, coalesce_s: float, max_wait_s: float) -> float:
    """When ``w``'s turn comes under ``policy`` (may be in the past: due now)."""
    if w.forced or policy is Policy.FIFO or not w.interrupts_busy:
        return w.oldest
    urgent_at = w.oldest + max_wait_s - w.switch_cost_s
    return min(w.oldest + coalesce_s, urgent_at)


def choose_target(
    waiting: Sequence[Waiting], now: float, policy: Policy, coalesce_s: float, max_wait_s: float
) -> str | None:
    """The model to switch to now, or ``None`` when none's turn has come yet."""
    due = [w for w in waiting if turn_at(w, policy, coalesce_s, max_wait_s) <= now]
    if not due:
        return None
    forced = [w for w in due if w.forced]
    if forced:
        return min(forced, key=lambda w: (w.oldest, w.model)).model
    if policy is Policy.FIFO:
        return min(due, key=lambda w: (w.oldest, w.model)).model
    urgent = [w for w in due if now - w.oldest + w.switch_cost_s >= max_wait_s]
    if urgent:
        return min(urgent, key=lambda w: (w.oldest, w.model)).model

    def value(w: Waiting) -> tuple[float, float, str]:
        # Requests served per second of switching; a free switch is worth the most.
        per_s = w.count / w.switch_cost_s if w.switch_cost_s > 0 else float("inf")
        return (-per_s, w.oldest, w.model)

    return min(due, key=value).model
