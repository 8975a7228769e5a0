"""OpenAI response encoding: SSE chunks for streams, whole objects otherwise.

The per-token path builds each event from pre-encoded bytes around one
``orjson.dumps`` of the text, so a batch of tokens costs one small allocation chain
and no dict building.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


class Encoder:
    """Encodes one response (chat or completion) for one request."""

    __slots__ = ("_base", "_kind", "_pre", "_suf", "created", "model", "response_id")

    def __init__(self, kind: str, response_id: str, model: str, created: int) -> None:
        self._kind = kind
        self.response_id = response_id
        self.model = model
        self.created = created
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._base = b'{"id":%b,"object":"%b","created":%d,"model":%b,' % (
            orjson.dumps(response_id),
            obj.encode(),
            created,
            orjson.dumps(model),
        )
        if kind == "chat":
            self._pre = b"data: " + self._base + b'"choices":[{"index":0,"delta":{"content":'
            self._suf = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._pre = b"data: " + self._base + b'"choices":[{"index":0,"text":'
            self._suf = b',"logprobs":null,"finish_reason":null}]}\n\n'

    @property
    def kind(self) -> str:
        """``chat`` or ``completion``."""
        return self._kind

    # Event ids (every event has one, strictly increasing): the chat role event -1,
    # text events the journal position of their last token, the final event the
    # stream's length L, the usage event L + 1. ``data: [DONE]`` is the end marker.

    def first(self) -> bytes:
        """The event that opens a chat stream (OpenAI sends the role first)."""
        if self._kind != "chat":
            return b""
        return (
            b"id: -1\ndata: "
            + self._base
            + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def text(self, position: int, text: str) -> bytes:
        """One event with ``text``; ``id`` is the journal position of its last token."""
        return b"id: %d\n%b%b%b" % (position, self._pre, orjson.dumps(text), self._suf)

    def finish(self, length: int, reason: str, text: str = "") -> bytes:
        """The final event, id = the stream's length; it carries any text released only
        by the end of the stream (held back by the stop matcher until then)."""
        t = orjson.dumps(text)
        if self._kind == "chat":
            delta = b'{"content":%b}' % t if text else b"{}"
            choice = b'{"index":0,"delta":%b,"logprobs":null,"finish_reason":"%b"}' % (
                delta,
                reason.encode(),
            )
        else:
            choice = b'{"index":0,"text":%b,"logprobs":null,"finish_reason":"%b"}' % (
                t,
                reason.encode(),
            )
        return b'id: %d\ndata: %b"choices":[%b]}\n\n' % (length, self._base, choice)

    def usage_event(self, length: int, usage: dict[str, int]) -> bytes:
        return b'id: %d\ndata: %b"choices":[],"usage":%b}\n\n' % (
            length + 1,
            self._base,
            orjson.dumps(usage),
        )

    def whole(self, text: str, reason: str, usage: dict[str, int]) -> bytes:
        """A non-streaming response body."""
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": "chat.completion" if self._kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "usage": usage,
        }
        if self._kind == "chat":
            body["choices"] = [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ]
        else:
            body["choices"] = [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            ]
        return orjson.dumps(body)
