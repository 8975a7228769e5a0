"""Exact continuation at every cut position, against a real llama-server and a real model.

The promise of pillar 1: a generation continued from the journal on another replica is
token-identical to an uninterrupted one. Here it is checked at *every* position of a
greedy stream of SmolLM2-135M-Instruct (the embedded model: byte-level BPE, Q4_1) whose
output holds emoji and accented letters, so several cuts fall inside a character whose
UTF-8 bytes are split across tokens (the engine releases "" for those tokens and the
journal's frontier lags behind its length).

Each cut is run the way a session continues a stream (``runtime/stream.py``): a journal
holding the reference's first ``k`` tokens, as the engine released them, is rewound to
its frontier and its :meth:`~StreamJournal.continuation` is generated through the
adapter into the same journal. The continuing slot's cache is erased first: a full
re-prefill of prompt + emitted ids, as on a replica that never saw the request.

Two servers: one started with ``-ub 1`` (prompts are evaluated one token at a time,
with the same kernels as decoding), where continuation must be exact; and one with the
flags managed replicas get (``runtime/app.py``), where batched prefill computes the KV
cache of the emitted tokens with other kernels than decoding did, which flips greedy
near-ties (an open bug, marked xfail).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from albatross.core.errors import AlbatrossError, EngineError
from albatross.core.journal import FinishReason, SamplingParams, StreamJournal
from albatross.core.requests import ChatMessage
from albatross.core.stops import StopMatcher
from albatross.engines.base import Finished
from albatross.engines.embedded_model import embedded_model_path
from albatross.engines.llama_server import LlamaServerClient
from albatross.testing.llama import running_llama_server

pytestmark = pytest.mark.engine

PROMPT = "Copy exactly: 'café 😀 crème 🎉 brûlée 🍨 naïve 😀'"
"""Greedy SmolLM2 answers with emoji (4 UTF-8 bytes, several tokens each) and accented
letters within its first 40 tokens."""
MAX_TOKENS = 40
SEED = 1234
SLOT = 0
STOP = "e 🍨"
"""A stop sequence in the reference text spanning three tokens, one of them split."""
TIMEOUT_S = 60.0


@dataclass
class JournalSink:
    """The adapter's TokenSink, journaling the way a session's leg does."""

    journal: StreamJournal
    batches: list[list[str]] = field(default_factory=list)
    """Released pieces, grouped as they arrived together (one group per ``on_batch``)."""
    done: asyncio.Future[Finished] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    duplicates: int = 0
    _batch: list[str] = field(default_factory=list)

    def on_token(self, position: int, token_id: int, piece: str) -> None:
        if not self.journal.append(position, token_id, piece):
            self.duplicates += 1
        elif piece:
            self._batch.append(piece)

    def on_batch(self) -> None:
        if self._batch:
            self.batches.append(self._batch)
            self._batch = []

    def on_finish(self, finished: Finished) -> None:
        self.on_batch()
        if not self.done.done():
            self.done.set_result(finished)

    def on_error(self, error: AlbatrossError) -> None:
        if not self.done.done():
            self.done.set_exception(error)


@dataclass(frozen=True)
class Run:
    ids: tuple[int, ...]
    pieces: tuple[str, ...]
    finish: FinishReason
    prompt_n: int | None
    batches: tuple[tuple[str, ...], ...]
    """What the continuing generation released, batch by batch."""
    duplicates: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _params(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=SEED, temperature=0.0)


PROMPT_KV = "prompt.bin"
"""Slot file holding the KV cache of the prompt alone (saved once per server)."""


async def _continue(url: str, journal: StreamJournal, *, from_scratch: bool) -> Run:
    """Generate ``journal``'s continuation into ``journal``; every emitted id is
    re-prefilled.

    ``from_scratch``: the slot is erased, so prompt + emitted ids are evaluated in one
    go, as on a replica that never saw the request. Otherwise the slot first gets the
    prompt's KV cache back from a file and only the emitted ids are evaluated: half
    the cost, and the same numbers where prompts are evaluated one token at a time.
    """
    setup = LlamaServerClient(url)
    try:
        if from_scratch:
            await setup.erase_slot(SLOT)
        else:
            await setup.restore_slot(SLOT, PROMPT_KV)
    finally:
        setup.close()
    client = LlamaServerClient(url)
    try:
        sink = JournalSink(journal)
        gen = await client.generate(journal.continuation(), sink, SLOT)
        try:
            async with asyncio.timeout(TIMEOUT_S):
                finished = await sink.done
        finally:
            gen.cancel()
    finally:
        client.close()
    reason = FinishReason.LENGTH if finished.stop_type == "limit" else FinishReason.STOP
    journal.finish(reason)
    return Run(
        tuple(journal.ids),
        tuple(journal.pieces),
        reason,
        finished.prompt_n,
        tuple(tuple(b) for b in sink.batches),
        sink.duplicates,
    )


def _cut_journal(server: Server, reference: Run, k: int) -> StreamJournal:
    """A journal that saw the reference's first ``k`` tokens, rewound to its frontier."""
    j = StreamJournal(f"cut{k}", server.prompt_ids, _params())
    for pos in range(k):
        assert j.append(pos, reference.ids[pos], reference.pieces[pos])
    j.rewind_to_frontier()
    return j


async def _cut_run(server: Server, reference: Run, k: int) -> tuple[Run, int]:
    """The run continued after a cut at ``k``, and the position it resumed at."""
    j = _cut_journal(server, reference, k)
    start = j.frontier
    if j.continuation().max_tokens == 0:
        # Every token was released: nothing is left to continue.
        j.finish(reference.finish)
        return Run(tuple(j.ids), tuple(j.pieces), reference.finish, None, (), 0), start
    return await _continue(server.url, j, from_scratch=server.from_scratch), start


def _mismatch(reference: Run, run: Run) -> str | None:
    if run.ids == reference.ids and run.text.encode() == reference.text.encode():
        return None if run.finish is reference.finish else f"finish {run.finish}"
    first = next(
        (i for i, (a, b) in enumerate(zip(run.ids, reference.ids, strict=False)) if a != b),
        min(len(run.ids), len(reference.ids)),
    )
    return f"first differing position {first}: {run.text!r}"


@dataclass(frozen=True)
class Server:
    url: str
    prompt_ids: tuple[int, ...]
    from_scratch: bool
    """How continuations prefill (see :func:`_continue`)."""


def _start(binary: Path, d: Path, extra: tuple[str, ...]) -> contextlib.AbstractContextManager[str]:
    return running_llama_server(
        binary,
        embedded_model_path(),
        parallel=2,
        ctx=2048,
        log_path=d / "llama-server.log",
        # Slot actions (erase, to force a full re-prefill) need a save path.
        extra_args=("--slot-save-path", str(d), *extra),
    )


def _serve(
    binary: Path, d: Path, extra: tuple[str, ...], from_scratch: bool
) -> Iterator[tuple[Server, Run]]:
    """A server and the uninterrupted reference run on it."""
    with _start(binary, d, extra) as url:

        async def setup() -> tuple[Server, Run]:
            c = LlamaServerClient(url)
            try:
                ids = await c.prompt_ids_for_chat((ChatMessage("user", PROMPT),))
            finally:
                c.close()
            c = LlamaServerClient(url)
            try:
                await c.erase_slot(SLOT)
                await c.prefill(ids, SLOT)
                assert await c.save_slot(SLOT, PROMPT_KV) == len(ids)
            finally:
                c.close()
            server = Server(url, ids, from_scratch)
            ref = StreamJournal("ref", ids, _params())
            return server, await _continue(url, ref, from_scratch=from_scratch)

        yield asyncio.run(setup())


@pytest.fixture(scope="module")
def exact(
    llama_server_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Run]]:
    """Prompts evaluated one token at a time (``-ub 1``): numerically like decoding.

    (A full re-prefill at every cut was checked exact here too; restoring the prompt's
    cache, computed the same way, keeps this module fast.)"""
    d = tmp_path_factory.mktemp("exact-ub1")
    # -ub 1 is the part of numerics = "exact" (runtime/app.py EXACT_NUMERICS) that makes a
    # re-prefill compute like decoding; the rest removes batch-dependence between
    # concurrent sequences, which a single stream does not have.
    yield from _serve(llama_server_bin, d, ("-ub", "1"), from_scratch=False)


@pytest.fixture(scope="module")
def product(
    llama_server_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Run]]:
    """The flags managed replicas run with (``runtime/app.py``: default batch sizes)."""
    d = tmp_path_factory.mktemp("exact-product")
    yield from _serve(llama_server_bin, d, (), from_scratch=True)


@pytest.fixture(scope="module")
def cuts(exact: tuple[Server, Run]) -> dict[int, tuple[Run, int]]:
    """For every k in 0..N: the run continued after a cut at k, and where it resumed."""
    server, reference = exact

    async def all_cuts() -> dict[int, tuple[Run, int]]:
        return {k: await _cut_run(server, reference, k) for k in range(len(reference.ids) + 1)}

    return asyncio.run(all_cuts())


def test_reference_has_multibyte_characters_split_across_tokens(
    exact: tuple[Server, Run], product: tuple[Server, Run]
) -> None:
    for _, reference in (exact, product):
        text = reference.text
        assert len(reference.ids) == MAX_TOKENS, reference
        assert reference.finish is FinishReason.LENGTH
        assert any(ord(c) > 0xFFFF for c in text), f"no emoji in {text!r}"
        assert any(0xC0 <= ord(c) <= 0x24F for c in text), f"no accented letter in {text!r}"
        assert "" in reference.pieces, f"no token released empty text: {reference.pieces}"
        assert STOP in text, f"stop {STOP!r} not in {text!r}"
        assert reference.duplicates == 0


def test_continuation_from_every_cut_is_token_and_byte_identical(
    exact: tuple[Server, Run], cuts: dict[int, tuple[Run, int]]
) -> None:
    _, reference = exact
    assert len(cuts) == len(reference.ids) + 1
    wrong = []
    for k, (run, start) in cuts.items():
        assert run.duplicates == 0, f"cut {k}: duplicates from a fresh continuation"
        why = _mismatch(reference, run)
        if why is not None:
            wrong.append(f"cut {k} (resumed at {start}): {why}")
    assert not wrong, "continuations differ from the reference:\n" + "\n".join(wrong)


def test_cuts_inside_a_split_character_resume_at_its_first_token(
    exact: tuple[Server, Run], cuts: dict[int, tuple[Run, int]]
) -> None:
    _, reference = exact
    frontier = 0
    resumed_early = 0
    for k in range(len(reference.ids) + 1):
        _, start = cuts[k]
        assert start == frontier, f"cut {k} resumed at {start}, expected {frontier}"
        resumed_early += start < k
        if k < len(reference.pieces) and reference.pieces[k]:
            frontier = k + 1
    assert resumed_early > 0, "no cut fell inside a split character"
    # Each continuation re-prefilled every emitted id (its slot held the prompt only;
    # with nothing emitted the engine evaluates the prompt's last token again).
    for k, (run, start) in cuts.items():
        if run.prompt_n is not None:
            assert run.prompt_n == max(start, 1), (k, run.prompt_n, start)


def _stopped(pieces: list[str]) -> str:
    m = StopMatcher((STOP,))
    out = "".join(m.feed(p) for p in pieces)
    assert m.stopped, f"{STOP!r} not found feeding {pieces!r}"
    return out + m.flush()


def test_stop_sequence_spanning_every_cut_gives_the_reference_text(
    exact: tuple[Server, Run], cuts: dict[int, tuple[Run, int]]
) -> None:
    _, reference = exact
    expected = reference.text[: reference.text.index(STOP)]
    # The reference path: text fed as the engine delivered it, batch by batch, and
    # token by token.
    assert _stopped(["".join(b) for b in reference.batches]) == expected
    assert _stopped(list(reference.pieces)) == expected
    spanning = 0
    for k, (run, start) in cuts.items():
        before = [p for p in run.pieces[:start] if p]
        after = ["".join(b) for b in run.batches]
        spanning += 0 < len("".join(before)) - len(expected) + len(STOP) < len(STOP)
        # As a session sees a continued stream: the text sent before the cut, then
        # what the continuing replica released, batch by batch.
        assert _stopped(before + after) == expected, f"cut {k}"
        # As a resumed client's matcher sees it: everything up to the cut at once.
        assert _stopped(["".join(before), *after]) == expected, f"cut {k} (one piece)"
    assert spanning > 0, "no cut fell inside the stop sequence"


@pytest.mark.xfail(
    strict=True,
    reason="engine limit, accepted by numerics = 'fast' (the default): with llama-server's "
    "default flags (-ub 512) a re-prefill evaluates prompt + emitted ids in one batch, whose "
    "KV cache differs in the last bits from the one decoding built, and greedy near-ties "
    "flip (7 of 41 cuts here); numerics = 'exact' (-ub 1 ...) is exact, see above",
)
def test_continuation_with_the_replica_flags_is_exact(product: tuple[Server, Run]) -> None:
    server, reference = product

    async def first_wrong() -> str | None:
        # Stops at the first cut that differs, from the end: the bug shows at several,
        # most of them late in the stream, and late cuts have little left to decode.
        for k in range(len(reference.ids), -1, -1):
            run, start = await _cut_run(server, reference, k)
            why = _mismatch(reference, run)
            if why is not None:
                return f"cut {k} (resumed at {start}): {why}"
        return None

    assert asyncio.run(first_wrong()) is None


def test_call_right_after_a_generation_succeeds(product: tuple[Server, Run]) -> None:
    """A control call issued right after a generation finished must not fail because
    the pool handed it the connection the engine is closing: llama-server closes its
    connection after a streamed response although it announced keep-alive (this
    failed about one call in two before ``EngineConnection.usable``)."""
    server, _ = product

    async def failures() -> list[str]:
        client = LlamaServerClient(server.url)
        out = []
        try:
            for i in range(20):
                j = StreamJournal(f"ka{i}", server.prompt_ids, _params(2))
                sink = JournalSink(j)
                await client.generate(j.continuation(), sink)
                async with asyncio.timeout(TIMEOUT_S):
                    await sink.done
                try:
                    await client.prompt_ids_for_text("hello")
                except EngineError as exc:
                    out.append(f"call {i}: {exc.message}")
        finally:
            client.close()
        return out

    assert asyncio.run(failures()) == []
