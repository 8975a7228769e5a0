"""What every engine adapter offers, behind one small interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from albatross.core.errors import AlbatrossError
from albatross.core.journal import Continuation
from albatross.core.requests import ChatMessage


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an engine can do, so policies can choose without asking it."""

    token_id_prompts: bool
    """Accepts a prompt as token ids (required for exact continuation)."""
    slot_save_restore: bool
    """Can save a sequence's KV cache to a file and restore it on another process."""
    router_mode: bool
    """One server process can load and unload several models on demand."""
    held_token_ids: bool
    """Reports the ids of tokens whose UTF-8 bytes it holds back (patched build)."""


@dataclass(frozen=True, slots=True)
class Finished:
    """How a generation ended on the engine."""

    stop_type: str
    """``eos``, ``limit`` or ``word`` (llama-server's names)."""
    prompt_n: int | None
    """Prompt tokens the engine evaluated (1 after a KV restore, all on re-prefill)."""


class TokenSink(Protocol):
    """Receives a generation's output; called from the event loop, never awaited.

    ``on_token`` is called for every token in order; ``on_batch`` once after each
    group of tokens that arrived together (the place to write to the client once).
    Exactly one of ``on_finish`` / ``on_error`` ends the generation.
    """

    def on_token(self, position: int, token_id: int, piece: str) -> None: ...

    def on_batch(self) -> None: ...

    def on_finish(self, finished: Finished) -> None: ...

    def on_error(self, error: AlbatrossError) -> None: ...


class Generation(Protocol):
    """A running generation; ``cancel`` stops it on the engine (closes the connection)."""

    def cancel(self) -> None: ...

    def pause(self) -> None:
        """Stop reading from the engine (client back-pressure)."""

    def resume(self) -> None: ...


class EngineClient(Protocol):
    """One engine replica, reached over HTTP."""

    base_url: str
    capabilities: Capabilities

    def close(self) -> None:
        """Drop idle connections (the replica went away or was replaced)."""

    async def health(self) -> bool: ...

    async def prompt_ids_for_chat(self, messages: tuple[ChatMessage, ...]) -> tuple[int, ...]: ...

    async def prompt_ids_for_text(self, text: str) -> tuple[int, ...]: ...

    async def generate(
        self, cont: Continuation, sink: TokenSink, slot: int | None = None
    ) -> Generation:
        """Start generating (pinned to ``slot`` if given); returns once the request is
        sent. Raises :class:`EngineError`."""
        ...

    async def total_slots(self) -> int: ...

    async def save_slot(self, slot: int, filename: str) -> int: ...

    async def restore_slot(self, slot: int, filename: str) -> int: ...

    async def prefill(self, prompt_ids: tuple[int, ...], slot: int) -> int: ...
