"""The engines behind switched models, and the verbs (``core.eviction.Step``) on them.

The switch scheduler decides *what* to do (``Sleep``/``Wake`` with ordered steps); this
module does one step at a time on one model's engine and keeps the replica pool's view
of that model true (ready while it can serve, down otherwise). Three kinds of engine:

- :class:`RouterModel`: a llama-server model behind the shared router (``weights =
  discard``, ``process = keep_running``): load and unload through the router's API;
- :class:`ProcessModel`: a model with an engine process of its own, run by a
  :class:`Supervisor` of its own: a cold start starts that supervisor, a stop closes
  it, a CRIU dump parks the replica (``Supervisor.checkpoint``) and a restore brings it
  back; ``cuda-checkpoint --toggle`` suspends and resumes its GPU state;
- :class:`VllmSteps`: the vLLM sleep verbs on a running vLLM server.

A step an engine cannot do raises :class:`EngineError`: the config validation
(``core.eviction.validate``) makes that a bug, not a user error.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from albatross.config import SupervisorConfig
from albatross.core.errors import EngineError
from albatross.core.eviction import Step
from albatross.core.replicas import Event
from albatross.engines.llama_router import LlamaRouterClient
from albatross.engines.vllm import VllmClient
from albatross.runtime.pool import Pool
from albatross.supervisor.supervisor import ReplicaImages, ReplicaSpec, Supervisor

log = logging.getLogger("albatross.switch")

Probe = Callable[[str], Awaitable[bool]]


class StepEngine:
    """One model's engine: performs steps; ``ready`` says whether it serves."""

    async def perform(self, step: Step) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop whatever runs for this model (gateway shutdown)."""


def _cannot(engine: str, step: Step) -> EngineError:
    return EngineError(f"{engine}: {step.value} is not something this engine can do")


class VllmSteps:
    """The vLLM sleep-mode steps on one server, in the order the scheduler gives them."""

    def __init__(self, client: VllmClient) -> None:
        self.client = client

    async def perform(self, step: Step) -> None:
        c = self.client
        if step is Step.VLLM_SLEEP_1:
            await c.sleep(1)
        elif step is Step.VLLM_SLEEP_2:
            await c.sleep(2)
        elif step is Step.VLLM_WAKE_UP:
            await c.wake_up()
        elif step is Step.VLLM_RELOAD_WEIGHTS:
            await c.reload_weights()
        elif step is Step.VLLM_RESET_PREFIX_CACHE:
            await c.reset_prefix_cache()
        else:
            raise _cannot(f"vLLM {c.base_url}", step)


@dataclass
class PoolListener:
    """The per-model supervisors' listener: forwards to the pool, except that a stop
    the switch asked for is not counted as a lost replica (no restart metric, no
    stream moves: the model was drained before)."""

    pool: Pool
    planned: set[str] = field(default_factory=set)

    def replica_ready(self, replica_id: str, base_url: str, pid: int) -> None:
        self.pool.replica_ready(replica_id, base_url, pid)

    def replica_lost(self, replica_id: str, reason: str) -> None:
        if replica_id in self.planned:
            self.planned.discard(replica_id)
            log.info("replica %s down: %s", replica_id, reason)
            self.pool.apply(replica_id, Event.LOST)
        else:
            self.pool.replica_lost(replica_id, reason)


async def cuda_toggle(command: str, pid: int) -> None:
    """``cuda-checkpoint --toggle --pid PID``: suspend a process's CUDA state to host
    memory, or resume it. Raises :class:`EngineError` when the command is missing or fails."""
    exe = shutil.which(command)
    if exe is None:
        raise EngineError(
            f"switch.cuda_checkpoint_command = {command!r} was not found; cuda_suspend needs "
            "NVIDIA's cuda-checkpoint (driver >= 550)"
        )
    proc = await asyncio.create_subprocess_exec(
        exe, "--toggle", "--pid", str(pid),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        text = out.decode("utf-8", "replace").strip()[-300:]
        raise EngineError(f"{exe} --toggle --pid {pid} exited {proc.returncode}: {text}")


class ProcessModel(StepEngine):
    """A model with an engine process of its own (llama-server or vLLM)."""

    def __init__(
        self,
        spec: ReplicaSpec,
        config: SupervisorConfig,
        listener: PoolListener,
        probe: Probe,
        *,
        images: ReplicaImages | None = None,
        cuda_command: str = "cuda-checkpoint",
        vllm: bool = False,
    ) -> None:
        self.spec, self._config, self._listener, self._probe = spec, config, listener, probe
        self._images, self._cuda, self._vllm = images, cuda_command, vllm
        self.supervisor: Supervisor | None = None

    @property
    def replica_id(self) -> str:
        return self.spec.replica_id

    def _sup(self, step: Step) -> Supervisor:
        if self.supervisor is None:
            raise EngineError(f"{self.replica_id}: {step.value} needs a running engine")
        return self.supervisor

    def _base_url(self, step: Step) -> str:
        r = self._listener.pool.replicas[self.replica_id]
        if r.client is None:
            raise EngineError(f"{self.replica_id}: {step.value} needs a running engine")
        return r.client.base_url

    async def perform(self, step: Step) -> None:
        rid = self.replica_id
        if step is Step.START_PROCESS:
            await self.close()
            self.supervisor = Supervisor(
                [self.spec], self._config, self._listener, self._probe, images=self._images
            )
            await self.supervisor.start()
        elif step is Step.STOP_PROCESS:
            await self.close()
        elif step is Step.CRIU_DUMP:
            self._listener.planned.add(rid)
            try:
                await self._sup(step).checkpoint(rid)
            except BaseException:
                self._listener.planned.discard(rid)
                raise
        elif step is Step.CRIU_RESTORE:
            await self._sup(step).restore(rid)
        elif step in (Step.CUDA_SUSPEND, Step.CUDA_RESUME):
            pid = self._sup(step).pid(rid)
            if pid is None:
                raise EngineError(f"{rid}: no running process to {step.value}")
            await cuda_toggle(self._cuda, pid)
        elif self._vllm and step.value.startswith("vllm_"):
            client = VllmClient(self._base_url(step))
            try:
                await VllmSteps(client).perform(step)
            finally:
                client.close()
        else:
            raise _cannot(rid, step)

    async def close(self) -> None:
        if self.supervisor is not None:
            sup, self.supervisor = self.supervisor, None
            if self._listener.pool.replicas[self.replica_id].client is not None:
                self._listener.planned.add(self.replica_id)
            await sup.close()
            self._listener.planned.discard(self.replica_id)


class RouterModel(StepEngine):
    """A llama-server model behind the shared router: load and unload, nothing else.

    A cold start is a load and a stop an unload (the router keeps running)."""

    def __init__(self, router: LlamaRouterClient, name: str, pool: Pool, replica_id: str) -> None:
        self.router, self.name, self.pool, self.replica_id = router, name, pool, replica_id

    async def perform(self, step: Step) -> None:
        if step in (Step.ROUTER_LOAD, Step.START_PROCESS):
            await self.router.load(self.name)
            client = self.router.model_client(self.name)
            r = self.pool.replicas[self.replica_id]
            r.reset_slots(await client.total_slots())
            if r.client is not None:
                r.client.close()
            r.client = client
            self.pool.apply(self.replica_id, Event.STARTED)
        elif step in (Step.ROUTER_UNLOAD, Step.STOP_PROCESS):
            self.pool.apply(self.replica_id, Event.LOST)
            await self.router.unload(self.name)
        else:
            raise _cannot(f"router model {self.name!r}", step)

    async def close(self) -> None:
        self.pool.apply(self.replica_id, Event.LOST)


def router_argv(
    binary: Path, models_dir: Path, parallel: int, ctx_size: int, threads: int,
    extra: tuple[str, ...] = (),
) -> Callable[[int], list[str]]:  # fmt: skip
    """The shared router's command line: it never loads or evicts a model by itself
    (the scheduler decides), every model gets ``parallel`` slots of ``ctx_size``."""

    def argv(port: int) -> list[str]:
        return [
            str(binary), "--host", "127.0.0.1", "--port", str(port),
            "--models-dir", str(models_dir),
            "--no-models-autoload", "--models-max", "0",
            "-np", str(parallel), "-c", str(ctx_size * parallel), "-t", str(threads),
            "--no-webui", *extra,
        ]  # fmt: skip

    return argv
