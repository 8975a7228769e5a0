"""Stop-sequence matching on released text, split into arbitrary pieces.

Reference semantics: generation stops as soon as any stop sequence has appeared, so
the cut is at the start of the match that *ends* first (ties: the one that starts
first, i.e. the longer one). This is the only definition under which what the client
gets does not depend on how the text was split into pieces (token batches, network
reads, a move to another replica).
"""

from __future__ import annotations

import itertools

from hypothesis import assume, given
from hypothesis import strategies as st

from albatross.core.stops import StopMatcher


def first_stop(text: str, stops: list[str] | tuple[str, ...]) -> int | None:
    """Start of the match that ends first (ties: starts first); None if no stop occurs."""
    best: tuple[int, int] | None = None
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i != -1 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return None if best is None else best[1]


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, StopMatcher]:
    """Feed ``pieces``; check nothing comes out after the stop; return the output."""
    m = StopMatcher(stops)
    out = []
    for piece in pieces:
        was_stopped = m.stopped
        got = m.feed(piece)
        if was_stopped:
            assert got == ""
        out.append(got)
    tail = m.flush()
    if m.stopped:
        assert tail == ""
    out.append(tail)
    return "".join(out), m


@st.composite
def split(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


ALPHABET = "ab\n"
short_text = st.text(alphabet=ALPHABET, max_size=24)
stop_lists = st.lists(st.text(alphabet=ALPHABET, min_size=0, max_size=4), max_size=4)


def has_inner_stop(stops: list[str]) -> bool:
    """Some stop occurs strictly inside another (ending before it): see the split test below."""
    for a in stops:
        for b in stops:
            if a and b and len(b) < len(a):
                for i in range(1, len(a) - len(b)):
                    if a.startswith(b, i) and i + len(b) < len(a):
                        return True
    return False


@given(data=st.data(), text=short_text, stops=stop_lists)
def test_output_is_text_up_to_the_first_stop_for_any_split(
    data: st.DataObject, text: str, stops: list[str]
) -> None:
    assume(not has_inner_stop(stops))
    pieces = data.draw(split(text))
    out, m = run(tuple(stops), pieces)
    cut = first_stop(text, stops)
    if cut is None:
        assert out == text
        assert not m.stopped
    else:
        assert out == text[:cut]
        assert m.stopped
    assert m.held == ""


@given(data=st.data(), text=short_text, stops=stop_lists)
def test_output_is_always_a_prefix_before_any_stop(
    data: st.DataObject, text: str, stops: list[str]
) -> None:
    """Holds for every stop list, inner stops included."""
    pieces = data.draw(split(text))
    out, m = run(tuple(stops), pieces)
    assert text.startswith(out)
    assert m.stopped == (first_stop(text, stops) is not None)
    # No stop sequence is ever sent, and nothing past the earliest-ending one is.
    assert not any(s and s in out for s in stops)
    cut = first_stop(text, stops)
    assert len(out) <= (len(text) if cut is None else cut)


@given(
    before=st.text(alphabet="xy", max_size=10),
    stop=st.text(alphabet="ab", min_size=2, max_size=6),
    after=st.text(alphabet="xyab", max_size=10),
    data=st.data(),
)
def test_stop_spanning_pieces_is_found(
    before: str, stop: str, after: str, data: st.DataObject
) -> None:
    text = before + stop + after
    k = data.draw(st.integers(1, len(stop) - 1))
    a = len(before) + k
    pieces = [text[:a], text[a:]]  # the stop sequence straddles the boundary
    out, m = run((stop,), pieces)
    assert m.stopped
    assert out == before


def test_explicit_cases() -> None:
    assert run(("END",), ["hello E", "N", "D world"])[0] == "hello "
    assert run(("END",), ["hello EN", "X"])[0] == "hello ENX"
    assert run(("\n\n",), ["a\n", "\nb"])[0] == "a"
    assert run((), ["a", "b"])[0] == "ab"
    assert run(("",), ["a", "b"])[0] == "ab"  # empty stops are ignored
    assert run(("x", "yz"), ["ay", "zx"])[0] == "a"
    assert run(("stop",), [""])[0] == ""


def test_held_is_released_as_soon_as_it_cannot_match() -> None:
    m = StopMatcher(("abc",))
    assert m.feed("xab") == "x"
    assert m.held == "ab"
    assert m.feed("x") == "abx"
    assert m.held == ""
    assert m.feed("a") == ""
    assert m.flush() == "a"


def test_after_stop_everything_is_swallowed() -> None:
    m = StopMatcher(("b",))
    assert m.feed("aab") == "aa"
    assert m.stopped
    assert m.feed("more") == ""
    assert m.flush() == ""


def test_inner_stop_output_does_not_depend_on_the_split() -> None:
    stops = ("aba", "b")
    whole, _ = run(stops, ["aba"])
    pieces, _ = run(stops, ["ab", "a"])
    assert whole == pieces == "a"
