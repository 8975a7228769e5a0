"""The adapter for each engine kind: what the pool talks to a replica through."""

from __future__ import annotations

from typing import Literal

from albatross.engines.base import EngineClient
from albatross.engines.llama_server import LlamaServerClient
from albatross.engines.vllm import VllmClient

EngineKind = Literal["llama-server", "vllm"]


def engine_client(engine: EngineKind, base_url: str, slots: int | None = None) -> EngineClient:
    """A client for the replica at ``base_url`` running ``engine`` (``ModelConfig.engine``).

    ``slots``: sequences the replica runs at once, where the engine cannot tell (vLLM).
    """
    if engine == "vllm":
        return VllmClient(base_url, slots)
    return LlamaServerClient(base_url)
