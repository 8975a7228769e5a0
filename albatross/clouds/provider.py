"""Replacement providers: launch a fresh host when a spot host is being taken away.

A :class:`ReplacementProvider` is what the spot-lifecycle pillar calls once a preemption
notice has arrived: it starts one replacement host and reports where it is, and it can
terminate a host it started. Implementations exist per cloud (``AwsSpotProvider``) and,
optionally, for the local machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Lifecycle = Literal["spot", "on-demand"]


@dataclass(frozen=True, slots=True)
class LaunchedHost:
    """A host a provider started.

    ``address`` is the private address the engine will be reachable on, or ``None`` when
    the provider could not learn one.
    """

    host_id: str
    address: str | None
    lifecycle: Lifecycle
    instance_type: str


class ProviderError(Exception):
    """A provider could not launch or terminate a host; the message says which call failed."""


@runtime_checkable
class ReplacementProvider(Protocol):
    """Launches and terminates replacement hosts."""

    async def launch(self, reason: str) -> LaunchedHost:
        """Start one replacement host and wait until it is running."""
        ...

    async def terminate(self, host_id: str) -> None:
        """Terminate a host this provider launched."""
        ...
