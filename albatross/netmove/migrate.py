"""The two halves of a connection move, in the order that gives no RST.

Source gateway (:func:`release_connections`), after its application stopped writing
to the sockets:

1. ``hold``: add the flows to the zero-window hold, so clients stop sending;
2. ``drain``: wait until the clients acknowledged everything (SIOCOUTQ == 0), or
   time out and carry the unacknowledged bytes;
3. ``release_vip``: stop owning the service address; from now on the clients'
   segments are dropped here silently (a socket-less address would answer RST);
4. ``dump``: export every socket and close it in repair mode (no FIN, no RST).

Target gateway (:func:`adopt_connections`), with the states:

1. ``guard``: drop the flows' incoming packets (XDP) until their sockets exist;
2. ``claim_vip``: own the address and make it reach this host;
3. ``restore``: rebuild every socket in repair mode, lift the guard, leave repair
   mode (which sends a window probe), and write the never-sent tails.

Each step's duration is recorded (``perf_counter`` seconds) for the benchmark's
control-plane split. A connection that fails is reported with its reason and the
others go on: one bad socket must not strand the rest. These calls block for at most
a few milliseconds per hundred connections, except the drain barrier; async callers
run :func:`freeze`, :func:`.tcp_repair.drain_barrier_async` and :func:`dump_and_close`
themselves.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from albatross.netmove.errors import NetmoveError
from albatross.netmove.hold import Guard, Hold
from albatross.netmove.state import Flow, TcpState
from albatross.netmove.tcp_repair import (
    DrainResult,
    close_silently,
    drain_barrier,
    export_socket,
    import_socket,
    resume_socket,
)

__all__ = [
    "Adopted",
    "Released",
    "adopt_connections",
    "dump_and_close",
    "freeze",
    "release_connections",
]


@dataclass
class Released:
    """What the source hands over: the states, in the order of the sockets given
    (None where the export failed, with the reason in ``failed``)."""

    states: list[TcpState | None]
    drain: DrainResult | None = None
    failed: dict[int, str] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    held_packets: int = 0
    """Segments whose window the hold set to 0 for these flows (diagnostics)."""


@dataclass
class Adopted:
    """Restored sockets in the order of the states given (None where it failed)."""

    sockets: list[socket.socket | None]
    failed: dict[int, str] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    guarded_packets: int = 0
    """Incoming packets the guard dropped for these flows (diagnostics)."""


class _Timer:
    def __init__(self, times: dict[str, float]) -> None:
        self.times = times
        self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.times[step] = self.times.get(step, 0.0) + now - self._last
        self._last = now


def _flows(socks: Sequence[socket.socket]) -> list[Flow]:
    out = []
    for s in socks:
        try:
            out.append(Flow.of(s))
        except OSError:
            continue  # not connected any more: nothing to hold
    return out


def freeze(socks: Sequence[socket.socket], hold: Hold | None) -> list[Flow]:
    """Step 1: put the sockets' flows under the zero-window hold; returns the flows.

    Best called just before the application's last write: that segment then tells
    the client the window is 0. TCP_QUICKACK pushes out a pending acknowledgement of
    uploaded data now, with the zero window in it, instead of after the delayed-ACK
    timer. Calling it again for the same sockets is harmless.
    """
    flows = _flows(socks)
    if hold is not None:
        hold.add(flows)
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    return flows


def dump_and_close(
    socks: Sequence[socket.socket],
    release_vip: Callable[[], None],
    released: Released,
) -> None:
    """Steps 3 and 4: release the address, then export and silently close each socket."""
    timer = _Timer(released.times)
    release_vip()
    timer.lap("release_vip")
    for i, sock in enumerate(socks):
        try:
            released.states.append(export_socket(sock))
        except NetmoveError as exc:
            released.states.append(None)
            released.failed[i] = str(exc)
        close_silently(sock)
    timer.lap("dump")


def release_connections(
    socks: Sequence[socket.socket],
    *,
    release_vip: Callable[[], None],
    hold: Hold | None = None,
    drain_timeout_s: float = 1.0,
) -> Released:
    """The source half (see the module docstring); the sockets are closed on return."""
    released = Released(states=[])
    timer = _Timer(released.times)
    flows = freeze(socks, hold)
    timer.lap("hold")
    released.drain = drain_barrier(socks, drain_timeout_s)
    timer.lap("drain")
    try:
        dump_and_close(socks, release_vip, released)
    finally:
        if hold is not None and hold.attached:
            released.held_packets = sum(hold.packets(f) or 0 for f in flows)
            hold.remove(flows)
    return released


def adopt_connections(
    states: Sequence[TcpState],
    *,
    claim_vip: Callable[[], None],
    guard: Guard | None = None,
) -> Adopted:
    """The target half (see the module docstring). Call it in the network namespace
    that will own the sockets; they are blocking and live on return."""
    adopted = Adopted(sockets=[])
    timer = _Timer(adopted.times)
    flows = [s.flow for s in states]
    if guard is not None:
        guard.add(flows)
    timer.lap("guard")
    try:
        claim_vip()
        timer.lap("claim_vip")
        for i, state in enumerate(states):
            try:
                adopted.sockets.append(import_socket(state, resume=False))
            except NetmoveError as exc:
                adopted.sockets.append(None)
                adopted.failed[i] = str(exc)
    finally:
        if guard is not None and guard.attached:
            adopted.guarded_packets = sum(guard.packets(f) or 0 for f in flows)
            guard.remove(flows)
    for i, (sock, state) in enumerate(zip(adopted.sockets, states, strict=True)):
        if sock is None:
            continue
        try:
            resume_socket(sock, state)
        except NetmoveError as exc:
            close_silently(sock)
            adopted.sockets[i] = None
            adopted.failed[i] = str(exc)
    timer.lap("restore")
    return adopted
