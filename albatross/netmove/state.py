"""The state of one TCP connection, and its compact versioned binary form.

:class:`TcpState` holds everything libsoccr (CRIU's socket library) saves, plus
``TCP_NODELAY``: both sequence numbers, both queues' contents (the send queue split
into a sent-but-unacknowledged head and an unsent tail), the window
(``TCP_REPAIR_WINDOW``), the MSS, the window scale both ways, the SACK and timestamp
options and the timestamp clock itself. It is pure data: :mod:`.tcp_repair` fills it
from a socket and makes a socket from it.

Wire format, version 1 (big-endian; the whole record is covered by the length field)::

    magic "ATCP" | version u8 | family u8 (4|6) | flags u8 | wscale u8 (snd<<4|rcv)
    length u32 (total bytes, header included)
    local addr (4|16) | local port u16 | remote addr (4|16) | remote port u16
    send_seq u32 | recv_seq u32 | mss u16 | timestamp u32
    snd_wl1 u32 | snd_wnd u32 | max_window u32 | rcv_wnd u32 | rcv_wup u32
    unsent_len u32 | send_len u32 | recv_len u32
    send queue (send_len bytes) | receive queue (recv_len bytes)

``flags``: bit 0 timestamps, bit 1 SACK, bit 2 window scaling, bit 3 TCP_NODELAY; the
other bits must be zero. Decoding checks the magic, the version, the length (against
the bytes actually given: a truncated or padded record is refused), and every value's
range, and names the field at fault. A forged state would be a connection hijack, so
these bytes only travel inside an authenticated handoff message (:mod:`.handoff`).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from albatross.netmove.errors import StateFormatError

__all__ = [
    "FORMAT_VERSION",
    "MAX_QUEUE_BYTES",
    "Flow",
    "TcpState",
    "TcpWindow",
    "decode_state",
    "encode_state",
]

MAGIC = b"ATCP"
FORMAT_VERSION = 1
MAX_QUEUE_BYTES = 64 * 1024 * 1024
"""Largest queue accepted: far above any socket buffer, low enough to refuse garbage."""

_U32 = 0xFFFFFFFF
_HEAD = struct.Struct(">4sBBBBI")
_SEQS = struct.Struct(">IIHIIIIIIIII")
_PORT = struct.Struct(">H")
_FLAG_TIMESTAMPS = 1
_FLAG_SACK = 2
_FLAG_WSCALE = 4
_FLAG_NODELAY = 8
_KNOWN_FLAGS = _FLAG_TIMESTAMPS | _FLAG_SACK | _FLAG_WSCALE | _FLAG_NODELAY
_FLOW_KEY = struct.Struct(">16s16sHHB3x")
_MAX_WSCALE = 14  # RFC 7323


def _family_bits(family: int) -> int:
    if family == socket.AF_INET:
        return 4
    if family == socket.AF_INET6:
        return 6
    raise StateFormatError("family", family, "must be AF_INET or AF_INET6")


def _addr_bytes(field: str, addr: str, family: int) -> bytes:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError as exc:
        raise StateFormatError(field, addr, "is not an IP address") from exc
    if ip.version != _family_bits(family):
        raise StateFormatError(field, addr, f"is not an IPv{_family_bits(family)} address")
    return ip.packed


def _check_u32(field: str, value: int) -> None:
    if not 0 <= value <= _U32:
        raise StateFormatError(field, value, "must be in 0..2**32-1")


@dataclass(frozen=True, slots=True)
class Flow:
    """A connection seen from the gateway: its own address and port, and the client's.

    This is the key of the eBPF hold and guard maps (``bpf/flow_key.h``).
    """

    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int

    def key(self) -> bytes:
        """The 40-byte ``struct flow_key`` for the BPF maps."""
        local = ipaddress.ip_address(self.local_addr)
        remote = ipaddress.ip_address(self.remote_addr)
        if local.version != remote.version:
            raise StateFormatError(
                "remote_addr", self.remote_addr, f"must be IPv{local.version} like local_addr"
            )
        return _FLOW_KEY.pack(
            local.packed.ljust(16, b"\0"),
            remote.packed.ljust(16, b"\0"),
            self.local_port,
            self.remote_port,
            local.version,
        )

    @classmethod
    def of(cls, sock: socket.socket) -> Flow:
        """The flow of a connected socket."""
        local = sock.getsockname()
        remote = sock.getpeername()
        return cls(str(local[0]), int(local[1]), str(remote[0]), int(remote[1]))


@dataclass(frozen=True, slots=True)
class TcpWindow:
    """``struct tcp_repair_window``: what the kernel knows of both windows."""

    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int


@dataclass(frozen=True, slots=True)
class TcpState:
    """One established TCP connection, enough to rebuild it on another host.

    ``send_seq`` is the sequence number of the first byte of ``send_queue`` (the oldest
    unacknowledged byte); the last ``unsent_len`` bytes of ``send_queue`` were never
    transmitted. ``recv_seq`` is the sequence number of the first byte of
    ``recv_queue`` (received and acknowledged, not yet read by the application).
    ``timestamp`` is the connection's TCP timestamp clock at the dump.
    """

    family: int
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    send_seq: int
    recv_seq: int
    send_queue: bytes
    unsent_len: int
    recv_queue: bytes
    mss: int
    timestamps: bool
    sack: bool
    wscale: bool
    snd_wscale: int
    rcv_wscale: int
    timestamp: int
    window: TcpWindow
    nodelay: bool

    def __post_init__(self) -> None:
        _addr_bytes("local_addr", self.local_addr, self.family)
        _addr_bytes("remote_addr", self.remote_addr, self.family)
        if not 1 <= self.local_port <= 65535:
            raise StateFormatError("local_port", self.local_port, "must be in 1..65535")
        if not 1 <= self.remote_port <= 65535:
            raise StateFormatError("remote_port", self.remote_port, "must be in 1..65535")
        for name in ("send_seq", "recv_seq", "timestamp"):
            _check_u32(name, getattr(self, name))
        for name in ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"):
            _check_u32(f"window.{name}", getattr(self.window, name))
        if not 1 <= self.mss <= 65535:
            raise StateFormatError("mss", self.mss, "must be in 1..65535")
        for name in ("snd_wscale", "rcv_wscale"):
            value = getattr(self, name)
            if not 0 <= value <= _MAX_WSCALE:
                raise StateFormatError(name, value, f"must be in 0..{_MAX_WSCALE} (RFC 7323)")
        for name in ("send_queue", "recv_queue"):
            size = len(getattr(self, name))
            if size > MAX_QUEUE_BYTES:
                raise StateFormatError(name, size, f"bytes exceed the limit {MAX_QUEUE_BYTES}")
        if not 0 <= self.unsent_len <= len(self.send_queue):
            raise StateFormatError(
                "unsent_len",
                self.unsent_len,
                f"must be in 0..len(send_queue)={len(self.send_queue)}",
            )

    @property
    def flow(self) -> Flow:
        return Flow(self.local_addr, self.local_port, self.remote_addr, self.remote_port)

    @property
    def sent_queue(self) -> bytes:
        """The head of the send queue that was transmitted but not acknowledged."""
        return self.send_queue[: len(self.send_queue) - self.unsent_len]

    @property
    def unsent(self) -> bytes:
        """The tail of the send queue that was never transmitted."""
        return self.send_queue[len(self.send_queue) - self.unsent_len :]


def encode_state(state: TcpState) -> bytes:
    """The version-1 binary form of ``state`` (see the module docstring)."""
    flags = (
        (_FLAG_TIMESTAMPS if state.timestamps else 0)
        | (_FLAG_SACK if state.sack else 0)
        | (_FLAG_WSCALE if state.wscale else 0)
        | (_FLAG_NODELAY if state.nodelay else 0)
    )
    body = b"".join(
        (
            _addr_bytes("local_addr", state.local_addr, state.family),
            _PORT.pack(state.local_port),
            _addr_bytes("remote_addr", state.remote_addr, state.family),
            _PORT.pack(state.remote_port),
            _SEQS.pack(
                state.send_seq,
                state.recv_seq,
                state.mss,
                state.timestamp,
                state.window.snd_wl1,
                state.window.snd_wnd,
                state.window.max_window,
                state.window.rcv_wnd,
                state.window.rcv_wup,
                state.unsent_len,
                len(state.send_queue),
                len(state.recv_queue),
            ),
            state.send_queue,
            state.recv_queue,
        )
    )
    head = _HEAD.pack(
        MAGIC,
        FORMAT_VERSION,
        _family_bits(state.family),
        flags,
        (state.snd_wscale << 4) | state.rcv_wscale,
        _HEAD.size + len(body),
    )
    return head + body


def decode_state(data: bytes) -> TcpState:
    """Parse one record made by :func:`encode_state`; :class:`StateFormatError` names
    the first rule the bytes break."""
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise StateFormatError(
            "length", len(view), f"bytes is shorter than the {_HEAD.size}-byte header"
        )
    magic, version, family_bits, flags, wscale, length = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise StateFormatError("magic", bytes(magic), f"must be {MAGIC!r} (not a TCP state record)")
    if version != FORMAT_VERSION:
        raise StateFormatError(
            "version", version, f"is not supported (this build reads {FORMAT_VERSION})"
        )
    if length != len(view):
        raise StateFormatError(
            "length", length, f"in the header does not match the {len(view)} bytes given"
        )
    if family_bits not in (4, 6):
        raise StateFormatError("family", family_bits, "must be 4 or 6")
    if flags & ~_KNOWN_FLAGS:
        raise StateFormatError("flags", flags, f"has unknown bits (known: {_KNOWN_FLAGS:#x})")
    family = socket.AF_INET if family_bits == 4 else socket.AF_INET6
    addr_len = 4 if family_bits == 4 else 16
    fixed = _HEAD.size + 2 * (addr_len + _PORT.size) + _SEQS.size
    if len(view) < fixed:
        raise StateFormatError(
            "length", len(view), f"bytes is shorter than the {fixed}-byte fixed part"
        )
    pos = _HEAD.size
    local_addr = str(ipaddress.ip_address(bytes(view[pos : pos + addr_len])))
    pos += addr_len
    (local_port,) = _PORT.unpack_from(view, pos)
    pos += _PORT.size
    remote_addr = str(ipaddress.ip_address(bytes(view[pos : pos + addr_len])))
    pos += addr_len
    (remote_port,) = _PORT.unpack_from(view, pos)
    pos += _PORT.size
    (
        send_seq,
        recv_seq,
        mss,
        timestamp,
        snd_wl1,
        snd_wnd,
        max_window,
        rcv_wnd,
        rcv_wup,
        unsent_len,
        send_len,
        recv_len,
    ) = _SEQS.unpack_from(view, pos)
    pos += _SEQS.size
    if pos + send_len + recv_len != len(view):
        raise StateFormatError(
            "queues",
            (send_len, recv_len),
            f"lengths do not add up to the {len(view) - pos} bytes after the fixed part",
        )
    send_queue = bytes(view[pos : pos + send_len])
    recv_queue = bytes(view[pos + send_len :])
    return TcpState(
        family=family,
        local_addr=local_addr,
        local_port=local_port,
        remote_addr=remote_addr,
        remote_port=remote_port,
        send_seq=send_seq,
        recv_seq=recv_seq,
        send_queue=send_queue,
        unsent_len=unsent_len,
        recv_queue=recv_queue,
        mss=mss,
        timestamps=bool(flags & _FLAG_TIMESTAMPS),
        sack=bool(flags & _FLAG_SACK),
        wscale=bool(flags & _FLAG_WSCALE),
        snd_wscale=wscale >> 4,
        rcv_wscale=wscale & 0x0F,
        timestamp=timestamp,
        window=TcpWindow(snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup),
        nodelay=bool(flags & _FLAG_NODELAY),
    )
