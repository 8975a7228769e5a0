"""Validation of OpenAI-style request bodies into :class:`GenerationRequest`.

Pure: the parsed JSON body, the limits and a seed (for requests that bring none) come
in; a frozen request or a :class:`ClientError` naming the field, the value and the rule
comes out. Unknown fields are refused rather than ignored: a parameter the gateway
would silently drop changes what the client gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from albatross.core.errors import ClientError, InvalidField, UnsupportedField
from albatross.core.journal import SamplingParams

_MAX_STOPS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[_TextPart], Field(union_mode="left_to_right")]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _JsonSchemaSpec(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class _ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> _ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.schema_ is None
        ):
            raise ValueError("response_format: type json_schema needs json_schema.schema")
        return self

    def engine_schema(self) -> str | None:
        """The JSON schema to constrain decoding with, as JSON text; None for text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return '{"type": "object"}'
        assert self.json_schema is not None and self.json_schema.schema_ is not None
        return orjson.dumps(self.json_schema.schema_).decode()


Float = float | int  # JSON numbers: 1 and 1.0 are both fine


class _Common(_Strict):
    model: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0, le=10)] | None = None
    seed: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] | None = None
    stop: str | Annotated[list[str], Field(max_length=_MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    user: str | None = None


class _Chat(_Common):
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    response_format: _ResponseFormat | None = None
    logprobs: Literal[False] | None = None

    @model_validator(mode="after")
    def _one_max(self) -> _Chat:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError(
                "max_completion_tokens: give max_tokens or max_completion_tokens, not both"
            )
        return self


class _Completion(_Common):
    prompt: Annotated[
        str | list[int] | list[str] | list[list[int]], Field(union_mode="left_to_right")
    ]
    echo: Literal[False] | None = None
    logprobs: None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None
    suffix: None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> _Completion:
        p = self.prompt
        if p == "" or p == [""]:
            raise ValueError("prompt: must not be empty")
        if isinstance(p, list):
            if not p or (isinstance(p[0], list) and not p[0]):
                raise ValueError("prompt: must not be empty")
            if isinstance(p[0], str | list) and len(p) > 1:
                raise ValueError(
                    "prompt: batched prompts are not supported; send one prompt per request"
                )
        return self


# Fields we know and refuse, with the reason a client deserves.
_UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "logit_bias": "logit_bias is not supported",
    "top_logprobs": "logprobs are not supported",
    "parallel_tool_calls": "tool calling is not supported",
}
_RULES = {
    "n": "must be 1 (several choices cannot be continued exactly)",
    "best_of": "must be 1 (several candidates cannot be continued exactly)",
    "response_format": "must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'schema': {...}}}",
    "logprobs": "logprobs are not supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
}


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated request; exactly one of ``messages`` / ``prompt_text`` / ``prompt_ids`` is set."""

    kind: Literal["chat", "completion"]
    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    messages: tuple[ChatMessage, ...] = ()
    prompt_text: str | None = None
    prompt_ids: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    max_tokens_default: int
    max_tokens_limit: int


def _field_name(loc: tuple[int | str, ...]) -> str:
    # Drop pydantic's union-branch labels such as "str" or "list[_TextPart]".
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif "[" in p or p in {"str", "int", "float", "bool", "function-after"}:
            continue
        else:
            parts.append(("." if parts else "") + p)
    return "".join(parts) or "body"


def _translate(exc: ValidationError) -> ClientError:
    errors = exc.errors()
    # Prefer the most specific error: a broken rule over a missing key (a union's
    # other branches report keys they would have needed), then the deepest location.
    e = max(errors, key=lambda e: (e["type"] != "missing", len(e["loc"])))
    field = _field_name(e["loc"])
    top = str(e["loc"][0]) if e["loc"] else "body"
    if e["type"] == "extra_forbidden":
        if top in _UNSUPPORTED:
            return UnsupportedField(top, _UNSUPPORTED[top])
        return UnsupportedField(field, "is not a supported parameter")
    if top == "stop" and isinstance(e.get("input"), list) and len(e["input"]) > _MAX_STOPS:
        return InvalidField(
            "stop", f"{len(e['input'])} sequences", f"must have at most {_MAX_STOPS} sequences"
        )
    if top in _RULES and len(e["loc"]) >= 1:
        return InvalidField(top, e.get("input"), _RULES[top])
    if e["type"] == "missing":
        return ClientError(f"{field}: is required", param=field, code="missing_field")
    rule = e["msg"]
    if rule.startswith("Value error, "):
        rule = rule[len("Value error, ") :]
        if not e["loc"] and ": " in rule:
            # A whole-body rule names its field first ("prompt: must not be empty").
            return ClientError(rule, param=rule.split(": ", 1)[0], code="invalid_value")
    return InvalidField(field, e.get("input"), rule[0].lower() + rule[1:])


def _params(
    req: _Common,
    max_tokens: int | None,
    limits: Limits,
    seed: int,
    field: str = "max_tokens",
    json_schema: str | None = None,
) -> SamplingParams:
    mt = limits.max_tokens_default if max_tokens is None else max_tokens
    if mt > limits.max_tokens_limit:
        raise InvalidField(field, mt, f"must be <= {limits.max_tokens_limit}")
    stop: tuple[str, ...] = ()
    if isinstance(req.stop, str):
        stop = (req.stop,)
    elif req.stop is not None:
        stop = tuple(req.stop)
    if any(not s for s in stop):
        raise InvalidField("stop", req.stop, "must not contain empty strings")

    def f(v: float | None) -> float | None:
        return None if v is None else float(v)

    return SamplingParams(
        max_tokens=mt,
        seed=req.seed if req.seed is not None else seed,
        temperature=f(req.temperature),
        top_p=f(req.top_p),
        top_k=req.top_k,
        min_p=f(req.min_p),
        presence_penalty=f(req.presence_penalty),
        frequency_penalty=f(req.frequency_penalty),
        repeat_penalty=f(req.repetition_penalty),
        stop=stop,
        json_schema=json_schema,
    )


def _require_object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidField("body", type(body).__name__, "must be a JSON object")
    return body


def parse_chat(body: object, limits: Limits, seed: int) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body. Raises :class:`ClientError`."""
    try:
        req = _Chat.model_validate(_require_object(body))
    except ValidationError as exc:
        raise _translate(exc) from exc
    mt: int | None
    if req.max_completion_tokens is not None:
        mt, field = req.max_completion_tokens, "max_completion_tokens"
    else:
        mt, field = req.max_tokens, "max_tokens"
    return GenerationRequest(
        kind="chat",
        model=req.model,
        params=_params(
            req,
            mt,
            limits,
            seed,
            field,
            req.response_format.engine_schema() if req.response_format else None,
        ),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        messages=tuple(ChatMessage(m.role, m.text()) for m in req.messages),
    )


def parse_completion(body: object, limits: Limits, seed: int) -> GenerationRequest:
    """Validate a ``/v1/completions`` body. Raises :class:`ClientError`."""
    try:
        req = _Completion.model_validate(_require_object(body))
    except ValidationError as exc:
        raise _translate(exc) from exc
    text: str | None = None
    ids: tuple[int, ...] | None = None
    p = req.prompt
    if isinstance(p, str):
        text = p
    elif isinstance(p[0], str):
        text = p[0]
    elif isinstance(p[0], list):
        ids = tuple(p[0])
    else:
        ids = tuple(p)
    if ids is not None and any(i < 0 for i in ids):
        raise InvalidField("prompt", list(ids)[:8], "token ids must be >= 0")
    return GenerationRequest(
        kind="completion",
        model=req.model,
        params=_params(req, req.max_tokens, limits, seed),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        prompt_text=text,
        prompt_ids=ids,
    )
