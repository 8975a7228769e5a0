"""Session fixtures shared by all test layers.

``llama_server_bin`` builds llama-server on first use (about 7 min on 2 cores) unless
it is cached; ``scripts/setup.sh`` builds it before the tests run, so in practice it is
a lookup. Markers belong in the test modules, not here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from albatross.config import LlamaServerConfig
from albatross.engines.llama_build import llama_server_binary
from albatross.testing.llama import running_llama_server
from albatross.testing.tinymodel import make_tiny_model


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The llama-server binary for the default configuration (built once, cached)."""
    return llama_server_binary(LlamaServerConfig())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama GGUF (seed 0), made once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("tinymodel"))


@pytest.fixture(scope="session")
def llama_url(
    llama_server_bin: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Base URL of a llama-server on ``tiny_model`` with 4 slots, shared by the session."""
    log = tmp_path_factory.mktemp("llama-server") / "llama-server.log"
    with running_llama_server(llama_server_bin, tiny_model, parallel=4, log_path=log) as url:
        yield url
