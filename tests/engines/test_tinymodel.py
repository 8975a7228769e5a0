"""The tiny test model against the real llama-server: the contract later layers rely on.

Token-id prompts, greedy determinism, streams that run to ``n_predict`` with one token
id per event, and exact continuation by re-prefill (prompt + generated ids).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from albatross.testing.tinymodel import make_tiny_model

pytestmark = pytest.mark.engine

N_PREDICT = 64
PROMPT_TEXT = "The albatross glides over the ocean, and the"


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    resp = httpx.post(url + path, json=body, timeout=30.0)
    resp.raise_for_status()
    return resp.json()


def _prompt_ids(url: str) -> list[int]:
    ids: list[int] = _post(url, "/tokenize", {"content": PROMPT_TEXT})["tokens"]
    return ids


def _stream_completion(url: str, prompt: list[int], n_predict: int) -> list[dict[str, Any]]:
    """All events of a streamed greedy ``/completion`` with token ids."""
    body = {
        "prompt": prompt,
        "n_predict": n_predict,
        "temperature": 0,
        "stream": True,
        "return_tokens": True,
    }
    events = []
    with httpx.stream("POST", url + "/completion", json=body, timeout=30.0) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(orjson.loads(line[len("data: ") :]))
    return events


def _greedy_ids(url: str, prompt: list[int], n_predict: int) -> list[int]:
    events = _stream_completion(url, prompt, n_predict)
    return [t for e in events for t in e["tokens"]]


def test_health(llama_url: str) -> None:
    resp = httpx.get(llama_url + "/health", timeout=5.0)
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


def test_tokenize_detokenize_round_trip(llama_url: str) -> None:
    text = 'Hello, world! 42 cats "quoted" (and) [more]\n\tnew line ~ | ^'
    ids = _post(llama_url, "/tokenize", {"content": text})["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)
    assert _post(llama_url, "/detokenize", {"tokens": ids})["content"] == text


def test_apply_template_is_chatml(llama_url: str) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    prompt = _post(llama_url, "/apply-template", {"messages": messages})["prompt"]
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_completion_runs_to_max_tokens(llama_url: str) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "temperature": 0}
    out = _post(llama_url, "/v1/chat/completions", body)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 16


def test_stream_has_one_token_id_per_event_and_is_deterministic(llama_url: str) -> None:
    prompt = _prompt_ids(llama_url)
    events = _stream_completion(llama_url, prompt, N_PREDICT)
    token_events = [e for e in events if not e["stop"]]
    assert len(token_events) == N_PREDICT
    assert all(len(e["tokens"]) == 1 for e in token_events)
    final = events[-1]
    assert final["stop"] is True and final["stop_type"] == "limit"  # never EOS early
    ids = [e["tokens"][0] for e in token_events]
    assert len(set(ids)) > N_PREDICT // 4, "greedy output should not be one repeated token"
    assert _greedy_ids(llama_url, prompt, N_PREDICT) == ids


@pytest.mark.parametrize("k", [1, 17, 40])
def test_reprefill_continues_exactly(llama_url: str, k: int) -> None:
    prompt = _prompt_ids(llama_url)
    full = _greedy_ids(llama_url, prompt, N_PREDICT)
    rest = _greedy_ids(llama_url, prompt + full[:k], N_PREDICT - k)
    assert rest == full[k:]


def test_tiny_model_is_reproducible_and_fast(tmp_path: Path) -> None:
    started = time.perf_counter()
    first = make_tiny_model(tmp_path / "a", seed=3)
    elapsed = time.perf_counter() - started
    second = make_tiny_model(tmp_path / "b", seed=3)
    assert first.read_bytes() == second.read_bytes()
    assert make_tiny_model(tmp_path / "c", seed=4).read_bytes() != first.read_bytes()
    assert elapsed < 1.0
