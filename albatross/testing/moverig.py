"""A rig that moves live token streams from gateway A to gateway B in namespaces.

:class:`MoveRig` sets up, on a :func:`albatross.testing.netns.topology`: a
:class:`~albatross.testing.tokenstream.Streamer` on A listening on the VIP and one on
B listening on the wildcard address (so a restored socket must coexist with a
listener on its port), the zero-window :class:`~albatross.netmove.hold.Hold` on A's
interface, the XDP :class:`~albatross.netmove.hold.Guard` on B's, and netlink handles
for the VIP on A and B and its route on the router. :meth:`MoveRig.move` runs the
real sequence (:mod:`albatross.netmove.migrate`), with the states and positions
carried in a sealed and verified handoff message. Clients run as separate processes
in the client namespace (:meth:`MoveRig.start_client`).

Everything is undone on exit, in reverse order, whatever failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from albatross.netmove.handoff import (
    ConnectionHandoff,
    HandoffMessage,
    ReplayCache,
    open_handoff,
    seal_handoff,
)
from albatross.netmove.hold import Guard, Hold
from albatross.netmove.migrate import Adopted, adopt_connections, freeze, release_connections
from albatross.netmove.state import TcpState
from albatross.netmove.tcp_repair import close_silently, import_socket, resume_socket
from albatross.netmove.vip import LocalVip, VipRoute
from albatross.testing.netns import Topology
from albatross.testing.tokenstream import AppState, Streamer

__all__ = ["MoveReport", "MoveRig"]

KEY = b"moverig-shared-key-0123456789abcdef"


@dataclass
class MoveReport:
    """What one move did and how long each control-plane step took (seconds)."""

    times: dict[str, float] = field(default_factory=dict)
    drained: bool = True
    unacked: tuple[int, ...] = ()
    failed: list[str] = field(default_factory=list)
    held_packets: int = 0
    guarded_packets: int = 0
    handoff_bytes: int = 0
    states: list[TcpState] = field(default_factory=list)


class MoveRig:
    """See the module docstring. Use as a context manager."""

    def __init__(
        self, topo: Topology, *, ipv6: bool = False, port: int = 9000, interval_s: float = 0.01
    ) -> None:
        self.topo = topo
        self.ipv6 = ipv6
        self.port = port
        self.vip = topo.vip6 if ipv6 else topo.vip
        self.gw_b_ip = topo.gw_b_ip6 if ipv6 else topo.gw_b_ip
        self.streamer_a = Streamer(interval_s=interval_s, name="streamer-a")
        self.streamer_b = Streamer(interval_s=interval_s, name="streamer-b")
        self.hold = Hold(topo.gw_ifname)
        self.guard = Guard(topo.gw_ifname)
        self._stack = contextlib.ExitStack()
        self._clients: list[subprocess.Popen[str]] = []
        self.replay = ReplayCache()

    def __enter__(self) -> MoveRig:
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _listener(self, addr: str) -> socket.socket:
        family = socket.AF_INET6 if self.ipv6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, self.port))
        sock.listen(512)
        return sock

    def _setup(self) -> None:
        t, s = self.topo, self._stack
        s.callback(self._kill_clients)
        with t.gw_a.entered():
            self.streamer_a.listen(self._listener(self.vip))
            s.enter_context(self.hold)
            self.vip_a = s.enter_context(LocalVip(self.vip, t.gw_ifname))
        with t.gw_b.entered():
            self.streamer_b.listen(self._listener("::" if self.ipv6 else "0.0.0.0"))
            s.enter_context(self.guard)
            self.vip_b = s.enter_context(LocalVip(self.vip, t.gw_ifname))
        with t.router.entered():
            self.route = s.enter_context(VipRoute(self.vip))
        for streamer in (self.streamer_a, self.streamer_b):
            streamer.start()
            s.callback(streamer.close)

    # ---- clients ------------------------------------------------------------------
    def start_client(
        self,
        conns: int = 1,
        tokens: int = 100,
        upload_bytes: int = 0,
        upload_rate: float = 200_000.0,
        timeout_s: float = 120.0,
    ) -> subprocess.Popen[str]:
        argv = self.topo.client.argv(
            sys.executable, "-m", "albatross.testing.tokenstream",
            "--host", self.vip, "--port", str(self.port), "--conns", str(conns),
            "--tokens", str(tokens), "--upload-bytes", str(upload_bytes),
            "--upload-rate", str(upload_rate), "--timeout", str(timeout_s),
        )  # fmt: skip
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._clients.append(proc)
        return proc

    def wait_streaming(self, n: int, timeout_s: float = 20.0, min_tokens: int = 0) -> None:
        """Until A serves ``n`` connections (and, optionally, wrote ``min_tokens`` each)."""
        deadline = time.monotonic() + timeout_s
        while self.streamer_a.streaming() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.streamer_a.streaming()} of {n} clients connected")
            time.sleep(0.01)
        time.sleep(min_tokens * self.streamer_a.interval_s)

    def wait_finished(self, n: int, timeout_s: float = 10.0) -> list[AppState]:
        """Until B's streamer saw ``n`` connections end; returns their final states."""
        deadline = time.monotonic() + timeout_s
        while len(self.streamer_b.finished) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.streamer_b.finished)} of {n} streams ended on B")
            time.sleep(0.01)
        return list(self.streamer_b.finished)

    def finish_client(
        self, proc: subprocess.Popen[str], timeout_s: float = 180.0
    ) -> dict[str, Any]:
        out, err = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"client exited {proc.returncode}: {err.strip()[-2000:]}")
        report: dict[str, Any] = json.loads(out)
        return report

    def _kill_clients(self) -> None:
        for proc in self._clients:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)

    # ---- the move -----------------------------------------------------------------
    def move(
        self,
        *,
        drain_timeout_s: float = 1.0,
        wait_before_restore_s: float = 0.0,
        restore_timestamp: bool = True,
        hold_lead_s: float | None = None,
    ) -> MoveReport:
        """Move every connection of A to B.

        ``wait_before_restore_s`` keeps the clients held that long after the address
        reached B (guarded) and before their sockets exist there.
        ``restore_timestamp=False`` skips TCP_TIMESTAMP on restore (the timestamp test).
        ``hold_lead_s``: how long before the streamer stops writing the flows go under
        the hold (default: one token interval), so that the last tokens carry the zero
        window to the clients; 0 applies the hold only when writing stopped.
        """
        t = self.topo
        report = MoveReport()
        lead = self.streamer_a.interval_s if hold_lead_s is None else hold_lead_s
        if lead > 0:
            freeze(self.streamer_a.sockets(), self.hold)
            time.sleep(lead)
        pairs = self.streamer_a.pause()
        start = time.perf_counter()
        with t.gw_a.entered():
            released = release_connections(
                [sock for sock, _ in pairs],
                release_vip=self.vip_a.release,
                hold=self.hold,
                drain_timeout_s=drain_timeout_s,
            )
        report.times.update(released.times)
        report.failed += [f"export {i}: {why}" for i, why in released.failed.items()]
        report.drained = released.drain.drained if released.drain else True
        report.unacked = released.drain.unacked if released.drain else ()
        report.held_packets = released.held_packets

        lap = time.perf_counter()
        conns = tuple(
            ConnectionHandoff(state, app.encode())
            for state, (_, app) in zip(released.states, pairs, strict=True)
            if state is not None
        )
        now_ms = time.time_ns() // 1_000_000
        sealed = seal_handoff(
            HandoffMessage("gw-a", "gw-b", conns), KEY, now_ms=now_ms, ttl_ms=120_000,
            nonce=os.urandom(16),
        )  # fmt: skip
        message = open_handoff(sealed, KEY, now_ms=now_ms, replay=self.replay, expect_target="gw-b")
        report.handoff_bytes = len(sealed)
        report.times["handoff"] = time.perf_counter() - lap
        states = [c.tcp for c in message.connections]
        report.states = states

        def claim() -> None:
            self.vip_b.claim()
            self.route.point(self.gw_b_ip)
            if wait_before_restore_s:
                time.sleep(wait_before_restore_s)

        with t.gw_b.entered():
            if restore_timestamp:
                adopted = adopt_connections(states, claim_vip=claim, guard=self.guard)
            else:
                adopted = _adopt_without_timestamp(states, claim, self.guard)
        report.times.update(adopted.times)
        report.times["total"] = time.perf_counter() - start
        report.guarded_packets = adopted.guarded_packets
        report.failed += [f"restore {i}: {why}" for i, why in adopted.failed.items()]
        for sock, conn in zip(adopted.sockets, message.connections, strict=True):
            if sock is not None:
                self.streamer_b.adopt(sock, AppState.decode(conn.app_state))
        return report

    def counters(self) -> dict[str, dict[str, int]]:
        t = self.topo
        return {
            "client": t.client.counters(),
            "router": t.router.counters(),
            "a": t.gw_a.counters(),
            "b": t.gw_b.counters(),
        }


def _adopt_without_timestamp(
    states: list[TcpState], claim: Callable[[], None], guard: Guard
) -> Adopted:
    """:func:`adopt_connections` minus TCP_TIMESTAMP: what a restore without it does."""
    guard.add(s.flow for s in states)
    claim()
    socks = [import_socket(s, resume=False, timestamp=False) for s in states]
    guard.remove(s.flow for s in states)
    for sock, state in zip(socks, states, strict=True):
        try:
            resume_socket(sock, state)
        except BaseException:
            close_silently(sock)
            raise
    return Adopted(sockets=list(socks))


@contextlib.contextmanager
def rig(topo: Topology, **kwargs: Any) -> Iterator[MoveRig]:
    with MoveRig(topo, **kwargs) as r:
        yield r
