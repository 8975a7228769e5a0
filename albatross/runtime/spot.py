"""Preemption notices -> deadline-aware drains -> replacements.

A notice (from a cloud's metadata service, the control API, ``albatross preempt`` or
SIGUSR1) names replicas and a deadline. Those replicas stop admitting requests at once.
Then, every tick until they are empty or the deadline has passed, the pure planner
(``core/drain.py``) decides per stream: finish in place, or move now (a planned move
while the source still runs). At the end each drained managed replica is restarted
on this machine (the local provider's replacement); a stream still on it then
continues from its journal like after any crash.

Replicas registered by ``albatross agent`` hosts are drained the same way; their agent
watches its own host's notices, reports them here, and restarts or loses its engines
once drained. With ``spot.aws`` configured, a replacement EC2 host is launched for each
such host at the notice, not after the drain: it has the whole notice to boot, and its
agent registers its engines when they are ready.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import statistics
import time
from collections.abc import Callable
from typing import Any

from albatross.clouds import (
    AwsWatcher,
    AzureWatcher,
    GcpWatcher,
    LocalWatcher,
    NoticeWatcher,
    PreemptionNotice,
    watch,
)
from albatross.clouds.aws_provider import AwsSpotProvider
from albatross.clouds.provider import ProviderError, ReplacementProvider
from albatross.config import AwsReplacementConfig, SpotConfig
from albatross.core.continuity import FailureReason
from albatross.core.drain import Decision, InFlight, plan_drain
from albatross.core.errors import AlbatrossError
from albatross.core.replicas import Event, ReplicaState
from albatross.runtime.pool import Pool
from albatross.runtime.registry import Registry
from albatross.supervisor.supervisor import Supervisor

log = logging.getLogger("albatross.spot")
TICK_S = 0.25
FALLBACK_SECONDS_PER_TOKEN = 0.05


def aws_provider(cfg: AwsReplacementConfig) -> AwsSpotProvider:
    """The EC2 provider for ``spot.aws`` (``endpoint_url`` for EC2-compatible APIs)."""

    def client(region: str) -> Any:
        import boto3

        return boto3.client("ec2", region_name=region, endpoint_url=cfg.endpoint_url)

    return AwsSpotProvider(
        cfg.region,
        launch_template=cfg.launch_template,
        image_id=cfg.image_id,
        instance_types=cfg.instance_types,
        subnet_id=cfg.subnet_id,
        tags=cfg.tags,
        fallback_on_demand=cfg.fallback_on_demand,
        client_factory=client,
    )


def cloud_watcher(cfg: SpotConfig) -> NoticeWatcher | None:
    """The metadata-service watcher for ``cfg.source``; None for ``local``/``none``."""
    if cfg.source == "aws":
        return AwsWatcher(cfg.base_url) if cfg.base_url else AwsWatcher()
    if cfg.source == "gcp":
        return GcpWatcher(cfg.base_url) if cfg.base_url else GcpWatcher()
    if cfg.source == "azure":
        if cfg.base_url:
            return AzureWatcher(cfg.base_url, vm_name=cfg.vm_name)
        return AzureWatcher(vm_name=cfg.vm_name)
    return None


class SpotController:
    def __init__(
        self, cfg: SpotConfig, pool: Pool, registry: Registry, supervisor: Supervisor
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.registry = registry
        self.supervisor = supervisor
        self.local = LocalWatcher()
        self._cloud = cloud_watcher(cfg)
        self._moving: set[str] = set()
        self.drains: dict[str, float] = {}
        """Replica id -> wall-clock deadline of the drain under way."""
        self.provider: ReplacementProvider | None = aws_provider(cfg.aws) if cfg.aws else None
        self.launches: list[dict[str, object]] = []
        """Replacement hosts asked of :attr:`provider`, newest last (``GET /admin/replicas``)."""
        self.host_notice_listeners: list[Callable[[str], None]] = []
        """Called with the notice's source when the notice is for this whole host (no
        replica named): the gateway moves its client connections to a peer."""

    async def run(self) -> None:
        """Watch the configured cloud (if any) forever; SIGUSR1 preempts every replica."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(
            signal.SIGUSR1, lambda: self.preempt(None, self.cfg.default_lead_s, "signal")
        )
        try:
            if self._cloud is not None:
                await watch(self._cloud, self.cfg.poll_interval_s, self._on_cloud_notice)
            else:
                await asyncio.Event().wait()
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    def _on_cloud_notice(self, notice: PreemptionNotice) -> None:
        if notice.kind == "rebalance":
            log.warning(
                "%s: rebalance recommendation (no deadline yet); nothing moved", notice.source
            )
            return
        deadline = notice.deadline_or(time.time(), self.cfg.default_lead_s)
        self.preempt(None, deadline - time.time(), notice.source)

    def preempt(self, ids: list[str] | None, lead_s: float, source: str = "local") -> list[str]:
        """Drain replicas ``ids`` (None: every managed replica) against a deadline
        ``lead_s`` from now. Returns the replica ids drained."""
        if ids is None:
            ids = [r.replica_id for r in self.pool.replicas.values() if r.managed]
            for listener in self.host_notice_listeners:
                listener(source)
        deadline = time.time() + lead_s
        fresh = [rid for rid in ids if rid not in self.drains]
        for rid in fresh:
            self.drains[rid] = deadline
            self.pool.replicas[rid].ledger.preemptions += 1
            self.pool.apply(rid, Event.DRAIN)  # stop admitting at once
        if fresh:
            log.warning(
                "preemption notice (%s): draining %s, deadline in %.1f s",
                source,
                ", ".join(fresh),
                lead_s,
            )
            self.registry.spawn(self._drain(fresh, deadline))
            hosts = sorted({h for rid in fresh if (h := self.pool.replicas[rid].host)})
            if self.provider is not None:
                for host in hosts:
                    self.registry.spawn(self._replace_host(host, source))
        return ids

    async def _replace_host(self, host: str, source: str) -> None:
        """Ask the provider for a host to take over from ``host``; record the outcome."""
        assert self.provider is not None
        entry: dict[str, object] = {
            "replaces": host,
            "source": source,
            "state": "launching",
            "at": time.time(),
        }
        self.launches.append(entry)
        try:
            launched = await self.provider.launch(f"replaces {host}")
        except ProviderError as exc:
            entry.update(state="failed", error=str(exc))
            log.error("replacement for %s not launched: %s", host, exc)
            return
        entry.update(
            state="running",
            host_id=launched.host_id,
            address=launched.address,
            lifecycle=launched.lifecycle,
            instance_type=launched.instance_type,
        )
        log.warning(
            "replacement for %s: %s %s instance %s at %s; its agent registers its engines",
            host,
            launched.lifecycle,
            launched.instance_type,
            launched.host_id,
            launched.address,
        )

    async def _drain(self, ids: list[str], deadline: float) -> None:
        try:
            while True:
                now = time.time()
                left = [rid for rid in ids if self.registry.on_replica(rid)]
                if not left or now >= deadline:
                    break
                for rid in left:
                    self._tick(rid, now, deadline, ids)
                await asyncio.sleep(TICK_S)
            for rid in ids:
                remaining = len(self.registry.on_replica(rid))
                log.info("drain of %s done: %d streams left at the end", rid, remaining)
                r = self.pool.replicas.get(rid)
                if self.cfg.replace and r is not None and r.managed:
                    await self.supervisor.replace(rid)  # restarted: the replacement
        finally:
            for rid in ids:
                self.drains.pop(rid, None)

    def _tick(self, rid: str, now: float, deadline: float, draining: list[str]) -> None:
        sessions = self.registry.on_replica(rid)
        model = self.pool.replicas[rid].model
        perf = time.perf_counter()
        rates = []
        for s in sessions:
            leg = s.leg
            if leg is not None and len(s.journal) > leg.info.start:
                rates.append((perf - leg.started) / (len(s.journal) - leg.info.start))
        spt = statistics.median(rates) if rates else FALLBACK_SECONDS_PER_TOKEN
        free = sum(
            len(r.free_slots)
            for r in self.pool.replicas.values()
            if r.model == model
            and r.replica_id not in draining
            and r.health.state is ReplicaState.READY
        )
        by_id = {s.request_id: s for s in sessions}
        plan = plan_drain(
            now,
            deadline,
            [
                InFlight(s.request_id, len(s.journal), s.journal.params.max_tokens, s.continuable)
                for s in sessions
            ],
            seconds_per_token=spt,
            free_slots_elsewhere=free,
            margin_s=self.cfg.margin_s,
        )
        for req in plan.ids(Decision.MIGRATE_NOW):
            if req not in self._moving:
                self._moving.add(req)
                log.info(
                    "drain of %s: moving %s now (at token %d of %d; %.1f ms/token, %.1f s left)",
                    rid,
                    req,
                    len(by_id[req].journal),
                    by_id[req].journal.params.max_tokens,
                    spt * 1000,
                    deadline - now,
                )
                self.registry.spawn(self._move(by_id[req].request_id))

    async def _move(self, request_id: str) -> None:
        from albatross.runtime.moves import move

        try:
            s = self.registry.live.get(request_id)
            if s is not None:
                t0 = time.perf_counter()
                path = await move(s, None, None, FailureReason.DRAINED)
                log.info("drain: %s %s in %.2f s", request_id, path, time.perf_counter() - t0)
        except AlbatrossError as exc:
            log.warning("drain: %s not moved: %s", request_id, exc.message)
        finally:
            self._moving.discard(request_id)
