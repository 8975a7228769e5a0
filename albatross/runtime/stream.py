"""One request being generated, in legs across replicas: engine tokens -> journal -> client.

A :class:`StreamSession` runs its request as a sequence of *legs*, each a generation on
one replica starting at the journal's frontier (``core/continuity.py`` decides whether
another leg may follow). Every byte it writes is derived from the journal: tokens are
journaled first (duplicates dropped, gaps refused), then the text they released passes
the stop matcher and goes to the client in one write per batch. A leg's tokens are
accepted only while it is the current leg, so a cancelled replica's late output is
ignored. Nothing on the token path awaits.

SSE event ids are the position of the last token whose text the event completes
(``frontier - 1``), so they only grow, also across moves, and a client that reconnects
with ``Last-Event-ID: N`` is owed exactly the text released after position N.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from albatross.config import ContinuityConfig
from albatross.core.continuity import FailureReason, MovePath, Phase, StreamEvent, StreamState, step
from albatross.core.errors import (
    AlbatrossError,
    ClientError,
    Conflict,
    EngineError,
    EngineLost,
    EngineTimeout,
    InternalError,
    InvalidField,
    NoReplicaAvailable,
)
from albatross.core.journal import FinishReason, JournalClosed, JournalGap, StreamJournal
from albatross.core.replicas import ReplicaState
from albatross.core.stops import StopMatcher
from albatross.engines.base import Finished, Generation
from albatross.gateway.errors import error_event
from albatross.gateway.http import Connection
from albatross.gateway.metrics import Metrics, ModelMetrics
from albatross.gateway.sse import DONE, Encoder
from albatross.runtime.pool import Pool, Replica

if TYPE_CHECKING:
    from albatross.runtime.registry import Registry

log = logging.getLogger("albatross.stream")


@dataclass(frozen=True, slots=True)
class Services:
    """What every session shares."""

    pool: Pool
    metrics: Metrics
    continuity: ContinuityConfig
    first_token_timeout_s: float
    registry: Registry


@dataclass(slots=True)
class PlannedMove:
    target: Replica
    slot: int | None
    path: MovePath
    reason: FailureReason


@dataclass(frozen=True, slots=True)
class Cut:
    """Why a leg ended."""

    kind: Literal["finished", "failed", "moved", "client_gone"]
    reason: FailureReason | None = None
    error: AlbatrossError | None = None
    move: PlannedMove | None = None


@dataclass(slots=True)
class LegInfo:
    """What the control API shows about a leg."""

    replica: str
    start: int
    path: str
    slot: int | None
    prompt_n: int | None = None


class Leg:
    """One generation of the session on one replica; the adapter's TokenSink."""

    __slots__ = (
        "activity",
        "engine_done",
        "gen",
        "got_token",
        "info",
        "replica",
        "session",
        "slot",
        "started",
    )

    def __init__(
        self, session: StreamSession, replica: Replica, slot: int | None, info: LegInfo
    ) -> None:
        self.session = session
        self.replica = replica
        self.slot = slot
        self.info = info
        self.gen: Generation | None = None
        self.started = self.activity = time.perf_counter()
        self.got_token = False
        self.engine_done = False

    def on_token(self, position: int, token_id: int, piece: str) -> None:
        if self.session.leg is self:
            self.got_token = True
            self.session._on_token(position, token_id, piece)

    def on_batch(self) -> None:
        if self.session.leg is self:
            self.activity = time.perf_counter()
            self.session._on_batch()

    def on_finish(self, finished: Finished) -> None:
        self.info.prompt_n = finished.prompt_n
        self.engine_done = True
        if self.session.leg is self:
            self.session._on_finish(finished)

    def on_error(self, error: AlbatrossError) -> None:
        self.engine_done = True
        if self.session.leg is self:
            reason = (
                FailureReason.CRASHED
                if isinstance(error, EngineLost)
                else FailureReason.ENGINE_ERROR
            )
            self.session.cut(Cut("failed", reason, error))


@dataclass(eq=False)
class StreamSession:
    """Drives one request for one client; see the module docstring."""

    services: Services
    conn: Connection
    journal: StreamJournal
    encoder: Encoder
    model: str
    stream: bool
    include_usage: bool
    received_at: float
    continuable: bool = True
    state: StreamState = field(default_factory=StreamState)
    legs: list[LegInfo] = field(default_factory=list)
    leg: Leg | None = None
    error: AlbatrossError | None = None
    client_gone: bool = False
    ended_at: float | None = None
    sent_id: int = -2
    """Id of the last SSE event written to the client (-2: none yet, -1: the chat role
    event); what a connection moved to another gateway is owed starts after it."""
    _stops: StopMatcher = field(init=False)
    _new: list[str] = field(default_factory=list)
    _out: list[str] = field(default_factory=list)
    _started: bool = False  # response bytes have been sent
    _emitted: bool = False  # text has been produced (for a whole response: not yet sent)
    _last_write: float = 0.0
    _cut: asyncio.Future[Cut] | None = None
    _gap_since: float | None = None
    _gap_path: str = ""

    def __post_init__(self) -> None:
        self.continuable = self.journal.params.continuable
        self._stops = StopMatcher(self.journal.params.stop)
        self.mm: ModelMetrics = self.services.metrics.model(self.model)

    @property
    def request_id(self) -> str:
        return self.journal.request_id

    # ---- lifecycle -------------------------------------------------------------
    async def run(self, replica: Replica) -> None:
        """Generate to the end, across replicas. The caller has acquired ``replica``;
        it is released here. Raises an :class:`AlbatrossError` if the request failed
        before anything was sent (the handler answers with its status)."""
        self.services.registry.add(self)
        self.conn.on_disconnect(self._client_gone)
        try:
            await self._drive(replica, replica.take_slot(), None, FailureReason.MOVED)
        finally:
            self.mm.tokens.inc(len(self.journal))  # type: ignore[attr-defined]
            self.services.registry.retire(self)
        if self.error is not None and not self._started:
            raise self.error

    async def _drive(
        self, replica: Replica, slot: int | None, path: MovePath | None, reason: FailureReason
    ) -> None:
        pool, cfg = self.services.pool, self.services.continuity
        tried: set[str] = set()
        while True:
            try:
                cut = await self._run_leg(replica, slot, path, reason)
            except Exception:
                # A bug must not leak the replica's slot or cut the client off mid-body.
                log.exception(
                    "%s: unexpected error in a leg on %s", self.request_id, replica.replica_id
                )
                pool.release(replica, slot)
                self._fail(InternalError("internal error while generating; see the gateway log"))
                return
            if cut.kind in ("finished", "client_gone"):
                pool.release(replica, slot)
                return
            if cut.kind == "moved":
                assert cut.move is not None
                mv = cut.move
                if mv.path is MovePath.KV:
                    from albatross.runtime.moves import transfer_kv

                    if not await transfer_kv(self, replica, slot, mv):
                        mv.path = MovePath.REPREFILL
                pool.release(replica, slot)
                # The cut may fall inside a split character: continue at the frontier.
                self.journal.rewind_to_frontier()
                replica, slot, path, reason = mv.target, mv.slot, mv.path, mv.reason
                continue
            # An unplanned failure: continue from the journal on another replica.
            pool.release(replica, slot)
            bad_request = isinstance(cut.error, ClientError)
            # Nothing released yet: even a constrained request restarts exactly.
            fresh = self.journal.frontier == 0
            verdict = step(
                self.state,
                StreamEvent.LEG_FAILED,
                max_migrations=cfg.max_migrations,
                continuable=(self.continuable or fresh) and not bad_request,
            )
            self.state = verdict.state
            assert cut.reason is not None
            if bad_request or verdict.give_up is not None:
                err = (
                    cut.error
                    if bad_request
                    else EngineError(
                        f"{verdict.give_up}; last failure: {cut.error.message if cut.error else cut.reason}"
                    )
                )
                assert err is not None
                self.services.metrics.continuation_failures.labels(cut.reason.value).inc()
                self._fail(err)
                return
            log.info(
                "%s: replica %s failed at position %d (%s); continuing elsewhere",
                self.request_id,
                replica.replica_id,
                len(self.journal),
                cut.reason.value,
            )
            self.journal.rewind_to_frontier()
            tried.add(replica.replica_id)
            try:
                replica = await pool.acquire(
                    self.model,
                    self.services.first_token_timeout_s,
                    frozenset(tried),
                    avoid=frozenset({replica.replica_id}),
                )
            except NoReplicaAvailable as exc:
                self.services.metrics.continuation_failures.labels(cut.reason.value).inc()
                self._fail(exc)
                return
            if self.client_gone:
                pool.release(replica)
                return
            slot, path, reason = replica.take_slot(), MovePath.REPREFILL, cut.reason

    async def _run_leg(
        self, replica: Replica, slot: int | None, path: MovePath | None, reason: FailureReason
    ) -> Cut:
        loop = asyncio.get_running_loop()
        self._cut = loop.create_future()
        info = LegInfo(replica.replica_id, len(self.journal), path.value if path else "first", slot)
        leg = Leg(self, replica, slot, info)
        self.leg = leg
        self.legs.append(info)
        if path is not None:
            self.services.metrics.migrations.labels(reason.value, path.value).inc()
            self._gap_path = path.value
        client = replica.client
        try:
            if client is None:
                raise EngineError(f"replica {replica.replica_id} has no engine")
            leg.gen = await client.generate(self.journal.continuation(), leg, slot)
        except EngineError as exc:
            if not self._cut.done():
                self._cut.set_result(Cut("failed", FailureReason.CRASHED, exc))
        else:
            self.state = step(
                self.state,
                StreamEvent.LEG_STARTED,
                max_migrations=self.services.continuity.max_migrations,
            ).state
            if self._cut.done():
                leg.gen.cancel()
        cut = await self._cut
        self.leg = None
        replica.ledger.tokens += max(0, len(self.journal) - info.start)
        if leg.gen is not None and not leg.engine_done:
            leg.gen.cancel()  # also after a stop sequence: the engine is still generating
        if cut.kind in ("failed", "moved") and self._gap_since is None:
            self._gap_since = self._last_write or time.perf_counter()
        return cut

    def cut(self, cut: Cut) -> None:
        """End the current leg (from a callback, the watchdog or a planned move)."""
        if self._cut is not None and not self._cut.done():
            self._flush()
            self._cut.set_result(cut)

    def _client_gone(self) -> None:
        # The client went away: stop the engine's work at once (closing the engine
        # connection cancels the generation on llama-server). The journal is kept for
        # a while so the client can resume with Last-Event-ID.
        self.client_gone = True
        if self.leg is not None and self.leg.gen is not None:
            self.leg.gen.cancel()
        self.cut(Cut("client_gone"))

    # ---- tokens ----------------------------------------------------------------------
    def _on_token(self, position: int, token_id: int, piece: str) -> None:
        try:
            if self.journal.append(position, token_id, piece) and piece:
                self._new.append(piece)
        except (JournalGap, JournalClosed) as exc:
            # A lost token: this replica's output can no longer be trusted to be exact.
            self.cut(
                Cut(
                    "failed",
                    FailureReason.ENGINE_ERROR,
                    EngineError(f"engine output cannot be journaled: {exc}"),
                )
            )

    def _on_batch(self) -> None:
        self._flush()
        if self._stops.stopped and self._cut is not None and not self._cut.done():
            self._complete(FinishReason.STOP)

    def _flush(self) -> None:
        if not self._new:
            return
        text = "".join(self._new) if len(self._new) > 1 else self._new[0]
        self._new.clear()
        out = self._stops.feed(text)
        if out:
            self._emit(out)

    def _on_finish(self, finished: Finished) -> None:
        if self.journal.finished:
            return  # a stop sequence completed it in the same read
        self._flush()
        if self._stops.stopped:
            self._complete(FinishReason.STOP)
            return
        reason = FinishReason.LENGTH if finished.stop_type == "limit" else FinishReason.STOP
        self._complete(reason, self._stops.flush())

    def _emit(self, text: str) -> None:
        now = time.perf_counter()
        mm = self.mm
        if not self._emitted:
            self._emitted = True
            mm.ttft.observe(now - self.received_at)
        else:
            mm.itl.observe(now - self._last_write)
        if self._gap_since is not None:
            self.services.metrics.stall(self._gap_path).observe(now - self._gap_since)
            self._gap_since = None
        self._last_write = now
        if not self.stream:
            self._out.append(text)
            return
        data = self.encoder.text(self.journal.frontier - 1, text)
        if self._started:
            self.conn.send_chunk(data)
        else:
            self._started = True
            self.conn.start_stream(first=self.encoder.first() + data)
        self.sent_id = self.journal.frontier - 1

    def _usage(self) -> dict[str, int]:
        p, c = len(self.journal.prompt_ids), len(self.journal)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _complete(self, reason: FinishReason, tail: str = "") -> None:
        """Finish the response; ``tail`` is text only the end of the stream released."""
        j = self.journal
        if j.finished:
            return
        j.finish(reason)
        self.state = StreamState(
            Phase.DONE, self.state.migrations, self.state.legs, self.state.failures
        )
        if self.stream:
            end = self.encoder.finish(len(j), reason.value, tail)
            if self.include_usage:
                end += self.encoder.usage_event(len(j), self._usage())
            end += DONE
            if self._started:
                self.conn.end_stream(end)
            else:
                self._started = True
                self.conn.start_stream(first=self.encoder.first() + end)
                self.conn.end_stream()
        else:
            self._out.append(tail)
            self._started = True
            self.conn.respond(
                200, self.encoder.whole("".join(self._out), reason.value, self._usage())
            )
        self.cut(Cut("finished"))

    def _fail(self, error: AlbatrossError) -> None:
        """End the stream with ``error``: an error event if the stream has started,
        else the handler answers with the error's status."""
        self.error = error
        self.state = StreamState(Phase.FAILED, self.state.migrations, self.state.legs)
        if self._started and not self.client_gone:
            self.conn.end_stream(error_event(error, len(self.journal)) + DONE)

    # ---- resume --------------------------------------------------------------------
    async def resume(
        self,
        conn: Connection,
        last_event_id: int,
        prefer_url: str | None = None,
        prefer_slot: int | None = None,
    ) -> None:
        """Serve the rest of this stream to a client that reconnected with
        ``Last-Event-ID``; if it had not ended, continue it from the journal.

        ``prefer_url``/``prefer_slot``: the engine and slot the stream was generated on
        (a connection moved from another gateway sharing that engine): continuing there
        reuses the slot's cached prefix instead of prefilling it again.

        Raises :class:`Conflict` while the stream still has a client, and
        :class:`InvalidField` for an event id the stream never sent.
        """
        if self.services.registry.live.get(self.request_id) is self:
            raise Conflict(f"stream {self.request_id} still has a client", param="Last-Event-ID")
        j = self.journal
        seen = max(last_event_id, -2)  # -2: nothing seen, -1: the chat role event
        if seen >= j.frontier and not (j.finished and seen <= len(j) + 1):
            raise InvalidField(
                "Last-Event-ID",
                last_event_id,
                f"is past the stream's last event ({j.frontier - 1})",
            )
        # The text sent through event N is a function of the journal's text through N.
        stops = StopMatcher(j.params.stop)
        stops.feed(j.text(0, max(seen, -1) + 1))
        rest = stops.feed(j.text(max(seen, -1) + 1, j.frontier)) if seen < j.frontier else ""
        self._stops = stops
        self.conn, self.client_gone, self.error = conn, False, None
        self._new.clear()
        first = self.encoder.first() if seen < -1 else b""
        self.sent_id = -1 if first else seen
        if rest:
            first += self.encoder.text(j.frontier - 1, rest)
            self.sent_id = j.frontier - 1
        self._started = True
        self._last_write = time.perf_counter()
        if j.finished:
            assert j.finish_reason is not None
            if seen < len(j):
                first += self.encoder.finish(
                    len(j), j.finish_reason.value, "" if stops.stopped else stops.flush()
                )
            if seen < len(j) + 1 and self.include_usage:
                first += self.encoder.usage_event(len(j), self._usage())
            conn.start_stream(first=first)
            conn.end_stream(DONE)
            return
        conn.start_stream(first=first)
        j.rewind_to_frontier()
        self.state = StreamState(
            Phase.ROUTING, self.state.migrations, self.state.legs, self.state.failures
        )
        self.services.registry.add(self)
        conn.on_disconnect(self._client_gone)
        try:
            replica, slot = self._replica_at(prefer_url, prefer_slot)
            if replica is None:
                replica = await self.services.pool.acquire(
                    self.model, self.services.first_token_timeout_s
                )
                slot = replica.take_slot()
            await self._drive(replica, slot, MovePath.REPREFILL, FailureReason.MOVED)
        except AlbatrossError as exc:
            self._fail(exc)
        finally:
            self.services.registry.retire(self)

    def _replica_at(self, url: str | None, slot: int | None) -> tuple[Replica | None, int | None]:
        """The ready replica of this model at engine ``url``, acquired, with ``slot`` if
        it is free; (None, None) if there is none."""
        for r in self.services.pool.replicas.values():
            if (
                url is not None
                and r.model == self.model
                and r.client is not None
                and r.client.base_url == url
                and r.health.state is ReplicaState.READY
            ):
                r.in_flight += 1
                if slot is not None and slot in r.free_slots:
                    r.free_slots.remove(slot)
                    return r, slot
                return r, r.take_slot()
        return None, None

    @property
    def response_started(self) -> bool:
        """Bytes of the response (its head at least) have been written."""
        return self._started

    def hand_off(self) -> int:
        """Stop writing to this client and stop generating, at once: its connection is
        being moved to another gateway, which continues the stream from the journal.
        Returns the id of the last event the client was written (see :attr:`sent_id`)."""
        sent = self.sent_id
        self.conn.freeze_writes()
        self._client_gone()
        return sent

    # ---- watchdog ------------------------------------------------------------------
    def check_stall(self, now: float) -> None:
        """Called periodically: a leg with no token for too long has failed."""
        leg = self.leg
        if leg is None or self._cut is None or self._cut.done():
            return
        if not leg.got_token:
            limit = self.services.first_token_timeout_s
            if now - leg.started > limit:
                self.cut(
                    Cut(
                        "failed",
                        FailureReason.STALLED,
                        EngineTimeout(f"no token within {limit:g}s"),
                    )
                )
        elif now - leg.activity > self.services.continuity.stall_timeout_s:
            limit = self.services.continuity.stall_timeout_s
            self.cut(
                Cut("failed", FailureReason.STALLED, EngineTimeout(f"no token for {limit:g}s"))
            )
