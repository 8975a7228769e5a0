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

from albatross.core.errors import EngineError
from albatross.core.journal import Continuation
from albatross.core.requests import ChatMessage
from albatross.engines.base import Capabilities, Finished, Generation, TokenSink
from albatross.engines.http_client import (
    ConnectionPool,
    build_request,
    call_json,
    error_message,
    healthy,
    request_json,
    split_base_url,
)
from albatross.engines.sse_generation import SSEGeneration

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


class LlamaGeneration(SSEGeneration):
    """llama-server's ``/completion`` events: ``tokens`` with their released
    ``content`` and ``tokens_predicted``; a final event with ``stop``."""

    __slots__ = ("_start",)

    def __init__(self, start: int, sink: TokenSink) -> None:
        super().__init__(sink)
        self._start = start

    def _payload(self, payload: bytes) -> None:
        ev = self._json(payload)
        if ev is None:
            return
        toks = ev.get("tokens")
        if toks:
            sink = self._sink
            pos = self._start + ev["tokens_predicted"] - len(toks)
            last = len(toks) - 1
            for i, t in enumerate(toks):
                # The text an event releases completes with its last token.
                sink.on_token(pos + i, t, ev["content"] if i == last else "")
            self._got = True
        if ev.get("stop"):
            self.on_read_done()
            # The engine closes the connection once the response has ended.
            self._done = True
            timings = ev.get("timings") or {}
            self._sink.on_finish(
                Finished(
                    stop_type=str(ev.get("stop_type", "none")), prompt_n=timings.get("prompt_n")
                )
            )
            return
        err = ev.get("error")
        if err is not None:
            self.on_read_done()
            self._fail(EngineError(f"engine error during generation: {error_message(err)}"))


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

    async def health(self, timeout_s: float = 2.0) -> bool:
        return await healthy(self.pool, timeout_s)

    async def _call(self, path: str, body: Any) -> Any:
        return await call_json(self.pool, path, body)

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
        gen = LlamaGeneration(cont.start, sink)
        body = orjson.dumps(completion_body(cont, slot))
        req = build_request("POST", self.host, self.port, "/completion", body, keep_alive=False)
        gen._proto = await self.pool.exchange(
            req, gen.on_head, gen.on_body, gen.on_end, gen.on_read_done, reuse=False
        )
        return gen
