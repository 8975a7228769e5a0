"""Handoff messages: sealed, and refused when forged, expired, replayed or misaddressed."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from albatross.netmove.errors import (
    ExpiredHandoff,
    ForgedHandoff,
    HandoffRefused,
    NetmoveError,
    ReplayedHandoff,
    StateFormatError,
)
from albatross.netmove.handoff import (
    ConnectionHandoff,
    HandoffAck,
    HandoffMessage,
    ReplayCache,
    open_ack,
    open_handoff,
    seal_ack,
    seal_handoff,
)
from albatross.netmove.state import TcpState, TcpWindow

KEY = b"k" * 32
NONCE = bytes(range(16))
NOW = 1_700_000_000_000


def conn(port: int, app: bytes = b"pos=7") -> ConnectionHandoff:
    state = TcpState(
        family=socket.AF_INET6, local_addr="fd77:100::1", local_port=8000,
        remote_addr="fd77::2", remote_port=port, send_seq=10, recv_seq=20,
        send_queue=b"data: x\n\n", unsent_len=0, recv_queue=b"", mss=1440,
        timestamps=True, sack=True, wscale=True, snd_wscale=7, rcv_wscale=7,
        timestamp=99, window=TcpWindow(20, 65535, 65535, 65535, 20), nodelay=True,
    )  # fmt: skip
    return ConnectionHandoff(state, app)


MESSAGE = HandoffMessage("gw-a", "gw-b", (conn(40000), conn(40001, b"")))


def sealed(**over: object) -> bytes:
    kw: dict[str, object] = {"now_ms": NOW, "ttl_ms": 10_000, "nonce": NONCE}
    kw.update(over)
    return seal_handoff(MESSAGE, KEY, **kw)  # type: ignore[arg-type]


def open_(
    data: bytes, cache: ReplayCache | None = None, now: int = NOW + 1, key: bytes = KEY
) -> HandoffMessage:
    return open_handoff(
        data,
        key,
        now_ms=now,
        replay=ReplayCache() if cache is None else cache,
        expect_target="gw-b",
    )


def test_round_trip_keeps_every_connection_and_its_app_state() -> None:
    got = open_(sealed())
    assert got.connections == MESSAGE.connections
    assert (got.source, got.target, got.nonce) == ("gw-a", "gw-b", NONCE)
    assert got.expires_ms == NOW + 10_000


def test_wrong_key_is_refused_as_forged() -> None:
    with pytest.raises(ForgedHandoff, match="HMAC does not match"):
        open_(sealed(), key=b"x" * 32)


@settings(max_examples=60)
@given(st.data())
def test_any_flipped_byte_is_refused(data: st.DataObject) -> None:
    raw = bytearray(sealed())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(NetmoveError):
        open_(bytes(raw))


@given(st.integers(0, 400))
def test_truncated_messages_are_refused(cut: int) -> None:
    raw = sealed()
    with pytest.raises((ForgedHandoff, StateFormatError)):
        open_(raw[: min(cut, len(raw) - 1)])


def test_replayed_message_is_refused_and_a_fresh_one_passes() -> None:
    cache = ReplayCache()
    open_(sealed(), cache)
    with pytest.raises(ReplayedHandoff, match=NONCE.hex()):
        open_(sealed(), cache)
    open_(sealed(nonce=b"\x01" * 16), cache)
    assert len(cache) == 2


def test_expired_and_future_messages_are_refused() -> None:
    with pytest.raises(ExpiredHandoff, match="expires_ms"):
        open_(sealed(), now=NOW + 10_000)
    with pytest.raises(ExpiredHandoff, match="in the future"):
        open_(sealed(now_ms=NOW + 60_000))


def test_refused_message_does_not_burn_its_nonce() -> None:
    cache = ReplayCache()
    with pytest.raises(ExpiredHandoff):
        open_(sealed(), cache, now=NOW + 20_000)
    assert len(cache) == 0


def test_message_for_another_gateway_is_refused() -> None:
    with pytest.raises(HandoffRefused, match="target: 'gw-b' is not this gateway"):
        open_handoff(sealed(), KEY, now_ms=NOW, replay=ReplayCache(), expect_target="gw-c")


def test_other_versions_are_named() -> None:
    raw = sealed()
    with pytest.raises(StateFormatError, match=r"^version: 9 is not supported"):
        open_(raw[:4] + b"\x09" + raw[5:])


def test_short_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="too short"):
        seal_handoff(MESSAGE, b"short", now_ms=NOW, ttl_ms=1, nonce=NONCE)


def test_full_replay_cache_refuses_rather_than_forgets() -> None:
    cache = ReplayCache(max_entries=1)
    cache.admit(b"a" * 16, expires_ms=NOW + 5, now_ms=NOW)
    with pytest.raises(HandoffRefused, match="replay cache full"):
        cache.admit(b"b" * 16, expires_ms=NOW + 5, now_ms=NOW)
    cache.admit(b"b" * 16, expires_ms=NOW + 10, now_ms=NOW + 5)  # the first one expired


def test_ack_round_trip_and_binding_to_the_nonce() -> None:
    ack = HandoffAck(NONCE, (None, "bind: EADDRINUSE"))
    raw = seal_ack(ack, KEY)
    assert open_ack(raw, KEY, nonce=NONCE) == ack
    assert ack.restored == 1
    with pytest.raises(ForgedHandoff, match="answers another handoff"):
        open_ack(raw, KEY, nonce=b"\0" * 16)
    with pytest.raises(ForgedHandoff):
        open_ack(raw[:-1] + bytes([raw[-1] ^ 1]), KEY, nonce=NONCE)
