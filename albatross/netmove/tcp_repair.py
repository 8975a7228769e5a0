"""Export a live TCP connection's state and rebuild it elsewhere (TCP_REPAIR).

Everything goes through ``setsockopt``/``getsockopt``/``ioctl`` on the socket; no
helper binary, no CRIU. Needs CAP_NET_ADMIN (repair mode) in the socket's network
namespace.

Export (:func:`export_socket`) puts the socket into repair mode and reads, in this
order: TCP_INFO (state, options, window scales), TCP_NODELAY, TCP_MAXSEG,
TCP_TIMESTAMP, TCP_REPAIR_WINDOW, then per queue the sequence number
(TCP_QUEUE_SEQ) and the contents (``recv(MSG_PEEK)`` in repair mode reads the chosen
queue). The socket stays in repair mode: :func:`close_silently` then closes it without
a FIN or RST, or :func:`leave_repair` gives it back to the application.

Import (:func:`import_socket`) follows libsoccr: repair mode, bind, both queue
sequence numbers, ``connect()`` (no SYN in repair mode), TCP_REPAIR_OPTIONS (MSS,
window scale, SACK, timestamps), TCP_TIMESTAMP, the receive queue, the sent part of
the send queue, TCP_REPAIR_WINDOW; then (:func:`resume_socket`) leave repair mode and
write the never-sent tail of the send queue as ordinary data, so it goes out at once
instead of waiting for a retransmission timeout.

What must stay true:

- TCP_TIMESTAMP is restored: without it the restored socket's clock starts from
  another offset, and when that is behind the client's last seen value the client
  drops every segment (PAWS) and the stream hangs with no error.
- The source socket is closed in repair mode only after the service address stopped
  reaching it; repair mode is not a lock (it still acknowledges data, which would be
  lost).
- :func:`drain_barrier` waits for the client to acknowledge what was sent (SIOCOUTQ
  == 0); on time-out the unacknowledged queue is carried in the state, never dropped.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from albatross.netmove.errors import ConnectionNotMovable, KernelError
from albatross.netmove.state import TcpState, TcpWindow

__all__ = [
    "DrainResult",
    "close_silently",
    "drain_barrier",
    "drain_barrier_async",
    "export_socket",
    "import_socket",
    "leave_repair",
    "poke",
    "resume_socket",
    "segments_in",
    "unacked_bytes",
]

TCP_INFO = 11
TCP_MAXSEG = 2
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0  # leaving repair sends a window probe: the peer learns we are back
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2
SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B
IP_FREEBIND = 15
IPV6_FREEBIND = 78
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

TCPOPT_MAXSEG = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4
TCP_ESTABLISHED = 1

_U32 = struct.Struct("=I")
_INT = struct.Struct("=i")
_WINDOW = struct.Struct("=IIIII")
_INFO_HEAD = struct.Struct("=BBBBBBB")
_SEGS_IN_OFFSET = 140  # struct tcp_info: __u32 tcpi_segs_in
_CHUNK = 64 * 1024
_TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}  # fmt: skip
_REPAIR_HINT = "TCP_REPAIR needs CAP_NET_ADMIN in the socket's network namespace"


def _kernel(operation: str, exc: OSError, hint: str = "") -> KernelError:
    return KernelError(operation, exc.errno or 0, hint)


def _set_int(sock: socket.socket, level: int, opt: int, value: int, name: str) -> None:
    try:
        sock.setsockopt(level, opt, _INT.pack(value))
    except OSError as exc:
        raise _kernel(f"setsockopt({name}={value})", exc) from exc


def _set_u32(sock: socket.socket, opt: int, value: int, name: str) -> None:
    # 32-bit sequence numbers and timestamps do not fit a C int: pass raw bytes.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, opt, _U32.pack(value))
    except OSError as exc:
        raise _kernel(f"setsockopt({name}={value})", exc) from exc


def _get_u32(sock: socket.socket, opt: int, name: str) -> int:
    try:
        (value,) = _U32.unpack(sock.getsockopt(socket.IPPROTO_TCP, opt, 4))
    except OSError as exc:
        raise _kernel(f"getsockopt({name})", exc) from exc
    return int(value)


def _ioctl_int(sock: socket.socket, request: int, name: str) -> int:
    try:
        (value,) = _INT.unpack(fcntl.ioctl(sock.fileno(), request, b"\0" * 4))
    except OSError as exc:
        raise _kernel(f"ioctl({name})", exc) from exc
    return int(value)


def _enter_repair(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, _INT.pack(TCP_REPAIR_ON))
    except OSError as exc:
        raise _kernel("setsockopt(TCP_REPAIR=1)", exc, _REPAIR_HINT) from exc


def leave_repair(sock: socket.socket) -> None:
    """Leave repair mode; the kernel sends a window probe so the peer hears from us."""
    _set_int(sock, socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF, "TCP_REPAIR")


def unacked_bytes(sock: socket.socket) -> int:
    """SIOCOUTQ: bytes written and not yet acknowledged by the peer (sent or not)."""
    return _ioctl_int(sock, SIOCOUTQ, "SIOCOUTQ")


def _tcp_info_head(sock: socket.socket) -> tuple[int, int, int, int]:
    """(state, options, snd_wscale, rcv_wscale) from the first bytes of TCP_INFO."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 104)
    except OSError as exc:
        raise _kernel("getsockopt(TCP_INFO)", exc) from exc
    state, _ca, _retr, _probes, _backoff, options, wscales = _INFO_HEAD.unpack_from(raw)
    # struct tcp_info: __u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4 (low nibble first).
    return state, options, wscales & 0x0F, wscales >> 4


def _peek_queue(sock: socket.socket, queue: int, size: int, name: str) -> bytes:
    _set_int(sock, socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE")
    if size == 0:
        return b""
    try:
        data = sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError as exc:
        raise _kernel(f"recv(MSG_PEEK) of the {name} queue", exc) from exc
    if len(data) != size:
        raise KernelError(f"recv(MSG_PEEK) of the {name} queue: {len(data)} of {size} bytes", 0)
    return data


def export_socket(sock: socket.socket) -> TcpState:
    """Read the full state of an established TCP connection.

    The socket is left in repair mode (it sends nothing by itself there); close it
    with :func:`close_silently` once the state is safe elsewhere, or give it back with
    :func:`leave_repair`. Raises :class:`ConnectionNotMovable` for a socket that is not
    an established TCP connection, :class:`KernelError` when the kernel refuses.
    """
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ConnectionNotMovable(f"socket {sock.fileno()}: not a TCP/IP stream socket")
    state, options, snd_wscale, rcv_wscale = _tcp_info_head(sock)
    if state != TCP_ESTABLISHED:
        raise ConnectionNotMovable(
            f"socket {sock.fileno()}: TCP state {_TCP_STATES.get(state, state)} "
            "(only ESTABLISHED connections can be moved)"
        )
    local = sock.getsockname()
    remote = sock.getpeername()
    _enter_repair(sock)
    try:
        nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        mss = sock.getsockopt(socket.IPPROTO_TCP, TCP_MAXSEG)
    except OSError as exc:
        raise _kernel("getsockopt(TCP_NODELAY/TCP_MAXSEG)", exc) from exc
    timestamp = _get_u32(sock, TCP_TIMESTAMP, "TCP_TIMESTAMP")
    try:
        window = TcpWindow(
            *_WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _WINDOW.size))
        )
    except OSError as exc:
        raise _kernel("getsockopt(TCP_REPAIR_WINDOW)", exc) from exc
    in_size = _ioctl_int(sock, SIOCINQ, "SIOCINQ")
    out_size = _ioctl_int(sock, SIOCOUTQ, "SIOCOUTQ")
    unsent = _ioctl_int(sock, SIOCOUTQNSD, "SIOCOUTQNSD")
    recv_queue = _peek_queue(sock, TCP_RECV_QUEUE, in_size, "receive")
    rcv_nxt = _get_u32(sock, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ(receive)")
    send_queue = _peek_queue(sock, TCP_SEND_QUEUE, out_size, "send")
    write_seq = _get_u32(sock, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ(send)")
    return TcpState(
        family=int(sock.family),
        local_addr=str(local[0]),
        local_port=int(local[1]),
        remote_addr=str(remote[0]),
        remote_port=int(remote[1]),
        send_seq=(write_seq - len(send_queue)) & 0xFFFFFFFF,
        recv_seq=(rcv_nxt - len(recv_queue)) & 0xFFFFFFFF,
        send_queue=send_queue,
        unsent_len=unsent,
        recv_queue=recv_queue,
        mss=mss,
        timestamps=bool(options & TCPI_OPT_TIMESTAMPS),
        sack=bool(options & TCPI_OPT_SACK),
        wscale=bool(options & TCPI_OPT_WSCALE),
        snd_wscale=snd_wscale,
        rcv_wscale=rcv_wscale,
        timestamp=timestamp,
        window=window,
        nodelay=nodelay,
    )


def close_silently(sock: socket.socket) -> None:
    """Close without a FIN or RST: in repair mode the kernel just forgets the socket."""
    try:
        if sock.fileno() >= 0:
            _enter_repair(sock)
    finally:
        sock.close()


def _repair_options(state: TcpState) -> bytes:
    opts = [(TCPOPT_MAXSEG, state.mss)]
    if state.wscale:
        opts.append((TCPOPT_WINDOW, state.snd_wscale | (state.rcv_wscale << 16)))
    if state.sack:
        opts.append((TCPOPT_SACK_PERM, 0))
    if state.timestamps:
        opts.append((TCPOPT_TIMESTAMP, 0))
    return b"".join(struct.pack("=II", code, value) for code, value in opts)


def _fill_queue(sock: socket.socket, queue: int, data: bytes, name: str) -> None:
    _set_int(sock, socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE")
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view[:_CHUNK])
        except OSError as exc:
            raise _kernel(f"send() into the {name} queue in repair mode", exc) from exc
        view = view[sent:]


def import_socket(state: TcpState, *, resume: bool = True, timestamp: bool = True) -> socket.socket:
    """Build a socket that continues the connection ``state`` describes.

    Create it in the network namespace that now holds ``state.local_addr``. With
    ``resume`` (the default) the socket leaves repair mode and is live on return;
    with ``resume=False`` it stays in repair mode (silent) until
    :func:`resume_socket`, so a caller can restore many and release them together.
    ``timestamp=False`` skips TCP_TIMESTAMP; it exists only to show the stall that
    restoring it prevents. The socket is blocking; set it non-blocking to hand it to
    an event loop.
    """
    sock = socket.socket(state.family, socket.SOCK_STREAM)
    try:
        _enter_repair(sock)
        if state.family == socket.AF_INET:
            _set_int(sock, socket.IPPROTO_IP, IP_FREEBIND, 1, "IP_FREEBIND")
        else:
            _set_int(sock, socket.IPPROTO_IPV6, IPV6_FREEBIND, 1, "IPV6_FREEBIND")
        # Repair mode forces address reuse, so a listener on the same port is no conflict.
        try:
            sock.bind((state.local_addr, state.local_port))
        except OSError as exc:
            raise _kernel(f"bind({state.local_addr}:{state.local_port})", exc) from exc
        # The MSS clamp before connect(): the repair connect sizes segments from it, and
        # TCP_REPAIR_OPTIONS after it would leave them at the 536-byte default.
        _set_int(sock, socket.IPPROTO_TCP, TCP_MAXSEG, state.mss, "TCP_MAXSEG")
        _set_int(sock, socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")
        _set_u32(sock, TCP_QUEUE_SEQ, state.recv_seq, "TCP_QUEUE_SEQ(receive)")
        _set_int(sock, socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")
        _set_u32(sock, TCP_QUEUE_SEQ, state.send_seq, "TCP_QUEUE_SEQ(send)")
        try:
            sock.connect((state.remote_addr, state.remote_port))
        except OSError as exc:
            raise _kernel(f"repair connect({state.remote_addr}:{state.remote_port})", exc) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, _repair_options(state))
        except OSError as exc:
            raise _kernel("setsockopt(TCP_REPAIR_OPTIONS)", exc) from exc
        if timestamp:
            _set_u32(sock, TCP_TIMESTAMP, state.timestamp, "TCP_TIMESTAMP")
        _set_int(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY, int(state.nodelay), "TCP_NODELAY")
        # Big queues need room: the defaults of a fresh socket may be smaller than what
        # the old one had grown to. Forcing a size locks it, so only when needed.
        if len(state.recv_queue) > 64 * 1024:
            _set_int(
                sock, socket.SOL_SOCKET, SO_RCVBUFFORCE, 2 * len(state.recv_queue), "SO_RCVBUFFORCE"
            )
        if len(state.send_queue) > 64 * 1024:
            _set_int(
                sock, socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * len(state.send_queue), "SO_SNDBUFFORCE"
            )
        _fill_queue(sock, TCP_RECV_QUEUE, state.recv_queue, "receive")
        _fill_queue(sock, TCP_SEND_QUEUE, state.sent_queue, "send")
        w = state.window
        try:
            sock.setsockopt(
                socket.IPPROTO_TCP,
                TCP_REPAIR_WINDOW,
                _WINDOW.pack(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup),
            )
        except OSError as exc:
            raise _kernel("setsockopt(TCP_REPAIR_WINDOW)", exc) from exc
        if resume:
            resume_socket(sock, state)
    except BaseException:
        close_silently(sock)
        raise
    return sock


def resume_socket(sock: socket.socket, state: TcpState) -> None:
    """Leave repair mode and send the never-transmitted tail of the send queue."""
    leave_repair(sock)
    if state.unsent_len:
        try:
            sock.sendall(state.unsent)
        except OSError as exc:
            raise _kernel("send() of the unsent tail after repair", exc) from exc


def poke(sock: socket.socket) -> None:
    """Make the peer acknowledge now: a window probe (repair mode on, then off).

    The probe carries an old sequence number, which the peer answers at once with an
    ACK of everything it received, instead of after its delayed-ACK timer (up to
    40 ms). Its answer also travels behind any data the peer sent before it.
    """
    _enter_repair(sock)
    leave_repair(sock)


def segments_in(sock: socket.socket) -> int:
    """``tcpi_segs_in``: segments received on this connection so far."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _SEGS_IN_OFFSET + 4)
    except OSError as exc:
        raise _kernel("getsockopt(TCP_INFO)", exc) from exc
    return int(_U32.unpack_from(raw, _SEGS_IN_OFFSET)[0])


@dataclass(frozen=True, slots=True)
class DrainResult:
    """Outcome of a drain barrier: ``drained`` is False after a time-out, and then
    ``unacked`` says how many bytes per socket will travel in the state instead."""

    drained: bool
    waited_s: float
    unacked: tuple[int, ...]


class _Barrier:
    """The state of one drain barrier, shared by the blocking and the async loop."""

    def __init__(self, socks: Sequence[socket.socket], repoke_s: float) -> None:
        self.socks = socks
        self.repoke_s = repoke_s
        self.segs = [segments_in(s) for s in socks]
        self.answered = [False] * len(socks)
        for s in socks:
            poke(s)
        self.last_poke = time.perf_counter()

    def check(self, now: float) -> tuple[int, ...]:
        left = tuple(unacked_bytes(s) for s in self.socks)
        for i, s in enumerate(self.socks):
            if not self.answered[i]:
                self.answered[i] = segments_in(s) != self.segs[i]
        if now - self.last_poke >= self.repoke_s:
            for i, s in enumerate(self.socks):
                if left[i] or not self.answered[i]:
                    self.segs[i] = segments_in(s)
                    poke(s)
            self.last_poke = now
        return left

    def done(self, left: tuple[int, ...]) -> bool:
        return not any(left) and all(self.answered)


def drain_barrier(
    socks: Sequence[socket.socket],
    timeout_s: float,
    poll_s: float = 0.0001,
    repoke_s: float = 0.05,
) -> DrainResult:
    """Wait until every peer acknowledged everything written and answered a probe.

    The application must have stopped writing. Each socket is poked (:func:`poke`) so
    its peer acknowledges at once; the barrier holds until SIOCOUTQ is 0 and a segment
    came back after the probe (so the peer's data sent before it has arrived too).
    Then the dump carries no in-flight data and the restored socket never needs to
    retransmit. A client that stops reading cannot be waited for forever: after
    ``timeout_s`` the unacknowledged bytes are carried in the state and sent again
    from the target.
    """
    start = time.perf_counter()
    barrier = _Barrier(socks, repoke_s)
    while True:
        now = time.perf_counter()
        left = barrier.check(now)
        if barrier.done(left) or now >= start + timeout_s:
            return DrainResult(barrier.done(left), now - start, left)
        time.sleep(poll_s)


async def drain_barrier_async(
    socks: Sequence[socket.socket],
    timeout_s: float,
    poll_s: float = 0.0005,
    repoke_s: float = 0.05,
) -> DrainResult:
    """:func:`drain_barrier` for an event loop: polls without blocking it."""
    start = time.perf_counter()
    barrier = _Barrier(socks, repoke_s)
    while True:
        now = time.perf_counter()
        left = barrier.check(now)
        if barrier.done(left) or now >= start + timeout_s:
            return DrainResult(barrier.done(left), now - start, left)
        await asyncio.sleep(poll_s)
