"""What the adapter asks llama-server for: a pure function of the continuation."""

from __future__ import annotations

from albatross.core.journal import SamplingParams, StreamJournal
from albatross.engines.llama_server import completion_body


def _journal(**params: object) -> StreamJournal:
    return StreamJournal("r", (1, 2, 3), SamplingParams(max_tokens=10, seed=7, **params))  # type: ignore[arg-type]


def test_first_leg_asks_for_the_prompt_with_token_ids_back() -> None:
    body = completion_body(_journal().continuation())
    assert body == {
        "prompt": [1, 2, 3],
        "n_predict": 10,
        "seed": 7,
        "stream": True,
        "return_tokens": True,
        "cache_prompt": True,
    }


def test_only_sampling_parameters_the_client_gave_are_sent() -> None:
    body = completion_body(_journal(temperature=0.0, top_k=5).continuation())
    assert body["temperature"] == 0.0 and body["top_k"] == 5
    assert "top_p" not in body and "min_p" not in body


def test_continuation_carries_emitted_ids_fewer_tokens_and_a_derived_seed() -> None:
    j = _journal(temperature=0.5)
    for pos, (tid, piece) in enumerate([(10, "a"), (11, "b"), (12, "")]):
        j.append(pos, tid, piece)
    j.rewind_to_frontier()
    body = completion_body(j.continuation(), slot=3)
    assert body["prompt"] == [1, 2, 3, 10, 11]
    assert body["n_predict"] == 8
    assert body["seed"] != 7 and 0 <= body["seed"] < 2**32
    assert body["id_slot"] == 3


def test_stop_sequences_stay_with_the_gateway_and_schemas_go_to_the_engine() -> None:
    body = completion_body(_journal(stop=("x",), json_schema='{"type": "object"}').continuation())
    assert "stop" not in body
    assert body["json_schema"] == {"type": "object"}
