"""Stop sequences, matched by the gateway on released text.

Engines are not told the stop sequences: a stop sequence can span tokens, and so it
can span a move to another replica, which only the gateway sees whole. The matcher
holds back the longest tail that could still become a stop sequence and releases it
once it cannot; the stop sequence itself is never sent (OpenAI semantics).
"""

from __future__ import annotations


class StopMatcher:
    """Incremental stop-sequence matcher over a stream of text pieces."""

    __slots__ = ("_held", "_max_hold", "stopped", "stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._held = ""
        self.stopped = False

    @property
    def held(self) -> str:
        """Text received but not yet safe to send."""
        return self._held

    def feed(self, text: str) -> str:
        """Add released text; return what may be sent now.

        After a stop sequence is found, ``stopped`` is True, the text before it is
        returned, and later calls return "".
        """
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        # Generation stops where a stop sequence is first complete: the match that
        # *ends* first (ties: the longer one). Choosing the earliest start instead
        # would make the output depend on how the text was split into pieces.
        best: tuple[int, int] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        if best is not None:
            cut = best[1]
            self.stopped = True
            self._held = ""
            return buf[:cut]
        hold = 0
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                hold = k
                break
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """The stream ended without a stop sequence: release what was held."""
        out, self._held = self._held, ""
        return "" if self.stopped else out
