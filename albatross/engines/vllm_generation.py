"""Generations on vLLM's OpenAI server: the request body and the streamed-event parser.

A generation is ``POST /v1/completions`` with a token-id ``prompt``, ``stream`` and
``return_token_ids``: every SSE chunk then carries the ids of the tokens sampled since
the previous chunk (``choices[0].token_ids``) and the text vLLM's detokenizer released
with them (``choices[0].text``). The released text completes with a chunk's last token;
a token whose UTF-8 bytes are still incomplete arrives with empty text, as the journal
expects. vLLM sends no token positions: they are counted from the continuation's start.

The chunk with ``finish_reason`` is followed by a usage chunk (``include_usage``) and
``data: [DONE]``; the generation finishes at ``[DONE]``. Stop sequences are not sent
(the gateway matches them, see ``core/stops.py``).
"""

from __future__ import annotations

from typing import Any

import orjson

from albatross.core.errors import EngineError
from albatross.core.journal import Continuation
from albatross.engines.base import Finished, TokenSink
from albatross.engines.http_client import error_message
from albatross.engines.sse_generation import SSEGeneration

_SAMPLING_FIELDS = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("repeat_penalty", "repetition_penalty"),
)


def completions_body(cont: Continuation) -> dict[str, Any]:
    """The ``/v1/completions`` request that continues ``cont`` (pure; tested directly).

    No ``model``: the server's only model answers. Special tokens are not rendered
    (vLLM's default), as llama-server does not render an end token.
    """
    body: dict[str, Any] = {
        "prompt": list(cont.prompt_ids),
        "max_tokens": cont.max_tokens,
        "seed": cont.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    p = cont.params
    if p.json_schema is not None:
        body["structured_outputs"] = {"json": orjson.loads(p.json_schema)}
    for attr, key in _SAMPLING_FIELDS:
        v = getattr(p, attr)
        if v is not None:
            body[key] = v
    return body


def stop_type(finish_reason: str | None, stop_reason: object) -> str:
    """llama-server's name for how a generation ended (see :class:`Finished`)."""
    if finish_reason == "length":
        return "limit"
    if finish_reason == "stop":
        return "eos" if stop_reason is None else "word"
    return "none"


def prompt_evaluated(usage: Any) -> int | None:
    """Prompt tokens vLLM computed (not taken from its prefix cache), if it said."""
    if not isinstance(usage, dict) or "prompt_tokens" not in usage:
        return None
    details = usage.get("prompt_tokens_details") or {}
    return int(usage["prompt_tokens"]) - int(details.get("cached_tokens") or 0)


class VllmGeneration(SSEGeneration):
    """vLLM's ``/v1/completions`` chunks: ``choices[0].token_ids`` with their released
    ``text``; a ``finish_reason``, a usage chunk, then ``[DONE]``."""

    __slots__ = ("_finish", "_pos", "_prompt_n", "_stop_reason")

    def __init__(self, start: int, sink: TokenSink) -> None:
        super().__init__(sink)
        self._pos = start
        self._finish: str | None = None
        self._stop_reason: object = None
        self._prompt_n: int | None = None

    def _payload(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.on_read_done()
            self._finished()
            return
        ev = self._json(payload)
        if ev is None:
            return
        err = ev.get("error")
        if err is not None:
            self.on_read_done()
            self._fail(EngineError(f"engine error during generation: {error_message(err)}"))
            return
        if ev.get("usage") is not None:
            self._prompt_n = prompt_evaluated(ev["usage"])
        for choice in ev.get("choices") or ():
            toks = choice.get("token_ids")
            if toks:
                sink, pos, last = self._sink, self._pos, len(toks) - 1
                for i, t in enumerate(toks):
                    sink.on_token(pos + i, t, choice.get("text", "") if i == last else "")
                self._pos = pos + len(toks)
                self._got = True
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
                self._stop_reason = choice.get("stop_reason")

    def _ended(self, error: EngineError | None) -> None:
        if error is None and self._finish is not None:
            self._finished()  # a complete response without [DONE]
        else:
            super()._ended(error)

    def _finished(self) -> None:
        if self._done:
            return
        if self._finish is None:
            self._fail(EngineError("engine ended the stream without a finish reason"))
            return
        self._done = True
        if self._proto is not None:
            self._proto.close()
        self._sink.on_finish(Finished(stop_type(self._finish, self._stop_reason), self._prompt_n))
