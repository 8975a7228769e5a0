"""Adapter for llama.cpp's ``llama-server``.

Generations go through ``POST /completion`` with a token-id prompt, ``stream`` and
``return_tokens``: every SSE event then carries one sampled token id, the text the
server released with it, and ``tokens_predicted`` (the token's 1-based index in this
generation), from which the absolute journal position follows. Chat prompts are
rendered with the model's own template (``/apply-template``) and tokenized
(``/tokenize``) here, so the gateway always holds the prompt as ids.

Stop sequences are not sent to the engine (the gateway matches them, see
``core/stops.py``). The pinned build carries a small patch so the server also reports
the ids of tokens whose UTF-8 bytes it holds back; against an unpatched server such a
token shows up as a skipped ``tokens_predicted``, which the journal refuses as a gap.
"""

from __future__ import annotations

from typing import Any

import orjson

from albatross.core.errors import ClientError, EngineError
from albatross.core.journal import Continuation
from albatross.core.requests import ChatMessage
from albatross.engines.base import Capabilities, Finished, Generation, TokenSink
from albatross.engines.http_client import (
    ConnectionPool,
    EngineConnection,
    build_request,
    request_json,
    split_base_url,
)

CAPABILITIES = Capabilities(
    token_id_prompts=True, slot_save_restore=True, router_mode=True, held_token_ids=True
)

_SAMPLING_FIELDS = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("repeat_penalty", "repeat_penalty"),
)


def completion_body(cont: Continuation, slot: int | None = None) -> dict[str, Any]:
    """The ``/completion`` request that continues ``cont`` (pure; tested directly).

    ``slot`` pins the sequence to one of the server's slots, so its KV cache can be
    saved from that slot for a move (llama-server reports ``id_slot: -1`` in events).
    """
    body: dict[str, Any] = {
        "prompt": list(cont.prompt_ids),
        "n_predict": cont.max_tokens,
        "seed": cont.seed,
        "stream": True,
        "return_tokens": True,
        "cache_prompt": True,
    }
    if slot is not None:
        body["id_slot"] = slot
    p = cont.params
    if p.json_schema is not None:
        body["json_schema"] = orjson.loads(p.json_schema)
    for attr, key in _SAMPLING_FIELDS:
        v = getattr(p, attr)
        if v is not None:
            body[key] = v
    return body


class _SSEGeneration:
    """Parses llama-server's SSE body into sink calls; the hot path of every token."""

    __slots__ = ("_buf", "_done", "_err_body", "_got", "_proto", "_sink", "_start", "_status")

    def __init__(self, start: int, sink: TokenSink) -> None:
        self._start = start
        self._sink = sink
        self._buf = b""
        self._status = 0
        self._err_body = b""
        self._done = False
        self._got = False  # tokens handed to the sink since the last on_batch
        self._proto: EngineConnection | None = None

    # Generation protocol
    def cancel(self) -> None:
        self._done = True
        if self._proto is not None:
            self._proto.close()

    def pause(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.pause_reading()

    def resume(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.resume_reading()

    # EngineConnection callbacks
    def on_head(self, status: int) -> None:
        self._status = status

    def on_body(self, data: bytes) -> None:
        if self._status != 200:
            self._err_body += data
            return
        buf = self._buf + data if self._buf else data
        sink = self._sink
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end == -1:
                break
            block = buf[start:end]
            start = end + 2
            if not block.startswith(b"data: "):
                continue  # ":" keep-alive pings, or event names we do not use
            try:
                ev = orjson.loads(block[6:])
            except orjson.JSONDecodeError:
                self._fail(EngineError(f"engine sent a malformed event: {block[:120]!r}"))
                return
            toks = ev.get("tokens")
            if toks:
                pos = self._start + ev["tokens_predicted"] - len(toks)
                last = len(toks) - 1
                for i, t in enumerate(toks):
                    # The text an event releases completes with its last token.
                    sink.on_token(pos + i, t, ev["content"] if i == last else "")
                self._got = True
            if ev.get("stop"):
                self.on_read_done()
                self._finish(ev)
                return
            err = ev.get("error")
            if err is not None:
                self.on_read_done()
                self._fail(EngineError(f"engine error during generation: {_message(err)}"))
                return
        self._buf = buf[start:] if start < len(buf) else b""

    def on_read_done(self) -> None:
        """One socket read is consumed: tokens that arrived together leave together."""
        if self._got:
            self._got = False
            self._sink.on_batch()

    def on_end(self, error: EngineError | None) -> None:
        if self._done:
            return
        if self._status not in (0, 200):
            self._fail(_status_error(self._status, self._err_body))
        else:
            self._fail(error or EngineError("engine ended the stream without a final event"))

    def _finish(self, ev: dict[str, Any]) -> None:
        # The engine closes the connection once the response has ended.
        self._done = True
        timings = ev.get("timings") or {}
        self._sink.on_finish(
            Finished(stop_type=str(ev.get("stop_type", "none")), prompt_n=timings.get("prompt_n"))
        )

    def _fail(self, error: EngineError | ClientError) -> None:
        # An engine 4xx (e.g. prompt longer than the context) arrives as ClientError:
        # the request's fault, not the replica's.
        if self._done:
            return
        self._done = True
        if self._proto is not None:
            self._proto.close()
        self._sink.on_error(error)


def _message(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


def _status_error(status: int, body: bytes) -> EngineError | ClientError:
    try:
        msg = _message(orjson.loads(body).get("error", body[:200]))
    except (orjson.JSONDecodeError, AttributeError):
        msg = body[:200].decode("utf-8", "replace")
    if 400 <= status < 500:
        return ClientError(f"engine refused the request: {msg}", code="engine_rejected")
    return EngineError(f"engine answered {status}: {msg}")


class LlamaServerClient:
    """One llama-server replica. Stateless apart from its address."""

    capabilities = CAPABILITIES

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.host, self.port = split_base_url(self.base_url)
        self.pool = ConnectionPool(self.host, self.port)

    def close(self) -> None:
        """Drop idle connections (the replica went away or was replaced)."""
        self.pool.close()

    async def health(self) -> bool:
        try:
            status, _ = await request_json(self.pool, "GET", "/health", timeout_s=2.0)
        except EngineError:
            return False
        return status == 200

    async def _call(self, path: str, body: Any) -> Any:
        status, data = await request_json(self.pool, "POST", path, body)
        if status != 200:
            raise _status_error(status, orjson.dumps(data))
        return data

    async def prompt_ids_for_chat(self, messages: tuple[ChatMessage, ...]) -> tuple[int, ...]:
        data = await self._call(
            "/apply-template",
            {"messages": [{"role": m.role, "content": m.content} for m in messages]},
        )
        return await self.prompt_ids_for_text(data["prompt"])

    async def prompt_ids_for_text(self, text: str) -> tuple[int, ...]:
        data = await self._call(
            "/tokenize", {"content": text, "add_special": True, "parse_special": True}
        )
        return tuple(data["tokens"])

    async def total_slots(self) -> int:
        """Sequences the server runs at once (``-np``)."""
        status, data = await request_json(self.pool, "GET", "/props", timeout_s=5.0)
        if status != 200 or not isinstance(data, dict) or "total_slots" not in data:
            raise EngineError(f"{self.base_url}/props did not report total_slots")
        return int(data["total_slots"])

    async def save_slot(self, slot: int, filename: str) -> int:
        """Write the slot's tokens and KV cache to ``filename`` in the server's
        ``--slot-save-path``; returns the number of tokens saved. A busy slot is saved
        once idle (cancel its generation first)."""
        data = await self._call(f"/slots/{slot}?action=save", {"filename": filename})
        return int(data.get("n_saved", 0))

    async def restore_slot(self, slot: int, filename: str) -> int:
        """Load a saved slot file into ``slot``; returns the number of tokens restored."""
        data = await self._call(f"/slots/{slot}?action=restore", {"filename": filename})
        return int(data.get("n_restored", 0))

    async def erase_slot(self, slot: int) -> None:
        await self._call(f"/slots/{slot}?action=erase", {})

    async def prefill(self, prompt_ids: tuple[int, ...], slot: int) -> int:
        """Evaluate ``prompt_ids`` into ``slot``'s cache (a later request with a prompt
        extending them then prefills only the rest); returns tokens evaluated."""
        data = await self._call(
            "/completion",
            {
                "prompt": list(prompt_ids),
                "n_predict": 0,
                "id_slot": slot,
                "cache_prompt": True,
                "temperature": 0,
            },
        )
        return int((data.get("timings") or {}).get("prompt_n", 0))

    async def generate(
        self, cont: Continuation, sink: TokenSink, slot: int | None = None
    ) -> Generation:
        gen = _SSEGeneration(cont.start, sink)
        body = orjson.dumps(completion_body(cont, slot))
        req = build_request("POST", self.host, self.port, "/completion", body, keep_alive=False)
        gen._proto = await self.pool.exchange(
            req, gen.on_head, gen.on_body, gen.on_end, gen.on_read_done, reuse=False
        )
        return gen
