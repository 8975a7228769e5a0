"""A restored engine process, watched and stopped exactly like a spawned one.

A restore runs criu with ``--restore-sibling``, so the restored engine is a child of
this process, but not one asyncio started: asyncio's child watchers only wait for pids
they spawned, so nothing else reaps it. :func:`adopt` wraps the pid in a pidfd (which
cannot be fooled by pid reuse) and reaps it with ``waitid(P_PIDFD)`` when the kernel
says it exited, then hands it to :class:`~albatross.supervisor.process.EngineProcess`,
whose stop rules (TERM, grace, KILL, whole process group) therefore apply unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
from pathlib import Path
from typing import cast

from albatross.supervisor.process import EngineProcess


class _PidfdProcess:
    """The part of ``asyncio.subprocess.Process`` that EngineProcess uses: pid,
    returncode and wait(), for a child we did not spawn."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._fd = os.pidfd_open(pid)
        self._exited: asyncio.Future[int] | None = None

    def _reap(self) -> bool:
        """Collect the exit status if the child has exited; True once it has."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        if not poller.poll(0):
            return False  # a pidfd turns readable when its process exits
        try:
            info = os.waitid(os.P_PIDFD, self._fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Not our child after all (restored without --restore-sibling): someone
            # else reaps it; the pidfd still tells us it is gone, but not how.
            info = None
            self.returncode = -9
        if info is None:
            if self.returncode is None:
                return False
        elif info.si_code == os.CLD_EXITED:
            self.returncode = info.si_status
        else:
            self.returncode = -info.si_status
        return True

    async def wait(self) -> int:
        if self.returncode is not None:
            return self.returncode
        loop = asyncio.get_running_loop()
        if self._exited is None:
            self._exited = loop.create_future()
            fut = self._exited

            def readable() -> None:
                if self._reap():
                    loop.remove_reader(self._fd)
                    os.close(self._fd)
                    if not fut.done():
                        fut.set_result(cast(int, self.returncode))

            loop.add_reader(self._fd, readable)
            readable()  # it may have exited before the reader was added
        return await asyncio.shield(self._exited)

    def __del__(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(OSError):
                os.close(self._fd)


def adopt(pid: int, log_path: Path) -> EngineProcess:
    """An :class:`EngineProcess` for the restored child ``pid`` (its log: ``log_path``).

    Raises ProcessLookupError if ``pid`` is already gone.
    """
    return EngineProcess(cast(asyncio.subprocess.Process, _PidfdProcess(pid)), log_path)
