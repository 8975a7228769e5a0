"""The replica pool: who serves which model, in what health, with how much in flight.

It is the supervisor's listener (processes come and go) and the health checker's
target; decisions are the pure functions of ``core/replicas.py``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

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
from albatross.engines.llama_server import LlamaServerClient
from albatross.gateway.metrics import Metrics

log = logging.getLogger("albatross.pool")
_STATES = tuple(s.value for s in ReplicaState)


@dataclass(eq=False)
class Replica:
    replica_id: str
    model: str
    managed: bool
    client: LlamaServerClient | None = None
    health: Health = field(default_factory=Health)
    in_flight: int = 0
    pid: int | None = None


class Pool:
    def __init__(self, metrics: Metrics, health_failures: int) -> None:
        self._metrics = metrics
        self._threshold = health_failures
        self.replicas: dict[str, Replica] = {}
        self._last: dict[str, str | None] = {}
        self._changed = asyncio.Event()

    def add(self, replica_id: str, model: str, managed: bool, base_url: str | None = None) -> Replica:
        r = Replica(replica_id, model, managed, LlamaServerClient(base_url) if base_url else None)
        self.replicas[replica_id] = r
        self._publish(r)
        return r

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
        self._metrics.set_replica_state(r.model, r.replica_id, r.health.state.value, _STATES)

    # ---- supervisor listener -------------------------------------------------
    def replica_ready(self, replica_id: str, base_url: str, pid: int) -> None:
        r = self.replicas[replica_id]
        if r.client is not None:
            r.client.close()
        r.client = LlamaServerClient(base_url)
        r.pid = pid
        self.apply(replica_id, Event.STARTED)

    def replica_lost(self, replica_id: str, reason: str) -> None:
        r = self.replicas[replica_id]
        log.warning("replica %s lost: %s", replica_id, reason)
        r.pid = None
        self._metrics.replica_restarts.labels(r.model, replica_id).inc()
        self.apply(replica_id, Event.LOST)

    # ---- routing -------------------------------------------------------------
    def try_acquire(self, model: str) -> Replica | None:
        cands = [
            Candidate(r.replica_id, r.health.state, r.in_flight)
            for r in self.replicas.values()
            if r.model == model and r.client is not None
        ]
        rid = pick(cands, self._last.get(model))
        if rid is None:
            return None
        self._last[model] = rid
        r = self.replicas[rid]
        r.in_flight += 1
        return r

    async def acquire(self, model: str, timeout_s: float) -> Replica:
        """A ready replica of ``model`` (least loaded), waiting up to ``timeout_s`` for one.

        Raises :class:`NoReplicaAvailable` when none becomes ready in time. The caller
        must :meth:`release` it.
        """
        r = self.try_acquire(model)
        if r is not None:
            return r
        try:
            async with asyncio.timeout(timeout_s):
                while r is None:
                    self._changed.clear()
                    await self._changed.wait()
                    r = self.try_acquire(model)
        except TimeoutError as exc:
            raise NoReplicaAvailable(f"no healthy replica of {model!r} became available within {timeout_s:g}s") from exc
        return r

    def release(self, r: Replica) -> None:
        r.in_flight -= 1
