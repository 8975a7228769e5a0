"""Adapter for vLLM's OpenAI server: launch line, health, and the sleep-mode verbs.

vLLM frees GPU memory while its process keeps running (``--enable-sleep-mode``):

- ``POST /sleep?level=1``: weights are copied to host memory, the KV cache dropped;
  ``POST /wake_up`` copies them back;
- ``POST /sleep?level=2``: weights and KV cache are dropped. ``/wake_up`` only
  re-allocates memory, so it **must** be followed by ``POST /collective_rpc``
  ``{"method": "reload_weights"}`` (weights read again from the model directory) and
  ``POST /reset_prefix_cache`` (the prefix cache still points at KV blocks that were
  dropped): without them the model answers with garbage. The order lives in
  ``core/eviction.py`` (``wake_steps``); this module only performs single verbs;
- ``GET /is_sleeping``: ``{"is_sleeping": bool}``.

These routes exist only with ``VLLM_SERVER_DEV_MODE=1`` in the server's environment
(:func:`vllm_env` sets it). Memory is released only with ``--enable-sleep-mode``, which
vLLM refuses on a CPU host ("Sleep mode is not supported on current platform"); there
the routes answer and do nothing, so the HTTP contract can be tested on CPU and the
memory release only on a GPU.

:class:`VllmClient` is also the gateway's adapter for streaming from a vLLM replica
(the :class:`~albatross.engines.base.EngineClient` protocol); the generation itself is
in ``vllm_generation.py``. vLLM cannot save or restore one sequence's KV cache, so a
stream moves to or from a vLLM replica by re-prefill (its prefix cache makes a
pre-warm worthwhile).

Every control call is appended to :attr:`VllmClient.calls` (``"sleep(2)"``,
``"wake_up"``, ...): the order of calls is the contract with vLLM, so the switch log and
the tests can show what was done.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from albatross.core.errors import EngineError
from albatross.core.journal import Continuation
from albatross.core.requests import ChatMessage
from albatross.engines.base import Capabilities, Generation, TokenSink
from albatross.engines.http_client import (
    ConnectionPool,
    build_request,
    call_json,
    healthy,
    request_json,
    split_base_url,
)
from albatross.engines.vllm_generation import (
    VllmGeneration,
    completions_body,
    prompt_evaluated,
)

CAPABILITIES = Capabilities(
    token_id_prompts=True, slot_save_restore=False, router_mode=False, held_token_ids=True
)
"""``held_token_ids``: vLLM streams the id of every token, also of those whose text it
still holds back (partial UTF-8)."""

CONTROL_TIMEOUT_S = 300.0
"""Sleep, wake and weight reloads of a large model take minutes on a slow disk."""


def vllm_argv(
    python: Path, model_dir: Path, port: int, *, dtype: str, enforce_eager: bool,
    sleep_mode: bool, name: str | None = None, host: str = "127.0.0.1", extra: tuple[str, ...] = (),
) -> list[str]:  # fmt: skip
    """The server's command line (no shell). ``python -m`` rather than the ``vllm``
    command: CPU repackagings of vLLM ship no ``vllm`` distribution metadata, which the
    command's entry point needs."""
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        *(("--served-model-name", name) if name else ()),
        "--host", host, "--port", str(port),
        "--dtype", dtype,
        *(("--enable-sleep-mode",) if sleep_mode else ()),
        *(("--enforce-eager",) if enforce_eager else ()),
        *extra,
    ]  # fmt: skip


def vllm_env(
    base: Mapping[str, str] | None = None, *, cpu_kvcache_space_gib: int = 1
) -> dict[str, str]:
    """The server's environment: the sleep routes on, the CPU KV cache sized."""
    env = dict(os.environ if base is None else base)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_space_gib))
    return env


class VllmClient:
    """One vLLM server, reached over HTTP.

    ``slots``: the sequences it runs at once (``--max-num-seqs``) when known; vLLM does
    not report it, so :meth:`total_slots` raises without it.
    """

    capabilities = CAPABILITIES

    def __init__(self, base_url: str, slots: int | None = None) -> None:
        self.slots = slots
        self.base_url = base_url.rstrip("/")
        self.host, self.port = split_base_url(self.base_url)
        self.pool = ConnectionPool(self.host, self.port)
        self.calls: list[str] = []

    def close(self) -> None:
        self.pool.close()

    async def health(self) -> bool:
        return await healthy(self.pool, 5.0)

    async def _call(self, path: str, body: Any) -> Any:
        return await call_json(self.pool, path, body)

    async def prompt_ids_for_chat(self, messages: tuple[ChatMessage, ...]) -> tuple[int, ...]:
        """The chat rendered with the model's template and tokenized by the server."""
        data = await self._call(
            "/tokenize",
            {
                "messages": [{"role": m.role, "content": m.content} for m in messages],
                "add_generation_prompt": True,
            },
        )
        return tuple(data["tokens"])

    async def prompt_ids_for_text(self, text: str) -> tuple[int, ...]:
        data = await self._call("/tokenize", {"prompt": text, "add_special_tokens": True})
        return tuple(data["tokens"])

    async def generate(
        self, cont: Continuation, sink: TokenSink, slot: int | None = None
    ) -> Generation:
        """Start generating; ``slot`` is ignored (vLLM schedules sequences itself)."""
        gen = VllmGeneration(cont.start, sink)
        body = orjson.dumps(completions_body(cont))
        req = build_request("POST", self.host, self.port, "/v1/completions", body)
        gen._proto = await self.pool.exchange(
            req, gen.on_head, gen.on_body, gen.on_end, gen.on_read_done, reuse=False
        )
        return gen

    async def total_slots(self) -> int:
        if self.slots is None:
            raise EngineError(f"vLLM {self.base_url} does not report how many sequences it runs")
        return self.slots

    async def save_slot(self, slot: int, filename: str) -> int:
        raise EngineError(f"vLLM {self.base_url} cannot save a sequence's KV cache")

    async def restore_slot(self, slot: int, filename: str) -> int:
        raise EngineError(f"vLLM {self.base_url} cannot restore a sequence's KV cache")

    async def prefill(self, prompt_ids: tuple[int, ...], slot: int) -> int:
        """Evaluate ``prompt_ids`` into vLLM's prefix cache (one token is sampled and
        dropped); a later request extending them prefills only the rest. Returns the
        prompt tokens evaluated (``slot`` is ignored)."""
        body = {"prompt": list(prompt_ids), "max_tokens": 1, "temperature": 0.0}
        data = await self._call("/v1/completions", body)
        return prompt_evaluated(data.get("usage")) or 0

    async def _control(self, call: str, method: str, path: str, body: Any = None) -> Any:
        self.calls.append(call)
        try:
            status, data = await request_json(
                self.pool, method, path, body, timeout_s=CONTROL_TIMEOUT_S
            )
        except EngineError as exc:
            raise EngineError(f"vLLM {self.base_url}: {call} failed: {exc.message}") from exc
        if status != 200:
            detail = orjson.dumps(data).decode()[:300] if data is not None else "no body"
            hint = ""
            if status == 404:
                hint = " (is VLLM_SERVER_DEV_MODE=1 set in the server's environment?)"
            raise EngineError(f"vLLM {self.base_url}: {call} answered {status}: {detail}{hint}")
        return data

    async def sleep(self, level: int) -> None:
        if level not in (1, 2):
            raise ValueError(f"vLLM sleep level {level!r}: must be 1 or 2")
        await self._control(f"sleep({level})", "POST", f"/sleep?level={level}")

    async def wake_up(self) -> None:
        await self._control("wake_up", "POST", "/wake_up")

    async def reload_weights(self) -> None:
        await self._control(
            "collective_rpc(reload_weights)",
            "POST",
            "/collective_rpc",
            {"method": "reload_weights"},
        )

    async def reset_prefix_cache(self) -> None:
        await self._control("reset_prefix_cache", "POST", "/reset_prefix_cache")

    async def is_sleeping(self) -> bool:
        data = await self._control("is_sleeping", "GET", "/is_sleeping")
        if not isinstance(data, dict) or "is_sleeping" not in data:
            raise EngineError(f"vLLM {self.base_url}: /is_sleeping answered {data!r}")
        return bool(data["is_sleeping"])

    async def greedy_text(self, model: str, prompt: list[int] | str, max_tokens: int) -> str:
        """A greedy completion (temperature 0): what a wake is checked with."""
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        status, data = await request_json(
            self.pool, "POST", "/v1/completions", body, timeout_s=CONTROL_TIMEOUT_S
        )
        if status != 200 or not isinstance(data, dict) or not data.get("choices"):
            raise EngineError(f"vLLM {self.base_url}: completion answered {status}: {data!r}")
        return str(data["choices"][0]["text"])
