"""Request validation: every bad input is a 4xx naming its field; good inputs parse exactly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from albatross.core.errors import ClientError
from albatross.core.requests import Limits, parse_chat, parse_completion

LIMITS = Limits(max_tokens_default=128, max_tokens_limit=4096)
MSGS = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSGS, **kw}


def completion(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hello", **kw}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


# (id, body, field named by .param)
BAD_CHAT: list[tuple[str, object, str]] = [
    ("list body", [chat()], "body"),
    ("string body", "hello", "body"),
    ("null body", None, "body"),
    ("missing model", without(chat(), "model"), "model"),
    ("empty model", chat(model=""), "model"),
    ("model not a string", chat(model=5), "model"),
    ("missing messages", without(chat(), "messages"), "messages"),
    ("empty messages", chat(messages=[]), "messages"),
    ("messages not a list", chat(messages="hi"), "messages"),
    ("content int", chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    ("content null", chat(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    (
        "content image part",
        chat(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        "messages[0].content",
    ),
    ("bad role", chat(messages=[{"role": "bot", "content": "x"}]), "messages[0].role"),
    ("missing role", chat(messages=[{"content": "x"}]), "messages[0].role"),
    ("max_tokens negative", chat(max_tokens=-1), "max_tokens"),
    ("max_tokens zero", chat(max_tokens=0), "max_tokens"),
    ("max_tokens string", chat(max_tokens="10"), "max_tokens"),
    ("max_tokens bool", chat(max_tokens=True), "max_tokens"),
    ("max_tokens over limit", chat(max_tokens=4097), "max_tokens"),
    ("max_completion_tokens zero", chat(max_completion_tokens=0), "max_completion_tokens"),
    ("temperature -0.1", chat(temperature=-0.1), "temperature"),
    ("temperature 2.5", chat(temperature=2.5), "temperature"),
    ("temperature string", chat(temperature="0.5"), "temperature"),
    ("top_p 0", chat(top_p=0), "top_p"),
    ("top_p 1.5", chat(top_p=1.5), "top_p"),
    ("n=2", chat(n=2), "n"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("tool_choice", chat(tool_choice="auto"), "tool_choice"),
    ("logit_bias", chat(logit_bias={"1": 5}), "logit_bias"),
    ("unknown field", chat(foo=1), "foo"),
    ("response_format grammar", chat(response_format={"type": "grammar"}), "response_format"),
    ("json_schema without schema", chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    ("stop with empty string", chat(stop=["a", ""]), "stop"),
    ("stop empty string", chat(stop=""), "stop"),
    ("17 stops", chat(stop=[f"s{i}" for i in range(17)]), "stop"),
    ("stop int", chat(stop=5), "stop"),
    ("both max fields", chat(max_tokens=3, max_completion_tokens=4), "max_completion_tokens"),
    ("seed negative", chat(seed=-1), "seed"),
    ("seed too big", chat(seed=2**32), "seed"),
    ("logprobs true", chat(logprobs=True), "logprobs"),
    ("stream not bool", chat(stream="yes"), "stream"),
    (
        "stream_options unknown",
        chat(stream=True, stream_options={"foo": True}),
        "stream_options.foo",
    ),
]

BAD_COMPLETION: list[tuple[str, object, str]] = [
    ("list body", [completion()], "body"),
    ("missing model", without(completion(), "model"), "model"),
    ("missing prompt", without(completion(), "prompt"), "prompt"),
    ("batched text prompts", completion(prompt=["a", "b"]), "prompt"),
    ("batched id prompts", completion(prompt=[[1, 2], [3]]), "prompt"),
    ("empty id list", completion(prompt=[]), "prompt"),
    ("empty nested id list", completion(prompt=[[]]), "prompt"),
    ("negative token id", completion(prompt=[1, -2, 3]), "prompt"),
    ("negative nested token id", completion(prompt=[[-1]]), "prompt"),
    ("prompt int", completion(prompt=5), "prompt"),
    ("echo", completion(echo=True), "echo"),
    ("logprobs", completion(logprobs=1), "logprobs"),
    ("best_of=2", completion(best_of=2), "best_of"),
    ("n=2", completion(n=2), "n"),
    ("suffix", completion(suffix="x"), "suffix"),
    ("max_tokens zero", completion(max_tokens=0), "max_tokens"),
    ("max_tokens over limit", completion(max_tokens=10**6), "max_tokens"),
    (
        "max_completion_tokens is chat only",
        completion(max_completion_tokens=5),
        "max_completion_tokens",
    ),
    ("messages is chat only", completion(messages=MSGS), "messages"),
    ("top_p 1.5", completion(top_p=1.5), "top_p"),
    ("seed too big", completion(seed=2**32), "seed"),
    ("logit_bias", completion(logit_bias={"1": 5}), "logit_bias"),
    ("unknown field", completion(foo="bar"), "foo"),
]


def check(exc: ClientError, field: str) -> None:
    assert 400 <= exc.status < 500
    assert exc.param == field, exc.message
    assert exc.message.startswith(field + ":"), exc.message


@pytest.mark.parametrize(("body", "field"), [c[1:] for c in BAD_CHAT], ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_is_a_client_error_naming_the_field(body: object, field: str) -> None:
    with pytest.raises(ClientError) as info:
        parse_chat(body, LIMITS, seed=1)
    param = info.value.param or ""
    # Nested fields may be reported more precisely than the test names them.
    assert param == field or param.startswith(field + ".") or param.startswith(field + "["), param
    check(info.value, param)


@pytest.mark.parametrize(
    ("body", "field"), [c[1:] for c in BAD_COMPLETION], ids=[c[0] for c in BAD_COMPLETION]
)
def test_bad_completion_is_a_client_error_naming_the_field(body: object, field: str) -> None:
    with pytest.raises(ClientError) as info:
        parse_completion(body, LIMITS, seed=1)
    check(info.value, field)


def test_error_messages_quote_value_and_rule() -> None:
    with pytest.raises(ClientError) as info:
        parse_chat(chat(temperature=2.5), LIMITS, seed=1)
    assert "2.5" in info.value.message
    assert "2" in info.value.message.split("2.5", 1)[1]
    with pytest.raises(ClientError) as info:
        parse_chat(chat(max_tokens=5000), LIMITS, seed=1)
    assert "5000" in info.value.message and "4096" in info.value.message


def test_max_completion_tokens_over_limit_names_that_field() -> None:
    with pytest.raises(ClientError) as info:
        parse_chat(chat(max_completion_tokens=5000), LIMITS, seed=1)
    assert info.value.param == "max_completion_tokens"


def test_too_many_stops_quotes_the_rule() -> None:
    with pytest.raises(ClientError) as info:
        parse_chat(chat(stop=[f"s{i}" for i in range(17)]), LIMITS, seed=1)
    assert "16" in info.value.message


# ---- good inputs ------------------------------------------------------------------


def test_minimal_chat_leaves_params_unset() -> None:
    r = parse_chat(chat(), LIMITS, seed=99)
    assert r.kind == "chat"
    assert r.model == "m"
    assert [(m.role, m.content) for m in r.messages] == [("user", "hi")]
    assert r.prompt_text is None and r.prompt_ids is None
    assert r.stream is False and r.include_usage is False
    p = r.params
    assert p.max_tokens == LIMITS.max_tokens_default
    assert p.seed == 99
    assert p.stop == ()
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repeat_penalty",
    ):
        assert getattr(p, name) is None, name


def test_text_parts_are_joined_and_roles_kept() -> None:
    body = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}],
            },
            {"role": "assistant", "content": "", "name": "bot"},
        ]
    )
    r = parse_chat(body, LIMITS, seed=1)
    assert [(m.role, m.content) for m in r.messages] == [
        ("system", "be brief"),
        ("user", "hello"),
        ("assistant", ""),
    ]


def test_stop_as_string_and_as_list() -> None:
    assert parse_chat(chat(stop="END"), LIMITS, seed=1).params.stop == ("END",)
    assert parse_chat(chat(stop=["a", "b"]), LIMITS, seed=1).params.stop == ("a", "b")
    assert (
        parse_chat(chat(stop=[f"s{i}" for i in range(16)]), LIMITS, seed=1).params.stop[-1] == "s15"
    )
    assert parse_chat(chat(stop=None), LIMITS, seed=1).params.stop == ()


def test_max_completion_tokens_is_used() -> None:
    assert parse_chat(chat(max_completion_tokens=7), LIMITS, seed=1).params.max_tokens == 7
    assert parse_chat(chat(max_tokens=9), LIMITS, seed=1).params.max_tokens == 9
    assert parse_chat(chat(max_tokens=4096), LIMITS, seed=1).params.max_tokens == 4096


def test_seed_default_and_explicit() -> None:
    assert parse_chat(chat(), LIMITS, seed=12345).params.seed == 12345
    assert parse_chat(chat(seed=7), LIMITS, seed=12345).params.seed == 7
    assert parse_chat(chat(seed=0), LIMITS, seed=12345).params.seed == 0
    assert parse_chat(chat(seed=2**32 - 1), LIMITS, seed=1).params.seed == 2**32 - 1


def test_sampling_params_are_kept_as_floats() -> None:
    r = parse_chat(
        chat(
            temperature=0,
            top_p=1,
            top_k=40,
            min_p=0.05,
            presence_penalty=-2,
            frequency_penalty=1.5,
            repetition_penalty=1.1,
        ),
        LIMITS,
        seed=1,
    )
    p = r.params
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.top_p == 1.0 and isinstance(p.top_p, float)
    assert p.top_k == 40
    assert p.min_p == 0.05
    assert p.presence_penalty == -2.0
    assert p.frequency_penalty == 1.5
    assert p.repeat_penalty == 1.1


def test_stream_options_include_usage() -> None:
    r = parse_chat(chat(stream=True, stream_options={"include_usage": True}), LIMITS, seed=1)
    assert r.stream is True and r.include_usage is True
    r = parse_chat(chat(stream=True, stream_options={"include_usage": False}), LIMITS, seed=1)
    assert r.include_usage is False
    r = parse_completion(
        completion(stream=True, stream_options={"include_usage": True}), LIMITS, seed=1
    )
    assert r.include_usage is True


def test_allowed_neutral_values() -> None:
    r = parse_chat(
        chat(n=1, logprobs=False, response_format={"type": "text"}, user="u"), LIMITS, seed=1
    )
    assert r.kind == "chat"
    r = parse_completion(completion(n=1, best_of=1, echo=False), LIMITS, seed=1)
    assert r.kind == "completion"


def test_completion_text_prompt() -> None:
    r = parse_completion(completion(prompt="once upon"), LIMITS, seed=3)
    assert r.kind == "completion"
    assert r.prompt_text == "once upon" and r.prompt_ids is None
    assert r.messages == ()
    assert r.params.seed == 3
    r = parse_completion(completion(prompt=["single"]), LIMITS, seed=3)
    assert r.prompt_text == "single" and r.prompt_ids is None


def test_completion_token_id_prompts() -> None:
    r = parse_completion(completion(prompt=[1, 2, 3]), LIMITS, seed=1)
    assert r.prompt_ids == (1, 2, 3) and r.prompt_text is None
    r = parse_completion(completion(prompt=[[4, 5]]), LIMITS, seed=1)
    assert r.prompt_ids == (4, 5) and r.prompt_text is None
    r = parse_completion(completion(prompt=[0]), LIMITS, seed=1)
    assert r.prompt_ids == (0,)


def test_completion_stop_and_max_tokens() -> None:
    r = parse_completion(completion(stop="\n", max_tokens=5, seed=11), LIMITS, seed=1)
    assert r.params.stop == ("\n",)
    assert r.params.max_tokens == 5
    assert r.params.seed == 11


def test_guided_decoding_is_accepted_and_marked_not_continuable() -> None:
    plain = parse_chat(chat(), LIMITS, 1)
    assert plain.params.json_schema is None and plain.params.continuable
    obj = parse_chat(chat(response_format={"type": "json_object"}), LIMITS, 1)
    assert obj.params.json_schema == '{"type": "object"}' and not obj.params.continuable
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    js = parse_chat(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}), LIMITS, 1)
    assert js.params.json_schema is not None and json.loads(js.params.json_schema) == schema
    assert not js.params.continuable
