"""The stream journal: the truth about what a client has been sent.

Theory of operation
-------------------
One journal per request. It holds the prompt token ids, the sampling parameters
(always with a seed) and, for every generated position, the token id and the text the
engine *released* with it. Engines hold text back while a UTF-8 character is split
across tokens, so a token's released text may be empty and a later token may release
the bytes of several; the sum of released text is always valid UTF-8.

Rules (each enforced here, each tested):

1. Positions are dense and 0-based. ``append(p, ...)`` with ``p == len`` is accepted;
   ``p < len`` is a duplicate and is dropped (returns ``False``); ``p > len`` would leave
   a gap and raises :class:`JournalGap`, leaving the journal unchanged.
2. Appending after :meth:`finish` raises :class:`JournalClosed`; nothing changes.
3. The *frontier* is the number of leading tokens whose text has been released in
   full: one past the last token that released text. Tokens past the frontier are
   provisional: the client has seen nothing of them.
4. A continuation starts at the frontier: prompt ids + ids before the frontier,
   ``max_tokens`` reduced by the frontier, the same sampling parameters and a seed
   derived from the request's seed and the frontier (:func:`derive_seed`).
   :meth:`rewind_to_frontier` drops the provisional tail first, so the continuing
   replica re-generates it and releases its text itself. Every byte the client gets is
   therefore derived from the journal, exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, position: int) -> int:
    """Seed for a continuation starting at ``position``.

    Position 0 keeps the request's own seed, so an uninterrupted run is the same as
    a direct one. Later positions get a splitmix64 mix of both, folded to 32 bits
    (engines take unsigned 32-bit seeds).
    """
    if position == 0:
        return seed
    z = (seed * 0x9E3779B97F4A7C15 + position) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What decides the next token. ``seed`` is always set (the gateway picks one)."""

    max_tokens: int
    seed: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None
    """``None`` leaves a parameter to the engine's default; the journal records only
    what the client asked for, so a continuation asks for the same."""
    stop: tuple[str, ...] = ()
    json_schema: str | None = None
    """Constrained decoding (JSON text of a schema). A constrained generation cannot be
    continued exactly elsewhere: the grammar's state is not in the journal."""

    @property
    def continuable(self) -> bool:
        return self.json_schema is None


@dataclass(frozen=True, slots=True)
class Continuation:
    """What a replica is asked to generate to continue a journal."""

    prompt_ids: tuple[int, ...]
    start: int
    """Position of the first token the replica will produce."""
    max_tokens: int
    seed: int
    params: SamplingParams


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"


class JournalGap(Exception):
    """Raised when a token would skip a position. The journal is unchanged.

    It means the engine lost a token (or a continuation started at the wrong place);
    the stream cannot be continued exactly from this replica's output.
    """


class JournalClosed(Exception):
    """Raised when a token arrives after the journal finished. Nothing changes."""


class StreamJournal:
    """Token-level record of one request; see the module docstring for its rules."""

    __slots__ = (
        "_frontier",
        "finish_reason",
        "ids",
        "params",
        "pieces",
        "prompt_ids",
        "request_id",
    )

    def __init__(
        self, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.ids: list[int] = []
        self.pieces: list[str] = []
        self._frontier = 0
        self.finish_reason: FinishReason | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def frontier(self) -> int:
        return self._frontier

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, position: int, token_id: int, piece: str) -> bool:
        """Record the token at ``position``; ``False`` if it was a duplicate (dropped)."""
        if self.finish_reason is not None:
            raise JournalClosed(f"{self.request_id}: token at {position} after finish")
        n = len(self.ids)
        if position != n:
            if position < n:
                return False
            raise JournalGap(f"{self.request_id}: token at {position}, expected {n}")
        self.ids.append(token_id)
        self.pieces.append(piece)
        if piece:
            self._frontier = n + 1
        return True

    def text(self, start: int = 0, end: int | None = None) -> str:
        """Text released by tokens ``start`` up to ``end`` (exclusive)."""
        return "".join(self.pieces[start:end])

    def finish(self, reason: FinishReason) -> None:
        """Close the journal; idempotent for the same reason."""
        if self.finish_reason is not None and self.finish_reason is not reason:
            raise JournalClosed(
                f"{self.request_id}: finished twice ({self.finish_reason}, {reason})"
            )
        self.finish_reason = reason

    def rewind_to_frontier(self) -> int:
        """Drop the provisional tail (tokens past the frontier); returns how many."""
        if self.finish_reason is not None:
            raise JournalClosed(f"{self.request_id}: rewind after finish")
        dropped = len(self.ids) - self._frontier
        del self.ids[self._frontier :]
        del self.pieces[self._frontier :]
        return dropped

    def continuation(self) -> Continuation:
        """The request that continues this journal from its frontier.

        Call :meth:`rewind_to_frontier` first when the journal has a provisional tail.
        """
        start = self._frontier
        if len(self.ids) != start:
            raise ValueError("continuation() with a provisional tail: rewind_to_frontier() first")
        return Continuation(
            prompt_ids=self.prompt_ids + tuple(self.ids),
            start=start,
            max_tokens=self.params.max_tokens - start,
            seed=derive_seed(self.params.seed, start),
            params=self.params,
        )
