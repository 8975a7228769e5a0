"""Fixtures for the end-to-end tests: ``albatross serve`` run as a process, as a user would.

``gateway`` is one serve process for the whole session (2 replicas of the tiny model, 4
slots each, 1024 tokens of context per slot); tests that stop, kill or misconfigure
serve start their own through ``serve_factory`` instead.

The tiny model decodes about 3000 tokens/s on one core: a 400-token stream is over in
0.15 s, before a test can do anything while it runs. Tests that need a generation to be
*in progress* for a while (concurrency, cancellation, Ctrl-C mid-stream) use
``slow_gateway``: the same kind of random model, made bigger (about 500 tokens/s), so
2000 tokens take about 4 s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import Served, start_serve, write_config

from albatross.testing.llama import free_port
from albatross.testing.tinymodel import make_tiny_model

StartServe = Callable[..., Served]


@pytest.fixture(scope="session")
def gateway(
    llama_server_bin: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """The shared ``albatross serve``: ``.url``, ``.proc``, ``.replicas()``, ``.log()``."""
    d = tmp_path_factory.mktemp("albatross-serve")
    cfg = write_config(
        d / "albatross.toml",
        binary=llama_server_bin,
        model_path=tiny_model,
        log_dir=d / "logs",
        port=free_port(),
    )
    served = start_serve(cfg, d / "serve.log")
    try:
        yield served
    finally:
        code = served.stop()
        assert code == 0, f"albatross serve exited with {code} on SIGINT:\n{served.log()}"


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model like ``tiny_model`` but about 6x slower to decode (40 MB)."""
    return make_tiny_model(
        tmp_path_factory.mktemp("slowmodel"), hidden=512, layers=4, ffn=1024, name="slow"
    )


SLOW_CTX = 2304
"""Context per slot of ``slow_gateway``: room for a 2000-token generation."""


@pytest.fixture(scope="session")
def slow_gateway(
    llama_server_bin: Path, slow_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """Like ``gateway`` (model name ``tiny`` too) but on ``slow_model``."""
    d = tmp_path_factory.mktemp("albatross-serve-slow")
    cfg = write_config(
        d / "albatross.toml",
        binary=llama_server_bin,
        model_path=slow_model,
        log_dir=d / "logs",
        port=free_port(),
        ctx_size=SLOW_CTX,
    )
    served = start_serve(cfg, d / "serve.log")
    try:
        yield served
    finally:
        code = served.stop()
        assert code == 0, f"albatross serve exited with {code} on SIGINT:\n{served.log()}"


@pytest.fixture
def serve_factory(llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> Iterator[StartServe]:
    """``start(**write_config_overrides) -> Served``: a private serve, stopped at teardown."""
    started: list[Served] = []

    def start(**overrides: object) -> Served:
        n = len(started)
        kwargs: dict[str, object] = {
            "binary": llama_server_bin,
            "model_path": tiny_model,
            "log_dir": tmp_path / f"logs{n}",
            "port": free_port(),
            **overrides,
        }
        cfg = write_config(tmp_path / f"albatross{n}.toml", **kwargs)
        served = start_serve(cfg, tmp_path / f"serve{n}.log")
        started.append(served)
        return served

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def http(gateway: Served) -> Iterator[httpx.Client]:
    """An httpx client on the shared gateway."""
    with httpx.Client(base_url=gateway.url, timeout=30.0) as c:
        yield c
