"""The stream journal: rules 1-4 of ``albatross.core.journal`` and its exactness property.

The exactness property runs a deterministic fake engine (greedy decoding: a pure
function of the prefix) that releases text the way llama-server does: a token whose
bytes leave an incomplete UTF-8 character at the end releases "", and the next token
that completes the text releases the bytes of all tokens held so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from albatross.core.journal import (
    Continuation,
    FinishReason,
    JournalClosed,
    JournalGap,
    SamplingParams,
    StreamJournal,
    derive_seed,
)

PROMPT = (1, 2, 3)


def journal(
    max_tokens: int = 16, seed: int = 42, prompt: tuple[int, ...] = PROMPT
) -> StreamJournal:
    return StreamJournal(
        "req-1", prompt, SamplingParams(max_tokens=max_tokens, seed=seed, temperature=0.0)
    )


def snapshot(j: StreamJournal) -> tuple[object, ...]:
    return (
        list(j.ids),
        list(j.pieces),
        j.frontier,
        j.finish_reason,
        len(j),
        j.prompt_ids,
        j.params,
    )


# ---- rule 1: dense positions, duplicates dropped, gaps refused --------------------------


def test_append_at_len_is_accepted() -> None:
    j = journal()
    assert j.append(0, 10, "a") is True
    assert j.append(1, 11, "b") is True
    assert j.ids == [10, 11]
    assert j.pieces == ["a", "b"]
    assert len(j) == 2
    assert j.text() == "ab"


def test_duplicate_is_dropped_and_changes_nothing() -> None:
    j = journal()
    j.append(0, 10, "a")
    j.append(1, 11, "b")
    before = snapshot(j)
    assert j.append(0, 99, "zz") is False
    assert j.append(1, 11, "b") is False
    assert snapshot(j) == before


def test_gap_raises_and_leaves_journal_unchanged() -> None:
    j = journal()
    j.append(0, 10, "a")
    before = snapshot(j)
    with pytest.raises(JournalGap):
        j.append(2, 12, "c")
    assert snapshot(j) == before
    # The journal still accepts the right position afterwards.
    assert j.append(1, 11, "b") is True


def test_gap_on_empty_journal() -> None:
    j = journal()
    with pytest.raises(JournalGap):
        j.append(1, 10, "a")
    assert snapshot(j) == snapshot(journal())


def test_text_slices() -> None:
    j = journal()
    for p, piece in enumerate(["a", "", "bc", "d"]):
        j.append(p, 100 + p, piece)
    assert j.text() == "abcd"
    assert j.text(2) == "bcd"
    assert j.text(1, 3) == "bc"
    assert j.text(0, 0) == ""


# ---- rule 2: nothing after finish ----------------------------------------------------


def test_append_after_finish_raises_and_changes_nothing() -> None:
    j = journal()
    j.append(0, 10, "a")
    j.finish(FinishReason.STOP)
    before = snapshot(j)
    with pytest.raises(JournalClosed):
        j.append(1, 11, "b")
    # Even a duplicate position is refused once finished.
    with pytest.raises(JournalClosed):
        j.append(0, 10, "a")
    assert snapshot(j) == before
    assert j.finished


def test_finish_is_idempotent_for_the_same_reason() -> None:
    j = journal()
    assert not j.finished
    j.finish(FinishReason.LENGTH)
    j.finish(FinishReason.LENGTH)
    assert j.finish_reason is FinishReason.LENGTH


def test_finish_with_another_reason_raises_and_keeps_the_first() -> None:
    j = journal()
    j.finish(FinishReason.STOP)
    with pytest.raises(JournalClosed):
        j.finish(FinishReason.LENGTH)
    assert j.finish_reason is FinishReason.STOP


def test_rewind_after_finish_raises_and_changes_nothing() -> None:
    j = journal()
    j.append(0, 10, "a")
    j.append(1, 11, "")
    j.finish(FinishReason.STOP)
    before = snapshot(j)
    with pytest.raises(JournalClosed):
        j.rewind_to_frontier()
    assert snapshot(j) == before


# ---- rule 3: the frontier ------------------------------------------------------------


def test_frontier_is_one_past_the_last_token_that_released_text() -> None:
    j = journal()
    assert j.frontier == 0
    j.append(0, 10, "")  # held bytes
    assert j.frontier == 0
    j.append(1, 11, "é")  # releases the bytes of tokens 0 and 1
    assert j.frontier == 2
    j.append(2, 12, "")
    j.append(3, 13, "")
    assert j.frontier == 2
    assert len(j) == 4
    j.append(4, 14, "x")
    assert j.frontier == 5


def test_rewind_drops_only_the_provisional_tail() -> None:
    j = journal()
    for p, piece in enumerate(["a", "b", "", ""]):
        j.append(p, 10 + p, piece)
    assert j.rewind_to_frontier() == 2
    assert j.ids == [10, 11]
    assert j.pieces == ["a", "b"]
    assert j.frontier == 2
    assert j.rewind_to_frontier() == 0
    # After a rewind the dropped positions are accepted again (not as duplicates).
    assert j.append(2, 20, "c") is True
    assert j.text() == "abc"


# ---- rule 4: the continuation --------------------------------------------------------


def test_continuation_from_start_is_the_original_request() -> None:
    j = journal(max_tokens=10, seed=1234)
    c = j.continuation()
    assert c == Continuation(prompt_ids=PROMPT, start=0, max_tokens=10, seed=1234, params=j.params)


def test_continuation_after_tokens() -> None:
    j = journal(max_tokens=10, seed=1234)
    for p, piece in enumerate(["a", "", "bc"]):
        j.append(p, 10 + p, piece)
    c = j.continuation()
    assert c.prompt_ids == (*PROMPT, 10, 11, 12)
    assert c.start == 3
    assert c.max_tokens == 7
    assert c.seed == derive_seed(1234, 3)
    assert c.params is j.params


def test_continuation_with_provisional_tail_raises_and_changes_nothing() -> None:
    j = journal()
    j.append(0, 10, "a")
    j.append(1, 11, "")
    before = snapshot(j)
    with pytest.raises(ValueError):
        j.continuation()
    assert snapshot(j) == before
    j.rewind_to_frontier()
    assert j.continuation().start == 1


def test_derive_seed_examples() -> None:
    assert derive_seed(7, 0) == 7
    assert derive_seed(7, 1) != derive_seed(7, 2)
    assert derive_seed(7, 1) != derive_seed(8, 1)
    assert derive_seed(7, 5) == derive_seed(7, 5)


@given(st.integers(0, 2**32 - 1), st.integers(0, 10**6))
def test_derive_seed_range_and_identity(seed: int, position: int) -> None:
    assert derive_seed(seed, 0) == seed
    d = derive_seed(seed, position)
    assert 0 <= d < 2**32
    assert d == derive_seed(seed, position)


# ---- property (a): in-order feed with re-sent duplicates ------------------------------


@st.composite
def feeds(draw: st.DrawFn) -> tuple[list[tuple[int, str]], list[tuple[int, int, str]]]:
    """A token sequence and a delivery order: in order, with random earlier positions re-sent."""
    tokens = draw(st.lists(st.tuples(st.integers(0, 50_000), st.text(max_size=3)), max_size=40))
    deliveries: list[tuple[int, int, str]] = []
    for p, (tid, piece) in enumerate(tokens):
        if p:
            for q in draw(st.lists(st.integers(0, p - 1), max_size=3)):
                # A re-sent duplicate may even carry different content: it is dropped.
                deliveries.append((q, draw(st.sampled_from([tokens[q][0], -1])), "dup"))
        deliveries.append((p, tid, piece))
    return tokens, deliveries


@given(feeds())
def test_in_order_feed_with_duplicates_yields_exactly_the_sequence(
    case: tuple[list[tuple[int, str]], list[tuple[int, int, str]]],
) -> None:
    tokens, deliveries = case
    j = journal(max_tokens=len(tokens) + 1)
    accepted = 0
    for p, tid, piece in deliveries:
        was_new = p == len(j)
        assert j.append(p, tid, piece) is was_new
        accepted += was_new
    assert accepted == len(tokens)
    assert j.ids == [t for t, _ in tokens]
    assert j.pieces == [s for _, s in tokens]
    assert j.text() == "".join(s for _, s in tokens)


# ---- property (b): continuing from any position reproduces the rest --------------------

# Words of the fake vocabulary; each word is a list of token byte strings whose
# concatenation is valid UTF-8, and each token id belongs to exactly one word, so the
# engine knows from the last id whether it is inside a word.
WORDS: list[list[bytes]] = [
    [b"a"],
    [b" b"],
    [b'"\n'],
    [b"\xc3", b"\xa9"],  # é split in two
    [b"\xe2\x82", b"\xacx"],  # € then x, released together
    [b"\xf0", b"\x9f\x98", b"\x80"],  # 😀 in three
    [b"\xc3", b"\xa9\xc3", b"\xa9"],  # éé: the middle token ends one char and starts the next
    [b""],  # a token with no text at all
]
VOCAB: dict[int, tuple[int, int]] = {}  # token id -> (word, index in word)
FIRST: list[int] = []
_tid = 0
for _w, _parts in enumerate(WORDS):
    for _i in range(len(_parts)):
        VOCAB[_tid] = (_w, _i)
        if _i == 0:
            FIRST.append(_tid)
        _tid += 1
TOKEN_BYTES = {t: WORDS[w][i] for t, (w, i) in VOCAB.items()}


@dataclass(frozen=True)
class FakeEngine:
    """Greedy decoding: the next token is a pure function of the prefix (prompt + generated)."""

    salt: int

    def next_id(self, prefix: tuple[int, ...]) -> int:
        if prefix and prefix[-1] in VOCAB:
            w, i = VOCAB[prefix[-1]]
            if i + 1 < len(WORDS[w]):
                return prefix[-1] + 1
        h = self.salt
        for t in prefix:
            h = (h * 1_000_003 + t + 1) % 2_147_483_647
        return FIRST[h % len(FIRST)]


@dataclass
class EngineRun:
    """One generation on one replica: holds bytes back like llama-server does."""

    engine: FakeEngine
    prefix: tuple[int, ...]
    held: bytes = b""
    out: list[tuple[int, str]] = field(default_factory=list)

    def step(self) -> tuple[int, str]:
        tid = self.engine.next_id(self.prefix)
        self.prefix += (tid,)
        self.held += TOKEN_BYTES[tid]
        try:
            piece = self.held.decode("utf-8")
        except UnicodeDecodeError:
            piece = ""  # an incomplete character: hold everything back
        else:
            self.held = b""
        return tid, piece


def uninterrupted(engine: FakeEngine, prompt: tuple[int, ...], n: int) -> tuple[list[int], str]:
    run = EngineRun(engine, prompt)
    steps = [run.step() for _ in range(n)]
    return [t for t, _ in steps], "".join(p for _, p in steps)


@settings(max_examples=300)
@given(
    salt=st.integers(0, 2**31),
    prompt=st.lists(st.integers(1000, 2000), min_size=1, max_size=5).map(tuple),
    max_tokens=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.floats(0, 1), max_size=4),
    resend=st.booleans(),
)
def test_continuing_from_any_position_reproduces_the_rest(
    salt: int,
    prompt: tuple[int, ...],
    max_tokens: int,
    seed: int,
    cuts: list[float],
    resend: bool,
) -> None:
    engine = FakeEngine(salt)
    want_ids, want_text = uninterrupted(engine, prompt, max_tokens)

    j = journal(max_tokens=max_tokens, seed=seed, prompt=prompt)
    cont = j.continuation()
    # Each cut interrupts the current replica after some of its tokens; the last run completes.
    for cut in [*cuts, None]:
        assert cont.start + cont.max_tokens == max_tokens
        assert cont.seed == derive_seed(seed, cont.start)
        assert cont.prompt_ids == prompt + tuple(j.ids)
        run = EngineRun(engine, cont.prompt_ids)
        n = cont.max_tokens if cut is None else int(cut * cont.max_tokens)
        for k in range(n):
            tid, piece = run.step()
            assert j.append(cont.start + k, tid, piece) is True
            if resend and k:
                assert j.append(cont.start + k - 1, tid, piece) is False
        if cut is None:
            break
        j.rewind_to_frontier()
        assert len(j) == j.frontier
        # What the client has seen so far is a prefix of the uninterrupted text.
        assert want_text.startswith(j.text())
        cont = j.continuation()

    j.finish(FinishReason.LENGTH)
    assert j.ids == want_ids
    assert j.text() == want_text
    assert len(j) == max_tokens
