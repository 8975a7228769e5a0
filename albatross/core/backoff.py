"""Restart back-off: how long to wait before starting a failed process again.

Theory of operation. A process that keeps failing soon after it comes up is restarted
after ``initial_s``, then ``2 * initial_s``, ``4 * initial_s`` ... capped at ``max_s``.
A process that stayed up for at least ``stable_s`` (default ``10 * initial_s``) before
it went down is considered healthy again: its next delay is ``initial_s``. "Up" is what
the caller says it is (the supervisor calls :meth:`Backoff.up` when a replica is ready,
so a replica that never gets ready keeps backing off).

The policy is a value: every method returns a new :class:`Backoff`, nothing is mutated,
and time comes in as ``now`` (seconds on any monotonic clock), so it is tested without
a clock or a sleep.

Invariants (asserted by the tests): every delay is within ``[initial_s, max_s]``; the
delays of consecutive unstable runs never decrease; a stable run resets to ``initial_s``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

STABLE_FACTOR = 10.0
"""``stable_s`` defaults to this many times ``initial_s``."""


@dataclass(frozen=True)
class Backoff:
    """Restart back-off state of one process. Build it with :meth:`create`."""

    initial_s: float
    max_s: float
    stable_s: float
    failures: int = 0
    """Consecutive unstable runs so far (stops growing once the delay reaches max_s)."""
    up_since: float | None = None
    """``now`` of the last :meth:`up`, or None when the current run never came up."""

    def __post_init__(self) -> None:
        if not self.initial_s > 0:
            raise ValueError(f"initial_s = {self.initial_s!r}: must be > 0")
        if not self.max_s >= self.initial_s:
            raise ValueError(f"max_s = {self.max_s!r}: must be >= initial_s ({self.initial_s!r})")
        if not self.stable_s > 0:
            raise ValueError(f"stable_s = {self.stable_s!r}: must be > 0")

    @classmethod
    def create(cls, initial_s: float, max_s: float, stable_s: float | None = None) -> Backoff:
        """A fresh policy; raises ValueError (naming the field) on a nonsensical bound."""
        if stable_s is None:
            stable_s = STABLE_FACTOR * initial_s
        return cls(initial_s=initial_s, max_s=max_s, stable_s=stable_s)

    def up(self, now: float) -> Backoff:
        """The process came up (e.g. became ready) at ``now``."""
        return replace(self, up_since=now)

    def down(self, now: float) -> tuple[float, Backoff]:
        """The process went down at ``now``: the delay before the next start, and the new state.

        A run that came up and stayed up for ``stable_s`` resets the delay to ``initial_s``;
        any other run (never up, or up for less) doubles it, up to ``max_s``.
        """
        stable = self.up_since is not None and now - self.up_since >= self.stable_s
        failures = 0 if stable else self.failures
        # Computed by doubling rather than ``initial * 2**failures`` so that a process
        # failing for days never overflows a float.
        delay = self.initial_s
        for _ in range(failures):
            delay = min(self.max_s, delay * 2)
        # Once at the cap, stop counting: the loop above stays bounded.
        grown = failures + 1 if delay < self.max_s else failures
        return delay, replace(self, failures=grown, up_since=None)
