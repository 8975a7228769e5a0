"""The official ``openai`` client against ``albatross serve``, as a user would use it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from e2e_support import MODEL, Served
from openai import OpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.engine]

MESSAGES = [{"role": "user", "content": "Tell me about the albatross."}]
PROMPT = "The albatross glides over the ocean"
# temperature 0 is greedy; top_k and seed are explicit so nothing depends on defaults.
GREEDY = {"temperature": 0.0, "seed": 1234}
GREEDY_EXTRA = {"top_k": 1}


@pytest.fixture
def client(gateway: Served) -> Iterator[OpenAI]:
    with OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=30.0) as c:
        yield c


def test_models_list_names_the_model(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]


def test_chat_non_streaming(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, **GREEDY)
    choice = r.choices[0]
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content
    # The tiny model never samples an end token, so the stream runs to max_tokens.
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_streaming_matches_non_streaming(client: OpenAI) -> None:
    kw = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 40,
        **GREEDY,
        "extra_body": GREEDY_EXTRA,
    }
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks, "no chunks"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1


def test_stream_options_include_usage(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=17,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 17
    assert last.usage.total_tokens == last.usage.prompt_tokens + 17
    # Only the final chunk carries usage.
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_streaming_and_not(client: OpenAI) -> None:
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 30, **GREEDY, "extra_body": GREEDY_EXTRA}
    whole = client.completions.create(**kw)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 30
    chunks = list(client.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequence_cuts_right_before_it(gateway: Served) -> None:
    # A fresh client (so a fresh connection) per request: a gateway bug can write a
    # stop-ended response twice, and the stray copy would answer the next request on
    # the same connection (test_raw_http.py::test_stop_sequence_is_answered_once).
    def fresh() -> OpenAI:
        return OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=30.0)

    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 60, **GREEDY, "extra_body": GREEDY_EXTRA}
    with fresh() as c:
        ref = c.completions.create(**kw).choices[0].text
    assert len(ref) > 40, ref
    # A non-blank piece from the middle; the output must end right before its first
    # occurrence, which may be earlier than where it was taken from.
    start = len(ref) // 2
    while not ref[start : start + 4].strip():
        start += 1
    stop = ref[start : start + 4]
    expected = ref[: ref.index(stop)]
    assert len(expected) < len(ref)

    for stream in (False, True):
        with fresh() as c:
            if stream:
                chunks = list(c.completions.create(stop=[stop], stream=True, **kw))
                assert chunks, "no chunks"
                text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
                reason = chunks[-1].choices[0].finish_reason
            else:
                r = c.completions.create(stop=stop, **kw)
                text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert text == expected, (stream, stop)
        assert reason == "stop", stream

    chat_kw = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 60,
        **GREEDY,
        "extra_body": GREEDY_EXTRA,
    }
    with fresh() as c:
        chat_ref = c.chat.completions.create(**chat_kw).choices[0].message.content
    assert chat_ref and len(chat_ref) > 40
    start = len(chat_ref) // 2
    while not chat_ref[start : start + 3].strip():
        start += 1
    chat_stop = chat_ref[start : start + 3]
    with fresh() as c:
        r = c.chat.completions.create(stop=chat_stop, **chat_kw)
    assert r.choices[0].message.content == chat_ref[: chat_ref.index(chat_stop)]
    assert r.choices[0].finish_reason == "stop"


def test_greedy_output_equals_llama_server_directly(client: OpenAI, llama_url: str) -> None:
    """Same model file, same prompt, greedy: the gateway adds nothing and loses nothing."""
    max_tokens = 64
    body = {
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_k": 1,
        "seed": 1234,
    }
    direct = httpx.post(llama_url + "/v1/completions", json=body, timeout=30.0)
    assert direct.status_code == 200, direct.text
    expected = direct.json()["choices"][0]["text"]
    assert len(expected) > 0

    got = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0.0,
        seed=1234,
        extra_body={"top_k": 1},
    )
    assert got.choices[0].text == expected
    assert got.usage is not None and got.usage.completion_tokens == max_tokens
    assert got.usage.prompt_tokens == direct.json()["usage"]["prompt_tokens"]

    streamed = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0.0,
        seed=1234,
        stream=True,
        extra_body={"top_k": 1},
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_greedy_chat_equals_llama_server_directly(client: OpenAI, llama_url: str) -> None:
    """Chat too: the gateway renders the model's template the way llama-server does."""
    body = {"messages": MESSAGES, "max_tokens": 48, "temperature": 0.0, "top_k": 1, "seed": 1234}
    direct = httpx.post(llama_url + "/v1/chat/completions", json=body, timeout=30.0)
    assert direct.status_code == 200, direct.text
    expected = direct.json()["choices"][0]["message"]["content"]

    got = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=48,
        temperature=0.0,
        seed=1234,
        extra_body={"top_k": 1},
    )
    assert got.choices[0].message.content == expected
    assert got.usage is not None
    assert got.usage.prompt_tokens == direct.json()["usage"]["prompt_tokens"]
