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

    def first(self) -> bytes:
        """The event that opens a chat stream (OpenAI sends the role first)."""
        if self._kind != "chat":
            return b""
        return (
            b"data: "
            + self._base
            + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def text(self, position: int | None, text: str) -> bytes:
        """One event with ``text``; ``id`` is the journal position of its last token
        (none for text released by the end of the stream, which the final event's id
        covers)."""
        if position is None:
            return b"%b%b%b" % (self._pre, orjson.dumps(text), self._suf)
        return b"id: %d\n%b%b%b" % (position, self._pre, orjson.dumps(text), self._suf)

    def finish(self, position: int, reason: str) -> bytes:
        """The final event; its id is the stream's length, past every token position."""
        if self._kind == "chat":
            choice = (
                b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"%b"}' % reason.encode()
            )
        else:
            choice = b'{"index":0,"text":"","logprobs":null,"finish_reason":"%b"}' % reason.encode()
        return b'id: %d\ndata: %b"choices":[%b]}\n\n' % (position, self._base, choice)

    def usage_event(self, usage: dict[str, int]) -> bytes:
        return b"data: " + self._base + b'"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"

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
