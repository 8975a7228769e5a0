"""Wires the parts together and runs them: supervisor, replica pool, health checks,
HTTP server. The only owner of the tasks it starts; :meth:`App.stop` ends them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from albatross.config import Config, ModelConfig
from albatross.core.cost import Price
from albatross.core.errors import AlbatrossError
from albatross.core.replicas import Event, ReplicaState
from albatross.engines.llama_server import LlamaServerClient
from albatross.engines.vllm import vllm_argv, vllm_env
from albatross.gateway.errors import error_response
from albatross.gateway.http import serve
from albatross.gateway.metrics import Metrics
from albatross.runtime.handlers import Api
from albatross.runtime.pool import Pool
from albatross.runtime.registry import Registry
from albatross.runtime.spot import SpotController
from albatross.runtime.switching import Switcher
from albatross.supervisor.supervisor import ReplicaSpec, Supervisor

if TYPE_CHECKING:
    from albatross.runtime.gateway_move import GatewayMove

log = logging.getLogger("albatross")


@dataclass(frozen=True)
class EngineFiles:
    """What managed replicas need on disk, resolved before start (builds happen there)."""

    llama_server: Path | None
    model_paths: dict[str, Path]
    """GGUF files (llama-server) or Hugging Face directories (vLLM), per model name."""
    vllm_python: Path | None = None
    """A python with vLLM installed, when a managed model runs on vLLM."""


EXACT_NUMERICS = ("-ub", "1", "-fa", "off", "-ctk", "f32", "-ctv", "f32")
"""One token per micro-batch (prefill computes like decoding), no flash attention, f32
KV cache: continuations by re-prefill then match an uninterrupted run bit for bit."""


def llama_server_argv(
    binary: Path, model_path: Path, m: ModelConfig, slot_dir: Path, host: str = "127.0.0.1"
) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [
            str(binary),
            "-m", str(model_path),
            "--host", host,
            "--port", str(port),
            "-np", str(m.parallel),
            # -c is shared by all slots; give every slot the configured context.
            "-c", str(m.ctx_size * m.parallel),
            "-t", str(m.threads),
            "--no-webui",
            # One directory for every managed replica: a slot saved by one can be
            # restored by another (KV-cache moves).
            "--slot-save-path", str(slot_dir.resolve()),
            *(EXACT_NUMERICS if m.numerics == "exact" else ()),
            *m.extra_args,
        ]  # fmt: skip

    return argv


def vllm_replica_argv(
    config: Config, python: Path, model_dir: Path, m: ModelConfig, host: str = "127.0.0.1"
) -> Callable[[int], list[str]]:
    """A managed vLLM replica: ``parallel`` sequences of ``ctx_size`` tokens at most."""
    v = config.vllm

    def argv(port: int) -> list[str]:
        return vllm_argv(
            python, model_dir, port,
            dtype=v.dtype, enforce_eager=v.enforce_eager, sleep_mode=v.enable_sleep_mode,
            name=m.name, host=host,
            extra=("--max-num-seqs", str(m.parallel), "--max-model-len", str(m.ctx_size),
                   # Cached prompt tokens in usage: a move's prompt_n is then what it cost.
                   "--enable-prompt-tokens-details", *m.extra_args),
        )  # fmt: skip

    return argv


def replica_spec(
    config: Config, files: EngineFiles, m: ModelConfig, i: int, replica_id: str, host: str
) -> ReplicaSpec:
    """How to run replica ``i`` of model ``m`` as ``replica_id``, listening on ``host``."""
    log_path = config.supervisor.log_dir / f"{m.name.replace('/', '_')}-{i}.log"
    if m.engine == "vllm":
        assert files.vllm_python is not None
        return ReplicaSpec(
            replica_id=replica_id,
            argv=vllm_replica_argv(config, files.vllm_python, files.model_paths[m.name], m, host),
            log_path=log_path,
            env=vllm_env(cpu_kvcache_space_gib=config.vllm.cpu_kvcache_space_gib),
        )
    assert files.llama_server is not None
    return ReplicaSpec(
        replica_id=replica_id,
        argv=llama_server_argv(
            files.llama_server,
            files.model_paths[m.name],
            m,
            config.continuity.slot_dir,
            host,
        ),
        log_path=log_path,
    )


def _price(m: ModelConfig) -> Price:
    return Price(m.price_spot_per_hour, m.price_on_demand_per_hour)


PROBE_CEILING_S = 300.0
"""The probe's own time-out: only a ceiling. The supervisor bounds every probe with
``supervisor.health_timeout_s``; a shorter limit here would silently override it."""


async def probe(base_url: str) -> bool:
    client = LlamaServerClient(base_url)
    try:
        return await client.health(PROBE_CEILING_S)
    finally:
        client.close()


class App:
    def __init__(self, config: Config, files: EngineFiles) -> None:
        self.config = config
        self.metrics = Metrics()
        self.pool = Pool(
            self.metrics,
            config.supervisor.health_failures,
            engines={m.name: m.engine for m in config.models},
        )
        self.registry = Registry(config.continuity)
        self.pool.lost_listeners.append(self.registry.replica_lost)
        specs: list[ReplicaSpec] = []
        for m in config.models:
            for i in range(m.replicas):
                rid = f"{m.name}/{i}"
                self.pool.add(
                    rid,
                    m.name,
                    managed=True,
                    slots=m.parallel,
                    instance_type=m.instance_type,
                    price=_price(m),
                )
                specs.append(replica_spec(config, files, m, i, rid, "127.0.0.1"))
            for j, url in enumerate(m.endpoints):
                self.pool.add(
                    f"{m.name}/ext{j}",
                    m.name,
                    managed=False,
                    base_url=url,
                    instance_type=m.instance_type,
                    price=_price(m),
                )
        if config.switch.active:
            specs = []  # switched models are started and stopped by the switcher
        images = None
        if config.checkpoint.enabled:
            from albatross.checkpoint.engine import ReplicaCheckpointer

            images = ReplicaCheckpointer.from_config(
                config.checkpoint, stop_grace_s=config.supervisor.stop_grace_s
            )
        self.supervisor = Supervisor(specs, config.supervisor, self.pool, probe, images=images)
        self.spot = SpotController(config.spot, self.pool, self.registry, self.supervisor)
        self.api = Api(config, self.pool, self.metrics, self.registry, self.spot)
        self.switcher: Switcher | None = None
        if config.switch.active:
            self.switcher = Switcher(
                config, self.pool, self.metrics, probe,
                llama_server=files.llama_server, model_paths=files.model_paths,
            )  # fmt: skip
            self.api.switcher = self.api.control.switcher = self.switcher
        self.gateway_move: GatewayMove | None = None
        if config.netmove.enabled:
            from albatross.runtime.gateway_move import GatewayMove

            self.gateway_move = GatewayMove(
                config.netmove, self.api.services, self.api, config.gateway.max_body_bytes
            )
            self.api.control.gateway_move = self.gateway_move
            if config.netmove.on_preemption and config.netmove.peers:
                self.spot.host_notice_listeners.append(self._move_gateway_on_notice)
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Start replicas (ready when this returns), health checks and the HTTP server."""
        slot_dir = self.config.continuity.slot_dir
        slot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in slot_dir.glob("*.bin"):
            stale.unlink(missing_ok=True)  # KV files of moves cut short by a crash
        await self.supervisor.start()
        if self.switcher is not None:
            await self.switcher.start()
        self._tasks.append(asyncio.create_task(self._check_health(), name="health-checks"))
        self._tasks.append(asyncio.create_task(self.registry.watch(), name="stream-watchdog"))
        if self.config.spot.source != "none":
            self._tasks.append(asyncio.create_task(self.spot.run(), name="preemption-notices"))
        g = self.config.gateway
        if self.gateway_move is not None:
            await self.gateway_move.start()
        self._server = await serve(self.api, error_response, g.host, g.port, g.max_body_bytes)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop accepting, give streams in flight ``grace_s`` to end, stop replicas."""
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while any(r.in_flight for r in self.pool.replicas.values()):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.gateway_move is not None:
            await self.gateway_move.close()
        await self.registry.close()
        if self.switcher is not None:
            await self.switcher.close()
        await self.supervisor.close()

    def _move_gateway_on_notice(self, source: str) -> None:
        """This host is going away: move its client connections to the first peer
        while its replicas drain (streams then continue on the peer's replicas)."""
        assert self.gateway_move is not None
        peer = next(iter(self.config.netmove.peers))

        async def go() -> None:
            assert self.gateway_move is not None
            if not await self.gateway_move.vip_held():
                return  # moved already (notices repeat until the host goes)
            try:
                await self.gateway_move.migrate_out(peer)
            except AlbatrossError as exc:
                log.error("preemption notice (%s): connections not moved: %s", source, exc.message)

        self.registry.spawn(go())

    async def _check_health(self) -> None:
        """Health of external endpoints and agents' replicas. Managed replicas are
        checked by the supervisor, which reports a replica failing its checks as lost and
        restarts it. An agent's replica that is down comes back only when its agent says
        so (it may be answering while its agent stops it)."""
        interval = self.config.supervisor.health_interval_s
        while True:
            # Read each round: agents register and deregister replicas at any time.
            external = [
                r
                for r in self.pool.replicas.values()
                if not r.managed
                and r.client is not None
                and not (r.host is not None and r.health.state is ReplicaState.DOWN)
            ]
            results = await asyncio.gather(*(r.client.health() for r in external if r.client))
            for r, ok in zip(external, results, strict=True):
                if self.pool.replicas.get(r.replica_id) is not r:
                    continue  # deregistered meanwhile
                if ok and r.health.state in (ReplicaState.STARTING, ReplicaState.DOWN):
                    with contextlib.suppress(AlbatrossError):
                        if r.client is not None and r.slots == 0:
                            r.reset_slots(await r.client.total_slots())
                    self.pool.apply(r.replica_id, Event.STARTED)
                else:
                    self.pool.apply(r.replica_id, Event.CHECK_PASSED if ok else Event.CHECK_FAILED)
            await asyncio.sleep(interval)
