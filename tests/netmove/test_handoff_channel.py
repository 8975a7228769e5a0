"""The handoff channel over real TCP on loopback: delivered, acknowledged, refused."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Sequence

import pytest
from test_handoff_message import KEY, MESSAGE

from albatross.netmove.channel import HandoffServer, send_handoff
from albatross.netmove.errors import ForgedHandoff, HandoffRefused
from albatross.netmove.handoff import HandoffMessage


class Target:
    def __init__(self) -> None:
        self.received: list[HandoffMessage] = []

    async def on_handoff(self, message: HandoffMessage) -> Sequence[str | None]:
        self.received.append(message)
        return [None] * (len(message.connections) - 1) + ["restore failed: test"]


@pytest.fixture
async def served() -> AsyncIterator[tuple[HandoffServer, Target, int]]:
    target = Target()
    server = HandoffServer(KEY, "gw-b", target.on_handoff, max_bytes=64 * 1024)
    _, port = await server.start("127.0.0.1")
    yield server, target, port
    await server.close()


async def test_handoff_is_delivered_and_acknowledged(
    served: tuple[HandoffServer, Target, int],
) -> None:
    _, target, port = served
    ack = await send_handoff("127.0.0.1", port, MESSAGE, KEY)
    assert target.received[0].connections == MESSAGE.connections
    assert ack.errors == (None, "restore failed: test")


async def test_forged_handoff_is_refused_and_not_applied(
    served: tuple[HandoffServer, Target, int],
) -> None:
    server, target, port = served
    with pytest.raises(HandoffRefused, match="ForgedHandoff"):
        await send_handoff("127.0.0.1", port, MESSAGE, b"w" * 32)
    assert target.received == []
    assert server.refused and "HMAC" in server.refused[0]


async def test_replayed_handoff_is_refused(served: tuple[HandoffServer, Target, int]) -> None:
    _, target, port = served
    nonce = b"n" * 16
    await send_handoff("127.0.0.1", port, MESSAGE, KEY, nonce=nonce)
    with pytest.raises(HandoffRefused, match="ReplayedHandoff"):
        await send_handoff("127.0.0.1", port, MESSAGE, KEY, nonce=nonce)
    assert len(target.received) == 1


async def test_expired_handoff_is_refused(served: tuple[HandoffServer, Target, int]) -> None:
    _, target, port = served
    with pytest.raises(HandoffRefused, match="ExpiredHandoff"):
        await send_handoff("127.0.0.1", port, MESSAGE, KEY, now_ms=1_000, ttl_ms=10)
    assert target.received == []


async def test_oversized_frame_is_refused_before_it_is_read(
    served: tuple[HandoffServer, Target, int],
) -> None:
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(struct.pack(">I", 10**9))
    await writer.drain()
    size = struct.unpack(">I", await reader.readexactly(4))[0]
    answer = await reader.readexactly(size)
    writer.close()
    assert answer.startswith(b"AERR") and b"exceeds the limit" in answer


async def test_an_acknowledgement_under_another_key_is_not_trusted() -> None:
    target = Target()
    server = HandoffServer(b"o" * 32, "gw-b", target.on_handoff)
    _, port = await server.start("127.0.0.1")
    try:
        with pytest.raises((HandoffRefused, ForgedHandoff)):
            await send_handoff("127.0.0.1", port, MESSAGE, KEY)
    finally:
        await server.close()
