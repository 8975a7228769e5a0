"""The llama-server router adapter against a real llama-server in router mode.

Two tiny models with different random weights sit in one directory (the router names
them after their files: ``tiny-s0``, ``tiny-s1``), plus a file that is not a model. Each
model's greedy output through the router must equal what a plain llama-server on the
same file produces, so the router really sends each request to its own model. Load and
unload durations are not asserted (the machine is shared).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from albatross.core.errors import AlbatrossError, ClientError, EngineError, ModelNotFound
from albatross.core.journal import Continuation, SamplingParams
from albatross.engines.base import Finished
from albatross.engines.llama_router import LlamaRouterClient, RouterStatus
from albatross.engines.llama_server import LlamaServerClient
from albatross.testing.llama import (
    READY_TIMEOUT_S,
    LlamaServerStartError,
    _stop,
    free_port,
    healthy,
    log_tail,
)
from albatross.testing.tinymodel import make_tiny_model

pytestmark = pytest.mark.engine

N_TOKENS = 12
SETTLE_S = 60.0
"""Upper bound for waiting on a state change (not a timing assertion)."""


@contextmanager
def running_router(binary: Path, models_dir: Path, *extra: str) -> Iterator[str]:
    """A llama-server router on ``models_dir``; yields its URL once healthy, stops it after."""
    port = free_port()
    fd, name = tempfile.mkstemp(prefix=f"llama-router-{port}-", suffix=".log")
    os.close(fd)
    log = Path(name)
    args = [
        str(binary), "--host", "127.0.0.1", "--port", str(port), "--models-dir", str(models_dir),
        "--no-models-autoload", "--models-max", "0", "-np", "2", "-c", "1024", "-t", "1", *extra,
    ]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LlamaServerStartError(f"router did not start; log {log}:\n{log_tail(log)}")
            time.sleep(0.05)
        yield url
    finally:
        _stop(proc)  # the whole process group: the router and its model children


@pytest.fixture(scope="module")
def models_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("router-models")
    (d / tiny_model.name).symlink_to(tiny_model)  # tiny-s0.gguf, the session's model
    make_tiny_model(d, seed=1)  # tiny-s1.gguf
    (d / "broken.gguf").write_bytes(b"GGUF but not really a model")
    return d


@pytest.fixture(scope="module")
def router_url(llama_server_bin: Path, models_dir: Path) -> Iterator[str]:
    with running_router(llama_server_bin, models_dir) as url:
        yield url


@pytest.fixture
async def router(router_url: str) -> AsyncIterator[LlamaRouterClient]:
    r = LlamaRouterClient(router_url)
    yield r
    for m in await r.models():  # leave every model unloaded for the next test
        if m.status is not RouterStatus.UNLOADED:
            await r.unload(m.name)
    r.close()


@dataclass
class Collect:
    tokens: list[int] = field(default_factory=list)
    done: asyncio.Future[Finished | AlbatrossError] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def on_token(self, position: int, token_id: int, piece: str) -> None:
        assert position == len(self.tokens)
        self.tokens.append(token_id)

    def on_batch(self) -> None:
        pass

    def on_finish(self, finished: Finished) -> None:
        self.done.set_result(finished)

    def on_error(self, error: AlbatrossError) -> None:
        self.done.set_result(error)


async def greedy(client: LlamaServerClient, text: str = "The albatross glides") -> list[int]:
    """``N_TOKENS`` greedy tokens after ``text``; raises the engine's error."""
    prompt = await client.prompt_ids_for_text(text)
    params = SamplingParams(max_tokens=N_TOKENS, seed=7, temperature=0.0)
    sink = Collect()
    await client.generate(Continuation(prompt, 0, N_TOKENS, 7, params), sink)
    result = await asyncio.wait_for(sink.done, SETTLE_S)
    if isinstance(result, AlbatrossError):
        raise result
    assert result.stop_type == "limit"
    return sink.tokens


async def test_lists_every_model_file_by_name(router: LlamaRouterClient) -> None:
    assert await router.health()
    listed = {m.name: m for m in await router.models()}
    assert set(listed) == {"tiny-s0", "tiny-s1", "broken"}
    assert all(m.status is RouterStatus.UNLOADED and not m.serving for m in listed.values())


async def test_each_model_answers_with_its_own_greedy_output(
    router: LlamaRouterClient, llama_url: str
) -> None:
    plain = LlamaServerClient(llama_url)  # a single llama-server on tiny-s0's file
    try:
        reference_s0 = await greedy(plain)
    finally:
        plain.close()
    await router.load("tiny-s0")
    await router.load("tiny-s1")
    assert {m.name for m in await router.models() if m.status is RouterStatus.LOADED} == {
        "tiny-s0",
        "tiny-s1",
    }
    s0, s1 = router.model_client("tiny-s0"), router.model_client("tiny-s1")
    assert await s0.health() and await s1.health()
    assert await s0.total_slots() == 2
    out_s0 = await greedy(s0)
    out_s1 = await greedy(s1)
    assert out_s0 == reference_s0
    assert len(out_s1) == N_TOKENS and out_s1 != out_s0
    assert await greedy(s1) == out_s1  # deterministic
    assert await greedy(s0) == reference_s0  # and still its own after the other ran


async def test_unload_frees_the_model_and_requests_are_then_refused(
    router: LlamaRouterClient,
) -> None:
    await router.load("tiny-s1")
    await router.load("tiny-s1")  # already loaded: nothing to do
    client = router.model_client("tiny-s1")
    before = await greedy(client)
    await router.unload("tiny-s1")
    assert (await router.model("tiny-s1")).status is RouterStatus.UNLOADED
    assert not await client.health()
    with pytest.raises(ClientError, match="model is not loaded"):
        await client.prompt_ids_for_text("hello")
    await router.unload("tiny-s1")  # not loaded: nothing to do
    await router.load("tiny-s1")  # a fresh child answers the same
    assert await greedy(client) == before


async def test_an_unknown_model_is_a_404(router: LlamaRouterClient) -> None:
    with pytest.raises(ModelNotFound, match="'nope' does not exist; available: ") as e:
        await router.load("nope")
    assert e.value.status == 404
    with pytest.raises(ModelNotFound):
        await router.unload("nope")


async def test_a_model_whose_process_fails_to_load_is_an_engine_error(
    router: LlamaRouterClient,
) -> None:
    with pytest.raises(EngineError, match="could not load model 'broken': exit code"):
        await router.load("broken")
    m = await router.model("broken")
    assert m.status is RouterStatus.UNLOADED and m.failed


async def test_idle_sleep_is_reported_and_a_wake_restores_the_model(
    llama_server_bin: Path, models_dir: Path
) -> None:
    with running_router(llama_server_bin, models_dir, "--sleep-idle-seconds", "1") as url:
        router = LlamaRouterClient(url)
        try:
            await router.load("tiny-s0")
            client = router.model_client("tiny-s0")
            before = await greedy(client)
            async with asyncio.timeout(SETTLE_S):
                while True:  # the router polls its children's idleness
                    if await router.is_sleeping("tiny-s0"):
                        break
                    await asyncio.sleep(0.2)
            assert (await router.model("tiny-s0")).status is RouterStatus.SLEEPING
            assert await client.health()  # sleeping still serves: it wakes on a request
            await router.wake("tiny-s0")
            assert not await router.is_sleeping("tiny-s0")
            assert await greedy(client) == before
            with pytest.raises(EngineError, match="no running model 'tiny-s1'"):
                await router.is_sleeping("tiny-s1")
        finally:
            router.close()
