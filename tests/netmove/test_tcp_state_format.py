"""The TCP state record: exact round trips, and every malformed record refused by name."""

from __future__ import annotations

import dataclasses
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from albatross.netmove.errors import StateFormatError
from albatross.netmove.state import Flow, TcpState, TcpWindow, decode_state, encode_state

u32 = st.integers(0, 2**32 - 1)


def make_state(**over: object) -> TcpState:
    base: dict[str, object] = dict(
        family=socket.AF_INET, local_addr="10.0.0.1", local_port=443,
        remote_addr="10.0.0.2", remote_port=50000, send_seq=1, recv_seq=2,
        send_queue=b"abcdef", unsent_len=2, recv_queue=b"GET /", mss=1460,
        timestamps=True, sack=True, wscale=True, snd_wscale=7, rcv_wscale=9,
        timestamp=123456, window=TcpWindow(1, 2, 3, 4, 5), nodelay=True,
    )  # fmt: skip
    base.update(over)
    return TcpState(**base)  # type: ignore[arg-type]


@st.composite
def states(draw: st.DrawFn) -> TcpState:
    v6 = draw(st.booleans())
    addr = st.ip_addresses(v=6 if v6 else 4).map(str)
    send_queue = draw(st.binary(max_size=300))
    return TcpState(
        family=socket.AF_INET6 if v6 else socket.AF_INET,
        local_addr=draw(addr), local_port=draw(st.integers(1, 65535)),
        remote_addr=draw(addr), remote_port=draw(st.integers(1, 65535)),
        send_seq=draw(u32), recv_seq=draw(u32), send_queue=send_queue,
        unsent_len=draw(st.integers(0, len(send_queue))),
        recv_queue=draw(st.binary(max_size=300)), mss=draw(st.integers(1, 65535)),
        timestamps=draw(st.booleans()), sack=draw(st.booleans()), wscale=draw(st.booleans()),
        snd_wscale=draw(st.integers(0, 14)), rcv_wscale=draw(st.integers(0, 14)),
        timestamp=draw(u32), window=TcpWindow(*(draw(u32) for _ in range(5))),
        nodelay=draw(st.booleans()),
    )  # fmt: skip


@given(states())
def test_round_trip_is_exact(state: TcpState) -> None:
    assert decode_state(encode_state(state)) == state


@given(states(), st.data())
def test_truncated_or_padded_records_are_refused(state: TcpState, data: st.DataObject) -> None:
    raw = encode_state(state)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(StateFormatError):
        decode_state(raw[:cut])
    with pytest.raises(StateFormatError, match="length"):
        decode_state(raw + b"\0")


def test_version_magic_and_flags_are_checked_by_name() -> None:
    raw = bytearray(encode_state(make_state()))
    bad_version = bytes(raw[:4]) + b"\x02" + bytes(raw[5:])
    with pytest.raises(
        StateFormatError, match=r"^version: 2 is not supported \(this build reads 1\)"
    ):
        decode_state(bad_version)
    with pytest.raises(StateFormatError, match=r"^magic"):
        decode_state(b"XTCP" + bytes(raw[4:]))
    raw[6] |= 0x80
    with pytest.raises(StateFormatError, match=r"^flags"):
        decode_state(bytes(raw))


def test_queue_lengths_that_do_not_add_up_are_refused() -> None:
    raw = bytearray(encode_state(make_state()))
    send_len_at = len(raw) - len(b"abcdef") - len(b"GET /") - 8
    raw[send_len_at + 3] += 1
    with pytest.raises(StateFormatError, match=r"^queues"):
        decode_state(bytes(raw))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("local_port", 0, "local_port: 0 must be in 1..65535"),
        ("snd_wscale", 15, "snd_wscale: 15 must be in 0..14"),
        ("unsent_len", 7, "unsent_len: 7 must be in 0..len(send_queue)=6"),
        ("remote_addr", "fd00::1", "remote_addr: 'fd00::1' is not an IPv4 address"),
        ("send_seq", 2**32, "send_seq: 4294967296 must be in 0..2**32-1"),
    ],
)
def test_invalid_fields_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(StateFormatError) as info:
        make_state(**{field: value})
    assert str(info.value).startswith(message)
    assert info.value.field == field


def test_sent_and_unsent_parts_split_the_send_queue() -> None:
    s = make_state()
    assert (s.sent_queue, s.unsent) == (b"abcd", b"ef")
    assert dataclasses.replace(s, unsent_len=0).unsent == b""


def test_flow_key_layout_matches_the_bpf_struct() -> None:
    key = Flow("10.0.0.1", 443, "10.0.0.2", 50000).key()
    assert len(key) == 40
    assert key[:4] == bytes([10, 0, 0, 1]) and key[4:16] == bytes(12)
    assert key[16:20] == bytes([10, 0, 0, 2])
    assert key[32:34] == (443).to_bytes(2, "big") and key[34:36] == (50000).to_bytes(2, "big")
    assert key[36] == 4 and key[37:] == bytes(3)
    assert Flow("fd00::1", 1, "fd00::2", 2).key()[36] == 6
    with pytest.raises(StateFormatError, match="remote_addr"):
        Flow("10.0.0.1", 1, "fd00::2", 2).key()
