"""What travels with a client connection moved to another gateway: its stream's state.

A moved connection is a TCP socket in the middle of an SSE response. The target
gateway must write the same response on from the exact byte the client has, and
continue the generation like a ``Last-Event-ID`` resume; so it needs:

- the journal up to its frontier (prompt ids, sampling parameters with the seed,
  emitted ids and released text pieces, and the finish reason if it had ended): the
  rest of the text is a function of it, and so is the continuation request;
- ``sent_id``: the id of the last SSE event written to the socket (-2: nothing, -1:
  the chat role event). Everything after it is owed, everything up to it is not;
- the HTTP framing: whether the response head is out (then the body continues in
  chunks and no head may be written again), whether the connection is kept alive
  after this response, and the encoder's constants (kind, id, model, created,
  ``include_usage``).

The provisional tail of the journal (tokens past the frontier) does not travel: the
continuing replica generates it again and releases its text itself. Encoded as one
small orjson object; decoding checks every field and names the one at fault, so a
peer running another version fails the move of that connection with a clear reason
instead of corrupting the stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import orjson

from albatross.core.journal import FinishReason, SamplingParams, StreamJournal

__all__ = ["SNAPSHOT_VERSION", "SnapshotError", "StreamSnapshot", "decode", "encode"]

SNAPSHOT_VERSION = 1
_KINDS = ("chat", "completion")


class SnapshotError(ValueError):
    """Raised by :func:`decode` for bytes that are not a valid snapshot; names the
    field, the value and the rule. The connection it came with cannot be continued."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        super().__init__(f"stream snapshot: {field} = {shown}: {rule}")
        self.field = field


@dataclass(frozen=True, slots=True)
class StreamSnapshot:
    """One streaming response in flight, as the target gateway needs it."""

    request_id: str
    kind: str
    """``chat`` or ``completion``: the encoder's shape of events."""
    model: str
    created: int
    include_usage: bool
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    ids: tuple[int, ...]
    pieces: tuple[str, ...]
    finish_reason: FinishReason | None
    sent_id: int
    """Id of the last SSE event written to the client (-2: none, -1: the role event)."""
    head_sent: bool
    """The response head is out: the body goes on in chunks, no head again."""
    keep_alive: bool
    """What the request asked: keep the connection for another request afterwards."""
    migrations: int = 0
    """Legs started after the first, so ``continuity.max_migrations`` still counts them."""
    engine_url: str | None = None
    slot: int | None = None
    """The engine (base URL) and slot the stream was generating on: a target gateway
    sharing that engine continues there and reuses the slot's cached prefix."""

    @classmethod
    def of(
        cls,
        journal: StreamJournal,
        *,
        kind: str,
        model: str,
        created: int,
        include_usage: bool,
        sent_id: int,
        head_sent: bool,
        keep_alive: bool,
        migrations: int = 0,
        engine_url: str | None = None,
        slot: int | None = None,
    ) -> StreamSnapshot:
        """Snapshot ``journal`` up to its frontier (or whole, if it has finished)."""
        end = len(journal) if journal.finished else journal.frontier
        return cls(
            request_id=journal.request_id,
            kind=kind,
            model=model,
            created=created,
            include_usage=include_usage,
            prompt_ids=journal.prompt_ids,
            params=journal.params,
            ids=tuple(journal.ids[:end]),
            pieces=tuple(journal.pieces[:end]),
            finish_reason=journal.finish_reason,
            sent_id=sent_id,
            head_sent=head_sent,
            keep_alive=keep_alive,
            migrations=migrations,
            engine_url=engine_url,
            slot=slot,
        )

    def journal(self) -> StreamJournal:
        """A journal equal to the one snapshotted (through its frontier)."""
        j = StreamJournal(self.request_id, self.prompt_ids, self.params)
        for position, (token_id, piece) in enumerate(zip(self.ids, self.pieces, strict=True)):
            j.append(position, token_id, piece)
        if self.finish_reason is not None:
            j.finish(self.finish_reason)
        return j


def encode(s: StreamSnapshot) -> bytes:
    params = asdict(s.params)
    params["stop"] = list(s.params.stop)
    return orjson.dumps(
        {
            "v": SNAPSHOT_VERSION,
            "id": s.request_id,
            "kind": s.kind,
            "model": s.model,
            "created": s.created,
            "usage": s.include_usage,
            "prompt": s.prompt_ids,
            "params": params,
            "ids": s.ids,
            "pieces": s.pieces,
            "finish": s.finish_reason.value if s.finish_reason else None,
            "sent": s.sent_id,
            "head": s.head_sent,
            "keep_alive": s.keep_alive,
            "migrations": s.migrations,
            "engine": s.engine_url,
            "slot": s.slot,
        }
    )


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise SnapshotError(key, None, "is required")
    value = obj[key]
    # bool is an int in Python: an int field must not accept true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SnapshotError(key, value, f"must be of type {getattr(kind, '__name__', kind)}")
    return value


def _optional(obj: dict[str, Any], key: str, kind: type) -> Any:
    return None if obj.get(key) is None else _get(obj, key, kind)


def _ints(obj: dict[str, Any], key: str) -> tuple[int, ...]:
    values = _get(obj, key, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise SnapshotError(key, values, "must be a list of non-negative token ids")
    return tuple(values)


def _params(raw: Any) -> SamplingParams:
    if not isinstance(raw, dict):
        raise SnapshotError("params", raw, "must be an object")
    stop = raw.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise SnapshotError("params.stop", stop, "must be a list of strings")
    for key in ("max_tokens", "seed"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SnapshotError(f"params.{key}", value, "must be a non-negative integer")
    try:
        return SamplingParams(**{**raw, "stop": tuple(stop)})
    except TypeError as exc:
        raise SnapshotError(
            "params", sorted(raw), f"do not match the sampling fields: {exc}"
        ) from exc


def decode(data: bytes) -> StreamSnapshot:
    """Parse and check a snapshot; raises :class:`SnapshotError` naming the field."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SnapshotError("(bytes)", data[:40], f"is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SnapshotError("(top level)", type(obj).__name__, "must be an object")
    version = _get(obj, "v", int)
    if version != SNAPSHOT_VERSION:
        raise SnapshotError("v", version, f"is not supported (this build reads {SNAPSHOT_VERSION})")
    kind = _get(obj, "kind", str)
    if kind not in _KINDS:
        raise SnapshotError("kind", kind, f"must be one of {', '.join(_KINDS)}")
    ids = _ints(obj, "ids")
    pieces = _get(obj, "pieces", list)
    if len(pieces) != len(ids) or not all(isinstance(p, str) for p in pieces):
        raise SnapshotError("pieces", len(pieces), f"must be {len(ids)} strings, one per id")
    finish = obj.get("finish")
    if finish is not None and finish not in {r.value for r in FinishReason}:
        raise SnapshotError("finish", finish, "must be null, 'stop' or 'length'")
    sent = _get(obj, "sent", int)
    frontier = max((i + 1 for i, p in enumerate(pieces) if p), default=0)
    top = len(ids) + 1 if finish is not None else frontier - 1
    if not -2 <= sent <= top:
        raise SnapshotError("sent", sent, f"must be in [-2, {top}] for this journal")
    params = _params(obj.get("params"))
    if len(ids) > params.max_tokens:
        raise SnapshotError("ids", len(ids), f"exceed max_tokens ({params.max_tokens})")
    return StreamSnapshot(
        request_id=_get(obj, "id", str),
        kind=kind,
        model=_get(obj, "model", str),
        created=_get(obj, "created", int),
        include_usage=_get(obj, "usage", bool),
        prompt_ids=_ints(obj, "prompt"),
        params=params,
        ids=ids,
        pieces=tuple(pieces),
        finish_reason=FinishReason(finish) if finish is not None else None,
        sent_id=sent,
        head_sent=_get(obj, "head", bool),
        keep_alive=_get(obj, "keep_alive", bool),
        migrations=_get(obj, "migrations", int),
        engine_url=_optional(obj, "engine", str),
        slot=_optional(obj, "slot", int),
    )
