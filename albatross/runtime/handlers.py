"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, plus ``/health`` and ``/metrics``.

A handler validates (4xx with the field named), picks a replica, turns the prompt into
token ids on it, opens the request's journal and hands the rest to a
:class:`StreamSession`. The replica counts as busy for as long as the session runs,
that is, as long as the response body is being streamed.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson

from albatross.config import Config
from albatross.core.errors import (
    AlbatrossError,
    ClientError,
    EngineError,
    InvalidField,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
)
from albatross.core.journal import StreamJournal
from albatross.core.replicas import ReplicaState
from albatross.core.requests import GenerationRequest, Limits, parse_chat, parse_completion
from albatross.gateway.http import Request
from albatross.gateway.metrics import Metrics
from albatross.gateway.sse import Encoder
from albatross.runtime.control import Control
from albatross.runtime.pool import Pool, Replica
from albatross.runtime.registry import Registry
from albatross.runtime.spot import SpotController
from albatross.runtime.stream import Services, StreamSession

if TYPE_CHECKING:
    from albatross.runtime.switching import Switcher

_Route = Callable[[Request], Awaitable[None]]


class Api:
    def __init__(
        self,
        config: Config,
        pool: Pool,
        metrics: Metrics,
        registry: Registry,
        spot: SpotController | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.registry = registry
        self.services = Services(
            pool, metrics, config.continuity, config.gateway.first_token_timeout_s, registry
        )
        self.control = Control(config, pool, registry, spot)
        self.switcher: Switcher | None = None
        """Set when models take turns on a GPU: requests then wait for their model."""
        g = config.gateway
        self._limits = Limits(g.max_tokens_default, g.max_tokens_limit)
        self._routes: dict[str, dict[str, _Route]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completion},
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
            "/metrics": {"GET": self._metrics},
            "/v1/streams/{id}": {"GET": self._resume},
        }
        self._created = int(time.time())

    async def __call__(self, req: Request) -> None:
        if req.path.startswith("/admin/"):
            await self.control(req)
            return
        route = req.path.rstrip("/") or "/"
        if route.startswith("/v1/streams/") and route.count("/") == 3:
            route = "/v1/streams/{id}"
        methods = self._routes.get(route)
        if methods is None:
            self._count(route, 404)
            raise NotFound(f"no route for {req.path}")
        handler = methods.get(req.method)
        if handler is None:
            self._count(route, 405)
            raise MethodNotAllowed(
                f"{req.method} is not allowed on {req.path}; use {', '.join(methods)}",
                tuple(methods),
            )
        try:
            await handler(req)
        except AlbatrossError as exc:
            self._count(route, exc.status)
            raise
        else:
            if route.startswith("/v1/"):
                self._count(route, 499 if req.conn.closed else 200)

    def _count(self, endpoint: str, status: int) -> None:
        if endpoint not in self._routes:
            endpoint = "other"
        self.metrics.requests.labels(endpoint, str(status)).inc()

    # ---- generation -------------------------------------------------------------
    async def _chat(self, req: Request) -> None:
        greq = parse_chat(_json(req), self._limits, random.getrandbits(32))
        await self._generate(req, greq, "chatcmpl-")

    async def _completion(self, req: Request) -> None:
        greq = parse_completion(_json(req), self._limits, random.getrandbits(32))
        await self._generate(req, greq, "cmpl-")

    async def _generate(self, req: Request, greq: GenerationRequest, prefix: str) -> None:
        received = time.perf_counter()
        if self.config.model(greq.model) is None:
            raise ModelNotFound(greq.model, [m.name for m in self.config.models])
        if self.switcher is None:
            await self._generate_on(req, greq, prefix, received)
            return
        # Before a replica is acquired: the model may be asleep. The ticket is the
        # in-flight guard; it is given back once the stream has ended.
        ticket = await self.switcher.admit(greq.model, req.conn)
        try:
            await self._generate_on(req, greq, prefix, received)
        finally:
            self.switcher.finished(ticket)

    async def _generate_on(
        self, req: Request, greq: GenerationRequest, prefix: str, received: float
    ) -> None:
        replica, prompt_ids = await self._prompt_ids(greq)
        mm = self.metrics.model(greq.model)
        mm.in_flight.inc()  # type: ignore[attr-defined]
        try:
            rid = prefix + os.urandom(12).hex()
            session = StreamSession(
                self.services,
                req.conn,
                StreamJournal(rid, prompt_ids, greq.params),
                Encoder(greq.kind, rid, greq.model, int(time.time())),
                greq.model,
                stream=greq.stream,
                include_usage=greq.include_usage,
                received_at=received,
            )
            await session.run(replica)
        finally:
            mm.in_flight.dec()  # type: ignore[attr-defined]

    async def _prompt_ids(self, greq: GenerationRequest) -> tuple[Replica, tuple[int, ...]]:
        """A replica for the request and the prompt as token ids, rendered and
        tokenized on that replica; a replica failing at this stage is passed over."""
        tried: set[str] = set()
        timeout = self.config.gateway.first_token_timeout_s
        while True:
            replica = await self.pool.acquire(greq.model, timeout, frozenset(tried))
            client = replica.client
            try:
                assert client is not None
                if greq.kind == "chat":
                    return replica, await client.prompt_ids_for_chat(greq.messages)
                if greq.prompt_ids is not None:
                    return replica, greq.prompt_ids
                return replica, await client.prompt_ids_for_text(greq.prompt_text or "")
            except EngineError:
                self.pool.release(replica)
                tried.add(replica.replica_id)
                if len(tried) > self.config.continuity.max_migrations:
                    raise
            except BaseException:
                self.pool.release(replica)
                raise

    async def _resume(self, req: Request) -> None:
        """``GET /v1/streams/{id}`` with ``Last-Event-ID``: the rest of a stream whose
        client lost its connection, continued from the journal if it had not ended."""
        rid = req.path.rsplit("/", 1)[-1]
        session = self.registry.get(rid)
        if session is None:
            raise NotFound(f"no stream {rid!r} (unknown, not streamed, or past its retention)")
        raw = req.headers.get("last-event-id", "-2").strip()  # absent: nothing was seen
        try:
            last = int(raw)
        except ValueError:
            raise InvalidField("Last-Event-ID", raw, "must be an integer event id") from None
        await session.resume(req.conn, last)

    # ---- the rest ---------------------------------------------------------------
    async def _models(self, req: Request) -> None:
        data = [
            {"id": m.name, "object": "model", "created": self._created, "owned_by": "albatross"}
            for m in self.config.models
        ]
        req.conn.respond(200, orjson.dumps({"object": "list", "data": data}))

    async def _health(self, req: Request) -> None:
        models: dict[str, dict[str, int]] = {}
        for r in self.pool.replicas.values():
            m = models.setdefault(r.model, {"ready": 0, "total": 0})
            m["total"] += 1
            m["ready"] += r.health.state is ReplicaState.READY
        sw = self.switcher
        ok = all(
            m["ready"] > 0 or (sw is not None and not sw.serving(name))  # asleep by design
            for name, m in models.items()
        )
        body = {"status": "ok" if ok else "degraded", "models": models}
        req.conn.respond(200 if ok else 503, orjson.dumps(body))

    async def _metrics(self, req: Request) -> None:
        req.conn.respond(
            200, self.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8"
        )


def _json(req: Request) -> object:
    # The body is parsed as JSON whatever Content-Type says (curl -d sends a form type).
    if not req.body:
        raise ClientError("request body is empty; send a JSON object", code="invalid_json")
    try:
        return orjson.loads(req.body)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
