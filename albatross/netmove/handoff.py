"""The handoff message: N connections' TCP state and application state, authenticated.

A handoff carries sockets from one gateway to another, and a forged one would be a
connection hijack; so every message is sealed with HMAC-SHA256 under a key both
gateways share, names its source and target, expires, and carries a random nonce that
the target accepts once. This module does no I/O and reads no clock or randomness:
``now`` and the nonce come in as arguments (:mod:`.channel` moves the bytes).

Wire format, version 1 (big-endian)::

    magic "AHND" | version u8 | 3 zero bytes | issued_ms u64 | expires_ms u64
    nonce (16) | source_len u8 | source (utf-8) | target_len u8 | target (utf-8)
    count u32 | count x (state_len u32 | TCP state record | app_len u32 | app bytes)
    tag (32): HMAC-SHA256(key, every byte before it)

The TCP state record is :func:`.state.encode_state`'s; the application bytes are
opaque here (the gateway puts the stream's journal position and its HTTP framing
state there). The acknowledgement ("AACK") is sealed the same way and bound to the
handoff's nonce, so an old acknowledgement cannot pass for a new one.

Order of checks in :func:`open_handoff`, and why: size and magic and version (cheap,
and a clear message for a peer that speaks another version); then the tag, before any
field is believed; then target, expiry and the replay cache. A refused message is
never partly applied, and its nonce is not recorded.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from albatross.netmove.errors import (
    ExpiredHandoff,
    ForgedHandoff,
    HandoffRefused,
    ReplayedHandoff,
    StateFormatError,
)
from albatross.netmove.state import TcpState, decode_state, encode_state

__all__ = [
    "HANDOFF_VERSION",
    "MIN_KEY_BYTES",
    "NONCE_BYTES",
    "ConnectionHandoff",
    "HandoffAck",
    "HandoffMessage",
    "ReplayCache",
    "open_ack",
    "open_handoff",
    "seal_ack",
    "seal_handoff",
]

HANDOFF_MAGIC = b"AHND"
ACK_MAGIC = b"AACK"
HANDOFF_VERSION = 1
NONCE_BYTES = 16
TAG_BYTES = 32
MIN_KEY_BYTES = 16
MAX_CONNECTIONS = 100_000
_HEAD = struct.Struct(">4sB3xQQ16s")
_ACK_HEAD = struct.Struct(">4sB3x16sI")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


def _check_key(key: bytes) -> None:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"handoff key: {len(key)} bytes is too short (at least {MIN_KEY_BYTES})")


def _tag(key: bytes, body: bytes | memoryview) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def _name(field_name: str, value: str) -> bytes:
    raw = value.encode()
    if not 1 <= len(raw) <= 255:
        raise StateFormatError(field_name, value, "must be 1..255 bytes of UTF-8")
    return bytes([len(raw)]) + raw


@dataclass(frozen=True, slots=True)
class ConnectionHandoff:
    """One connection: its socket state and the application's state for it."""

    tcp: TcpState
    app_state: bytes = b""


@dataclass(frozen=True, slots=True)
class HandoffMessage:
    """Connections handed from gateway ``source`` to gateway ``target``.

    ``nonce``, ``issued_ms`` and ``expires_ms`` are set by :func:`open_handoff`; a
    message being built leaves them at their defaults.
    """

    source: str
    target: str
    connections: tuple[ConnectionHandoff, ...]
    nonce: bytes = b""
    issued_ms: int = 0
    expires_ms: int = 0


@dataclass(frozen=True, slots=True)
class HandoffAck:
    """The target's answer: per connection, None if restored, else why it was not."""

    nonce: bytes
    errors: tuple[str | None, ...]

    @property
    def restored(self) -> int:
        return sum(1 for e in self.errors if e is None)


@dataclass
class ReplayCache:
    """Nonces of accepted messages, each kept until its message expires.

    A message cannot be accepted twice: past its expiry the expiry check refuses it,
    before that this cache does. Bounded: when full of unexpired nonces it refuses new
    messages rather than forget a nonce that is still replayable.
    """

    max_entries: int = 100_000
    _seen: dict[bytes, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, nonce: bytes, expires_ms: int, now_ms: int) -> None:
        """Record ``nonce``; :class:`ReplayedHandoff` if it was already recorded."""
        if nonce in self._seen:
            raise ReplayedHandoff(f"nonce {nonce.hex()} was already accepted (a replayed handoff)")
        if len(self._seen) >= self.max_entries:
            self._seen = {n: exp for n, exp in self._seen.items() if exp > now_ms}
            if len(self._seen) >= self.max_entries:
                raise HandoffRefused(
                    f"replay cache full ({self.max_entries} unexpired nonces); try again later"
                )
        self._seen[nonce] = expires_ms


def seal_handoff(
    message: HandoffMessage, key: bytes, *, now_ms: int, ttl_ms: int, nonce: bytes
) -> bytes:
    """Encode and authenticate ``message``; ``nonce`` must be ``NONCE_BYTES`` random bytes."""
    _check_key(key)
    if len(nonce) != NONCE_BYTES:
        raise StateFormatError("nonce", nonce, f"must be {NONCE_BYTES} bytes")
    if ttl_ms <= 0:
        raise StateFormatError("ttl_ms", ttl_ms, "must be > 0")
    if len(message.connections) > MAX_CONNECTIONS:
        raise StateFormatError(
            "connections", len(message.connections), f"exceeds {MAX_CONNECTIONS}"
        )
    parts = [
        _HEAD.pack(HANDOFF_MAGIC, HANDOFF_VERSION, now_ms, now_ms + ttl_ms, nonce),
        _name("source", message.source),
        _name("target", message.target),
        _U32.pack(len(message.connections)),
    ]
    for conn in message.connections:
        record = encode_state(conn.tcp)
        parts += [_U32.pack(len(record)), record, _U32.pack(len(conn.app_state)), conn.app_state]
    body = b"".join(parts)
    return body + _tag(key, body)


class _Reader:
    def __init__(self, data: memoryview, start: int) -> None:
        self.data = data
        self.pos = start

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise StateFormatError(what, n, f"bytes run past the end of the message at {self.pos}")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.take(4, what))[0])

    def name(self, what: str) -> str:
        raw = self.take(self.take(1, what)[0], what)
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise StateFormatError(what, raw, "is not UTF-8") from exc


def _check_envelope(data: bytes, magic: bytes, min_size: int, what: str) -> memoryview:
    if len(data) < min_size + TAG_BYTES:
        raise StateFormatError("length", len(data), f"bytes is too short for a {what}")
    if data[:4] != magic:
        raise StateFormatError("magic", data[:4], f"must be {magic!r} (not a {what})")
    if data[4] != HANDOFF_VERSION:
        raise StateFormatError(
            "version", data[4], f"is not supported (this build reads {HANDOFF_VERSION})"
        )
    return memoryview(data)


def _verify(data: memoryview, key: bytes, what: str) -> memoryview:
    _check_key(key)
    body, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
    if not hmac.compare_digest(_tag(key, body), tag):
        raise ForgedHandoff(
            f"{what}: the HMAC does not match (wrong key, or the bytes were altered)"
        )
    return body


def open_handoff(
    data: bytes,
    key: bytes,
    *,
    now_ms: int,
    replay: ReplayCache,
    expect_target: str,
    max_skew_ms: int = 5_000,
) -> HandoffMessage:
    """Verify and decode a sealed handoff; raise a :class:`HandoffRefused` subclass
    (forged, expired, replayed, wrong target) or :class:`StateFormatError`."""
    view = _check_envelope(data, HANDOFF_MAGIC, _HEAD.size, "handoff message")
    body = _verify(view, key, "handoff")
    _magic, _version, issued_ms, expires_ms, nonce = _HEAD.unpack_from(body)
    reader = _Reader(body, _HEAD.size)
    source = reader.name("source")
    target = reader.name("target")
    count = reader.u32("count")
    if count > MAX_CONNECTIONS:
        raise StateFormatError("count", count, f"exceeds {MAX_CONNECTIONS}")
    conns = []
    for i in range(count):
        record = reader.take(reader.u32(f"connections[{i}].state_len"), f"connections[{i}].state")
        app = reader.take(reader.u32(f"connections[{i}].app_len"), f"connections[{i}].app_state")
        conns.append(ConnectionHandoff(decode_state(record), app))
    if reader.pos != len(body):
        raise StateFormatError("length", len(body) - reader.pos, "bytes trail the last connection")
    if target != expect_target:
        raise HandoffRefused(f"target: {target!r} is not this gateway ({expect_target!r})")
    if issued_ms > now_ms + max_skew_ms:
        raise ExpiredHandoff(
            f"issued_ms: {issued_ms} is {issued_ms - now_ms} ms in the future "
            f"(clock skew above {max_skew_ms} ms)"
        )
    if now_ms >= expires_ms:
        raise ExpiredHandoff(f"expires_ms: {expires_ms} passed {now_ms - expires_ms} ms ago")
    replay.admit(nonce, expires_ms, now_ms)
    return HandoffMessage(source, target, tuple(conns), nonce, issued_ms, expires_ms)


def seal_ack(ack: HandoffAck, key: bytes) -> bytes:
    _check_key(key)
    parts = [_ACK_HEAD.pack(ACK_MAGIC, HANDOFF_VERSION, ack.nonce, len(ack.errors))]
    for error in ack.errors:
        text = (error or "").encode()[:65535]
        parts += [bytes([error is None]), _U16.pack(len(text)), text]
    body = b"".join(parts)
    return body + _tag(key, body)


def open_ack(data: bytes, key: bytes, *, nonce: bytes) -> HandoffAck:
    """Verify an acknowledgement and that it answers the handoff with ``nonce``."""
    view = _check_envelope(data, ACK_MAGIC, _ACK_HEAD.size, "handoff acknowledgement")
    body = _verify(view, key, "acknowledgement")
    _magic, _version, got_nonce, count = _ACK_HEAD.unpack_from(body)
    if got_nonce != nonce:
        raise ForgedHandoff(f"acknowledgement: nonce {got_nonce.hex()} answers another handoff")
    reader = _Reader(body, _ACK_HEAD.size)
    errors: list[str | None] = []
    for i in range(count):
        ok = reader.take(1, f"results[{i}].ok")[0]
        text = reader.take(
            int(_U16.unpack(reader.take(2, f"results[{i}].len"))[0]), f"results[{i}]"
        )
        errors.append(None if ok else text.decode(errors="replace"))
    if reader.pos != len(body):
        raise StateFormatError("length", len(body) - reader.pos, "bytes trail the last result")
    return HandoffAck(got_nonce, tuple(errors))
