"""How a model is put to sleep and woken again: the eviction-policy matrix.

Theory of operation
-------------------
An eviction policy answers two questions about a sleeping model:

- **weights**: where its weights are while it sleeps. ``retain``: still in GPU memory
  (nothing is freed, so the model is never evicted: it is *resident*); ``offload``:
  moved out of GPU memory to somewhere they come back from without reading the model
  file again (host memory, a checkpoint image); ``discard``: dropped, reloaded from the
  model file on wake.
- **process**: what happens to the engine process. ``keep_running``: it stays up and
  releases memory through its own API (vLLM sleep, llama-server router unload);
  ``cuda_suspend``: the process is frozen and its GPU memory copied to host memory by
  NVIDIA's cuda-checkpoint; ``checkpoint``: the process is dumped to disk by CRIU and
  ended; ``stop``: it is stopped and cold-started on wake (the universal fallback).

Not every pair means something (``retain`` + ``stop`` keeps weights in the memory of a
process that no longer exists), and not every engine can do every meaningful pair
(llama-server cannot offload weights while it keeps running). :func:`validate` rejects
an impossible pair at start, naming the model, the engine, the pair and what the engine
can do instead. :func:`sleep_steps` and :func:`wake_steps` turn a valid pair into the
ordered verbs the runtime performs, so the rules that must stay true live here, once:
after vLLM sleep level 2 a wake is *always* followed by ``reload_weights`` and
``reset_prefix_cache`` (otherwise vLLM answers with garbage), and a suspend or dump of
a vLLM process at level 2 happens after the sleep (a small image) and is undone first.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Weights(StrEnum):
    RETAIN = "retain"
    OFFLOAD = "offload"
    DISCARD = "discard"


class Process(StrEnum):
    KEEP_RUNNING = "keep_running"
    CUDA_SUSPEND = "cuda_suspend"
    CHECKPOINT = "checkpoint"
    STOP = "stop"


class EngineKind(StrEnum):
    LLAMA_SERVER = "llama-server"
    VLLM = "vllm"


class Step(StrEnum):
    """One verb the runtime performs on a model's engine, in the order given."""

    ROUTER_LOAD = "router_load"  # llama-server router: POST /models/load
    ROUTER_UNLOAD = "router_unload"  # llama-server router: POST /models/unload
    VLLM_SLEEP_1 = "vllm_sleep_1"  # weights to host memory, KV cache dropped
    VLLM_SLEEP_2 = "vllm_sleep_2"  # weights and KV cache dropped
    VLLM_WAKE_UP = "vllm_wake_up"
    VLLM_RELOAD_WEIGHTS = "vllm_reload_weights"  # collective_rpc reload_weights
    VLLM_RESET_PREFIX_CACHE = "vllm_reset_prefix_cache"
    CUDA_SUSPEND = "cuda_suspend"  # cuda-checkpoint --toggle: GPU memory to host
    CUDA_RESUME = "cuda_resume"
    CRIU_DUMP = "criu_dump"
    CRIU_RESTORE = "criu_restore"
    STOP_PROCESS = "stop_process"  # the process (or router child) serving this model
    START_PROCESS = "start_process"  # cold start


@dataclass(frozen=True, slots=True)
class EvictionPolicy:
    weights: Weights
    process: Process

    def __str__(self) -> str:
        return f"weights={self.weights.value}, process={self.process.value}"

    @property
    def resident(self) -> bool:
        """Nothing is freed: such a model is never chosen for eviction."""
        return self.weights is Weights.RETAIN


STOP = EvictionPolicy(Weights.DISCARD, Process.STOP)
"""The universal fallback: every engine can be stopped and cold-started."""


@dataclass(frozen=True, slots=True)
class HostTools:
    """Which host tools the policies that need them can use (found by the runtime)."""

    cuda_checkpoint: bool = False
    criu: bool = False


class EvictionPolicyError(ValueError):
    """A model's eviction policy cannot work with its engine or on this host.

    Raised by :func:`validate` at start; the message names the model, the engine, the
    pair and what the engine can do, so the fix is in the config.
    """


W, P, E, S = Weights, Process, EngineKind, Step

_VLLM_WAKE_AFTER_L2 = (S.VLLM_WAKE_UP, S.VLLM_RELOAD_WEIGHTS, S.VLLM_RESET_PREFIX_CACHE)

# (engine, weights, process) -> (sleep steps, wake steps, what it is, in words).
# Pairs missing here are impossible on that engine.
_MATRIX: dict[
    tuple[EngineKind, Weights, Process], tuple[tuple[Step, ...], tuple[Step, ...], str]
] = {
    (E.LLAMA_SERVER, W.RETAIN, P.KEEP_RUNNING): ((), (), "resident, never evicted"),
    (E.LLAMA_SERVER, W.DISCARD, P.KEEP_RUNNING): (
        (S.ROUTER_UNLOAD,),
        (S.ROUTER_LOAD,),
        "router-mode unload / load",
    ),
    (E.LLAMA_SERVER, W.OFFLOAD, P.CUDA_SUSPEND): (
        (S.CUDA_SUSPEND,),
        (S.CUDA_RESUME,),
        "cuda-checkpoint suspend",
    ),
    (E.LLAMA_SERVER, W.OFFLOAD, P.CHECKPOINT): (
        (S.CRIU_DUMP,),
        (S.CRIU_RESTORE,),
        "CRIU dump / restore",
    ),
    (E.LLAMA_SERVER, W.DISCARD, P.STOP): (
        (S.STOP_PROCESS,),
        (S.START_PROCESS,),
        "stop / cold start",
    ),
    (E.VLLM, W.RETAIN, P.KEEP_RUNNING): ((), (), "resident, never evicted"),
    (E.VLLM, W.OFFLOAD, P.KEEP_RUNNING): ((S.VLLM_SLEEP_1,), (S.VLLM_WAKE_UP,), "sleep level 1"),
    (E.VLLM, W.DISCARD, P.KEEP_RUNNING): ((S.VLLM_SLEEP_2,), _VLLM_WAKE_AFTER_L2, "sleep level 2"),
    (E.VLLM, W.OFFLOAD, P.CUDA_SUSPEND): (
        (S.CUDA_SUSPEND,),
        (S.CUDA_RESUME,),
        "cuda-checkpoint suspend",
    ),
    (E.VLLM, W.DISCARD, P.CUDA_SUSPEND): (
        (S.VLLM_SLEEP_2, S.CUDA_SUSPEND),
        (S.CUDA_RESUME, *_VLLM_WAKE_AFTER_L2),
        "sleep level 2, then cuda-checkpoint suspend",
    ),
    (E.VLLM, W.OFFLOAD, P.CHECKPOINT): ((S.CRIU_DUMP,), (S.CRIU_RESTORE,), "CRIU dump / restore"),
    (E.VLLM, W.DISCARD, P.CHECKPOINT): (
        (S.VLLM_SLEEP_2, S.CRIU_DUMP),
        (S.CRIU_RESTORE, *_VLLM_WAKE_AFTER_L2),
        "sleep level 2, then CRIU dump",
    ),
    (E.VLLM, W.DISCARD, P.STOP): ((S.STOP_PROCESS,), (S.START_PROCESS,), "stop / cold start"),
}

_NONSENSE: dict[tuple[Weights, Process], str] = {
    (W.RETAIN, P.CUDA_SUSPEND): "cuda_suspend moves the process's GPU memory to the host",
    (W.RETAIN, P.CHECKPOINT): "a checkpointed process holds no GPU memory",
    (W.RETAIN, P.STOP): "a stopped process holds no weights",
    (W.OFFLOAD, P.STOP): "a stopped process holds no weights to bring back",
}


def _pair(engine: EngineKind, policy: EvictionPolicy) -> tuple[EngineKind, Weights, Process]:
    return (engine, policy.weights, policy.process)


def supported(engine: EngineKind) -> list[EvictionPolicy]:
    """Every pair ``engine`` can do (given the host tools it needs)."""
    return [EvictionPolicy(w, p) for (e, w, p) in _MATRIX if e is engine]


def describe_supported(engine: EngineKind) -> str:
    """``engine``'s pairs in words, for error messages and ``albatross --help``."""
    rows = [(f"{w.value}+{p.value}", _MATRIX[(e, w, p)][2]) for (e, w, p) in _MATRIX if e is engine]
    return "; ".join(f"{pair} ({what})" for pair, what in rows)


def validate(model: str, engine: EngineKind, policy: EvictionPolicy, tools: HostTools) -> None:
    """Raise :class:`EvictionPolicyError` unless ``engine`` can evict ``model`` that way here."""
    where = f"model {model!r} (engine {engine.value}): eviction {policy}"
    why = _NONSENSE.get((policy.weights, policy.process))
    if why is not None:
        raise EvictionPolicyError(
            f"{where} is not a possible combination: {why}; "
            f"{engine.value} can do: {describe_supported(engine)}"
        )
    if _pair(engine, policy) not in _MATRIX:
        raise EvictionPolicyError(
            f"{where} is not something {engine.value} can do; "
            f"it can do: {describe_supported(engine)}"
        )
    if policy.process is Process.CUDA_SUSPEND and not tools.cuda_checkpoint:
        raise EvictionPolicyError(
            f"{where} needs the cuda-checkpoint command (NVIDIA driver >= 550), "
            "which is not available on this host; configure its path or choose another policy"
        )
    if policy.process is Process.CHECKPOINT and not tools.criu:
        raise EvictionPolicyError(
            f"{where} needs CRIU, which is not available on this host; "
            "install criu or choose another policy"
        )


def sleep_steps(engine: EngineKind, policy: EvictionPolicy) -> tuple[Step, ...]:
    """The verbs that put a model to sleep, in order (empty for a resident policy)."""
    return _MATRIX[_pair(engine, policy)][0]


def wake_steps(
    engine: EngineKind, configured: EvictionPolicy, slept_with: EvictionPolicy | None
) -> tuple[Step, ...]:
    """The verbs that wake a model configured with ``configured``, in order.

    ``slept_with`` is how it was actually put to sleep (the configured policy, or
    :data:`STOP` after that failed); ``None`` when it is not running at all (never
    started): a cold start, which for a llama-server router-mode model is a router load.
    """
    if slept_with is None:
        return cold_start_steps(engine, configured)
    if slept_with == STOP:
        return cold_start_steps(engine, configured)
    return _MATRIX[_pair(engine, slept_with)][1]


def cold_start_steps(engine: EngineKind, configured: EvictionPolicy) -> tuple[Step, ...]:
    """How a model that is not running at all is brought up.

    A router-mode llama-server model (``discard`` + ``keep_running``) is loaded by the
    router that keeps running; anything else is a process start.
    """
    if (engine, configured.weights, configured.process) == (
        E.LLAMA_SERVER,
        W.DISCARD,
        P.KEEP_RUNNING,
    ):
        return (Step.ROUTER_LOAD,)
    return (Step.START_PROCESS,)
