"""Adapter for llama-server in router mode: one server, several models, loaded on demand.

Started as ``llama-server --models-dir DIR`` (no ``-m``), the server is a router: every
``*.gguf`` file in DIR is a model named after the file without ``.gguf`` (a sub-folder
is a model named after the folder), and each loaded model runs as a child process the
router spawns and proxies to. The API used here (llama.cpp's ``tools/server``,
``server-models.cpp``):

- ``GET /models``: ``{"data": [{"id": name, "status": {"value": "unloaded" | "loading" |
  "loaded" | "sleeping" | ..., "failed": true, "exit_code": N}}, ...]}``;
- ``POST /models/load`` / ``/models/unload`` ``{"model": name}``: both only *start* the
  change and answer ``{"success": true}`` at once (400 "model is already running" /
  "model is not running"), so :meth:`LlamaRouterClient.load` and ``unload`` poll
  ``/models`` until the model reaches its state, and a child that exits while loading
  shows as ``unloaded`` with ``failed``;
- a request carrying ``"model"`` is proxied to that model's child; ``GET`` routes take
  ``?model=``; ``autoload=false`` keeps a ``GET /props`` from loading the model;
- ``--sleep-idle-seconds N``: a child idle for N s frees its model and KV cache and shows
  as ``sleeping``; ``GET /props?model=`` reports ``is_sleeping`` without waking it, and
  any task (``/tokenize`` is the cheapest) wakes it.

Albatross decides which models are loaded (``core/switch.py``), so the router is meant
to run with ``--no-models-autoload`` (a request for an unloaded model is refused, not
silently loaded) and ``--models-max 0`` (the router evicts nothing on its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import orjson

from albatross.core.errors import EngineError, EngineTimeout, ModelNotFound
from albatross.core.journal import Continuation
from albatross.engines.base import Capabilities, Generation, TokenSink
from albatross.engines.http_client import (
    ConnectionPool,
    build_request,
    healthy,
    request_json,
    split_base_url,
    status_error,
)
from albatross.engines.llama_server import LlamaGeneration, LlamaServerClient, completion_body

POLL_S = 0.05
"""How often load and unload look at ``/models``; a tiny model loads in about 0.1 s."""


class RouterStatus(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    SLEEPING = "sleeping"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class RouterModel:
    """One model as the router lists it."""

    name: str
    status: RouterStatus
    failed: bool = False
    """Its last child process exited with an error (then ``status`` is ``unloaded``)."""
    exit_code: int | None = None

    @property
    def serving(self) -> bool:
        """Takes requests now (a sleeping model wakes on the first one)."""
        return self.status in (RouterStatus.LOADED, RouterStatus.SLEEPING)


def _parse_model(entry: dict[str, Any]) -> RouterModel:
    status = entry.get("status") or {}
    value = status.get("value", "unknown")
    try:
        st = RouterStatus(value)
    except ValueError:
        st = RouterStatus.UNKNOWN
    code = status.get("exit_code")
    return RouterModel(str(entry["id"]), st, bool(status.get("failed", False)), code)


class LlamaRouterClient:
    """A llama-server router: lists, loads, unloads and wakes its models."""

    def __init__(self, base_url: str, *, poll_s: float = POLL_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.host, self.port = split_base_url(self.base_url)
        self.pool = ConnectionPool(self.host, self.port)
        self._poll_s = poll_s

    def close(self) -> None:
        self.pool.close()

    async def health(self) -> bool:
        """The router itself answers (says nothing about any model)."""
        return await healthy(self.pool, 2.0)

    async def models(self) -> list[RouterModel]:
        status, data = await request_json(self.pool, "GET", "/models", timeout_s=5.0)
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise EngineError(f"{self.base_url}/models answered {status} without a model list")
        return [_parse_model(e) for e in data["data"]]

    async def model(self, name: str) -> RouterModel:
        """Raises :class:`ModelNotFound` if the router has no such model."""
        listed = await self.models()
        for m in listed:
            if m.name == name:
                return m
        raise ModelNotFound(name, [m.name for m in listed])

    async def _post(self, path: str, name: str, timeout_s: float) -> tuple[int, Any]:
        return await request_json(self.pool, "POST", path, {"model": name}, timeout_s=timeout_s)

    async def load(self, name: str, timeout_s: float = 120.0) -> None:
        """Load ``name`` and return once it serves.

        Raises :class:`ModelNotFound`, :class:`EngineError` when its process exits while
        loading (with the exit code), :class:`EngineTimeout` after ``timeout_s``.
        """
        await self.model(name)  # a clear 404 rather than the router's bare "not found"
        status, data = await self._post("/models/load", name, timeout_s)
        if status != 200 and "already running" not in _error_text(data):
            raise status_error(status, orjson.dumps(data))
        m = await self._until(name, timeout_s, "load", lambda m: m.serving or (
            m.status is RouterStatus.UNLOADED
        ))  # fmt: skip
        if not m.serving:
            why = f"exit code {m.exit_code}" if m.failed else "it was unloaded meanwhile"
            raise EngineError(f"llama-server router could not load model {name!r}: {why}")

    async def unload(self, name: str, timeout_s: float = 60.0) -> None:
        """Unload ``name`` (its child process exits) and return once it is gone.

        Unloading a model that is not loaded does nothing.
        """
        status, data = await self._post("/models/unload", name, timeout_s)
        if status != 200:
            if "not running" in _error_text(data):
                return
            if status == 400 and "not found" in _error_text(data):
                raise ModelNotFound(name, [m.name for m in await self.models()])
            raise status_error(status, orjson.dumps(data))
        await self._until(name, timeout_s, "unload", lambda m: m.status is RouterStatus.UNLOADED)

    async def is_sleeping(self, name: str) -> bool:
        """Whether a loaded model is idle-sleeping (asking does not wake it).

        Raises :class:`EngineError` when the model is not loaded at all.
        """
        path = f"/props?model={quote(name, safe='')}&autoload=false"
        status, data = await request_json(self.pool, "GET", path, timeout_s=5.0)
        if status != 200 or not isinstance(data, dict):
            raise EngineError(
                f"llama-server router has no running model {name!r}: {_error_text(data)}"
            )
        return bool(data.get("is_sleeping", False))

    async def wake(self, name: str, timeout_s: float = 120.0) -> None:
        """Wake an idle-sleeping model; returns once it has its weights back.

        Any task wakes a sleeping child and waits for it; ``/tokenize`` of nothing is the
        cheapest one.
        """
        status, data = await request_json(
            self.pool, "POST", "/tokenize", {"model": name, "content": ""}, timeout_s=timeout_s
        )
        if status != 200:
            raise status_error(status, orjson.dumps(data))

    def model_client(self, name: str) -> RouterModelClient:
        """An :class:`EngineClient` for one model behind this router."""
        return RouterModelClient(self, name)

    async def _until(
        self, name: str, timeout_s: float, what: str, done: Callable[[RouterModel], bool]
    ) -> RouterModel:
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    m = await self.model(name)
                    if done(m):
                        return m
                    await asyncio.sleep(self._poll_s)
        except TimeoutError as exc:
            raise EngineTimeout(
                f"llama-server router did not {what} model {name!r} within {timeout_s:g} s"
            ) from exc


def _error_text(data: Any) -> str:
    if isinstance(data, dict):
        err = data.get("error", data)
        return str(err.get("message", err) if isinstance(err, dict) else err)
    return str(data)


class RouterModelClient(LlamaServerClient):
    """One model behind a router, with the interface of a single llama-server.

    The router proxies a request to the model named in its body, so every POST body
    gets ``"model"``; GET routes take it as a query parameter.
    """

    capabilities = Capabilities(
        token_id_prompts=True, slot_save_restore=True, router_mode=True, held_token_ids=True
    )

    def __init__(self, router: LlamaRouterClient, model: str) -> None:
        super().__init__(router.base_url)
        self.router = router
        self.model = model

    async def health(self, timeout_s: float = 2.0) -> bool:
        """The model is loaded or idle-sleeping (it then wakes on the first request)."""
        try:
            return (await self.router.model(self.model)).serving
        except (EngineError, ModelNotFound):
            return False

    async def _call(self, path: str, body: Any) -> Any:
        return await super()._call(path, {**body, "model": self.model})

    async def total_slots(self) -> int:
        path = f"/props?model={quote(self.model, safe='')}&autoload=false"
        status, data = await request_json(self.pool, "GET", path, timeout_s=5.0)
        if status != 200 or not isinstance(data, dict) or "total_slots" not in data:
            raise EngineError(f"model {self.model!r}: /props did not report total_slots")
        return int(data["total_slots"])

    async def generate(
        self, cont: Continuation, sink: TokenSink, slot: int | None = None
    ) -> Generation:
        gen = LlamaGeneration(cont.start, sink)
        body = orjson.dumps({**completion_body(cont, slot), "model": self.model})
        req = build_request("POST", self.host, self.port, "/completion", body, keep_alive=False)
        gen._proto = await self.pool.exchange(
            req, gen.on_head, gen.on_body, gen.on_end, gen.on_read_done, reuse=False
        )
        return gen
