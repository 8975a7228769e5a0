"""The switch scheduler: which models are awake on a shared GPU, and who waits.

Theory of operation
-------------------
Several models sit behind one endpoint; each is in one of five states, changed only
through the table below (``_TABLE``)::

    ASLEEP --wake--> WAKING --woke--> AWAKE --drain--> DRAINING --evict--> EVICTING
       ^               |                 |  <--undrain--                      |
       +--wake_failed--+                 +------------evict------------------>+
       +<----------------------------------------slept------------------------+

Only an AWAKE model is admitted requests. A request for any other model is held in a
queue (FIFO per arrival) until its model is awake, or answered 504 (:class:`QueueTimeout`)
after ``queue_timeout_s``. Admission takes the request's **in-flight guard** and only
:class:`RequestFinished` (sent when the *stream* ends, not when a handler returns)
gives it back; a model is put to sleep only with no guard taken, so a stream is never
cut by a switch: a model chosen for eviction while it streams is DRAINING first (it
takes no new requests; they queue) and is put to sleep once its last stream ended.

Memory: the models resident on a GPU (every state but ASLEEP) fit its budget together,
always; a wake starts only when the target fits next to everything still resident,
i.e. after the models evicted for it are asleep. Whom to wake next and whom to evict
are decided by the pure policies of ``core/switch_policy.py`` (FIFO or cost-aware,
minimum active time, pins, least recently used). A model being freed for holds its
GPU: no other wake starts there until that switch's target is waking, so a switch is
never starved by smaller models; a target that cannot fit now (pins, minimum active
time) does not hold it.

A wake that fails is retried after a back-off (``core/backoff.py``); after
``max_wake_attempts`` consecutive failures the scheduler gives up: the requests waiting
for the model and those that arrive during the next back-off are answered 503
(:class:`WakeGaveUp`, with the last error and when to retry). A sleep that fails is
retried with the universal fallback, stopping the process.

The scheduler is pure: :meth:`SwitchScheduler.handle` takes one event (with ``now``,
seconds on the caller's monotonic clock) and returns the actions to perform, in order;
:meth:`SwitchScheduler.wakeup_at` says when to send the next :class:`Tick`. An event
that does not fit the state (a wake completed for a model that was not waking, a
second finish of one request) raises :class:`IllegalTransition` and changes nothing.
Control-API commands that cannot be honoured raise :class:`SwitchConflict` (409).
Events, actions and the errors they carry live in ``core/switch_events.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from albatross.core import switch_events as ev
from albatross.core.backoff import Backoff
from albatross.core.errors import ModelNotFound
from albatross.core.eviction import STOP, EvictionPolicy, Step, sleep_steps, wake_steps
from albatross.core.switch_policy import (
    CostHistory,
    ModelSpec,
    Phase,
    Resident,
    SwitchSettings,
    Waiting,
    choose_target,
    choose_victims,
    turn_at,
)


class ModelState(StrEnum):
    ASLEEP = "asleep"
    WAKING = "waking"
    AWAKE = "awake"
    DRAINING = "draining"
    EVICTING = "evicting"


class Move(StrEnum):
    WAKE = "wake"
    WOKE = "woke"
    WAKE_FAILED = "wake_failed"
    DRAIN = "drain"
    UNDRAIN = "undrain"
    EVICT = "evict"
    SLEPT = "slept"
    SLEEP_FAILED = "sleep_failed"


M, St = Move, ModelState
_TABLE: dict[tuple[ModelState, Move], ModelState] = {
    (St.ASLEEP, M.WAKE): St.WAKING,
    (St.WAKING, M.WOKE): St.AWAKE,
    (St.WAKING, M.WAKE_FAILED): St.ASLEEP,
    (St.AWAKE, M.DRAIN): St.DRAINING,
    (St.DRAINING, M.UNDRAIN): St.AWAKE,
    (St.AWAKE, M.EVICT): St.EVICTING,
    (St.DRAINING, M.EVICT): St.EVICTING,
    (St.EVICTING, M.SLEPT): St.ASLEEP,
    (St.EVICTING, M.SLEEP_FAILED): St.EVICTING,  # retried with the stop fallback
}


@dataclass(slots=True)
class _Model:
    spec: ModelSpec
    backoff: Backoff
    state: ModelState = ModelState.ASLEEP
    pinned: bool = False
    in_flight: set[str] = field(default_factory=set)
    awake_since: float = 0.0
    last_used: float = float("-inf")
    slept_with: EvictionPolicy | None = None
    """How it was put to sleep; None while never started (a cold start wakes it)."""
    sleeping_with: EvictionPolicy | None = None
    leaving_for: str | None = None
    """The switch target it is drained or evicted for; ``"control"`` for a control sleep."""
    phase_since: float = 0.0
    """When the current WAKING / DRAINING / EVICTING began."""
    failures: int = 0
    last_error: str = ""
    retry_at: float = float("-inf")
    broken_until: float = float("-inf")
    broken: ev.WakeGaveUp | None = None
    forced: bool = False
    """Wanted awake by the control API even with no request waiting."""


@dataclass(slots=True)
class _Queued:
    model: str
    arrived: float
    deadline: float


@dataclass(slots=True)
class _Switch:
    target: str
    gpu: str
    started: float
    victims: list[str] = field(default_factory=list)
    drain_s: float = 0.0
    sleep_s: float = 0.0
    wake_started: float | None = None


class SwitchScheduler:
    """The switch state machine; see the module docstring. Not thread-safe (one loop)."""

    def __init__(self, settings: SwitchSettings) -> None:
        self.settings = settings
        s = settings
        self._models = {
            m.name: _Model(
                spec=m,
                backoff=Backoff.create(s.wake_backoff_initial_s, s.wake_backoff_max_s),
                pinned=m.pinned,
            )
            for m in s.models
        }
        self._queue: dict[str, _Queued] = {}  # insertion order is arrival order
        self._owner: dict[str, str] = {}  # admitted request -> model
        self._pending: dict[str, _Switch] = {}  # gpu -> switch freeing memory
        self._waking: dict[str, _Switch] = {}  # target -> switch whose wake runs
        self.costs = CostHistory.from_settings(s)
        self._now = float("-inf")

    # ---- queries (for the control API, metrics and tests) -----------------------------

    def state(self, model: str) -> ModelState:
        return self._model(model).state

    def pinned(self, model: str) -> bool:
        return self._model(model).pinned

    def in_flight(self, model: str) -> int:
        return len(self._model(model).in_flight)

    def queue_depth(self, model: str | None = None) -> int:
        return sum(1 for q in self._queue.values() if model is None or q.model == model)

    def queued(self) -> list[tuple[str, str]]:
        """``(request id, model)`` of every waiting request, oldest first."""
        return [(rid, q.model) for rid, q in self._queue.items()]

    def awake(self) -> list[str]:
        return [n for n, m in self._models.items() if m.state is ModelState.AWAKE]

    def resident_gib(self, gpu: str) -> float:
        """GPU memory held by the models on ``gpu`` that are not asleep."""
        return sum(
            m.spec.footprint_gib
            for m in self._models.values()
            if m.spec.gpu == gpu and m.state is not ModelState.ASLEEP
        )

    def wakeup_at(self) -> float | None:
        """When a :class:`ev.Tick` is next needed (a deadline, a turn, a retry), or None."""
        times = [q.deadline for q in self._queue.values()]
        for gpu in self.settings.gpu_budget_gib:
            s = self.settings
            times += [
                turn_at(w, s.policy, s.coalesce_s, s.max_wait_s) for w in self._waiting(gpu, set())
            ]
        for m in self._models.values():
            if self.queue_depth(m.spec.name) or m.forced:
                times.append(m.retry_at)
            if m.state is ModelState.AWAKE:
                times.append(m.awake_since + self.settings.min_active_s)
        future = [t for t in times if t > self._now]
        return min(future) if future else None

    # ---- events -----------------------------------------------------------------------

    def handle(self, event: ev.Event) -> list[ev.Action]:
        """Apply ``event``; return the actions to perform, in order."""
        self._validate(event)
        # A late-computed ``now`` from another task must not move time backwards.
        now = self._now = max(self._now, event.now)
        out: list[ev.Action] = []
        self._apply(event, now, out)
        self._admit(now, out)  # a request whose model woke at its deadline is served
        self._expire(now, out)
        self._plan(now, out)
        return out

    def _model(self, name: str) -> _Model:
        m = self._models.get(name)
        if m is None:
            raise ModelNotFound(name, list(self._models))
        return m

    def _validate(self, event: ev.Event) -> None:
        """Raise before anything changes, so a refused event leaves no trace."""
        if isinstance(event, ev.RequestArrived):
            self._model(event.model)
            if event.request_id in self._queue or event.request_id in self._owner:
                raise ev.IllegalTransition(f"request {event.request_id!r} arrived twice")
        elif isinstance(event, ev.RequestFinished):
            if event.request_id not in self._owner:
                raise ev.IllegalTransition(
                    f"request {event.request_id!r} finished but was not admitted"
                )
        elif isinstance(event, ev.WakeCompleted | ev.WakeFailed):
            self._check_move(event.model, Move.WOKE)
        elif isinstance(event, ev.SleepCompleted | ev.SleepFailed):
            self._check_move(event.model, Move.SLEPT)
        elif isinstance(event, ev.SleepRequested):
            m = self._model(event.model)
            if m.pinned:
                raise ev.SwitchConflict(f"model {event.model!r} is pinned; unpin it before sleep")
            if m.spec.eviction.resident:
                raise ev.SwitchConflict(
                    f"model {event.model!r} is configured resident ({m.spec.eviction}); "
                    "it is never put to sleep"
                )
            if m.state is ModelState.WAKING:
                raise ev.SwitchConflict(
                    f"model {event.model!r} is waking; put it to sleep once awake"
                )
        elif isinstance(event, ev.WakeRequested):
            m = self._model(event.model)
            if m.state is ModelState.EVICTING:
                raise ev.SwitchConflict(
                    f"model {event.model!r} is being put to sleep; use switch to have it woken after"
                )
            if m.state is ModelState.ASLEEP and not self._fits(m):
                raise ev.SwitchConflict(self._no_room(m) + "; use switch to evict others")
        elif isinstance(event, ev.SwitchRequested):
            m = self._model(event.model)
            blocked = self._blocked_gib(m.spec.gpu, m.spec.name)
            budget = self.settings.gpu_budget_gib[m.spec.gpu]
            if m.spec.footprint_gib + blocked > budget:
                raise ev.SwitchConflict(
                    f"model {event.model!r} needs {m.spec.footprint_gib:g} GiB but pinned and "
                    f"resident models hold {blocked:g} of {budget:g} GiB on GPU {m.spec.gpu!r}"
                )
        elif isinstance(event, ev.PinRequested | ev.UnpinRequested):
            self._model(event.model)

    def _check_move(self, model: str, move: Move) -> None:
        m = self._model(model)
        if (m.state, move) not in _TABLE:
            raise ev.IllegalTransition(
                f"{move.value} is not allowed for {model!r} in state {m.state}"
            )

    def _move(self, m: _Model, move: Move, now: float) -> None:
        m.state = _TABLE[(m.state, move)]
        m.phase_since = now

    def _apply(self, event: ev.Event, now: float, out: list[ev.Action]) -> None:
        if isinstance(event, ev.RequestArrived):
            m = self._models[event.model]
            if m.broken is not None and now < m.broken_until:
                err = ev.WakeGaveUp(
                    event.model, self.settings.max_wake_attempts, m.last_error, m.broken_until - now
                )
                out.append(ev.Fail(event.request_id, event.model, err))
            else:
                deadline = now + self.settings.queue_timeout_s
                self._queue[event.request_id] = _Queued(event.model, now, deadline)
                if m.state is not ModelState.AWAKE:
                    out.append(ev.Hold(event.request_id, event.model, deadline))
        elif isinstance(event, ev.RequestFinished):
            m = self._models[self._owner.pop(event.request_id)]
            m.in_flight.discard(event.request_id)
            m.last_used = now
        elif isinstance(event, ev.RequestCancelled):
            # The client left while waiting; a race with admission or a time-out is fine.
            self._queue.pop(event.request_id, None)
        elif isinstance(event, ev.WakeCompleted):
            self._woke(self._models[event.model], event, now, out)
        elif isinstance(event, ev.WakeFailed):
            self._wake_failed(self._models[event.model], event, now, out)
        elif isinstance(event, ev.SleepCompleted):
            m = self._models[event.model]
            self._move(m, Move.SLEPT, now)
            self.costs = self.costs.measured(event.model, Phase.SLEEP, event.duration_s)
            m.slept_with, m.sleeping_with, m.leaving_for = m.sleeping_with, None, None
        elif isinstance(event, ev.SleepFailed):
            m = self._models[event.model]
            self._move(m, Move.SLEEP_FAILED, now)
            m.sleeping_with = STOP
            out.append(ev.Sleep(event.model, STOP, sleep_steps(m.spec.engine, STOP), fallback=True))
        elif isinstance(event, ev.PinRequested):
            m = self._models[event.model]
            m.pinned = True
            if m.state is ModelState.DRAINING:
                self._undrain(m, now, out)
        elif isinstance(event, ev.UnpinRequested):
            self._models[event.model].pinned = False
        elif isinstance(event, ev.SleepRequested):
            m = self._models[event.model]
            m.forced = False
            if m.state in (ModelState.AWAKE, ModelState.DRAINING):
                m.leaving_for = "control"
                if m.state is ModelState.AWAKE:
                    self._leave(m, now, out)
        elif isinstance(event, ev.WakeRequested | ev.SwitchRequested):
            m = self._models[event.model]
            if m.state is ModelState.DRAINING:
                self._undrain(m, now, out)
            elif m.state in (ModelState.ASLEEP, ModelState.EVICTING):
                m.forced = True
                m.broken, m.broken_until, m.retry_at = None, float("-inf"), float("-inf")
        elif isinstance(event, ev.Tick):
            pass

    def _woke(self, m: _Model, event: ev.WakeCompleted, now: float, out: list[ev.Action]) -> None:
        self._move(m, Move.WOKE, now)
        m.awake_since = m.last_used = now
        m.failures, m.forced, m.broken = 0, False, None
        m.backoff = Backoff.create(
            self.settings.wake_backoff_initial_s, self.settings.wake_backoff_max_s
        )
        self.costs = self.costs.measured(m.spec.name, Phase.WAKE, event.duration_s)
        self._finish_switch(m.spec.name, ev.SwitchResult.OK, event.duration_s, out)

    def _wake_failed(
        self, m: _Model, event: ev.WakeFailed, now: float, out: list[ev.Action]
    ) -> None:
        self._move(m, Move.WAKE_FAILED, now)
        m.slept_with = None  # whatever half-woke is cold-started next time
        delay, m.backoff = m.backoff.down(now)
        m.failures += 1
        m.last_error = event.error
        self._finish_switch(m.spec.name, ev.SwitchResult.FAILED, event.duration_s, out)
        if m.failures < self.settings.max_wake_attempts:
            m.retry_at = now + delay
            return
        err = ev.WakeGaveUp(m.spec.name, m.failures, event.error, delay)
        m.failures, m.forced = 0, False
        m.broken, m.broken_until = err, now + delay
        out.append(ev.GiveUpWake(m.spec.name, err, delay))
        for rid, q in list(self._queue.items()):
            if q.model == m.spec.name:
                del self._queue[rid]
                out.append(ev.Fail(rid, q.model, err))

    def _finish_switch(
        self, target: str, result: ev.SwitchResult, wake_s: float, out: list[ev.Action]
    ) -> None:
        sw = self._waking.pop(target, None)
        if sw is not None:
            out.append(
                ev.SwitchDone(
                    tuple(sw.victims), target, result,
                    {Phase.DRAIN: sw.drain_s, Phase.SLEEP: sw.sleep_s, Phase.WAKE: wake_s},
                )
            )  # fmt: skip

    def _expire(self, now: float, out: list[ev.Action]) -> None:
        for rid, q in list(self._queue.items()):
            if q.deadline <= now:
                del self._queue[rid]
                m = self._models[q.model]
                err = ev.QueueTimeout(
                    q.model, now - q.arrived, self.settings.queue_timeout_s, self._why(m)
                )
                out.append(ev.TimeOut(rid, q.model, err))

    def _why(self, m: _Model) -> str:
        """Why a model is not serving, in words, for a 504."""
        n = m.spec.name
        if m.state is ModelState.WAKING:
            return f"it is still waking (expected {self.costs.estimate(n, Phase.WAKE):.1f} s)"
        if m.state is ModelState.DRAINING:
            return f"it is draining {len(m.in_flight)} streams before a switch"
        if m.state is ModelState.EVICTING:
            return "it is being put to sleep for another model"
        if m.retry_at > self._now:
            return f"its last wake failed ({m.last_error}); retrying"
        if (
            not self._fits(m)
            and self._blocked_gib(m.spec.gpu, n) + m.spec.footprint_gib
            > (self.settings.gpu_budget_gib[m.spec.gpu])
        ):
            return self._no_room(m) + " (pinned or resident models)"
        return "other models were being served (raise queue_timeout_s or add memory)"

    def _no_room(self, m: _Model) -> str:
        gpu = m.spec.gpu
        return (
            f"model {m.spec.name!r} needs {m.spec.footprint_gib:g} GiB but only "
            f"{self._free(gpu):g} of {self.settings.gpu_budget_gib[gpu]:g} GiB are free on GPU {gpu!r}"
        )

    # ---- planning ---------------------------------------------------------------------

    def _free(self, gpu: str) -> float:
        return self.settings.gpu_budget_gib[gpu] - self.resident_gib(gpu)

    def _fits(self, m: _Model) -> bool:
        return m.spec.footprint_gib <= self._free(m.spec.gpu) + 1e-9

    def _blocked_gib(self, gpu: str, but: str) -> float:
        """Memory on ``gpu`` that no switch can free: pinned or resident-policy models."""
        return sum(
            m.spec.footprint_gib
            for m in self._models.values()
            if m.spec.gpu == gpu
            and m.spec.name != but
            and m.state is not ModelState.ASLEEP
            and (m.pinned or m.spec.eviction.resident)
        )

    def _plan(self, now: float, out: list[ev.Action]) -> None:
        self._admit(now, out)
        for m in self._models.values():
            if m.state is ModelState.DRAINING and not m.in_flight:
                self._evict(m, now, out)
        for gpu in self.settings.gpu_budget_gib:
            self._plan_gpu(gpu, now, out)

    def _admit(self, now: float, out: list[ev.Action]) -> None:
        for rid, q in list(self._queue.items()):
            m = self._models[q.model]
            if m.state is ModelState.AWAKE:
                del self._queue[rid]
                m.in_flight.add(rid)
                self._owner[rid] = q.model
                m.last_used = now
                out.append(ev.Admit(rid, q.model, now - q.arrived))

    def _wanted(self, m: _Model, now: float) -> bool:
        eligible = m.retry_at <= now and (m.broken is None or now >= m.broken_until)
        return eligible and (m.forced or self.queue_depth(m.spec.name) > 0)

    def _candidates(self, gpu: str) -> list[Resident]:
        return [
            Resident(
                name=m.spec.name,
                footprint_gib=m.spec.footprint_gib,
                evictable=m.state is ModelState.AWAKE
                and not m.pinned
                and not m.spec.eviction.resident,
                awake_since=m.awake_since,
                last_used=m.last_used,
                in_flight=len(m.in_flight),
            )
            for m in self._models.values()
            if m.spec.gpu == gpu and m.state is ModelState.AWAKE
        ]

    def _victims(self, m: _Model, now: float, min_active_s: float) -> tuple[str, ...] | None:
        """Whom to evict (beyond those already leaving) so ``m`` fits; None: not now."""
        gpu = m.spec.gpu
        leaving = sum(
            x.spec.footprint_gib
            for x in self._models.values()
            if x.spec.gpu == gpu and x.state in (ModelState.DRAINING, ModelState.EVICTING)
        )
        return choose_victims(
            m.spec.footprint_gib,
            self._free(gpu) + leaving,
            self._candidates(gpu),
            now,
            min_active_s,
        )

    def _waiting(self, gpu: str, skip: set[str]) -> list[Waiting]:
        now = self._now
        first: dict[str, tuple[float, int]] = {}
        for q in self._queue.values():
            oldest, n = first.get(q.model, (q.arrived, 0))
            first[q.model] = (oldest, n + 1)
        out = []
        for name, m in self._models.items():
            if m.spec.gpu != gpu or m.state is not ModelState.ASLEEP or name in skip:
                continue
            if not self._wanted(m, now):
                continue
            oldest, n = first.get(name, (now, 0))
            victims = self._victims(m, now, 0.0) or ()
            busy = any(self._models[v].in_flight for v in victims)
            cost = self.costs.estimate(name, Phase.WAKE) + sum(
                self.costs.estimate(v, Phase.SLEEP) for v in victims
            )
            out.append(Waiting(name, oldest, n, cost, busy, forced=m.forced))
        return out

    def _plan_gpu(self, gpu: str, now: float, out: list[ev.Action]) -> None:
        s = self.settings
        sw = self._pending.get(gpu)
        if sw is not None:
            target = self._models[sw.target]
            if not self._wanted(target, now) or target.state is not ModelState.ASLEEP:
                self._abandon(sw, now, out)
            else:
                self._progress(sw, target, now, out)
            if gpu in self._pending:
                return  # memory is being freed for it: nobody else wakes here meanwhile
        skip: set[str] = set()
        while True:
            name = choose_target(
                self._waiting(gpu, skip), now, s.policy, s.coalesce_s, s.max_wait_s
            )
            if name is None:
                return
            m = self._models[name]
            sw = _Switch(name, gpu, now)
            if self._progress(sw, m, now, out):
                continue  # it is waking: another one may fit too
            if gpu in self._pending:
                return
            skip.add(name)  # cannot fit now (pins, minimum active time): not a reason to wait

    def _progress(self, sw: _Switch, m: _Model, now: float, out: list[ev.Action]) -> bool:
        """Advance ``sw``: wake the target if it fits (True), else free memory for it."""
        if self._fits(m):
            self._pending.pop(sw.gpu, None)
            self._wake(m, sw, now, out)
            return True
        victims = self._victims(m, now, 0.0 if m.forced else self.settings.min_active_s)
        if victims is None:
            if sw.victims and any(self._models[v].leaving_for == sw.target for v in sw.victims):
                return False  # its victims are on their way; more may become eligible later
            self._pending.pop(sw.gpu, None)
            return False
        for v in victims:
            vm = self._models[v]
            vm.leaving_for = sw.target
            sw.victims.append(v)
            self._leave(vm, now, out)
        self._pending[sw.gpu] = sw
        return False

    def _abandon(self, sw: _Switch, now: float, out: list[ev.Action]) -> None:
        del self._pending[sw.gpu]
        for v in sw.victims:
            vm = self._models[v]
            if vm.state is ModelState.DRAINING and vm.leaving_for == sw.target:
                self._undrain(vm, now, out)
        out.append(ev.SwitchDone(tuple(sw.victims), sw.target, ev.SwitchResult.ABANDONED, {}))
        self._admit(now, out)

    def _leave(self, m: _Model, now: float, out: list[ev.Action]) -> None:
        """Start putting an AWAKE model to sleep: drain first if it streams."""
        if m.in_flight:
            self._move(m, Move.DRAIN, now)
            out.append(ev.StartDrain(m.spec.name, len(m.in_flight), m.leaving_for or "control"))
        else:
            self._evict(m, now, out)

    def _undrain(self, m: _Model, now: float, out: list[ev.Action]) -> None:
        self._move(m, Move.UNDRAIN, now)
        m.leaving_for = None
        out.append(ev.Undrain(m.spec.name))

    def _evict(self, m: _Model, now: float, out: list[ev.Action]) -> None:
        assert not m.in_flight, "a model with streams in flight is never put to sleep"
        drained_s = now - m.phase_since if m.state is ModelState.DRAINING else 0.0
        if m.state is ModelState.DRAINING:
            self.costs = self.costs.measured(m.spec.name, Phase.DRAIN, drained_s)
        sw = self._pending.get(m.spec.gpu)
        if sw is not None and m.spec.name in sw.victims:
            sw.drain_s = max(sw.drain_s, drained_s)
        self._move(m, Move.EVICT, now)
        m.sleeping_with = m.spec.eviction
        out.append(
            ev.Sleep(m.spec.name, m.spec.eviction, sleep_steps(m.spec.engine, m.spec.eviction))
        )

    def _wake(self, m: _Model, sw: _Switch, now: float, out: list[ev.Action]) -> None:
        self._move(m, Move.WAKE, now)
        sw.wake_started = now
        sw.sleep_s = max(0.0, now - sw.started - sw.drain_s) if sw.victims else 0.0
        self._waking[m.spec.name] = sw
        steps: tuple[Step, ...] = wake_steps(m.spec.engine, m.spec.eviction, m.slept_with)
        out.append(ev.Wake(m.spec.name, steps, m.failures + 1))
