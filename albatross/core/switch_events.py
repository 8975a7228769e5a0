"""What the switch scheduler is told (events), what it asks for (actions), and the
errors it answers requests and commands with.

Events are past-tense facts with the ``now`` at which they happened (seconds on the
runtime's monotonic clock); actions are imperatives the runtime carries out, in the
order given, reporting each outcome back as an event:

=====================  ==========================================================
action                 the runtime ...
=====================  ==========================================================
:class:`Admit`         starts the request on the model; sends
                       :class:`RequestFinished` when its *stream* has ended
:class:`Hold`          keeps the request waiting (nothing to do but wait)
:class:`TimeOut`       answers the waiting request with ``error`` (504)
:class:`Fail`          answers the waiting request with ``error`` (503)
:class:`StartDrain`    nothing on the engine: no request is admitted to it any more
                       (metrics, logs); its streams run to their end
:class:`Undrain`       nothing on the engine: the drain was cancelled
:class:`Sleep`         performs ``steps`` in order; :class:`SleepCompleted` with the
                       measured duration, or :class:`SleepFailed`
:class:`Wake`          performs ``steps`` in order and checks the model answers;
                       :class:`WakeCompleted` with the measured duration, or
                       :class:`WakeFailed` with the error in words
:class:`GiveUpWake`    reports that the model failed to wake repeatedly
:class:`SwitchDone`    records the switch (metrics: from, to, result, phase durations)
=====================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from albatross.core.errors import (
    AlbatrossError,
    Conflict,
    EngineTimeout,
    NoReplicaAvailable,
)
from albatross.core.eviction import EvictionPolicy, Step
from albatross.core.switch_policy import Phase

# ---- errors ----


class IllegalTransition(Exception):
    """An event does not fit the current state (a bug in the caller); nothing changed."""


class SwitchConflict(Conflict):
    """A control command cannot be honoured in the current state (HTTP 409)."""


class QueueTimeout(EngineTimeout):
    """A request waited ``queue_timeout_s`` for its model to wake (HTTP 504)."""

    def __init__(self, model: str, waited_s: float, limit_s: float, why: str) -> None:
        super().__init__(
            f"model {model!r} was not ready in time: the request waited {waited_s:.1f} s "
            f"in the queue (limit {limit_s:g} s); {why}",
            code="model_wake_timeout",
        )
        self.model, self.waited_s, self.limit_s = model, waited_s, limit_s


class WakeGaveUp(NoReplicaAvailable):
    """A model failed to wake ``attempts`` times in a row (HTTP 503); retry later."""

    def __init__(self, model: str, attempts: int, last_error: str, retry_after_s: float) -> None:
        super().__init__(
            f"model {model!r} failed to wake {attempts} times in a row; last error: "
            f"{last_error}; retry in {retry_after_s:.0f} s",
            code="model_wake_failed",
        )
        self.model, self.retry_after_s = model, retry_after_s
        self.headers = (("Retry-After", str(max(1, round(retry_after_s)))),)


# ---- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestArrived:
    now: float
    request_id: str
    model: str


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """The stream of an admitted request ended (completed, failed or client gone).

    Sent when the response body is done, not when the handler returns: this releases
    the in-flight guard that keeps the model from being put to sleep under the stream.
    """

    now: float
    request_id: str


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    """The client of a waiting request went away; unknown ids are ignored (a race)."""

    now: float
    request_id: str


@dataclass(frozen=True, slots=True)
class WakeCompleted:
    now: float
    model: str
    duration_s: float


@dataclass(frozen=True, slots=True)
class WakeFailed:
    now: float
    model: str
    duration_s: float
    error: str


@dataclass(frozen=True, slots=True)
class SleepCompleted:
    now: float
    model: str
    duration_s: float


@dataclass(frozen=True, slots=True)
class SleepFailed:
    now: float
    model: str
    error: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; send one at :meth:`SwitchScheduler.wakeup_at`."""

    now: float


@dataclass(frozen=True, slots=True)
class PinRequested:
    """Control API: never evict this model (a drain under way for a switch is cancelled)."""

    now: float
    model: str


@dataclass(frozen=True, slots=True)
class UnpinRequested:
    now: float
    model: str


@dataclass(frozen=True, slots=True)
class SleepRequested:
    """Control API: put the model to sleep now (after its streams end). A request that
    arrives for it later wakes it again, as for any sleeping model."""

    now: float
    model: str


@dataclass(frozen=True, slots=True)
class WakeRequested:
    """Control API: wake the model if it fits next to the others; 409 if it does not."""

    now: float
    model: str


@dataclass(frozen=True, slots=True)
class SwitchRequested:
    """Control API: wake the model now, evicting what must go (pins are respected; the
    minimum active time and the coalescing window are not)."""

    now: float
    model: str


Event = (
    RequestArrived
    | RequestFinished
    | RequestCancelled
    | WakeCompleted
    | WakeFailed
    | SleepCompleted
    | SleepFailed
    | Tick
    | PinRequested
    | UnpinRequested
    | SleepRequested
    | WakeRequested
    | SwitchRequested
)

# ---- actions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admit:
    request_id: str
    model: str
    waited_s: float
    """Time spent in the queue (0 when the model was awake): the queue-wait metric."""


@dataclass(frozen=True, slots=True)
class Hold:
    request_id: str
    model: str
    deadline: float


@dataclass(frozen=True, slots=True)
class TimeOut:
    request_id: str
    model: str
    error: AlbatrossError


@dataclass(frozen=True, slots=True)
class Fail:
    request_id: str
    model: str
    error: AlbatrossError


@dataclass(frozen=True, slots=True)
class StartDrain:
    model: str
    in_flight: int
    reason: str
    """The model it makes room for, or ``control``."""


@dataclass(frozen=True, slots=True)
class Undrain:
    model: str


@dataclass(frozen=True, slots=True)
class Sleep:
    model: str
    policy: EvictionPolicy
    steps: tuple[Step, ...]
    fallback: bool = False
    """The configured policy failed; this is the stop fallback."""


@dataclass(frozen=True, slots=True)
class Wake:
    model: str
    steps: tuple[Step, ...]
    attempt: int
    """1 for a first try, more for retries after a failure."""


@dataclass(frozen=True, slots=True)
class GiveUpWake:
    model: str
    error: AlbatrossError
    retry_after_s: float


class SwitchResult(StrEnum):
    OK = "ok"
    FAILED = "failed"
    ABANDONED = "abandoned"  # nobody waited for the target any more


@dataclass(frozen=True, slots=True)
class SwitchDone:
    from_models: tuple[str, ...]
    to: str
    result: SwitchResult
    phases: Mapping[Phase, float]
    """Seconds spent draining, sleeping the evicted models and waking the target."""


Action = (
    Admit | Hold | TimeOut | Fail | StartDrain | Undrain | Sleep | Wake | GiveUpWake | SwitchDone
)
