"""``albatross agent``: engine replicas on a host apart from the gateway.

An agent runs its config's models under its own supervisor, exactly as ``albatross
serve`` runs managed replicas, and tells a gateway about them over the authenticated
control API:

- *registration*: each replica's state (ready at a URL, or gone) is sent on every
  change and again every ``agent.heartbeat_s``, so a gateway that restarted learns its
  replicas back; the call is idempotent on the gateway's side;
- *notices*: the agent watches its own host's metadata service (``spot.source``) and
  SIGUSR1; a notice becomes ``POST /admin/preempt`` for this host's replicas with the
  deadline the cloud gave. The gateway drains them (finish in place or move now) and, with
  ``spot.aws``, launches a replacement host at once. The agent waits until the gateway
  reports its replicas empty (or the deadline passed), acknowledges the event where the
  cloud wants it (Azure: the eviction may then come early), and with ``spot.replace``
  restarts its engines, which register again as new processes;
- *stop* (SIGINT/SIGTERM): drain this host's replicas at the gateway, wait for them to
  empty (up to ``agent.drain_on_stop_s``), stop the engines, deregister.

Replica ids are ``MODEL@HOST/N`` so that agents never collide with each other or with
the gateway's own replicas (``MODEL/N``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from albatross.clouds import AzureWatcher, LocalWatcher, PreemptionNotice, watch
from albatross.config import Config
from albatross.core.errors import EngineError
from albatross.engines.http_client import ConnectionPool, request_json, split_base_url
from albatross.runtime.app import EngineFiles, probe, replica_spec
from albatross.runtime.spot import cloud_watcher
from albatross.supervisor.supervisor import Supervisor

log = logging.getLogger("albatross.agent")
RETRY_S = 1.0
"""Pause before a failed call to the gateway is tried again."""


class GatewayRejected(Exception):
    """The gateway answered a call with a 4xx: a configuration problem on one side (wrong
    token, a model the gateway does not serve, a replica id taken). Not retried."""


class GatewayLink:
    """Authenticated JSON calls to the gateway's control API."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        host, port = split_base_url(self.url)
        self._pool = ConnectionPool(host, port, max_idle=4)
        self._headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """Raises :class:`GatewayRejected` on a 4xx, :class:`EngineError` when the gateway
        is unreachable or fails (5xx): the caller retries those."""
        status, data = await request_json(
            self._pool, method, path, body, timeout_s=10.0, headers=self._headers
        )
        if status < 300:
            return data
        msg = data.get("error", {}).get("message") if isinstance(data, dict) else None
        text = f"{method} {self.url}{path}: {status} {msg or data!r}"
        if 400 <= status < 500:
            raise GatewayRejected(text)
        raise EngineError(text)

    def close(self) -> None:
        self._pool.close()


@dataclass
class _Mine:
    replica_id: str
    model: str
    slots: int
    instance_type: str
    url: str | None = None
    pid: int | None = None
    sent: tuple[str | None, int | None] | None = None
    """What the gateway last accepted for it."""


class Agent:
    """One engine host's agent; ``await start()`` then ``await run()``; ``stop()`` ends both."""

    def __init__(self, config: Config, files: EngineFiles, gateway_url: str, token: str) -> None:
        self.config = config
        self.host_id = config.agent.host_id or socket.gethostname()
        self.link = GatewayLink(gateway_url, token)
        self.mine: dict[str, _Mine] = {}
        specs = []
        for m in config.models:
            for i in range(m.replicas):
                rid = f"{m.name}@{self.host_id}/{i}"
                self.mine[rid] = _Mine(rid, m.name, m.parallel, m.instance_type)
                specs.append(replica_spec(config, files, m, i, rid, config.agent.bind_host))
        self.supervisor = Supervisor(
            specs, config.supervisor, self, probe, host=config.agent.bind_host
        )
        self.local = LocalWatcher(wait_s=3600)
        self._cloud = cloud_watcher(config.spot)
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[None]] = set()
        self._warned_at = 0.0

    # ---- supervisor listener: called on the loop, must not block ----------------
    def replica_ready(self, replica_id: str, base_url: str, pid: int) -> None:
        _, port = split_base_url(base_url)
        host = self.config.agent.advertise_host
        shown = f"[{host}]" if ":" in host else host
        m = self.mine[replica_id]
        m.url, m.pid = f"http://{shown}:{port}", pid
        self._changed.set()

    def replica_lost(self, replica_id: str, reason: str) -> None:
        m = self.mine[replica_id]
        m.url, m.pid = None, None
        log.warning("replica %s lost: %s", replica_id, reason)
        self._changed.set()

    # ---- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        """Start the engines and register them. Raises :class:`GatewayRejected` when the
        gateway refuses them; an unreachable gateway is retried in the background."""
        self.config.supervisor.log_dir.mkdir(parents=True, exist_ok=True)
        await self.supervisor.start()
        try:
            await self._report(force=True)
        except EngineError as exc:
            log.warning("gateway %s not reachable yet (%s); retrying", self.link.url, exc)
        self._tasks.append(asyncio.create_task(self._report_loop(), name="agent-report"))
        self._tasks.append(asyncio.create_task(self._watch(), name="agent-notices"))
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGUSR1, self.local.trigger, self.config.spot.default_lead_s
        )

    async def stop(self) -> None:
        """Drain at the gateway, stop the engines, deregister; never raises."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        ids = [m.replica_id for m in self.mine.values() if m.sent and m.sent[0]]
        for rid in ids:
            await self._quiet("POST", "/admin/drain", {"replica": rid})
        if ids:
            await self._wait_empty(ids, time.time() + self.config.agent.drain_on_stop_s)
        for t in [*self._tasks, *self._handling]:
            t.cancel()
        for t in [*self._tasks, *self._handling]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.supervisor.close()  # reports every replica lost
        with contextlib.suppress(Exception):
            await self._report(force=True)
        for rid in self.mine:
            await self._quiet("DELETE", "/admin/replicas", {"replica": rid})
        self.link.close()

    # ---- registration -----------------------------------------------------------
    def _registration(self, m: _Mine) -> dict[str, Any]:
        return {
            "replica": m.replica_id,
            "model": m.model,
            "host": self.host_id,
            "url": m.url,
            "slots": m.slots,
            "pid": m.pid,
            "instance_type": m.instance_type,
        }

    async def _report(self, force: bool = False) -> None:
        """Send each replica's state that the gateway has not accepted yet (all: force)."""
        for m in list(self.mine.values()):
            state = (m.url, m.pid)
            if force or m.sent != state:
                await self.link.call("POST", "/admin/replicas", self._registration(m))
                m.sent = state
                log.info(
                    "registered %s with %s: %s",
                    m.replica_id,
                    self.link.url,
                    m.url or "gone",
                )

    async def _report_loop(self) -> None:
        beat = self.config.agent.heartbeat_s
        next_beat = time.monotonic() + beat
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_beat - time.monotonic())):
                    await self._changed.wait()
            self._changed.clear()
            force = time.monotonic() >= next_beat
            if force:
                next_beat = time.monotonic() + beat
            try:
                await self._report(force)
            except (EngineError, GatewayRejected) as exc:
                self._warn(f"cannot report to the gateway: {exc}")
                await asyncio.sleep(RETRY_S)
                self._changed.set()

    def _warn(self, text: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 10.0:  # one line per 10 s while it lasts
            self._warned_at = now
            log.warning("%s; retrying", text)

    async def _quiet(self, method: str, path: str, body: Any) -> Any:
        try:
            return await self.link.call(method, path, body)
        except (EngineError, GatewayRejected) as exc:
            log.warning("%s", exc)
            return None

    # ---- notices ------------------------------------------------------------------
    async def _watch(self) -> None:
        watchers = [watch(self.local, 0.0, self._on_notice)]
        if self._cloud is not None:
            watchers.append(watch(self._cloud, self.config.spot.poll_interval_s, self._on_notice))
        await asyncio.gather(*watchers)

    def _on_notice(self, notice: PreemptionNotice) -> None:
        if notice.kind == "rebalance":
            log.warning("%s: rebalance recommendation (no deadline yet)", notice.source)
            return
        t = asyncio.create_task(self._handle(notice), name=f"notice-{notice.source}")
        self._handling.add(t)
        t.add_done_callback(self._handling.discard)

    async def _handle(self, notice: PreemptionNotice) -> None:
        deadline = notice.deadline_or(time.time(), self.config.spot.default_lead_s)
        ids = [m.replica_id for m in self.mine.values() if m.url is not None]
        if not ids:
            log.warning("%s notice: no replica of this host is up; nothing to drain", notice.source)
        body = {"source": f"{notice.source} notice on {self.host_id}"}
        while ids and time.time() < deadline:
            lead = min(3600.0, max(0.001, deadline - time.time()))
            try:
                await self.link.call(
                    "POST", "/admin/preempt", {**body, "replicas": ids, "deadline_s": lead}
                )
                log.warning(
                    "reported the %s notice to %s: %.1f s left", notice.source, self.link.url, lead
                )
                break
            except EngineError as exc:
                self._warn(f"cannot report the notice: {exc}")
                await asyncio.sleep(RETRY_S)
            except GatewayRejected as exc:
                log.error("the gateway refused the notice: %s", exc)
                break
        if ids:
            await self._wait_empty(ids, deadline)
        if isinstance(self._cloud, AzureWatcher) and notice.source == self._cloud.name:
            try:
                await self._cloud.acknowledge(notice)
                log.warning("acknowledged Azure event %s: eviction may come now", notice.event_id)
            except Exception as exc:
                log.error("could not acknowledge Azure event %s: %s", notice.event_id, exc)
        if self.config.spot.replace:
            for rid in ids:
                await self.supervisor.replace(rid)  # restarted, then re-registered

    async def _wait_empty(self, ids: list[str], deadline: float) -> None:
        """Until the gateway has no stream on ``ids`` or ``deadline`` (wall clock) passed."""
        while time.time() < deadline:
            data = await self._quiet("GET", "/admin/replicas", None)
            if isinstance(data, dict):
                busy = [
                    r["id"]
                    for r in data.get("replicas", [])
                    if r.get("id") in ids and r.get("in_flight", 0) > 0
                ]
                if not busy:
                    log.info("drained: no stream left on %s", ", ".join(ids))
                    return
            await asyncio.sleep(self.config.agent.drain_poll_s)
        log.warning("deadline reached with streams still on %s", ", ".join(ids))


def control_token(config: Config) -> str | None:
    return config.control.token or os.environ.get("ALBATROSS_CONTROL_TOKEN") or None
