"""One engine child process: started in its own session, stopped politely then firmly.

What stays true for every process started by :func:`spawn`:

- it leads a new session and process group (``pgid == pid``), so a signal for "the
  engine" reaches every process it started, and a Ctrl-C in the gateway's terminal
  does not reach it behind the supervisor's back;
- stdin is ``/dev/null``; stdout and stderr are appended to one log file, which is
  never truncated, so the output of earlier runs survives a restart;
- the kernel sends it SIGTERM when the gateway dies (``PR_SET_PDEATHSIG``), so even a
  SIGKILLed gateway takes its engines down. Pdeathsig reaches only this process, not
  its own children: an engine that forks workers must stop them when it gets SIGTERM
  (llama-server has none);
- no shell is involved: ``argv`` is executed as given.

Pdeathsig fires when the *thread* that forked the child exits, not the process. Call
:func:`spawn` from the event loop's thread (asyncio and uvloop both fork there); never
from a worker thread that may finish before the engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Resolved once, here (Linux + glibc only), so that the forked child only calls an
# already-bound C function: in the child, before exec, anything that might take a lock
# another thread held at fork time (an import, a dlsym) could deadlock.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_SECRET_FLAG_WORDS = ("key", "token", "secret", "password")


def _child_setup(parent_pid: int) -> Callable[[], None]:
    """The ``preexec_fn``: runs in the child after fork, before exec.

    preexec_fn is unsafe when other threads hold locks at fork time; this one touches
    only a pre-resolved libc function and two syscalls, which is the accepted use.
    """

    def setup() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
        # The parent may have died between fork and prctl; then the signal will never
        # come, so leave now instead of becoming an orphan engine.
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


def _shown_argv(argv: Sequence[str]) -> str:
    """argv for the log header, with the values of secret-looking flags hidden."""

    def secret(flag: str) -> bool:
        return flag.startswith("-") and any(w in flag.lower() for w in _SECRET_FLAG_WORDS)

    shown = list(argv)
    for i, arg in enumerate(shown):
        if i > 0 and secret(shown[i - 1]) and "=" not in shown[i - 1]:
            shown[i] = "***"  # --api-key VALUE
        elif "=" in arg and secret(arg.partition("=")[0]):
            shown[i] = arg.partition("=")[0] + "=***"  # --api-key=VALUE
    return shlex.join(shown)


def signal_name(sig: int) -> str:
    """``SIGKILL`` for 9; ``signal 42`` for a number without a name."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def describe_returncode(code: int) -> str:
    """``exited with code 1`` or ``killed by SIGKILL``, from an asyncio returncode."""
    return f"exited with code {code}" if code >= 0 else f"killed by {signal_name(-code)}"


class EngineProcess:
    """A running (or finished) child started by :func:`spawn`. Not thread-safe."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self._proc = proc
        self.pid: int = proc.pid
        """Also the process group id."""
        self.log_path = log_path
        self._stop_lock = asyncio.Lock()
        self._stopped = False

    def __repr__(self) -> str:
        return f"<EngineProcess pid={self.pid} returncode={self.returncode}>"

    @property
    def returncode(self) -> int | None:
        """None while running; else the exit code, or ``-N`` when killed by signal N."""
        return self._proc.returncode

    async def wait(self) -> int:
        """Wait for the child to exit (it is reaped) and return its returncode."""
        return await self._proc.wait()

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to every process in the child's group; no-op if none is left."""
        # Safe after the leader was reaped as long as a member remains: the kernel does
        # not reuse a pid while it is still some group's id.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    async def stop(self, grace_s: float) -> int:
        """Stop the whole group: SIGTERM (+SIGCONT), ``grace_s`` for the child to exit, SIGKILL.

        Returns the child's returncode. When the grace runs out a warning is logged
        and the group is SIGKILLed. Once the child has exited, whatever is left in its
        group (workers it failed to stop) is SIGKILLed too, so nothing is orphaned.
        Safe to call after the child exited on its own, more than once, and
        concurrently (later calls wait for the first). If cancelled part-way, calling
        again finishes the job.
        """
        async with self._stop_lock:
            if not self._stopped:
                if self.returncode is None:
                    self.signal_group(signal.SIGTERM)
                    # A stopped process (SIGSTOP, a debugger) acts on SIGTERM only once
                    # continued; without this it would always cost the full grace.
                    self.signal_group(signal.SIGCONT)
                    try:
                        async with asyncio.timeout(grace_s):
                            await self.wait()
                    except TimeoutError:
                        logger.warning(
                            "engine pid %d still running %.1f s after SIGTERM; "
                            "sending SIGKILL to its process group (log: %s)",
                            self.pid,
                            grace_s,
                            self.log_path,
                        )
                        self.signal_group(signal.SIGKILL)
                        await self.wait()
                self.signal_group(signal.SIGKILL)
                self._stopped = True
            return await self.wait()


async def spawn(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> EngineProcess:
    """Start ``argv`` (no shell) as a new session, output appended to ``log_path``.

    ``log_path``'s directory is created if missing. ``env`` is the child's whole
    environment; None inherits the gateway's. Must be called from the event loop's
    thread (see the module docstring). Raises ValueError for an empty argv and OSError
    when the program cannot be started (not found, not executable): fix the command.
    """
    if not argv:
        raise ValueError("argv is empty: nothing to run")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # A local append is not worth a thread; the file is closed here once the child has
    # its own copy of the descriptor.
    with log_path.open("ab", buffering=0) as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"--- albatross {stamp}: starting {_shown_argv(argv)}\n".encode())
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=None if env is None else dict(env),
            start_new_session=True,
            preexec_fn=_child_setup(os.getpid()),
        )
    return EngineProcess(proc, log_path)
