"""The replica pool: who serves which model, in what health, with how much in flight.

It is the supervisor's listener (processes come and go) and the health checker's
target; decisions are the pure functions of ``core/replicas.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from albatross.core.cost import Price, ReplicaLedger
from albatross.core.errors import NoReplicaAvailable
from albatross.core.replicas import (
    Candidate,
    Event,
    Health,
    IllegalTransition,
    ReplicaState,
    pick,
    transition,
)
from albatross.engines.base import EngineClient
from albatross.engines.clients import EngineKind, engine_client
from albatross.gateway.metrics import Metrics

log = logging.getLogger("albatross.pool")
_FREE = Price()
_STATES = tuple(s.value for s in ReplicaState)


@dataclass(eq=False)
class Replica:
    replica_id: str
    model: str
    managed: bool
    slots: int = 0
    """Sequences the engine runs at once (0 until known)."""
    shared_slot_dir: bool = False
    """Saves slots into the directory all managed replicas share (KV moves possible)."""
    client: EngineClient | None = None
    health: Health = field(default_factory=Health)
    in_flight: int = 0
    pid: int | None = None
    free_slots: list[int] = field(default_factory=list)
    host: str | None = None
    """The ``albatross agent`` host that registered it; None for this gateway's own."""
    ledger: ReplicaLedger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = ReplicaLedger(self.replica_id, "unknown", _FREE)

    def reset_slots(self, n: int) -> None:
        self.slots = n
        self.free_slots = list(range(n))

    def take_slot(self) -> int | None:
        """A slot no stream of ours holds, to pin a generation to; None if all are held."""
        return self.free_slots.pop(0) if self.free_slots else None

    def give_slot(self, slot: int | None) -> None:
        if slot is not None and slot < self.slots and slot not in self.free_slots:
            self.free_slots.append(slot)


class Pool:
    def __init__(
        self,
        metrics: Metrics,
        health_failures: int,
        engines: Mapping[str, EngineKind] | None = None,
    ) -> None:
        """``engines``: the engine each model runs on (default llama-server), which
        decides the client its replicas are reached through."""
        self._engines = dict(engines or {})
        self._metrics = metrics
        self._threshold = health_failures
        self.replicas: dict[str, Replica] = {}
        self._last: dict[str, str | None] = {}
        self._changed = asyncio.Event()
        self.lost_listeners: list[Callable[[str, bool], None]] = []
        """Called with ``(replica_id, planned)`` when a replica goes down (planned=False:
        its streams must continue elsewhere) or is drained (planned=True: move them off)."""

    def add(
        self,
        replica_id: str,
        model: str,
        managed: bool,
        base_url: str | None = None,
        slots: int = 0,
        instance_type: str = "local",
        price: Price = _FREE,
    ) -> Replica:
        r = Replica(replica_id, model, managed)
        if base_url:
            r.client = self._client(model, base_url, slots)
        r.shared_slot_dir = managed
        r.reset_slots(slots)
        r.ledger = ReplicaLedger(replica_id, instance_type, price)
        self.replicas[replica_id] = r
        self._publish(r)
        return r

    def _client(self, model: str, base_url: str, slots: int) -> EngineClient:
        return engine_client(self._engines.get(model, "llama-server"), base_url, slots or None)

    def models(self) -> list[str]:
        return sorted({r.model for r in self.replicas.values()})

    def apply(self, replica_id: str, event: Event) -> None:
        r = self.replicas[replica_id]
        try:
            new = transition(r.health, event, self._threshold)
        except IllegalTransition as exc:
            log.debug("replica %s: %s", replica_id, exc)
            return
        if new.state is not r.health.state:
            log.info("replica %s: %s -> %s", replica_id, r.health.state.value, new.state.value)
        r.health = new
        self._publish(r)
        self._changed.set()

    def _publish(self, r: Replica) -> None:
        # Paid for while it runs (ready, unhealthy or draining), not while down/starting.
        if r.health.state in (ReplicaState.READY, ReplicaState.UNHEALTHY, ReplicaState.DRAINING):
            r.ledger.up(time.time())
        else:
            r.ledger.down(time.time())
        self._metrics.set_replica_state(r.model, r.replica_id, r.health.state.value, _STATES)

    # ---- supervisor listener -------------------------------------------------
    def replica_ready(self, replica_id: str, base_url: str, pid: int) -> None:
        r = self.replicas[replica_id]
        if r.client is not None:
            r.client.close()
        r.client = self._client(r.model, base_url, r.slots)
        r.pid = pid
        r.reset_slots(r.slots)  # a new process: every slot is free
        self.apply(replica_id, Event.STARTED)

    def replica_lost(self, replica_id: str, reason: str) -> None:
        r = self.replicas[replica_id]
        log.warning("replica %s lost: %s", replica_id, reason)
        r.pid = None
        self._metrics.replica_restarts.labels(r.model, replica_id).inc()
        self.apply(replica_id, Event.LOST)
        for cb in self.lost_listeners:
            cb(replica_id, False)

    # ---- replicas registered by agents ---------------------------------------
    def register(
        self,
        replica_id: str,
        model: str,
        host: str,
        base_url: str | None,
        slots: int,
        pid: int | None,
        instance_type: str,
        price: Price,
    ) -> Replica:
        """An agent's report on one of its replicas: ready at ``base_url``, or gone
        (``base_url`` None). Idempotent, so agents re-send it as a heartbeat.

        A known replica at a new URL or pid is a new process (all slots free); a report
        of "gone" for a replica believed up moves its streams off like a crash.
        """
        r = self.replicas.get(replica_id)
        if r is None:
            r = self.add(replica_id, model, False, None, slots, instance_type, price)
            r.host = host
        if base_url is None:
            if r.health.state is not ReplicaState.DOWN:
                self.replica_lost(replica_id, f"reported gone by agent {host}")
            return r
        fresh = r.client is None or r.client.base_url != base_url or r.pid != pid
        if fresh:
            if r.health.state not in (ReplicaState.DOWN, ReplicaState.STARTING):
                # A new process behind a replica believed up (the replacement after a
                # drain, or a restart the gateway missed): whatever still ran on the old
                # one continues elsewhere.
                self.replica_lost(replica_id, f"replaced by a new engine on agent {host}")
            if r.client is not None:
                r.client.close()
            r.client = self._client(r.model, base_url, slots)
            r.pid = pid
            r.reset_slots(slots)
        self.apply(replica_id, Event.STARTED)
        return r

    def deregister(self, replica_id: str) -> None:
        """Forget an agent's replica; it must have no stream in flight."""
        r = self.replicas.pop(replica_id)
        if r.client is not None:
            r.client.close()
        r.ledger.down(time.time())
        self._metrics.forget_replica(r.model, replica_id, _STATES)

    # ---- routing -------------------------------------------------------------
    def try_acquire(
        self, model: str, exclude: frozenset[str] = frozenset(), avoid: frozenset[str] = frozenset()
    ) -> Replica | None:
        """The least-loaded ready replica of ``model``; the caller must :meth:`release` it.

        Replicas with a free slot come first (a stream beyond a replica's slots waits
        inside that engine and is not rebalanced when another replica comes back).
        ``exclude`` is avoided unless nothing else is ready; ``avoid`` always (a
        replica that just failed may still look ready for a moment).
        """
        mine = [
            r
            for r in self.replicas.values()
            if r.model == model and r.client is not None and r.replica_id not in avoid
        ]
        rid = None
        for pool in (
            [r for r in mine if r.replica_id not in exclude and (r.free_slots or not r.slots)],
            [r for r in mine if r.replica_id not in exclude],
            mine,
        ):
            rid = pick(
                (Candidate(r.replica_id, r.health.state, r.in_flight) for r in pool),
                self._last.get(model),
            )
            if rid is not None:
                break
        if rid is None:
            return None
        self._last[model] = rid
        r = self.replicas[rid]
        r.in_flight += 1
        return r

    async def acquire(
        self,
        model: str,
        timeout_s: float,
        exclude: frozenset[str] = frozenset(),
        avoid: frozenset[str] = frozenset(),
    ) -> Replica:
        """A ready replica of ``model`` (least loaded), waiting up to ``timeout_s`` for one.

        Raises :class:`NoReplicaAvailable` when none becomes ready in time. The caller
        must :meth:`release` it.
        """
        r = self.try_acquire(model, exclude, avoid)
        if r is not None:
            return r
        try:
            async with asyncio.timeout(timeout_s):
                while r is None:
                    self._changed.clear()
                    await self._changed.wait()
                    r = self.try_acquire(model, exclude, avoid)
        except TimeoutError as exc:
            raise NoReplicaAvailable(
                f"no healthy replica of {model!r} became available within {timeout_s:g}s"
            ) from exc
        return r

    def release(self, r: Replica, slot: int | None = None) -> None:
        r.in_flight -= 1
        r.give_slot(slot)

    def drain(self, replica_id: str) -> None:
        """Take a replica out of the pool; listeners move its streams off."""
        self.apply(replica_id, Event.DRAIN)
        for cb in self.lost_listeners:
            cb(replica_id, True)

    def undrain(self, replica_id: str) -> None:
        self.apply(replica_id, Event.UNDRAIN)
