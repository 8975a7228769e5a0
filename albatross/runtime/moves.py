"""Planned moves of a live stream to another replica: KV transfer, pre-warm, re-prefill.

A move never loses or repeats a token: the source leg is cut at a token boundary, the
journal rewinds to its frontier, and the next leg starts there (``stream.py``). What
differs is how much the target must compute before its first token:

- ``kv``: the source slot's KV cache is saved to the directory both replicas share and
  restored into the target's slot; the target then evaluates one token.
- ``prewarm``: while the source keeps decoding, the target evaluates prompt + emitted
  ids into a slot; at the cut it evaluates only the few tokens emitted meanwhile.
- ``reprefill``: the target evaluates prompt + emitted ids after the cut.
"""

from __future__ import annotations

import logging

from albatross.core.continuity import FailureReason, MovePath, Phase, StreamEvent, choose_path, step
from albatross.core.errors import AlbatrossError, Conflict, InvalidField, NoReplicaAvailable
from albatross.runtime.pool import Replica
from albatross.runtime.stream import Cut, PlannedMove, StreamSession

log = logging.getLogger("albatross.moves")
PREWARM_ROUNDS = 4
PREWARM_CLOSE_ENOUGH = 2
"""Tokens the target may be behind at the cut; each one is prefilled then."""


def _target(session: StreamSession, source: Replica, target_id: str | None) -> Replica:
    pool = session.services.pool
    if target_id is None:
        r = pool.try_acquire(session.model, frozenset({source.replica_id}))
        if r is None or r is source:
            if r is source:
                pool.release(r)
            raise NoReplicaAvailable(f"no other ready replica of {session.model!r} to move to")
        return r
    r = pool.replicas.get(target_id)
    if r is None or r.model != session.model:
        raise InvalidField("to", target_id, f"is not a replica of {session.model!r}")
    if r is source:
        raise InvalidField("to", target_id, "is the replica the request is already on")
    if r.health.state.value != "ready" or r.client is None:
        raise Conflict(f"replica {target_id} is {r.health.state.value}, not ready", param="to")
    r.in_flight += 1
    return r


async def move(
    session: StreamSession,
    target_id: str | None,
    requested: MovePath | None,
    reason: FailureReason = FailureReason.MOVED,
) -> str:
    """Move ``session``'s generation off its replica; returns the path taken.

    Returns ``"in_place"`` for a request that cannot be continued exactly (it finishes
    where it is) and ``"finished"`` if it ended before the cut. Raises
    :class:`Conflict` when it is not streaming, :class:`NoReplicaAvailable` when there
    is nowhere to go, :class:`InvalidField` for a bad target.
    """
    leg = session.leg
    if leg is None or session.state.phase is not Phase.STREAMING:
        raise Conflict(
            f"request {session.request_id} is {session.state.phase.value}, not streaming"
        )
    if not session.continuable:
        return "in_place"
    source = leg.replica
    target = _target(session, source, target_id)
    pool = session.services.pool
    tslot = target.take_slot()
    kv_ok = (
        source.client is not None
        and source.client.capabilities.slot_save_restore
        and leg.slot is not None
        and tslot is not None
    )
    path = choose_path(
        requested,
        source_kv=kv_ok,
        target_kv=kv_ok,
        shared_slot_dir=source.shared_slot_dir and target.shared_slot_dir,
    )
    if requested is MovePath.KV and path is not MovePath.KV:
        log.info(
            "%s: KV transfer not possible between %s and %s; pre-warming",
            session.request_id,
            source.replica_id,
            target.replica_id,
        )
    if path is MovePath.PREWARM:
        if tslot is None or target.client is None:
            path = MovePath.REPREFILL
        else:
            j = session.journal
            try:
                # The source keeps decoding while the target prefills; prefill again
                # while that left it more than a few tokens behind, so the cut-over
                # costs about one decode step. Stop chasing when a round did not at
                # least halve the gap: the target prefills no faster than the source
                # decodes (numerics = "exact" prefills one token per micro-batch, and
                # a busy target is slow), and more rounds would only delay the move
                # (a drain's deadline) without shortening the stall.
                done, behind = -PREWARM_CLOSE_ENOUGH - 1, None
                for _ in range(PREWARM_ROUNDS):
                    gap = j.frontier - done
                    if gap <= PREWARM_CLOSE_ENOUGH or session.leg is not leg:
                        break
                    if behind is not None and gap > behind // 2:
                        log.info(
                            "%s: pre-warm on %s not converging (%d tokens behind); cutting over",
                            session.request_id,
                            target.replica_id,
                            gap,
                        )
                        break
                    behind = gap
                    done = j.frontier
                    await target.client.prefill(j.prompt_ids + tuple(j.ids[:done]), tslot)
            except AlbatrossError as exc:
                log.warning(
                    "%s: pre-warm on %s failed (%s); re-prefilling",
                    session.request_id,
                    target.replica_id,
                    exc,
                )
                path = MovePath.REPREFILL
    if session.leg is not leg:
        pool.release(target, tslot)  # it finished, failed or moved while we prepared
        return "finished"
    session.state = step(
        session.state,
        StreamEvent.MOVE_REQUESTED,
        max_migrations=session.services.continuity.max_migrations,
    ).state
    session.cut(Cut("moved", move=PlannedMove(target, tslot, path, reason)))
    return path.value


async def transfer_kv(
    session: StreamSession, source: Replica, source_slot: int | None, mv: PlannedMove
) -> bool:
    """Save the source slot and restore it into the target's; False if that failed
    (the move then re-prefills). The source generation has been cancelled already;
    llama-server saves the slot once it is idle."""
    if source.client is None or mv.target.client is None or source_slot is None or mv.slot is None:
        return False
    name = f"{session.request_id}-{len(session.legs)}.bin"
    path = session.services.continuity.slot_dir / name
    try:
        await source.client.save_slot(source_slot, name)
        await mv.target.client.restore_slot(mv.slot, name)
        return True
    except AlbatrossError as exc:
        log.warning(
            "%s: KV transfer %s -> %s failed (%s); re-prefilling",
            session.request_id,
            source.replica_id,
            mv.target.replica_id,
            exc,
        )
        return False
    finally:
        path.unlink(missing_ok=True)
