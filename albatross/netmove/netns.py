"""Run the calling thread in a named network namespace for a while.

For netlink handles that must live in another namespace than the process's: a router
on the same machine whose VIP route the target gateway points at itself. A handle
opened inside stays bound to that namespace after the thread leaves it
(:class:`~albatross.netmove.vip.VipRoute` opens its handle at construction).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from albatross.netmove.errors import KernelError

__all__ = ["NETNS_DIR", "entered"]

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise KernelError(f"setns into {what}", ctypes.get_errno(), "needs CAP_SYS_ADMIN")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """The calling thread in network namespace ``name`` (``/run/netns/NAME``)."""
    path = NETNS_DIR / name
    try:
        target = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise KernelError(f"opening {path}", errno.ENOENT, "no such network namespace") from exc
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            _setns(target, f"network namespace {name!r}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home, "the original network namespace")
    finally:
        os.close(home)
