"""One request being generated: engine tokens -> journal -> bytes to the client.

A :class:`StreamSession` is the engine adapter's :class:`TokenSink`. Every byte it
writes is derived from the journal: tokens are journaled first (duplicates dropped,
gaps refused), then the text they released passes the stop matcher and goes to the
client in one write per batch. Nothing on this path awaits.
"""

from __future__ import annotations

import asyncio
import time

from albatross.core.errors import AlbatrossError, EngineError, EngineTimeout
from albatross.core.journal import FinishReason, JournalClosed, JournalGap, StreamJournal
from albatross.core.stops import StopMatcher
from albatross.engines.base import EngineClient, Finished, Generation
from albatross.gateway.errors import error_event
from albatross.gateway.http import Connection
from albatross.gateway.metrics import ModelMetrics
from albatross.gateway.sse import DONE, Encoder


class StreamSession:
    """Drives one generation for one client; see the module docstring."""

    def __init__(
        self,
        conn: Connection,
        journal: StreamJournal,
        encoder: Encoder,
        metrics: ModelMetrics,
        *,
        stream: bool,
        include_usage: bool,
        received_at: float,
        first_token_timeout_s: float,
    ) -> None:
        self.conn = conn
        self.journal = journal
        self.encoder = encoder
        self.metrics = metrics
        self.stream = stream
        self.include_usage = include_usage
        self.received_at = received_at
        self._first_token_timeout_s = first_token_timeout_s
        self._stops = StopMatcher(journal.params.stop)
        self._new: list[str] = []
        self._out: list[str] = []  # whole text, for non-streaming responses
        self._started = False  # response head sent
        self._last_write = 0.0
        self._gen: Generation | None = None
        self._done: asyncio.Future[AlbatrossError | None] = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None
        self.client_gone = False

    # ---- lifecycle -------------------------------------------------------------
    async def run(self, engine: EngineClient) -> None:
        """Generate to the end. Raises an :class:`AlbatrossError` if it failed before
        anything was sent (the handler then answers with its status)."""
        self.conn.on_disconnect(self._client_gone)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._first_token_timeout_s, self._first_token_late)
        try:
            self._gen = await engine.generate(self.journal.continuation(), self)
            if self._done.done():
                self._gen.cancel()
            else:
                self.conn.on_backpressure(self._gen.pause, self._gen.resume)
            err = await self._done
        finally:
            self.metrics.tokens.inc(len(self.journal))  # type: ignore[attr-defined]
            if self._timer is not None:
                self._timer.cancel()
            if self._gen is not None and not self._done.done():
                self._gen.cancel()
        if err is not None and not self._started:
            raise err

    def _client_gone(self) -> None:
        # The client went away: stop the engine's work at once (closing the engine
        # connection cancels the generation on llama-server).
        self.client_gone = True
        if self._gen is not None:
            self._gen.cancel()
        if not self._done.done():
            self._done.set_result(None)

    def _first_token_late(self) -> None:
        if len(self.journal) == 0:
            self.on_error(EngineTimeout(f"no token within {self._first_token_timeout_s:g}s"))

    # ---- TokenSink ---------------------------------------------------------------
    def on_token(self, position: int, token_id: int, piece: str) -> None:
        try:
            if self.journal.append(position, token_id, piece) and piece:
                self._new.append(piece)
        except (JournalGap, JournalClosed) as exc:
            # A lost token: the output can no longer be trusted to be exact.
            self.on_error(EngineError(f"engine output cannot be journaled: {exc}"))

    def on_batch(self) -> None:
        if self._done.done() or not self._new:
            return
        text = "".join(self._new) if len(self._new) > 1 else self._new[0]
        self._new.clear()
        out = self._stops.feed(text)
        if out:
            self._emit(out)
        if self._stops.stopped:
            if self._gen is not None:
                self._gen.cancel()
            self._complete(FinishReason.STOP)

    def on_finish(self, finished: Finished) -> None:
        if self._done.done():
            return
        self.on_batch()
        if self._done.done():
            return
        tail = self._stops.flush()
        if tail:
            self._emit(tail)
        self._complete(FinishReason.LENGTH if finished.stop_type == "limit" else FinishReason.STOP)

    def on_error(self, error: AlbatrossError) -> None:
        if self._done.done():
            return
        if self._gen is not None:
            self._gen.cancel()
        if self._started and self.stream:
            self.conn.end_stream(error_event(error) + DONE)
        self._done.set_result(error)

    # ---- writing -------------------------------------------------------------------
    def _emit(self, text: str) -> None:
        now = time.perf_counter()
        m = self.metrics
        if not self._started:
            m.ttft.observe(now - self.received_at)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        else:
            m.itl.observe(now - self._last_write)
        self._last_write = now
        if not self.stream:
            self._started = True
            self._out.append(text)
            return
        data = self.encoder.text(len(self.journal) - 1, text)
        if self._started:
            self.conn.send_chunk(data)
        else:
            self._started = True
            self.conn.start_stream(first=self.encoder.first() + data)

    def _usage(self) -> dict[str, int]:
        p, c = len(self.journal.prompt_ids), len(self.journal)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _complete(self, reason: FinishReason) -> None:
        j = self.journal
        j.finish(reason)
        if self.stream:
            tail = self.encoder.finish(max(len(j) - 1, 0), reason.value)
            if self.include_usage:
                tail += self.encoder.usage_event(self._usage())
            tail += DONE
            if self._started:
                self.conn.end_stream(tail)
            else:
                self._started = True
                self.conn.start_stream(first=self.encoder.first() + tail)
                self.conn.end_stream()
        else:
            self._started = True
            self.conn.respond(200, self.encoder.whole("".join(self._out), reason.value, self._usage()))
        if not self._done.done():
            self._done.set_result(None)
