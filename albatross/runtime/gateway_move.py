"""Moving every live SSE connection of this gateway to a peer gateway, and adopting
connections moved here: the runtime half of connection migration.

Source (:meth:`GatewayMove.migrate_out`), for each streaming response in flight:

1. ``stop``: :meth:`StreamSession.hand_off` freezes the connection's writes (the
   client's bytes end at a chunk boundary) and cancels the generation leg; it
   returns the id of the last SSE event written, which with the journal is the
   stream's whole state (:mod:`albatross.core.stream_snapshot`);
2. ``flush``: wait until the transport handed every written byte to the kernel,
   then take the socket out of the event loop without ending the TCP connection;
3. ``hold``, ``drain``, ``release_vip``, ``dump``: the kernel sequence of
   :mod:`albatross.netmove.migrate` (zero window, SIOCOUTQ barrier, VIP off, TCP
   repair export and silent close);
4. ``handoff``: the states and snapshots go to the peer in one sealed message; the
   acknowledgement says per connection whether it was restored.

Target (:meth:`GatewayMove._on_handoff`): guard, VIP claim (address, and the route
where one is configured), restore; then each socket becomes a
:class:`~albatross.gateway.http.Connection` in mid-response, and a
:class:`StreamSession` rebuilt from the snapshot continues exactly like a
``Last-Event-ID`` resume: the owed text first, then a re-prefill continuation on one
of this gateway's replicas.

Every kernel call that goes through netlink (pyroute2, whose blocking API must not
run inside a running event loop) runs on one worker thread of this object's own;
the hops cost tens of microseconds.

If the handoff cannot be delivered (peer down, refused), the source adopts the
connections back itself: they are restored here and continued, as after any move.
One move runs at a time. Each step's duration is kept for ``GET
/admin/migrate-gateway`` and the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from albatross.config import NetmoveConfig
from albatross.core.continuity import StreamState
from albatross.core.errors import Conflict, InvalidField
from albatross.core.stream_snapshot import SnapshotError, StreamSnapshot, decode, encode
from albatross.gateway.errors import error_response
from albatross.gateway.http import Connection, Handler
from albatross.gateway.sse import Encoder
from albatross.netmove.channel import HandoffServer, send_handoff
from albatross.netmove.errors import NetmoveError
from albatross.netmove.handoff import MIN_KEY_BYTES, ConnectionHandoff, HandoffMessage
from albatross.netmove.hold import Guard, Hold
from albatross.netmove.migrate import Released, adopt_connections, dump_and_close, freeze
from albatross.netmove.tcp_repair import close_silently, drain_barrier_async
from albatross.netmove.vip import LocalVip, VipRoute
from albatross.runtime.stream import Services, StreamSession

__all__ = ["KEY_ENV", "GatewayMove", "HandoffKeyError", "load_key"]

log = logging.getLogger("albatross.gateway_move")

KEY_ENV = "ALBATROSS_HANDOFF_KEY"
FLUSH_POLL_S = 0.0005
HISTORY = 20
T = TypeVar("T")


class HandoffKeyError(RuntimeError):
    """No usable handoff key: raised at start, naming where it was looked for."""


def load_key(cfg: NetmoveConfig) -> bytes:
    """The shared key from ``netmove.key_file`` or ``$ALBATROSS_HANDOFF_KEY``."""
    if cfg.key_file is not None:
        try:
            key = cfg.key_file.read_bytes().strip()
        except OSError as exc:
            raise HandoffKeyError(
                f"netmove.key_file = {str(cfg.key_file)!r}: {exc.strerror}"
            ) from exc
        where = f"netmove.key_file = {str(cfg.key_file)!r}"
    else:
        key = os.environ.get(KEY_ENV, "").encode()
        where = f"${KEY_ENV}"
    if len(key) < MIN_KEY_BYTES:
        raise HandoffKeyError(
            f"{where}: {len(key)} bytes; the handoff key must be at least {MIN_KEY_BYTES}"
        )
    return key


class _Laps:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._last = self._start = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.ms[step] = self.ms.get(step, 0.0) + 1000 * (now - self._last)
        self._last = now

    def add(self, times_s: dict[str, float]) -> None:
        for step, s in times_s.items():
            self.ms[step] = self.ms.get(step, 0.0) + 1000 * s
        self._last = time.perf_counter()

    def total(self) -> None:
        self.ms["total"] = 1000 * (time.perf_counter() - self._start)


class GatewayMove:
    """Owns the hold, guard, VIP handles and handoff server of one gateway."""

    def __init__(
        self, cfg: NetmoveConfig, services: Services, handler: Handler, max_body: int
    ) -> None:
        assert cfg.gateway_id is not None and cfg.vip is not None  # checked by the config
        self.cfg = cfg
        self.gateway_id = cfg.gateway_id
        self.services = services
        self._handler = handler
        self._max_body = max_body
        self._stack = contextlib.ExitStack()
        self._lock = asyncio.Lock()
        self._key = b""
        self.hold: Hold | None = None
        self.guard: Guard | None = None
        self.vip: LocalVip | None = None
        self.route: VipRoute | None = None
        self.server: HandoffServer | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        """The latest moves out and in, newest last (``GET /admin/migrate-gateway``)."""
        self._kernel = ThreadPoolExecutor(1, thread_name_prefix="netmove")

    async def _k(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking kernel call on the netlink worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._kernel, functools.partial(fn, *args, **kwargs))

    # ---- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        """Attach the hold and guard (removing a crashed run's leftovers), open the VIP
        handles and start the handoff server. Undone by :meth:`close`."""
        cfg = self.cfg
        self._key = load_key(cfg)
        try:
            await self._k(self._open_kernel)
            self.server = HandoffServer(self._key, self.gateway_id, self._on_handoff)
            host, port = await self.server.start(cfg.listen_host, cfg.listen_port)
        except BaseException:
            await self._k(self._stack.close)
            raise
        assert self.vip is not None
        held = await self._k(self.vip.held)
        log.info(
            "connection migration: gateway %s, VIP %s on %s (%s), handoffs on %s:%d",
            self.gateway_id,
            cfg.vip,
            cfg.interface,
            "held" if held else "not held",
            host,
            port,
        )

    def _open_kernel(self) -> None:
        cfg = self.cfg
        assert cfg.vip is not None
        self.hold = self._stack.enter_context(Hold(cfg.interface))
        self.guard = self._stack.enter_context(Guard(cfg.interface))
        self.vip = self._stack.enter_context(LocalVip(cfg.vip, cfg.interface, cfg.vip_prefixlen))
        if cfg.route_netns is not None:
            from albatross.netmove.netns import entered

            with entered(cfg.route_netns):
                self.route = self._stack.enter_context(VipRoute(cfg.vip))

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
        await self._k(self._stack.close)
        self._kernel.shutdown()

    # ---- source -------------------------------------------------------------------
    def peer(self, to: str) -> tuple[str, str, int]:
        """(gateway id, host, port) of peer ``to``, given by id or by host."""
        for name, addr in self.cfg.peers.items():
            host, _, port = addr.rpartition(":")
            if to in (name, host, addr):
                return name, host, int(port)
        known = ", ".join(self.cfg.peers) or "none configured (netmove.peers)"
        raise InvalidField("to", to, f"is not a peer gateway; known: {known}")

    def movable(self) -> list[StreamSession]:
        """Streaming responses in flight whose connection can move."""
        out: dict[int, StreamSession] = {}
        for s in self.services.registry.live.values():
            if (
                s.stream
                and not s.client_gone
                and not s.conn.closed
                and s.conn.transport is not None
            ):
                out[id(s.conn)] = s
        return list(out.values())

    async def migrate_out(self, to: str) -> dict[str, Any]:
        """Move every streaming connection to peer ``to``; returns what happened."""
        name, host, port = self.peer(to)
        if self._lock.locked():
            raise Conflict("a gateway move is already under way")
        async with self._lock:
            if not await self.vip_held():
                raise Conflict(
                    f"this gateway does not hold the VIP {self.cfg.vip}; nothing to move"
                )
            return await self._migrate_out(name, host, port)

    async def _migrate_out(self, name: str, host: str, port: int) -> dict[str, Any]:
        laps = _Laps()
        sessions = self.movable()
        # Whether the head is out must be read before hand_off() freezes the writes.
        snaps = [self._snapshot(s, s.response_started, s.hand_off()) for s in sessions]
        laps.lap("stop")
        conns = [s.conn for s in sessions]
        failed: list[str] = await self._flush(conns, sessions)
        keep = [i for i, c in enumerate(conns) if not c.closed]
        socks = [conns[i].detach_socket() for i in keep]
        snaps = [snaps[i] for i in keep]
        laps.lap("flush")
        flows = freeze(socks, self.hold)
        laps.lap("hold")
        released = Released(states=[])
        released.drain = await drain_barrier_async(socks, self.cfg.drain_timeout_s)
        laps.lap("drain")
        assert self.vip is not None
        try:
            await self._k(dump_and_close, socks, self.vip.release, released)
        finally:
            if self.hold is not None:
                self.hold.remove(flows)
        laps.add(released.times)
        failed += [f"export {snaps[i].request_id}: {why}" for i, why in released.failed.items()]
        message = HandoffMessage(
            self.gateway_id,
            name,
            tuple(
                ConnectionHandoff(state, encode(snap))
                for state, snap in zip(released.states, snaps, strict=True)
                if state is not None
            ),
        )
        record: dict[str, Any] = {"direction": "out", "peer": name, "at": time.time()}
        try:
            ack = await send_handoff(host, port, message, self._key, timeout_s=10.0)
        except (NetmoveError, OSError, TimeoutError) as exc:
            laps.lap("handoff")
            log.error("handoff to %s failed (%s); taking the connections back", name, exc)
            errors = await self._on_handoff(message)
            record.update(rolled_back=True, error=str(exc))
            restored = sum(e is None for e in errors)
        else:
            laps.lap("handoff")
            errors = list(ack.errors)
            restored = ack.restored
        failed += [
            f"{c.tcp.flow}: {e}" for c, e in zip(message.connections, errors, strict=True) if e
        ]
        laps.total()
        record.update(
            connections=len(sessions),
            moved=restored,
            failed=failed,
            drained=released.drain.drained,
            times_ms={k: round(v, 3) for k, v in laps.ms.items()},
        )
        self.history.append(record)
        log.warning(
            "moved %d of %d connections to %s in %.1f ms%s",
            restored,
            len(sessions),
            name,
            laps.ms["total"],
            f"; failed: {'; '.join(failed)}" if failed else "",
        )
        return record

    def _snapshot(self, s: StreamSession, head_sent: bool, sent_id: int) -> StreamSnapshot:
        leg = s.leg
        return StreamSnapshot.of(
            s.journal,
            kind=s.encoder.kind,
            model=s.model,
            created=s.encoder.created,
            include_usage=s.include_usage,
            sent_id=sent_id,
            head_sent=head_sent,
            keep_alive=s.conn.keep_alive,
            migrations=s.state.migrations,
            engine_url=leg.replica.client.base_url if leg and leg.replica.client else None,
            slot=leg.slot if leg else None,
        )

    async def _flush(
        self, conns: Sequence[Connection], sessions: Sequence[StreamSession]
    ) -> list[str]:
        """Wait until every transport passed its bytes to the kernel; a client that
        reads nothing for ``drain_timeout_s`` is cut off (its bytes cannot travel)."""
        deadline = time.perf_counter() + self.cfg.drain_timeout_s
        while any(c.unsent() and not c.closed for c in conns):
            if time.perf_counter() > deadline:
                failed = []
                for c, s in zip(conns, sessions, strict=True):
                    if c.unsent() and not c.closed:
                        failed.append(f"{s.request_id}: {c.unsent()} bytes not taken by the client")
                        c.close()
                return failed
            await asyncio.sleep(FLUSH_POLL_S)
        return []

    # ---- target -------------------------------------------------------------------
    def _claim_vip(self) -> None:
        assert self.vip is not None
        self.vip.claim()
        if self.route is not None and self.cfg.route_via is not None:
            self.route.point(self.cfg.route_via)

    async def _on_handoff(self, message: HandoffMessage) -> list[str | None]:
        """Restore the connections of a verified handoff and continue their streams."""
        laps = _Laps()
        errors: list[str | None] = [None] * len(message.connections)
        snaps: list[StreamSnapshot | None] = []
        for i, c in enumerate(message.connections):
            try:
                snaps.append(decode(c.app_state))
            except SnapshotError as exc:
                snaps.append(None)
                errors[i] = str(exc)
        laps.lap("decode")
        adopted = await self._k(
            adopt_connections,
            [c.tcp for c in message.connections],
            claim_vip=self._claim_vip,
            guard=self.guard,
        )
        laps.add(adopted.times)
        loop = asyncio.get_running_loop()
        for i, (sock, snap) in enumerate(zip(adopted.sockets, snaps, strict=True)):
            if sock is None:
                errors[i] = adopted.failed.get(i, "not restored")
                continue
            if snap is None:
                # The socket exists but its stream cannot go on: end the connection
                # (the client sees the body cut short, not a hang).
                sock.close()
                continue
            sock.setblocking(False)
            conn = Connection.adopted(
                self._handler,
                error_response,
                self._max_body,
                keep_alive=snap.keep_alive,
                head_sent=snap.head_sent,
            )
            try:
                await loop.create_connection(lambda conn=conn: conn, sock=sock)  # type: ignore[misc]
            except OSError as exc:
                close_silently(sock)
                errors[i] = f"attaching the restored socket: {exc}"
                continue
            session = self._session(snap, conn)
            conn.serve_adopted(
                functools.partial(session.resume, conn, snap.sent_id, snap.engine_url, snap.slot)
            )
        laps.lap("attach")
        laps.total()
        self.history.append(
            {
                "direction": "in",
                "peer": message.source,
                "at": time.time(),
                "connections": len(message.connections),
                "moved": sum(e is None for e in errors),
                "failed": [e for e in errors if e],
                "times_ms": {k: round(v, 3) for k, v in laps.ms.items()},
            }
        )
        log.warning(
            "adopted %d of %d connections from %s in %.1f ms",
            sum(e is None for e in errors),
            len(errors),
            message.source,
            laps.ms["total"],
        )
        return errors

    def _session(self, snap: StreamSnapshot, conn: Connection) -> StreamSession:
        session = StreamSession(
            self.services,
            conn,
            snap.journal(),
            Encoder(snap.kind, snap.request_id, snap.model, snap.created),
            snap.model,
            stream=True,
            include_usage=snap.include_usage,
            received_at=time.perf_counter(),
            state=StreamState(migrations=snap.migrations),
        )
        session._emitted = True  # its first token was timed where it started
        session.sent_id = snap.sent_id
        return session

    async def vip_held(self) -> bool:
        return self.vip is not None and await self._k(self.vip.held)

    async def status(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway_id,
            "vip": self.cfg.vip,
            "vip_held": await self.vip_held(),
            "peers": dict(self.cfg.peers),
            "movable": len(self.movable()),
            "history": list(self.history),
        }
