"""The gateway's vLLM adapter (:class:`VllmClient`) against a real vLLM server on CPU.

One server (about 30 s to start) on the tiny Hugging Face model is shared by the module.
Greedy decoding in float32 is deterministic, so a streamed generation must give exactly
the ids and text of a non-streamed one, and a continuation from a token-id prompt
(prompt + the first k emitted ids) exactly the rest.

Skipped when the vLLM venv is not installed (``python -m albatross.engines.vllm_install``).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator

import pytest

from albatross.core.errors import AlbatrossError, ClientError
from albatross.core.journal import Continuation, SamplingParams
from albatross.core.requests import ChatMessage
from albatross.engines.base import Finished
from albatross.engines.http_client import request_json
from albatross.engines.vllm import VllmClient, vllm_argv, vllm_env
from albatross.engines.vllm_install import installed_python
from albatross.testing.llama import free_port, healthy, log_tail
from albatross.testing.tinymodel import make_tiny_hf_model

pytestmark = [pytest.mark.engine, pytest.mark.vllm]

PROMPT = (1, 50, 60, 70, 80, 90)
LONG_PROMPT = (1, *((i * 37) % 500 + 5 for i in range(299)))
N = 48
SEED = 7
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
        python, model, port, dtype="float32", enforce_eager=True, sleep_mode=False, name="tiny",
        extra=("--enable-prompt-tokens-details",),
    )  # fmt: skip
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


class Collected:
    """A TokenSink that keeps everything it is given."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.ids: list[int] = []
        self.pieces: list[str] = []
        self.batches = 0
        self.done: asyncio.Future[Finished] = asyncio.get_running_loop().create_future()

    def on_token(self, position: int, token_id: int, piece: str) -> None:
        self.positions.append(position)
        self.ids.append(token_id)
        self.pieces.append(piece)

    def on_batch(self) -> None:
        self.batches += 1

    def on_finish(self, finished: Finished) -> None:
        self.done.set_result(finished)

    def on_error(self, error: AlbatrossError) -> None:
        self.done.set_exception(error)


def _greedy(prompt: tuple[int, ...], start: int, max_tokens: int) -> Continuation:
    params = SamplingParams(max_tokens=max_tokens, seed=SEED, temperature=0.0, top_k=1)
    return Continuation(prompt, start, max_tokens, SEED, params)


async def _stream(client: VllmClient, cont: Continuation) -> tuple[Collected, Finished]:
    sink = Collected()
    await client.generate(cont, sink)
    finished = await asyncio.wait_for(sink.done, 120)
    return sink, finished


def test_streamed_ids_and_text_equal_a_non_streamed_greedy_completion(vllm_url: str) -> None:
    async def go() -> tuple[Collected, Finished, object]:
        client = VllmClient(vllm_url)
        try:
            sink, finished = await _stream(client, _greedy(PROMPT, 0, N))
            body = {
                "prompt": list(PROMPT), "max_tokens": N, "temperature": 0.0, "top_k": 1,
                "seed": SEED, "return_token_ids": True,
            }  # fmt: skip
            status, whole = await request_json(client.pool, "POST", "/v1/completions", body)
            assert status == 200, whole
            return sink, finished, whole
        finally:
            client.close()

    sink, finished, whole = asyncio.run(go())
    assert isinstance(whole, dict)
    choice = whole["choices"][0]
    assert sink.ids == choice["token_ids"]
    assert "".join(sink.pieces) == choice["text"]
    assert sink.positions == list(range(N))
    assert sink.batches >= 1
    assert finished.stop_type == "limit"
    assert finished.prompt_n is not None and 0 < finished.prompt_n <= len(PROMPT)


def test_a_continuation_from_a_token_id_prompt_reproduces_the_rest(vllm_url: str) -> None:
    async def go() -> tuple[Collected, dict[int, Collected]]:
        client = VllmClient(vllm_url)
        try:
            full, _ = await _stream(client, _greedy(PROMPT, 0, N))
            rest: dict[int, Collected] = {}
            for k in (1, N // 3, N - 1):
                cont = _greedy(PROMPT + tuple(full.ids[:k]), k, N - k)
                rest[k], _ = await _stream(client, cont)
            return full, rest
        finally:
            client.close()

    full, rest = asyncio.run(go())
    for k, r in rest.items():
        assert r.ids == full.ids[k:], f"continued from {k}"
        assert r.positions == list(range(k, N))
        if full.pieces[k - 1]:  # no bytes held back at the cut: the text splits there too
            assert "".join(r.pieces) == "".join(full.pieces[k:]), f"continued from {k}"


def test_a_prefill_puts_the_prompt_in_the_prefix_cache(vllm_url: str) -> None:
    # A move's pre-warm: the generation after it evaluates only the tokens past the
    # cached blocks (whole blocks only: 256 tokens on CPU, 16 on GPUs).
    async def go() -> tuple[int, Collected, Finished]:
        client = VllmClient(vllm_url)
        try:
            evaluated = await client.prefill(LONG_PROMPT, 0)
            rest, finished = await _stream(client, _greedy(LONG_PROMPT, 0, 8))
            return evaluated, rest, finished
        finally:
            client.close()

    evaluated, rest, finished = asyncio.run(go())
    assert evaluated == len(LONG_PROMPT)  # not in the cache before
    assert len(rest.ids) == 8
    assert finished.prompt_n is not None and 0 < finished.prompt_n < len(LONG_PROMPT)


def test_chat_prompt_is_rendered_with_the_template_and_tokenized(vllm_url: str) -> None:
    async def go() -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        client = VllmClient(vllm_url)
        try:
            one = await client.prompt_ids_for_chat((ChatMessage("user", "hello there"),))
            two = await client.prompt_ids_for_chat(
                (ChatMessage("user", "hello there"), ChatMessage("assistant", "hi"))
            )
            text = await client.prompt_ids_for_text("hello there")
            return one, two, text
        finally:
            client.close()

    one, two, text = asyncio.run(go())
    assert one and two and text
    assert one != two
    assert len(one) > len(text)  # the template adds role markers around the content


def test_a_prompt_longer_than_the_context_is_the_requests_fault(vllm_url: str) -> None:
    async def go() -> None:
        client = VllmClient(vllm_url)
        try:
            assert await client.health()
            await _stream(client, _greedy((5,) * 5000, 0, 4))
        finally:
            client.close()

    with pytest.raises(ClientError, match="engine refused"):
        asyncio.run(go())
