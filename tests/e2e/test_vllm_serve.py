"""``albatross serve`` with one model on vLLM, used through the official ``openai`` client.

One serve process (one vLLM replica on the tiny Hugging Face model, about 30 s to start)
is shared by the module. Skipped when the vLLM venv is not installed
(``python -m albatross.engines.vllm_install``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_support import MODEL, Served, start_serve, toml_str
from openai import OpenAI

from albatross.engines.vllm_install import installed_python
from albatross.testing.llama import free_port
from albatross.testing.tinymodel import make_tiny_hf_model

pytestmark = [pytest.mark.e2e, pytest.mark.engine, pytest.mark.vllm]

MESSAGES = [{"role": "user", "content": "Tell me about the albatross."}]
GREEDY = {"temperature": 0.0, "seed": 1234, "extra_body": {"top_k": 1}}
START_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def vllm_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if installed_python() is None:
        pytest.skip("vLLM is not installed: python -m albatross.engines.vllm_install")
    d = tmp_path_factory.mktemp("albatross-vllm")
    model = make_tiny_hf_model(d)
    cfg = d / "albatross.toml"
    cfg.write_text(
        "\n".join(
            [
                "[gateway]",
                'host = "127.0.0.1"',
                f"port = {free_port()}",
                "[supervisor]",
                f"log_dir = {toml_str(d / 'logs')}",
                f"ready_timeout_s = {START_TIMEOUT_S}",
                "[[models]]",
                f"name = {toml_str(MODEL)}",
                'engine = "vllm"',
                f"path = {toml_str(model)}",
                "replicas = 1",
                "parallel = 4",
                "ctx_size = 1024",
            ]
        )
        + "\n"
    )
    served = start_serve(cfg, d / "serve.log", timeout=START_TIMEOUT_S)
    try:
        yield served
    finally:
        code = served.stop(timeout=60.0)
        assert code == 0, f"albatross serve exited with {code} on SIGINT:\n{served.log()}"


@pytest.fixture
def client(vllm_gateway: Served) -> Iterator[OpenAI]:
    with OpenAI(base_url=vllm_gateway.url + "/v1", api_key="x", max_retries=0, timeout=60.0) as c:
        yield c


def test_streamed_chat_equals_non_streamed_chat(client: OpenAI) -> None:
    kw = {"model": MODEL, "messages": MESSAGES, "max_tokens": 40, **GREEDY}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason] == ["length"]
    assert whole.usage is not None and whole.usage.completion_tokens == 40


def test_the_model_is_served_by_a_vllm_replica(client: OpenAI, vllm_gateway: Served) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    replica = vllm_gateway.replicas()[f"{MODEL}/0"]
    assert "vllm.entrypoints.openai.api_server" in replica.log_path.read_text(errors="replace")
