"""SSE encoding: every event is one OpenAI-shaped JSON object after ``data: ``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from albatross.gateway.sse import DONE, Encoder

RID = "chatcmpl-1"
MODEL = 'tiny "model"/ü'
CREATED = 1_700_000_000


def parse_event(raw: bytes) -> tuple[str | None, Any]:
    """One SSE event -> (id or None, decoded data). Checks the framing on the way."""
    assert raw.endswith(b"\n\n")
    lines = raw[:-2].decode("utf-8").split("\n")
    event_id = None
    data = []
    for line in lines:
        field, _, value = line.partition(": ")
        if field == "id":
            assert event_id is None
            event_id = value
        elif field == "data":
            data.append(value)
        else:
            raise AssertionError(f"unexpected SSE line {line!r}")
    assert len(data) == 1, "one data line per event (no raw newlines in JSON)"
    return event_id, json.loads(data[0])


def check_envelope(obj: dict[str, Any], kind: str) -> None:
    assert obj["id"] == RID
    assert obj["object"] == ("chat.completion.chunk" if kind == "chat" else "text_completion")
    assert obj["created"] == CREATED
    assert obj["model"] == MODEL
    assert isinstance(obj["choices"], list)


@pytest.fixture(params=["chat", "completion"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def enc(kind: str) -> Encoder:
    return Encoder(kind, RID, MODEL, CREATED)


def content_of(kind: str, choice: dict[str, Any]) -> str:
    return str(choice["delta"]["content"] if kind == "chat" else choice["text"])


def test_text_event(kind: str) -> None:
    event_id, obj = parse_event(enc(kind).text(7, "hello"))
    assert event_id == "7"
    check_envelope(obj, kind)
    (choice,) = obj["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] is None
    assert choice["logprobs"] is None
    assert content_of(kind, choice) == "hello"


@given(st.text(), st.integers(0, 2**31))
def test_any_text_round_trips(text: str, position: int) -> None:
    for kind in ("chat", "completion"):
        event_id, obj = parse_event(enc(kind).text(position, text))
        assert event_id == str(position)
        assert content_of(kind, obj["choices"][0]) == text


@pytest.mark.parametrize(
    "text", ['say "hi"', "line1\nline2\r\n\n", "data: [DONE]\n\n", "é€😀\u2028\x00", "\\"]
)
def test_awkward_text_round_trips(kind: str, text: str) -> None:
    _, obj = parse_event(enc(kind).text(0, text))
    assert content_of(kind, obj["choices"][0]) == text


def test_chat_first_event_sends_the_role() -> None:
    event_id, obj = parse_event(enc("chat").first())
    assert event_id == "-1"  # before every token position
    check_envelope(obj, "chat")
    (choice,) = obj["choices"]
    assert choice["delta"] == {"role": "assistant", "content": ""}
    assert choice["finish_reason"] is None


def test_completion_has_no_first_event() -> None:
    assert enc("completion").first() == b""


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_finish_event(kind: str, reason: str) -> None:
    event_id, obj = parse_event(enc(kind).finish(12, reason))
    assert event_id == "12"
    check_envelope(obj, kind)
    (choice,) = obj["choices"]
    assert choice["finish_reason"] == reason
    if kind == "chat":
        assert choice["delta"] == {}
    else:
        assert choice["text"] == ""


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_finish_event_carries_text_released_by_the_end(kind: str, reason: str) -> None:
    _, obj = parse_event(enc(kind).finish(12, reason, 'tail "x"'))
    (choice,) = obj["choices"]
    assert content_of(kind, choice) == 'tail "x"'
    assert choice["finish_reason"] == reason


def test_usage_event(kind: str) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    event_id, obj = parse_event(enc(kind).usage_event(3, usage))
    assert event_id == "4"  # after the final event (id = length 3)
    check_envelope(obj, kind)
    assert obj["choices"] == []
    assert obj["usage"] == usage


def test_done() -> None:
    assert DONE == b"data: [DONE]\n\n"


def test_a_stream_concatenates_into_parseable_events(kind: str) -> None:
    e = enc(kind)
    stream = e.first() + e.text(0, "a") + e.text(2, "b\n\nc") + e.finish(3, "stop") + DONE
    events = [ev + b"\n\n" for ev in stream.split(b"\n\n") if ev]
    texts = []
    for ev in events[:-1]:
        _, obj = parse_event(ev)
        choice = obj["choices"][0]
        if choice["finish_reason"] is None and (kind != "chat" or "role" not in choice["delta"]):
            texts.append(content_of(kind, choice))
    assert "".join(texts) == "ab\n\nc"
    assert events[-1] == DONE


def test_whole_chat() -> None:
    usage = {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    obj = json.loads(enc("chat").whole('a "b"\nc', "length", usage))
    assert obj == {
        "id": RID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "usage": usage,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": 'a "b"\nc'},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
    }


def test_whole_completion() -> None:
    usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    obj = json.loads(enc("completion").whole("é", "stop", usage))
    assert obj == {
        "id": RID,
        "object": "text_completion",
        "created": CREATED,
        "model": MODEL,
        "usage": usage,
        "choices": [{"index": 0, "text": "é", "logprobs": None, "finish_reason": "stop"}],
    }
