"""The stream state that travels with a moved connection: round trip and refusals."""

from __future__ import annotations

import orjson
import pytest

from albatross.core.journal import FinishReason, SamplingParams, StreamJournal
from albatross.core.stream_snapshot import SnapshotError, StreamSnapshot, decode, encode

PARAMS = SamplingParams(max_tokens=50, seed=42, temperature=0.0, stop=("\n\n", "END"))


def journal(pieces: list[str]) -> StreamJournal:
    j = StreamJournal("chatcmpl-1", (1, 2, 3), PARAMS)
    for i, p in enumerate(pieces):
        j.append(i, 100 + i, p)
    return j


def snap(j: StreamJournal, sent: int = 1, **kw: object) -> StreamSnapshot:
    args: dict[str, object] = {
        "kind": "chat",
        "model": "m",
        "created": 1700000000,
        "include_usage": True,
        "sent_id": sent,
        "head_sent": True,
        "keep_alive": False,
        "migrations": 2,
        "engine_url": "http://10.0.0.1:8080",
        "slot": 3,
        **kw,
    }
    return StreamSnapshot.of(j, **args)  # type: ignore[arg-type]


def test_round_trip_keeps_everything_through_the_frontier() -> None:
    # The last token released no text yet (a split character): it is provisional
    # and does not travel; the continuing replica generates it again.
    j = journal(["Hel", "lo", " wo", ""])
    s = snap(j)
    back = decode(encode(s))
    assert back == s
    rebuilt = back.journal()
    assert rebuilt.ids == [100, 101, 102] and rebuilt.text() == "Hello wo"
    assert rebuilt.frontier == 3 and rebuilt.params == PARAMS
    assert rebuilt.continuation() == journal(["Hel", "lo", " wo"]).continuation()


def test_a_finished_journal_travels_whole_with_its_reason() -> None:
    j = journal(["a", "b"])
    j.finish(FinishReason.LENGTH)
    back = decode(encode(snap(j, sent=0))).journal()
    assert back.finished and back.finish_reason is FinishReason.LENGTH and back.text() == "ab"


def _tampered(**fields: object) -> bytes:
    obj = orjson.loads(encode(snap(journal(["a", "b", "c"]))))
    obj.update(fields)
    return orjson.dumps(obj)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"v": 2}, "v"),
        ({"kind": "embedding"}, "kind"),
        ({"sent": 3}, "sent"),  # the client cannot have an event past the frontier
        ({"sent": -3}, "sent"),
        ({"pieces": ["a", "b"]}, "pieces"),
        ({"ids": [1, True, 3]}, "ids"),
        ({"head": 1}, "head"),
        ({"migrations": True}, "migrations"),
        ({"finish": "eos"}, "finish"),
        ({"params": {"max_tokens": 2, "seed": 1}}, "ids"),  # more ids than max_tokens
        ({"params": {"max_tokens": 50, "seed": 1, "bogus": 1}}, "params"),
        ({"params": {"max_tokens": "50", "seed": 1}}, "params.max_tokens"),
        ({"slot": "3"}, "slot"),
    ],
)
def test_decode_names_the_field_at_fault(fields: dict[str, object], field: str) -> None:
    with pytest.raises(SnapshotError) as info:
        decode(_tampered(**fields))
    assert info.value.field == field


def test_decode_refuses_what_is_not_json() -> None:
    with pytest.raises(SnapshotError, match="not JSON"):
        decode(b"\x00\x01")
