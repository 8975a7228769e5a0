"""The eviction-policy matrix: what each engine can do, and the steps that do it."""

from __future__ import annotations

import itertools

import pytest

from albatross.core import eviction
from albatross.core.eviction import (
    STOP,
    EngineKind,
    EvictionPolicy,
    EvictionPolicyError,
    HostTools,
    Process,
    Step,
    Weights,
    cold_start_steps,
    sleep_steps,
    supported,
    validate,
    wake_steps,
)

E, W, P = EngineKind, Weights, Process
ALL_TOOLS = HostTools(cuda_checkpoint=True, criu=True)

# Written out independently of the module: (engine, weights, process) an engine can do.
EXPECTED = {
    (E.LLAMA_SERVER, W.RETAIN, P.KEEP_RUNNING),
    (E.LLAMA_SERVER, W.DISCARD, P.KEEP_RUNNING),
    (E.LLAMA_SERVER, W.OFFLOAD, P.CUDA_SUSPEND),
    (E.LLAMA_SERVER, W.OFFLOAD, P.CHECKPOINT),
    (E.LLAMA_SERVER, W.DISCARD, P.STOP),
    (E.VLLM, W.RETAIN, P.KEEP_RUNNING),
    (E.VLLM, W.OFFLOAD, P.KEEP_RUNNING),
    (E.VLLM, W.DISCARD, P.KEEP_RUNNING),
    (E.VLLM, W.OFFLOAD, P.CUDA_SUSPEND),
    (E.VLLM, W.DISCARD, P.CUDA_SUSPEND),
    (E.VLLM, W.OFFLOAD, P.CHECKPOINT),
    (E.VLLM, W.DISCARD, P.CHECKPOINT),
    (E.VLLM, W.DISCARD, P.STOP),
}
EVERY = list(itertools.product(E, W, P))


@pytest.mark.parametrize(("engine", "w", "p"), EVERY, ids=[f"{e}-{w}-{p}" for e, w, p in EVERY])
def test_validate_accepts_exactly_the_matrix(engine: EngineKind, w: Weights, p: Process) -> None:
    policy = EvictionPolicy(w, p)
    if (engine, w, p) in EXPECTED:
        validate("m", engine, policy, ALL_TOOLS)
        assert policy in supported(engine)
    else:
        with pytest.raises(EvictionPolicyError) as e:
            validate("m", engine, policy, ALL_TOOLS)
        msg = str(e.value)
        # The model, the engine, the pair, and what the engine can do instead.
        assert f"model 'm' (engine {engine.value})" in msg
        assert f"weights={w.value}, process={p.value}" in msg
        assert "can do: " in msg and "discard+stop (stop / cold start)" in msg
        assert policy not in supported(engine)


def test_an_impossible_pair_explains_itself() -> None:
    with pytest.raises(EvictionPolicyError) as e:
        validate("big", E.LLAMA_SERVER, EvictionPolicy(W.OFFLOAD, P.KEEP_RUNNING), ALL_TOOLS)
    assert str(e.value) == (
        "model 'big' (engine llama-server): eviction weights=offload, process=keep_running is "
        "not something llama-server can do; it can do: retain+keep_running (resident, never "
        "evicted); discard+keep_running (router-mode unload / load); offload+cuda_suspend "
        "(cuda-checkpoint suspend); offload+checkpoint (CRIU dump / restore); discard+stop "
        "(stop / cold start)"
    )
    with pytest.raises(EvictionPolicyError, match="a stopped process holds no weights"):
        validate("big", E.VLLM, EvictionPolicy(W.RETAIN, P.STOP), ALL_TOOLS)


@pytest.mark.parametrize("engine", list(E))
def test_cuda_suspend_needs_cuda_checkpoint(engine: EngineKind) -> None:
    policy = EvictionPolicy(W.OFFLOAD, P.CUDA_SUSPEND)
    with pytest.raises(EvictionPolicyError, match="needs the cuda-checkpoint command"):
        validate("m", engine, policy, HostTools(criu=True))
    validate("m", engine, policy, HostTools(cuda_checkpoint=True))


@pytest.mark.parametrize("engine", list(E))
def test_checkpoint_needs_criu(engine: EngineKind) -> None:
    policy = EvictionPolicy(W.OFFLOAD, P.CHECKPOINT)
    with pytest.raises(EvictionPolicyError, match="needs CRIU"):
        validate("m", engine, policy, HostTools(cuda_checkpoint=True))
    validate("m", engine, policy, HostTools(criu=True))


@pytest.mark.parametrize("engine", list(E))
def test_stop_is_the_universal_fallback(engine: EngineKind) -> None:
    validate("m", engine, STOP, HostTools())
    assert sleep_steps(engine, STOP) == (Step.STOP_PROCESS,)


def test_vllm_steps() -> None:
    l1 = EvictionPolicy(W.OFFLOAD, P.KEEP_RUNNING)
    l2 = EvictionPolicy(W.DISCARD, P.KEEP_RUNNING)
    assert sleep_steps(E.VLLM, l1) == (Step.VLLM_SLEEP_1,)
    assert wake_steps(E.VLLM, l1, l1) == (Step.VLLM_WAKE_UP,)
    assert sleep_steps(E.VLLM, l2) == (Step.VLLM_SLEEP_2,)
    after_l2 = (Step.VLLM_WAKE_UP, Step.VLLM_RELOAD_WEIGHTS, Step.VLLM_RESET_PREFIX_CACHE)
    assert wake_steps(E.VLLM, l2, l2) == after_l2
    l2_dump = EvictionPolicy(W.DISCARD, P.CHECKPOINT)
    assert sleep_steps(E.VLLM, l2_dump) == (Step.VLLM_SLEEP_2, Step.CRIU_DUMP)
    assert wake_steps(E.VLLM, l2_dump, l2_dump) == (Step.CRIU_RESTORE, *after_l2)


def test_every_level_2_wake_reloads_weights_then_resets_the_prefix_cache() -> None:
    for (engine, w, p), (sleep, wake, _) in eviction._MATRIX.items():
        if Step.VLLM_SLEEP_2 in sleep:
            i = wake.index(Step.VLLM_WAKE_UP)
            assert wake[i:] == (
                Step.VLLM_WAKE_UP,
                Step.VLLM_RELOAD_WEIGHTS,
                Step.VLLM_RESET_PREFIX_CACHE,
            ), (engine, w, p)


def test_llama_server_router_steps_and_cold_starts() -> None:
    router = EvictionPolicy(W.DISCARD, P.KEEP_RUNNING)
    assert sleep_steps(E.LLAMA_SERVER, router) == (Step.ROUTER_UNLOAD,)
    assert wake_steps(E.LLAMA_SERVER, router, router) == (Step.ROUTER_LOAD,)
    # Never started, or stopped by the fallback: a router model is loaded by its router.
    assert wake_steps(E.LLAMA_SERVER, router, None) == (Step.ROUTER_LOAD,)
    assert wake_steps(E.LLAMA_SERVER, router, STOP) == (Step.ROUTER_LOAD,)
    assert cold_start_steps(E.LLAMA_SERVER, STOP) == (Step.START_PROCESS,)
    assert wake_steps(E.VLLM, EvictionPolicy(W.OFFLOAD, P.KEEP_RUNNING), None) == (
        Step.START_PROCESS,
    )


def test_resident_means_retain() -> None:
    assert EvictionPolicy(W.RETAIN, P.KEEP_RUNNING).resident
    assert not STOP.resident
