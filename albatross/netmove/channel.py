"""The handoff channel: one TCP connection per handoff, one frame each way.

The source connects to the target's :class:`HandoffServer`, sends one sealed handoff
(:mod:`.handoff`) as a frame (``u32`` length, big-endian, then the bytes), and waits
for one frame back: a sealed acknowledgement (``AACK``), or an error frame (``AERR``
+ UTF-8 text) when the target refused the message. Error frames are not authenticated
(the target may not share our key at all): they are only reasons to show, and the
source treats every one as "nothing was restored".

The target authenticates, checks expiry and replay (its :class:`ReplayCache` lives as
long as the server), and calls ``on_handoff`` with the verified message; the returned
per-connection errors go back in the acknowledgement. Frames above ``max_bytes`` are
refused before they are read. Expiry is checked on wall-clock milliseconds, since the
two hosts share no other clock; keep them NTP-synchronised (``max_skew_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Sequence

from albatross.netmove.errors import HandoffRefused, NetmoveError, StateFormatError
from albatross.netmove.handoff import (
    NONCE_BYTES,
    HandoffAck,
    HandoffMessage,
    ReplayCache,
    open_ack,
    open_handoff,
    seal_ack,
    seal_handoff,
)

__all__ = ["HandoffServer", "send_handoff", "wall_ms"]

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
ERROR_MAGIC = b"AERR"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

OnHandoff = Callable[[HandoffMessage], Awaitable[Sequence[str | None]]]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def _read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > max_bytes:
        raise StateFormatError("frame length", size, f"exceeds the limit of {max_bytes} bytes")
    return await reader.readexactly(size)


def _frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


class HandoffServer:
    """Accepts handoffs addressed to gateway ``gateway_id``."""

    def __init__(
        self,
        key: bytes,
        gateway_id: str,
        on_handoff: OnHandoff,
        *,
        clock_ms: Callable[[], int] = wall_ms,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_skew_ms: int = 5_000,
        read_timeout_s: float = 30.0,
    ) -> None:
        self._key = key
        self.gateway_id = gateway_id
        self._on_handoff = on_handoff
        self._clock_ms = clock_ms
        self._max_bytes = max_bytes
        self._max_skew_ms = max_skew_ms
        self._read_timeout_s = read_timeout_s
        self.replay = ReplayCache()
        self._server: asyncio.Server | None = None
        self.refused: list[str] = []
        """Why each refused handoff was refused, oldest first (for operators and tests)."""

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        """Listen; returns the bound address (``port=0`` picks a free one)."""
        self._server = await asyncio.start_server(self._serve, host, port)
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                data = await asyncio.wait_for(
                    _read_frame(reader, self._max_bytes), self._read_timeout_s
                )
                message = open_handoff(
                    data,
                    self._key,
                    now_ms=self._clock_ms(),
                    replay=self.replay,
                    expect_target=self.gateway_id,
                    max_skew_ms=self._max_skew_ms,
                )
            except (NetmoveError, ValueError) as exc:
                self.refused.append(f"{type(exc).__name__}: {exc}")
                log.warning("handoff refused: %s", exc)
                writer.write(_frame(ERROR_MAGIC + f"{type(exc).__name__}: {exc}".encode()))
                await writer.drain()
                return
            errors = tuple(await self._on_handoff(message))
            if len(errors) != len(message.connections):
                raise ValueError(
                    f"on_handoff answered {len(errors)} results for {len(message.connections)} connections"
                )
            writer.write(_frame(seal_ack(HandoffAck(message.nonce, errors), self._key)))
            await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError) as exc:
            log.warning("handoff channel: peer went away: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def send_handoff(
    host: str,
    port: int,
    message: HandoffMessage,
    key: bytes,
    *,
    ttl_ms: int = 10_000,
    timeout_s: float = 30.0,
    now_ms: int | None = None,
    nonce: bytes | None = None,
) -> HandoffAck:
    """Seal ``message``, deliver it and return the verified acknowledgement.

    Raises :class:`HandoffRefused` when the target refused it (with its reason), and
    :class:`ForgedHandoff` when the answer is not authentic.
    """
    nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)
    sealed = seal_handoff(
        message, key, now_ms=wall_ms() if now_ms is None else now_ms, ttl_ms=ttl_ms, nonce=nonce
    )

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(_frame(sealed))
            await writer.drain()
            return await _read_frame(reader, DEFAULT_MAX_BYTES)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    answer = await asyncio.wait_for(exchange(), timeout_s)
    if answer.startswith(ERROR_MAGIC):
        reason = answer[len(ERROR_MAGIC) :].decode(errors="replace")
        raise HandoffRefused(f"target {host}:{port} refused the handoff: {reason}")
    return open_ack(answer, key, nonce=nonce)
