"""Keeps N engine replicas running and tells a listener when each is usable.

Theory of operation. Each replica has one task, owned by the :class:`Supervisor`, that
loops over *runs*. A run picks a free port, spawns the engine (:mod:`.process`), polls
``probe(base_url)`` until it answers True (the replica is then *ready* and the listener
hears ``replica_ready``), then watches it: exit, or ``health_failures`` failed checks in
a row, ends the run. The listener then hears ``replica_lost``, whatever is left of the
process group is stopped (TERM, grace, KILL), and the next run starts after a back-off
(:mod:`albatross.core.backoff`) that grows while runs keep failing and resets after a
stable one. A run that never gets ready within ``ready_timeout_s`` also ends with
``replica_lost`` and is restarted, on a new port (which is how a lost race for the port
between our probe bind and the engine's bind heals itself).

What stays true:

- the listener sees, per replica, ``ready`` and ``lost`` alternating, starting with
  ``ready`` or ``lost`` (a run that failed before becoming ready is reported lost too);
  every ``ready`` may carry a new ``base_url``;
- after :meth:`Supervisor.close` begins there are no restarts and no ``ready``; the
  listener hears ``lost`` for each replica it last heard ``ready`` for, before the
  replica's processes are stopped;
- when :meth:`Supervisor.close` returns, no replica task and no engine process is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from albatross.config import SupervisorConfig
from albatross.core.backoff import Backoff
from albatross.supervisor.process import EngineProcess, describe_returncode, signal_name, spawn

logger = logging.getLogger("albatross.supervisor")

READY_POLL_S = 0.05
"""Pause between readiness probes of a starting replica."""
START_ATTEMPTS = 3
"""Runs in a row that may fail before :meth:`Supervisor.start` gives up on a replica.

More than one, so that a lost port race at start does not fail the gateway; few, so a
wrong command line fails fast instead of after ``ready_timeout_s``.
"""
LOG_TAIL_LINES = 20

Probe = Callable[[str], Awaitable[bool]]
"""``probe(base_url)`` -> is the engine healthy? Errors and hangs count as False."""


@dataclass(frozen=True)
class ReplicaSpec:
    """How to run one replica."""

    replica_id: str
    """Unique among the supervisor's replicas, e.g. ``"SmolLM2-135M-Instruct/0"``."""
    argv: Callable[[int], list[str]]
    """Command line that makes the engine listen on the given port (no shell)."""
    log_path: Path
    """Engine stdout and stderr are appended here, across restarts."""
    env: Mapping[str, str] | None = None
    """The engine's whole environment; None inherits the gateway's."""


class ReplicaListener(Protocol):
    """Told about replicas becoming usable and unusable; called on the event loop.

    Must return quickly and not raise (an exception is logged and ignored).
    """

    def replica_ready(self, replica_id: str, base_url: str, pid: int) -> None:
        """The probe said healthy: send requests to ``base_url`` (may differ per run)."""

    def replica_lost(self, replica_id: str, reason: str) -> None:
        """The replica exited, crashed, failed its health checks, never got ready, or the
        supervisor is closing. Stop sending it requests."""


class ReplicaImages(Protocol):
    """Process images of replicas: warm restarts instead of cold starts (optional).

    Implemented by :class:`albatross.checkpoint.engine.ReplicaCheckpointer`. When given
    to the supervisor, every run of a replica that has an image restores it instead of
    spawning the engine; a failed restore is logged and the run starts cold.
    """

    def has_image(self, replica_id: str) -> bool:
        """An image to restore exists for the replica."""

    async def checkpoint(self, replica_id: str, proc: EngineProcess, base_url: str) -> object:
        """Dump ``proc`` into an image; the process ends. Raises if it cannot (the
        process then keeps running). Returns a description of what was done."""

    async def restore(self, replica_id: str, log_path: Path) -> tuple[EngineProcess, str]:
        """Start the replica from its image: its process and base URL. Raises when
        the image is missing, damaged or cannot be restored."""


class SupervisorError(Exception):
    """Raised by :meth:`Supervisor.start` when a replica cannot become ready.

    (Also when :meth:`Supervisor.close` is called while start() still waits.) The message names the replica, why it failed, its log file and the log's last
    lines; the cause is almost always in those lines (bad model path, port in use,
    out of memory). Fix the command line or the environment and start again; every
    process the supervisor had started is already stopped.
    """

    def __init__(self, replica_id: str, reason: str, log_path: Path) -> None:
        self.replica_id = replica_id
        self.reason = reason
        self.log_path = log_path
        self.log_tail = _log_tail(log_path)
        tail = "".join(f"\n    {line}" for line in self.log_tail) or " (empty)"
        super().__init__(
            f"replica {replica_id!r} did not become ready: {reason}\n"
            f"  log file: {log_path}\n  last lines of the log:{tail}"
        )


def _log_tail(path: Path) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            data = f.read()
    except OSError as exc:
        return [f"(cannot read the log: {exc.strerror})"]
    return data.decode("utf-8", "replace").splitlines()[-LOG_TAIL_LINES:]


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(eq=False)
class _Replica:
    spec: ReplicaSpec
    backoff: Backoff
    first_ready: asyncio.Future[None] | None = None
    proc: EngineProcess | None = None
    announced: bool = False
    """The listener last heard ``ready`` for it."""
    failed_runs: int = 0
    """Runs in a row that ended without being ready; reset when a run gets ready."""
    last_reason: str | None = None
    base_url: str | None = None
    """Of the current run."""
    parked: bool = False
    """Checkpointed: not restarted until :meth:`Supervisor.restore` sets ``wake``."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    restore_next: bool = False
    """The next run restores even if no image is known: a failure is then reported."""
    became_ready: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    """Runs one engine process per :class:`ReplicaSpec`; see the module docstring.

    Use from one event loop: ``await start()``, then ``await close()`` (also on error).
    """

    def __init__(
        self,
        specs: Sequence[ReplicaSpec],
        config: SupervisorConfig,
        listener: ReplicaListener,
        probe: Probe,
        *,
        host: str = "127.0.0.1",
        images: ReplicaImages | None = None,
    ) -> None:
        """Raises ValueError for duplicate replica ids or back-off bounds with max < initial."""
        ids = [s.replica_id for s in specs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"replica ids must be unique, got {ids}")
        backoff = Backoff.create(config.restart_backoff_initial_s, config.restart_backoff_max_s)
        self._replicas = {s.replica_id: _Replica(s, backoff) for s in specs}
        self._config = config
        self._listener = listener
        self._probe_fn = probe
        self._host = host
        self._images = images
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._closed = asyncio.Event()

    async def start(self) -> None:
        """Start every replica; return once each has been ready once.

        Raises SupervisorError when a replica is not ready within ``ready_timeout_s``,
        failed :data:`START_ATTEMPTS` runs in a row, or close() was called meanwhile;
        everything started is stopped first. If cancelled, also stops everything.
        Raises RuntimeError if called twice or after close().
        """
        if self._tasks or self._closing:
            raise RuntimeError("Supervisor.start() may be called once, before close()")
        loop = asyncio.get_running_loop()
        for r in self._replicas.values():
            r.first_ready = loop.create_future()
            self._tasks.append(asyncio.create_task(self._supervise(r), name=r.spec.replica_id))
        waiting = {r.first_ready: r for r in self._replicas.values() if r.first_ready is not None}
        if not waiting:
            return  # nothing to supervise (a gateway in front of external endpoints only)
        try:
            done, pending = await asyncio.wait(
                waiting,
                timeout=self._config.ready_timeout_s,
                return_when=asyncio.FIRST_EXCEPTION,
            )
            for fut in done:
                if (exc := fut.exception()) is not None:
                    raise exc
            if pending:
                r = waiting[next(iter(pending))]
                reason = f"not ready within {self._config.ready_timeout_s:g} s"
                if r.last_reason:
                    reason += f" (an earlier run: {r.last_reason})"
                raise SupervisorError(r.spec.replica_id, reason, r.spec.log_path)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop every replica (TERM, ``stop_grace_s``, KILL) and its task. Idempotent.

        Replicas are stopped in parallel, so this takes at most about one grace period.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        for r in self._replicas.values():
            if r.announced:
                self._report_lost(r, "stopped: the supervisor is closing")
            if r.first_ready is not None:
                if not r.first_ready.done():
                    # Wakes a start() still waiting, which then raises this.
                    err = SupervisorError(
                        r.spec.replica_id, "closed while starting", r.spec.log_path
                    )
                    r.first_ready.set_exception(err)
                # Marked retrieved: when no start() waits, nobody else will look.
                r.first_ready.exception()
        for t in self._tasks:
            t.cancel()
        # Shielded: if close() itself is cancelled, the tasks still finish stopping
        # their processes instead of being cancelled in the middle of a stop.
        await asyncio.shield(asyncio.gather(*self._tasks, return_exceptions=True))
        self._closed.set()

    def pid(self, replica_id: str) -> int | None:
        """The pid (= process group) of the replica's current process, None between runs.

        Raises KeyError for an unknown replica id.
        """
        proc = self._replica(replica_id).proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def checkpoint(self, replica_id: str) -> object:
        """Dump the ready replica's engine into an image and park the replica.

        The listener hears ``lost`` ("checkpointed"); the replica is not restarted
        until :meth:`restore`. Returns the images' description of the outcome. Raises
        RuntimeError without ``images``, or when the replica is not ready or already
        checkpointed; errors of the dump propagate and the replica keeps running.
        """
        r = self._replica(replica_id)
        if self._images is None:
            raise RuntimeError("checkpoint needs a Supervisor created with images=")
        proc, base_url = r.proc, r.base_url
        if r.parked or proc is None or proc.returncode is not None or base_url is None:
            raise RuntimeError(f"replica {replica_id!r} is not running; nothing to checkpoint")
        r.wake.clear()
        r.parked = True
        try:
            outcome = await self._images.checkpoint(replica_id, proc, base_url)
        except BaseException:
            r.parked = False
            r.wake.set()  # in case the run ended meanwhile and waits parked
            raise
        await proc.wait()
        return outcome

    async def restore(self, replica_id: str) -> None:
        """Start a checkpointed replica again, from its image (cold if that fails).

        Returns once it is ready. Raises RuntimeError when the replica is not
        checkpointed, SupervisorError when it is not ready within ``ready_timeout_s``
        (the supervisor keeps trying, as for any lost replica).
        """
        r = self._replica(replica_id)
        if not r.parked:
            raise RuntimeError(f"replica {replica_id!r} is not checkpointed")
        r.became_ready.clear()
        r.wake.set()
        try:
            async with asyncio.timeout(self._config.ready_timeout_s):
                await r.became_ready.wait()
        except TimeoutError:
            reason = f"not ready within {self._config.ready_timeout_s:g} s after restore"
            raise SupervisorError(replica_id, reason, r.spec.log_path) from None

    async def kill(self, replica_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the replica's process group, as a crash would (chaos tests).

        Returns once the signal is sent; the supervisor notices the exit and restarts
        the replica like any other. No-op between runs. Raises KeyError for an unknown id.
        """
        proc = self._replica(replica_id).proc
        if proc is not None and proc.returncode is None:
            logger.info("replica %s: sending %s to pid %d", replica_id, signal_name(sig), proc.pid)
            proc.signal_group(sig)

    async def replace(self, replica_id: str) -> None:
        """Stop the replica's process politely (TERM, ``stop_grace_s``, KILL); the
        supervisor then restarts it like any lost replica. Returns once it has exited.

        An engine may not finish a SIGTERM while a client keeps a connection to it
        alive (llama-server waits for its keep-alive connections), hence the KILL.
        """
        proc = self._replica(replica_id).proc
        if proc is None or proc.returncode is not None:
            return
        logger.info("replica %s: replacing pid %d", replica_id, proc.pid)
        proc.signal_group(signal.SIGTERM)
        try:
            async with asyncio.timeout(self._config.stop_grace_s):
                await proc.wait()
        except TimeoutError:
            logger.warning(
                "replica %s: pid %d still running %.1f s after SIGTERM; SIGKILL",
                replica_id,
                proc.pid,
                self._config.stop_grace_s,
            )
            proc.signal_group(signal.SIGKILL)
            await proc.wait()

    def _replica(self, replica_id: str) -> _Replica:
        try:
            return self._replicas[replica_id]
        except KeyError:
            known = ", ".join(self._replicas) or "none"
            raise KeyError(f"unknown replica {replica_id!r}; known: {known}") from None

    # --- one task per replica ---------------------------------------------------------

    async def _supervise(self, r: _Replica) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                reason = await self._run_once(r)
                if r.parked:
                    reason = f"checkpointed ({reason})"
                logger.warning("replica %s lost: %s", r.spec.replica_id, reason)
                self._report_lost(r, reason)
                await self._stop_proc(r)
                if r.parked:
                    await r.wake.wait()  # until restore(); then no back-off
                    r.parked = False
                    r.restore_next = True
                    continue
                delay, r.backoff = r.backoff.down(loop.time())
                if r.first_ready is not None and not r.first_ready.done():
                    r.failed_runs += 1
                    r.last_reason = reason
                    if r.failed_runs >= START_ATTEMPTS:
                        why = f"{r.failed_runs} runs failed in a row; the last one: {reason}"
                        err = SupervisorError(r.spec.replica_id, why, r.spec.log_path)
                        r.first_ready.set_exception(err)
                        return
                logger.info("replica %s: restarting in %.2f s", r.spec.replica_id, delay)
                await asyncio.sleep(delay)
        except Exception as exc:
            # Top of a task: nothing above would see this. A bug (an argv callable that
            # raises, say) stops this replica only; start() reports it, close() cleans up.
            logger.exception("replica %s: supervision failed", r.spec.replica_id)
            if r.announced:
                self._report_lost(r, f"supervision failed: {exc!r}")
            if r.first_ready is not None and not r.first_ready.done():
                err = SupervisorError(
                    r.spec.replica_id, f"supervision failed: {exc!r}", r.spec.log_path
                )
                err.__cause__ = exc
                r.first_ready.set_exception(err)
        finally:
            await self._stop_proc(r)

    async def _run_once(self, r: _Replica) -> str:
        """One run; returns why it ended. ``r.proc`` may still be running then."""
        restored = await self._restore(r)
        if restored is not None:
            r.proc, base_url = restored
        else:
            try:
                port = _free_port(self._host)
            except OSError as exc:
                return f"cannot pick a free port on {self._host!r}: {exc}"
            host = f"[{self._host}]" if ":" in self._host else self._host
            base_url = f"http://{host}:{port}"
            try:
                r.proc = await self._spawn(r, port)
            except OSError as exc:
                return f"cannot start the engine: {exc}"
        proc = r.proc
        r.base_url = base_url
        logger.info(
            "replica %s: started pid %d for %s (log: %s)",
            r.spec.replica_id,
            proc.pid,
            base_url,
            r.spec.log_path,
        )
        exited = asyncio.ensure_future(proc.wait())
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            reason = await self._until_ready(base_url, exited)
            if reason is not None:
                return reason
            logger.info(
                "replica %s ready at %s after %.2f s (pid %d)",
                r.spec.replica_id,
                base_url,
                loop.time() - started,
                proc.pid,
            )
            r.backoff = r.backoff.up(loop.time())
            r.failed_runs = 0
            self._report_ready(r, base_url, proc.pid)
            return await self._until_down(r.spec.replica_id, base_url, exited)
        finally:
            exited.cancel()

    async def _restore(self, r: _Replica) -> tuple[EngineProcess, str] | None:
        """The replica restored from its image, or None: no image, or the restore
        failed (logged with the reason; the run then starts cold)."""
        wanted, r.restore_next = r.restore_next, False
        if self._images is None or not (wanted or self._images.has_image(r.spec.replica_id)):
            return None
        # Shielded like _spawn: a cancel must not orphan a restored engine.
        restoring = asyncio.ensure_future(self._images.restore(r.spec.replica_id, r.spec.log_path))
        try:
            return await asyncio.shield(restoring)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await (await restoring)[0].stop(self._config.stop_grace_s)
            raise
        except Exception as exc:
            logger.warning("replica %s: restore failed, starting cold: %s", r.spec.replica_id, exc)
            return None

    async def _spawn(self, r: _Replica, port: int) -> EngineProcess:
        # Shielded: a cancel landing between fork and our getting the handle would leave
        # an engine nobody stops. If cancelled, finish the spawn, stop it, then give up.
        spawning = asyncio.ensure_future(spawn(r.spec.argv(port), r.spec.log_path, r.spec.env))
        try:
            return await asyncio.shield(spawning)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                await (await spawning).stop(self._config.stop_grace_s)
            raise

    async def _until_ready(self, base_url: str, exited: asyncio.Future[int]) -> str | None:
        """None once the probe says ready; else why the run cannot become ready."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.ready_timeout_s
        while True:
            if exited.done():
                return f"{describe_returncode(exited.result())} before becoming ready"
            remaining = deadline - loop.time()
            if remaining <= 0:
                return f"not ready within {self._config.ready_timeout_s:g} s"
            if await self._probe(base_url, min(remaining, self._config.health_interval_s)):
                return None
            await asyncio.wait({exited}, timeout=min(READY_POLL_S, max(0.0, remaining)))

    async def _until_down(self, replica_id: str, base_url: str, exited: asyncio.Future[int]) -> str:
        """Watch a ready replica; return why it is no longer usable."""
        interval = self._config.health_interval_s
        failures = 0
        while True:
            await asyncio.wait({exited}, timeout=interval)
            if exited.done():
                return describe_returncode(exited.result())
            # A busy engine answers /health slowly; only a long silence counts.
            if await self._probe(base_url, self._config.health_timeout_s):
                failures = 0
                continue
            failures += 1
            logger.info("replica %s: health check %d failed", replica_id, failures)
            if failures >= self._config.health_failures:
                return f"failed {failures} health checks in a row"

    async def _probe(self, base_url: str, limit_s: float) -> bool:
        try:
            async with asyncio.timeout(limit_s):
                return bool(await self._probe_fn(base_url))
        except TimeoutError:
            return False
        except Exception as exc:
            # The probe's own errors (connection refused, garbage reply) mean "not
            # healthy"; the loop must survive them. Refusals are routine while an engine
            # starts, hence debug and no traceback.
            logger.debug("probe of %s failed: %r", base_url, exc)
            return False

    async def _stop_proc(self, r: _Replica) -> None:
        if r.proc is None:
            return
        code = await r.proc.stop(self._config.stop_grace_s)
        logger.info(
            "replica %s: pid %d %s", r.spec.replica_id, r.proc.pid, describe_returncode(code)
        )
        r.proc = None

    # --- listener calls: one place, so a listener bug cannot end supervision ----------

    def _report_ready(self, r: _Replica, base_url: str, pid: int) -> None:
        if self._closing:
            return
        r.announced = True
        r.became_ready.set()
        if r.first_ready is not None and not r.first_ready.done():
            r.first_ready.set_result(None)
        try:
            self._listener.replica_ready(r.spec.replica_id, base_url, pid)
        except Exception:
            logger.exception("listener.replica_ready(%r) raised", r.spec.replica_id)

    def _report_lost(self, r: _Replica, reason: str) -> None:
        r.announced = False
        try:
            self._listener.replica_lost(r.spec.replica_id, reason)
        except Exception:
            logger.exception("listener.replica_lost(%r) raised", r.spec.replica_id)
