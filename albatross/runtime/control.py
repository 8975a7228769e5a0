"""The control API under ``/admin``: bearer token required on every call.

| call | body | does |
|---|---|---|
| ``GET /admin/replicas`` | | replicas: state, address, load, slots |
| ``GET /admin/requests`` | | streams in flight: position, replica, legs |
| ``GET /admin/requests/{id}`` | | one stream, also after it ended (while retained) |
| ``POST /admin/drain`` | ``{"replica": ID}`` | no new requests; move its streams off |
| ``POST /admin/undrain`` | ``{"replica": ID}`` | back into the pool |
| ``POST /admin/move`` | ``{"request": ID, "to": ID?, "path": "auto"?}`` | move one stream |
| ``GET /admin/cost`` | | per replica: uptime, tokens, preemptions, spend vs on demand |
| ``POST /admin/preempt`` | ``{"replica": ID?, "deadline_s": 30?}`` | a preemption notice: deadline-aware drain, then replacement |

Replica ids contain ``/`` (``model/0``), so they travel in bodies, not paths. Without a
configured token the API answers 403: it moves other people's streams.
"""

from __future__ import annotations

import hmac
import os
import time
from typing import Any

import orjson

from albatross.config import Config
from albatross.core.continuity import MovePath
from albatross.core.cost import fleet_summary
from albatross.core.errors import (
    Conflict,
    Forbidden,
    InvalidField,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
)
from albatross.gateway.http import Request
from albatross.runtime.pool import Pool, Replica
from albatross.runtime.registry import Registry
from albatross.runtime.spot import SpotController
from albatross.runtime.stream import StreamSession

_PATHS = ("auto", "kv", "prewarm", "reprefill")


class Control:
    def __init__(
        self, config: Config, pool: Pool, registry: Registry, spot: SpotController | None = None
    ) -> None:
        token = config.control.token or os.environ.get("ALBATROSS_CONTROL_TOKEN") or None
        self._token = token.encode() if token else None
        self.pool = pool
        self.registry = registry
        self.spot = spot

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
        route = {
            "/admin/replicas": ("GET", self._replicas),
            "/admin/requests": ("GET", self._requests),
            "/admin/drain": ("POST", self._drain),
            "/admin/undrain": ("POST", self._undrain),
            "/admin/move": ("POST", self._move),
            "/admin/preempt": ("POST", self._preempt),
            "/admin/cost": ("GET", self._cost),
        }.get(path)
        if route is None:
            raise NotFound(f"no control route {req.path}")
        self._only(req, route[0])
        await route[1](req)

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
        _reply(req, {"replicas": [_replica(r) for r in self.pool.replicas.values()]})

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

    async def _cost(self, req: Request) -> None:
        _reply(req, fleet_summary([r.ledger for r in self.pool.replicas.values()], time.time()))

    async def _preempt(self, req: Request) -> None:
        if self.spot is None or self.spot.cfg.source == "none":
            raise Conflict("preemption handling is off (spot.source = none)")
        body = _body(req)
        rid = self._replica(body).replica_id if body.get("replica") is not None else None
        lead = body.get("deadline_s", self.spot.cfg.default_lead_s)
        if not isinstance(lead, int | float) or isinstance(lead, bool) or not 0 < lead <= 3600:
            raise InvalidField("deadline_s", lead, "must be a number of seconds in (0, 3600]")
        ids = self.spot.preempt(rid, float(lead), "control API")
        _reply(req, {"replicas": ids, "deadline_s": lead})

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
