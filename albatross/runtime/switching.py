"""Runs the switch scheduler: several models taking turns on one GPU.

``core/switch.py`` decides; this module feeds it events and carries out its actions:

- a request is announced (:meth:`Switcher.admit`) before a replica is acquired for it;
  it returns once the model is awake (the in-flight guard is then taken), or raises the
  scheduler's error: :class:`QueueTimeout` (504) or :class:`WakeGaveUp` (503). The
  handler calls :meth:`Switcher.finished` when the *stream* has ended, which gives the
  guard back: a model is put to sleep only after its last stream ended;
- ``Sleep`` and ``Wake`` run as tasks, one step at a time on the model's engine
  (``runtime/switch_engines.py``), and report their outcome with the measured duration;
- the scheduler's timers (queue deadlines, coalescing, back-off) are one loop timer at
  :meth:`SwitchScheduler.wakeup_at`.

Everything runs on the event loop; the scheduler is never entered twice at once.
Time is the loop's monotonic clock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from albatross.config import Config, ModelConfig, criu_command, switch_settings
from albatross.core import switch_events as ev
from albatross.core.errors import AlbatrossError, ClientError, Conflict
from albatross.core.eviction import Process, Step, Weights
from albatross.core.switch import ModelState, SwitchScheduler
from albatross.engines.llama_router import LlamaRouterClient
from albatross.engines.vllm import vllm_argv, vllm_env
from albatross.gateway.http import Connection
from albatross.gateway.metrics import Metrics, SwitchMetrics
from albatross.runtime.pool import Pool
from albatross.runtime.switch_engines import (
    PoolListener,
    Probe,
    ProcessModel,
    RouterModel,
    StepEngine,
    router_argv,
)
from albatross.supervisor.supervisor import ReplicaImages, ReplicaSpec, Supervisor

log = logging.getLogger("albatross.switch")


def uses_router(m: ModelConfig) -> bool:
    """A llama-server model that sleeps by router unload runs behind the shared router."""
    return m.engine == "llama-server" and (m.eviction.weights, m.eviction.process) == (
        Weights.DISCARD.value,
        Process.KEEP_RUNNING.value,
    )


def replica_id(m: ModelConfig) -> str:
    return f"{m.name}/0"


class ClientGone(ClientError):
    """The client left while its request waited for the model."""

    status = 499


class _RouterListener:
    """The router process's supervisor listener: models behind a router that went away
    are gone with it (the router restarts with nothing loaded)."""

    def __init__(self, switcher: Switcher) -> None:
        self._switcher = switcher

    def replica_ready(self, replica_id: str, base_url: str, pid: int) -> None:
        self._switcher.router_url = base_url

    def replica_lost(self, replica_id: str, reason: str) -> None:
        self._switcher.router_lost(reason)


class Switcher:
    """The scheduler's runtime; see the module docstring."""

    def __init__(
        self,
        config: Config,
        pool: Pool,
        metrics: Metrics,
        probe: Probe,
        *,
        llama_server: Path | None,
        model_paths: dict[str, Path],
        vllm_python: Path | None = None,
        images: ReplicaImages | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.scheduler = SwitchScheduler(switch_settings(config))
        self.metrics = SwitchMetrics(metrics.registry)
        self._listener = PoolListener(pool)
        self._probe = probe
        self._waiting: dict[str, asyncio.Future[float]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self.router_url: str | None = None
        self._router_sup: Supervisor | None = None
        self._router: LlamaRouterClient | None = None
        self._router_dir: Path | None = None
        self.engines: dict[str, StepEngine] = {}
        self._llama_server, self._paths = llama_server, model_paths
        self._vllm_python, self._images = vllm_python, images
        if images is None and any(m.eviction.process == "checkpoint" for m in config.models):
            from albatross.checkpoint.engine import ReplicaCheckpointer

            cp = config.checkpoint
            crit = criu_command(config)
            self._images = ReplicaCheckpointer.from_config(
                cp.model_copy(update={"criu": crit}), stop_grace_s=config.supervisor.stop_grace_s
            )
        for m in config.models:
            if not uses_router(m):
                self.engines[m.name] = self._process_model(m)

    # ---- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Start the shared router (when a model uses it); models start asleep and are
        woken by their first request (or the control API)."""
        routed = [m for m in self.config.models if uses_router(m)]
        if routed:
            assert self._llama_server is not None
            self._router_dir = Path(tempfile.mkdtemp(prefix="albatross-router-"))
            for m in routed:
                (self._router_dir / f"{_router_name(m)}.gguf").symlink_to(
                    self._paths[m.name].resolve()
                )
            first = routed[0]
            spec = ReplicaSpec(
                "router",
                router_argv(
                    self._llama_server, self._router_dir, first.parallel, first.ctx_size,
                    first.threads, self.config.switch.router_args,
                ),
                self.config.supervisor.log_dir / "router.log",
            )  # fmt: skip
            self._router_sup = Supervisor(
                [spec], self.config.supervisor, _RouterListener(self), self._probe
            )
            await self._router_sup.start()
            assert self.router_url is not None
            self._router = LlamaRouterClient(self.router_url)
            for m in routed:
                self.engines[m.name] = RouterModel(
                    self._router, _router_name(m), self.pool, replica_id(m)
                )
        for m in self.config.models:
            self.metrics.awake.labels(m.name).set(0)
            self.metrics.queue_depth.labels(m.name).set(0)

    async def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(Conflict("the gateway is stopping"))
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(e.close() for e in self.engines.values()), return_exceptions=True)
        if self._router is not None:
            self._router.close()
        if self._router_sup is not None:
            await self._router_sup.close()
        if self._router_dir is not None:
            shutil.rmtree(self._router_dir, ignore_errors=True)

    def router_lost(self, reason: str) -> None:
        if not self._closing:
            log.error(
                "the llama-server router went away (%s); its models must be woken again", reason
            )

    def _process_model(self, m: ModelConfig) -> ProcessModel:
        sup = self.config.supervisor
        log_path = sup.log_dir / f"{m.name.replace('/', '_')}-0.log"
        if m.engine == "vllm":
            v = self.config.vllm
            from albatross.engines.vllm_install import installed_python

            python = v.python or self._vllm_python or installed_python()
            if python is None:
                raise ValueError(
                    f"model {m.name!r}: no python with vLLM; set vllm.python or run "
                    "python -m albatross.engines.vllm_install"
                )
            path, name = self._paths[m.name], m.name

            def argv(port: int) -> list[str]:
                return vllm_argv(
                    python, path, port, dtype=v.dtype, enforce_eager=v.enforce_eager,
                    sleep_mode=v.enable_sleep_mode, name=name, extra=m.extra_args,
                )  # fmt: skip

            spec = ReplicaSpec(
                replica_id(m),
                argv,
                log_path,
                vllm_env(cpu_kvcache_space_gib=v.cpu_kvcache_space_gib),
            )
        else:
            from albatross.runtime.app import llama_server_argv

            assert self._llama_server is not None
            spec = ReplicaSpec(
                replica_id(m),
                llama_server_argv(
                    self._llama_server, self._paths[m.name], m, self.config.continuity.slot_dir
                ),
                log_path,
            )
        return ProcessModel(
            spec, sup, self._listener, self._probe, images=self._images,
            cuda_command=self.config.switch.cuda_checkpoint_command, vllm=m.engine == "vllm",
        )  # fmt: skip

    # ---- requests ---------------------------------------------------------------------
    async def admit(self, model: str, conn: Connection | None = None) -> str:
        """Wait until ``model`` may serve one more request; returns its ticket for
        :meth:`finished`. Raises the scheduler's 504/503 errors, or :class:`ClientGone`."""
        ticket = f"sw-{next(self._ids)}"
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[ticket] = fut
        try:
            self._feed(ev.RequestArrived(self._now(), ticket, model))
            if not fut.done() and conn is not None:
                conn.on_disconnect(lambda: self._gone(ticket))
            await fut
        finally:
            self._waiting.pop(ticket, None)
        return ticket

    def finished(self, ticket: str) -> None:
        """The stream of an admitted request ended: its in-flight guard is given back."""
        if not self._closing:
            self._feed(ev.RequestFinished(self._now(), ticket))

    def _gone(self, ticket: str) -> None:
        fut = self._waiting.get(ticket)
        if fut is not None and not fut.done():
            fut.set_exception(ClientGone("the client went away while waiting for its model"))
            self._feed(ev.RequestCancelled(self._now(), ticket))

    # ---- control API ------------------------------------------------------------------
    def command(self, verb: str, model: str) -> dict[str, Any]:
        """``sleep``, ``wake``, ``pin``, ``unpin`` or ``switch`` ``model``; raises
        :class:`SwitchConflict` (409) or :class:`ModelNotFound` (404)."""
        now = self._now()
        events: dict[str, ev.Event] = {
            "sleep": ev.SleepRequested(now, model),
            "wake": ev.WakeRequested(now, model),
            "pin": ev.PinRequested(now, model),
            "unpin": ev.UnpinRequested(now, model),
            "switch": ev.SwitchRequested(now, model),
        }
        self._feed(events[verb])
        return self.model_status(model)

    def model_status(self, model: str) -> dict[str, Any]:
        s = self.scheduler
        spec = s.settings.spec(model)
        return {
            "model": model,
            "state": s.state(model).value,
            "pinned": s.pinned(model),
            "in_flight": s.in_flight(model),
            "queued": s.queue_depth(model),
            "engine": spec.engine.value,
            "eviction": {
                "weights": spec.eviction.weights.value,
                "process": spec.eviction.process.value,
            },
            "footprint_gib": spec.footprint_gib,
            "gpu": spec.gpu,
        }

    def status(self) -> dict[str, Any]:
        s = self.scheduler
        gpus = {
            g: {"budget_gib": b, "resident_gib": s.resident_gib(g)}
            for g, b in s.settings.gpu_budget_gib.items()
        }
        return {
            "policy": s.settings.policy.value,
            "gpus": gpus,
            "models": [self.model_status(m.name) for m in s.settings.models],
        }

    def serving(self, model: str) -> bool:
        """Awake (or on its way): /health does not count a sleeping model as missing."""
        return self.scheduler.state(model) is not ModelState.ASLEEP

    # ---- the scheduler loop -----------------------------------------------------------
    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _feed(self, event: ev.Event) -> None:
        try:
            actions = self.scheduler.handle(event)
        except ev.IllegalTransition:
            log.exception("switch scheduler refused %r", event)
            return
        for a in actions:
            self._perform(a)
        self._observe()
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.scheduler.wakeup_at()
        if at is not None and not self._closing:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(at, lambda: self._feed(ev.Tick(self._now())))

    def _observe(self) -> None:
        s, m = self.scheduler, self.metrics
        for spec in s.settings.models:
            m.queue_depth.labels(spec.name).set(s.queue_depth(spec.name))
            m.awake.labels(spec.name).set(1 if s.state(spec.name) is ModelState.AWAKE else 0)

    def _perform(self, a: ev.Action) -> None:
        if isinstance(a, ev.Admit):
            self.metrics.queue_wait.labels(a.model).observe(a.waited_s)
            fut = self._waiting.get(a.request_id)
            if fut is not None and not fut.done():
                fut.set_result(a.waited_s)
            elif fut is None or fut.done():
                # Its client left between admission and now: give the guard back.
                asyncio.get_running_loop().call_soon(self.finished, a.request_id)
        elif isinstance(a, ev.TimeOut | ev.Fail):
            log.warning("request for %s answered: %s", a.model, a.error.message)
            fut = self._waiting.get(a.request_id)
            if fut is not None and not fut.done():
                fut.set_exception(a.error)
        elif isinstance(a, ev.Hold):
            log.info("request %s waits for model %s", a.request_id, a.model)
        elif isinstance(a, ev.StartDrain):
            log.info("switch: draining %s (%d streams) for %s", a.model, a.in_flight, a.reason)
        elif isinstance(a, ev.Undrain):
            log.info("switch: %s stays awake (drain cancelled)", a.model)
        elif isinstance(a, ev.Sleep):
            self._spawn(self._sleep(a), f"sleep {a.model}")
        elif isinstance(a, ev.Wake):
            self._spawn(self._wake(a), f"wake {a.model}")
        elif isinstance(a, ev.GiveUpWake):
            log.error("switch: giving up waking %s: %s", a.model, a.error.message)
        elif isinstance(a, ev.SwitchDone):
            src = ",".join(sorted(a.from_models)) or "none"
            self.metrics.switches.labels(src, a.to, a.result.value).inc()
            for phase, seconds in a.phases.items():
                self.metrics.phase_seconds.labels(phase.value).observe(seconds)
            log.info(
                "switch %s -> %s: %s (%s)", src, a.to, a.result.value,
                ", ".join(f"{p.value} {v:.2f} s" for p, v in a.phases.items()),
            )  # fmt: skip

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _steps(self, model: str, steps: tuple[Step, ...]) -> None:
        engine = self.engines[model]
        for step in steps:
            log.info("switch: %s: %s", model, step.value)
            await engine.perform(step)

    async def _sleep(self, a: ev.Sleep) -> None:
        t0 = self._now()
        try:
            await self._steps(a.model, a.steps)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the scheduler must hear an outcome, whatever failed
            log.warning("switch: putting %s to sleep (%s) failed: %s", a.model, a.policy, exc)
            self._feed(ev.SleepFailed(self._now(), a.model, _why(exc)))
        else:
            self._feed(ev.SleepCompleted(self._now(), a.model, self._now() - t0))

    async def _wake(self, a: ev.Wake) -> None:
        t0 = self._now()
        try:
            await self._steps(a.model, a.steps)
            r = self.pool.replicas[replica_id(_model(self.config, a.model))]
            if r.client is None or not await r.client.health():
                raise AlbatrossError(f"model {a.model!r} does not answer after its wake")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the scheduler must hear an outcome, whatever failed
            log.warning("switch: waking %s (attempt %d) failed: %s", a.model, a.attempt, exc)
            self._feed(ev.WakeFailed(self._now(), a.model, self._now() - t0, _why(exc)))
        else:
            self._feed(ev.WakeCompleted(self._now(), a.model, self._now() - t0))


def _why(exc: BaseException) -> str:
    return exc.message if isinstance(exc, AlbatrossError) else f"{type(exc).__name__}: {exc}"


def _model(config: Config, name: str) -> ModelConfig:
    m = config.model(name)
    assert m is not None
    return m


def _router_name(m: ModelConfig) -> str:
    """The router names a model after its file: a name safe as a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in m.name)
