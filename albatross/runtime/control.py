"""The control API under ``/admin``: bearer token required on every call.

| call | body | does |
|---|---|---|
| ``GET /admin/replicas`` | | replicas: state, address, load, slots; replacement launches |
| ``POST /admin/replicas`` | ``{"replica", "model", "host", "url", "slots", ...}`` | an agent's replica is ready at ``url`` (``null``: gone); idempotent |
| ``DELETE /admin/replicas`` | ``{"replica": ID}`` | forget an agent's replica (409 while streams run on it) |
| ``GET /admin/requests`` | | streams in flight: position, replica, legs |
| ``GET /admin/requests/{id}`` | | one stream, also after it ended (while retained) |
| ``POST /admin/drain`` | ``{"replica": ID}`` | no new requests; move its streams off |
| ``POST /admin/undrain`` | ``{"replica": ID}`` | back into the pool |
| ``POST /admin/move`` | ``{"request": ID, "to": ID?, "path": "auto"?}`` | move one stream |
| ``POST /admin/checkpoint`` | ``{"replica": ID}`` | dump an idle managed replica's engine with CRIU and park it (``checkpoint.enabled``) |
| ``POST /admin/restore`` | ``{"replica": ID}`` | bring a checkpointed replica back from its image (cold start if that fails) |
| ``GET /admin/cost`` | | per replica: uptime, tokens, preemptions, spend vs on demand |
| ``GET /admin/models`` | | models sharing a GPU: state, pinned, in flight, queued, memory |
| ``POST /admin/models/{sleep,wake,pin,unpin,switch}`` | ``{"model": NAME}`` | put to sleep (after its streams), wake (409 if it does not fit), pin, unpin, wake evicting others |
| ``POST /admin/migrate-gateway`` | ``{"to": PEER}`` | move every SSE connection to peer gateway ``PEER`` (``netmove.enabled``); ``GET``: status and recent moves |
| ``POST /admin/preempt`` | ``{"replica": ID?, "replicas": [ID]?, "deadline_s": 30?, "source": "local"?}`` | a preemption notice: deadline-aware drain, then replacement |

Replica ids contain ``/`` (``model/0``), so they travel in bodies, not paths. Without a
configured token the API answers 403: it moves other people's streams.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from albatross.config import Config
from albatross.core.continuity import MovePath
from albatross.core.cost import Price, fleet_summary
from albatross.core.errors import (
    ClientError,
    Conflict,
    EngineError,
    Forbidden,
    InvalidField,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    UnsupportedField,
)
from albatross.gateway.http import Request
from albatross.runtime.pool import Pool, Replica
from albatross.runtime.registry import Registry
from albatross.runtime.spot import SpotController
from albatross.runtime.stream import StreamSession

if TYPE_CHECKING:
    from albatross.runtime.gateway_move import GatewayMove
    from albatross.runtime.switching import Switcher

_PATHS = ("auto", "kv", "prewarm", "reprefill")
_MODEL_VERBS = ("sleep", "wake", "pin", "unpin", "switch")


class Control:
    def __init__(
        self, config: Config, pool: Pool, registry: Registry, spot: SpotController | None = None
    ) -> None:
        self.config = config
        token = config.control.token or os.environ.get("ALBATROSS_CONTROL_TOKEN") or None
        self._token = token.encode() if token else None
        self.pool = pool
        self.registry = registry
        self.spot = spot
        self.switcher: Switcher | None = None
        """Set by the app when models take turns on a GPU (``switch.gpu_budget_gib``)."""
        self.gateway_move: GatewayMove | None = None
        """Set by the app when ``netmove.enabled``."""
        self._routes: dict[str, dict[str, Callable[[Request], Awaitable[None]]]] = {
            "/admin/replicas": {
                "GET": self._replicas,
                "POST": self._register,
                "DELETE": self._deregister,
            },
            "/admin/requests": {"GET": self._requests},
            "/admin/drain": {"POST": self._drain},
            "/admin/undrain": {"POST": self._undrain},
            "/admin/move": {"POST": self._move},
            "/admin/preempt": {"POST": self._preempt},
            "/admin/cost": {"GET": self._cost},
            "/admin/checkpoint": {"POST": self._checkpoint},
            "/admin/restore": {"POST": self._restore},
            "/admin/models": {"GET": self._models},
            **{f"/admin/models/{v}": {"POST": self._model_command} for v in _MODEL_VERBS},
            "/admin/migrate-gateway": {"GET": self._gateway_moves, "POST": self._migrate_gateway},
        }

    async def __call__(self, req: Request) -> None:
        self._authorize(req)
        path = req.path.rstrip("/")
        if path.startswith("/admin/requests/"):
            self._only(req, "GET")
            s = self.registry.get(path.rsplit("/", 1)[-1])
            if s is None:
                raise NotFound(
                    f"no request {path.rsplit('/', 1)[-1]!r} (unknown or past its retention)"
                )
            return _reply(req, _session(s))
        methods = self._routes.get(path)
        if methods is None:
            raise NotFound(f"no control route {req.path}")
        handler = methods.get(req.method)
        if handler is None:
            allowed = tuple(methods)
            raise MethodNotAllowed(
                f"{req.method} is not allowed on {req.path}; use {' or '.join(allowed)}", allowed
            )
        await handler(req)

    def _authorize(self, req: Request) -> None:
        if self._token is None:
            raise Forbidden(
                "the control API is disabled: set control.token or ALBATROSS_CONTROL_TOKEN"
            )
        auth = req.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token
        ):
            raise Unauthorized("missing or wrong bearer token", param="Authorization")

    @staticmethod
    def _only(req: Request, method: str) -> None:
        if req.method != method:
            raise MethodNotAllowed(
                f"{req.method} is not allowed on {req.path}; use {method}", (method,)
            )

    def _replica(self, body: dict[str, Any], key: str = "replica") -> Replica:
        rid = body.get(key)
        r = self.pool.replicas.get(rid) if isinstance(rid, str) else None
        if r is None:
            raise InvalidField(
                key, rid, f"is not a replica; known: {', '.join(self.pool.replicas)}"
            )
        return r

    async def _replicas(self, req: Request) -> None:
        launches = [] if self.spot is None else [dict(x) for x in self.spot.launches]
        _reply(
            req,
            {"replicas": [_replica(r) for r in self.pool.replicas.values()], "launches": launches},
        )

    async def _register(self, req: Request) -> None:
        reg = _registration(_body(req))
        m = self.config.model(reg.model)
        if m is None:
            raise InvalidField(
                "model",
                reg.model,
                f"is not a model of this gateway; configured: {', '.join(x.name for x in self.config.models)}",
            )
        known = self.pool.replicas.get(reg.replica)
        if known is not None and known.host != reg.host:
            owner = "this gateway" if known.host is None else f"agent {known.host!r}"
            raise Conflict(f"replica id {reg.replica!r} already belongs to {owner}")
        if known is not None and known.model != reg.model:
            raise Conflict(f"replica {reg.replica!r} serves {known.model!r}, not {reg.model!r}")
        price = Price(
            m.price_spot_per_hour if reg.price_spot_per_hour is None else reg.price_spot_per_hour,
            m.price_on_demand_per_hour
            if reg.price_on_demand_per_hour is None
            else reg.price_on_demand_per_hour,
        )
        r = self.pool.register(
            reg.replica,
            reg.model,
            reg.host,
            reg.url.rstrip("/") if reg.url else None,
            reg.slots,
            reg.pid,
            reg.instance_type or m.instance_type,
            price,
        )
        _reply(req, _replica(r))

    async def _deregister(self, req: Request) -> None:
        r = self._replica(_body(req))
        if r.host is None:
            raise Conflict(f"replica {r.replica_id!r} belongs to this gateway, not to an agent")
        if r.in_flight or self.registry.on_replica(r.replica_id):
            raise Conflict(
                f"replica {r.replica_id!r} still has {r.in_flight} streams in flight; drain it first"
            )
        self.pool.deregister(r.replica_id)
        _reply(req, {"replica": r.replica_id, "state": "removed"})

    async def _requests(self, req: Request) -> None:
        _reply(req, {"requests": [_session(s) for s in self.registry.live.values()]})

    async def _drain(self, req: Request) -> None:
        r = self._replica(_body(req))
        moving = [s.request_id for s in self.registry.on_replica(r.replica_id)]
        self.pool.drain(r.replica_id)
        _reply(req, {"replica": r.replica_id, "state": r.health.state.value, "moving": moving})

    async def _undrain(self, req: Request) -> None:
        r = self._replica(_body(req))
        self.pool.undrain(r.replica_id)
        _reply(req, {"replica": r.replica_id, "state": r.health.state.value})

    def _parkable(self, req: Request) -> Replica:
        if not self.config.checkpoint.enabled or self.spot is None:
            raise Conflict("checkpointing is off (checkpoint.enabled = false)")
        r = self._replica(_body(req))
        if not r.managed:
            raise Conflict(f"replica {r.replica_id!r} is not run by this gateway")
        return r

    async def _checkpoint(self, req: Request) -> None:
        r = self._parkable(req)
        if r.in_flight or self.registry.on_replica(r.replica_id):
            raise Conflict(
                f"replica {r.replica_id!r} has {r.in_flight} streams in flight; drain it first"
            )
        assert self.spot is not None
        try:
            outcome = await self.spot.supervisor.checkpoint(r.replica_id)
        except RuntimeError as exc:
            raise Conflict(str(exc)) from exc
        except Exception as exc:
            raise EngineError(f"checkpoint of {r.replica_id} failed: {exc}") from exc
        _reply(req, {"replica": r.replica_id, "state": "checkpointed", "image": str(outcome)})

    async def _restore(self, req: Request) -> None:
        r = self._parkable(req)
        assert self.spot is not None
        try:
            await self.spot.supervisor.restore(r.replica_id)
        except RuntimeError as exc:
            raise Conflict(str(exc)) from exc
        except Exception as exc:
            raise EngineError(f"restore of {r.replica_id} failed: {exc}") from exc
        _reply(req, _replica(r))

    def _mover(self) -> GatewayMove:
        if self.gateway_move is None:
            raise Conflict("connection migration is off (netmove.enabled = false)")
        return self.gateway_move

    async def _gateway_moves(self, req: Request) -> None:
        _reply(req, await self._mover().status())

    async def _migrate_gateway(self, req: Request) -> None:
        mover = self._mover()
        to = _body(req).get("to")
        if not isinstance(to, str) or not to:
            raise InvalidField("to", to, "must be a peer gateway's id or host")
        _reply(req, await mover.migrate_out(to))

    def _switching(self) -> Switcher:
        if self.switcher is None:
            raise Conflict("models do not take turns here: switch.gpu_budget_gib is empty")
        return self.switcher

    async def _models(self, req: Request) -> None:
        _reply(req, self._switching().status())

    async def _model_command(self, req: Request) -> None:
        sw = self._switching()
        body = _body(req)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidField("model", model, "must be the name of a configured model")
        _reply(req, sw.command(req.path.rstrip("/").rsplit("/", 1)[-1], model))

    async def _cost(self, req: Request) -> None:
        _reply(req, fleet_summary([r.ledger for r in self.pool.replicas.values()], time.time()))

    async def _preempt(self, req: Request) -> None:
        if self.spot is None or self.spot.cfg.source == "none":
            raise Conflict("preemption handling is off (spot.source = none)")
        body = _body(req)
        many = body.get("replicas")
        if many is not None and body.get("replica") is not None:
            raise InvalidField("replicas", many, "must not be given together with replica")
        ids: list[str] | None = None
        if many is not None:
            if not isinstance(many, list) or not many:
                raise InvalidField("replicas", many, "must be a non-empty list of replica ids")
            ids = [self._replica({"replicas": x}, "replicas").replica_id for x in many]
        elif body.get("replica") is not None:
            ids = [self._replica(body).replica_id]
        lead = body.get("deadline_s", self.spot.cfg.default_lead_s)
        if not isinstance(lead, int | float) or isinstance(lead, bool) or not 0 < lead <= 3600:
            raise InvalidField("deadline_s", lead, "must be a number of seconds in (0, 3600]")
        source = body.get("source", "control API")
        if not isinstance(source, str) or not 0 < len(source) <= 64:
            raise InvalidField("source", source, "must be a string of 1 to 64 characters")
        drained = self.spot.preempt(ids, float(lead), source)
        _reply(req, {"replicas": drained, "deadline_s": lead})

    async def _move(self, req: Request) -> None:
        from albatross.runtime.moves import move

        body = _body(req)
        rid = body.get("request")
        s = self.registry.live.get(rid) if isinstance(rid, str) else None
        if s is None:
            raise InvalidField("request", rid, "is not a request in flight")
        to = body.get("to")
        if to is not None and not isinstance(to, str):
            raise InvalidField("to", to, "must be a replica id or null")
        p = body.get("path", "auto")
        if p not in _PATHS:
            raise InvalidField("path", p, f"must be one of {', '.join(_PATHS)}")
        source = s.leg.replica.replica_id if s.leg else None
        taken = await move(s, to, None if p == "auto" else MovePath(p))
        _reply(req, {"request": s.request_id, "from": source, "path": taken})


class _Registration(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    replica: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\s]+$")]
    model: Annotated[str, Field(min_length=1, max_length=256)]
    host: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[^\s]+$")]
    url: Annotated[str, Field(pattern=r"^http://[^\s/]+(:\d+)?/?$")] | None
    slots: Annotated[int, Field(ge=1, le=256)]
    pid: Annotated[int, Field(ge=1)] | None = None
    instance_type: Annotated[str, Field(max_length=64)] | None = None
    price_spot_per_hour: Annotated[float, Field(ge=0)] | None = None
    price_on_demand_per_hour: Annotated[float, Field(ge=0)] | None = None


def _registration(body: dict[str, Any]) -> _Registration:
    try:
        return _Registration.model_validate(body)
    except ValidationError as exc:
        e = max(exc.errors(), key=lambda e: e["type"] != "missing")
        field = ".".join(str(p) for p in e["loc"]) or "body"
        if e["type"] == "missing":
            raise ClientError(f"{field}: is required", param=field, code="missing_field") from exc
        if e["type"] == "extra_forbidden":
            raise UnsupportedField(field, "is not a registration field") from exc
        msg = str(e["msg"])
        raise InvalidField(field, e.get("input"), msg[0].lower() + msg[1:]) from exc


def _body(req: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(req.body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidField("body", req.body[:40].decode("latin-1"), "is not valid JSON") from exc
    if not isinstance(body, dict):
        raise InvalidField("body", type(body).__name__, "must be a JSON object")
    return body


def _reply(req: Request, data: dict[str, Any]) -> None:
    req.conn.respond(200, orjson.dumps(data))


def _replica(r: Replica) -> dict[str, Any]:
    return {
        "id": r.replica_id,
        "model": r.model,
        "state": r.health.state.value,
        "url": r.client.base_url if r.client else None,
        "pid": r.pid,
        "managed": r.managed,
        "in_flight": r.in_flight,
        "slots": r.slots,
        "free_slots": len(r.free_slots),
        "host": r.host,
    }


def _session(s: StreamSession) -> dict[str, Any]:
    j = s.journal
    return {
        "id": s.request_id,
        "model": s.model,
        "phase": s.state.phase.value,
        "position": len(j),
        "frontier": j.frontier,
        "max_tokens": j.params.max_tokens,
        "finish_reason": j.finish_reason.value if j.finish_reason else None,
        "replica": s.leg.replica.replica_id if s.leg else None,
        "migrations": s.state.migrations,
        "legs": [
            {
                "replica": leg.replica,
                "start": leg.start,
                "path": leg.path,
                "slot": leg.slot,
                "prompt_n": leg.prompt_n,
            }
            for leg in s.legs
        ],
        "error": s.error.message if s.error else None,
    }
