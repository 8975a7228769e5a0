"""Network namespaces for tests and benchmarks: a client, a router and two gateways.

:func:`topology` builds, in fresh namespaces named ``albt-<pid>-<n>-<role>``::

    client (10.77.0.2, fd77::2) ── router ──┬── gw_a (10.77.1.2, fd77:1::2)
                                            └── gw_b (10.77.2.2, fd77:2::2)

The service address (VIP, 10.77.100.1 and fd77:100::1) starts on gw_a, and the router
sends it to gw_a by a /32 (/128) route; moving it means removing it on A, adding it on
B and re-pointing the route (:mod:`albatross.netmove.vip`). IPv6 addresses skip
duplicate address detection so they work at once.

Everything is torn down on exit, whatever happened inside: deleting a namespace
destroys its veths, qdiscs and the eBPF programs attached to them. Namespaces left by
a process that died (a killed test run) are removed by :func:`remove_stale`, which
:func:`topology` calls first.

:meth:`Netns.entered` moves only the calling thread into the namespace (``setns``):
sockets and netlink handles created there stay in that namespace after the thread
leaves, which lets one test process play every host.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Netns", "Topology", "remove_stale", "topology"]

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
PREFIX = "albt-"
_STALE = re.compile(rf"^{PREFIX}(\d+)-")
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(args: Sequence[str], batch: str | None = None) -> None:
    done = subprocess.run(
        ["ip", *args],
        input=batch,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class Netns:
    """One named network namespace (``/run/netns/NAME``)."""

    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the calling thread in this namespace for the ``with`` block."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(self.path, os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)

    def argv(self, *command: str) -> list[str]:
        """``command`` run inside this namespace (through ``ip netns exec``)."""
        return ["ip", "netns", "exec", self.name, *command]

    def write_sysctl(self, key: str, value: str) -> None:
        """Set a per-namespace ``net.*`` sysctl, e.g. ``ipv4/tcp_timestamps``."""
        with self.entered():
            Path("/proc/sys/net", key).write_text(value)

    def counters(self) -> dict[str, int]:
        """SNMP counters of this namespace, as ``Tcp.OutRsts``, ``TcpExt.PAWSEstab``..."""
        out: dict[str, int] = {}
        with self.entered():
            for name in ("snmp", "netstat"):
                lines = Path("/proc/thread-self/net", name).read_text().splitlines()
                for head, values in itertools.pairwise(lines):
                    proto, _, keys = head.partition(":")
                    vproto, _, nums = values.partition(":")
                    if proto != vproto or not keys or keys.split()[0].isdigit():
                        continue
                    for key, num in zip(keys.split(), nums.split(), strict=False):
                        with contextlib.suppress(ValueError):
                            out[f"{proto}.{key}"] = int(num)
        return out


@dataclass(frozen=True)
class Topology:
    """The namespaces and addresses :func:`topology` made."""

    client: Netns
    router: Netns
    gw_a: Netns
    gw_b: Netns
    client_ip: str = "10.77.0.2"
    gw_a_ip: str = "10.77.1.2"
    gw_b_ip: str = "10.77.2.2"
    router_a_ip: str = "10.77.1.1"
    router_b_ip: str = "10.77.2.1"
    vip: str = "10.77.100.1"
    client_ip6: str = "fd77::2"
    gw_a_ip6: str = "fd77:1::2"
    gw_b_ip6: str = "fd77:2::2"
    vip6: str = "fd77:100::1"
    gw_ifname: str = "eth0"
    """The gateways' interface towards the router (same name on A and B)."""
    router_a_ifname: str = "to_a"
    router_b_ifname: str = "to_b"

    @property
    def namespaces(self) -> tuple[Netns, ...]:
        return (self.client, self.router, self.gw_a, self.gw_b)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete(name: str) -> None:
    with contextlib.suppress(RuntimeError):
        _ip(["netns", "delete", name])


def remove_stale() -> list[str]:
    """Delete the namespaces of test processes that no longer run; returns their names."""
    removed = []
    if NETNS_DIR.is_dir():
        for entry in NETNS_DIR.iterdir():
            match = _STALE.match(entry.name)
            if match and not _alive(int(match.group(1))):
                _delete(entry.name)
                removed.append(entry.name)
    return removed


def _build(t: Topology) -> None:
    c, r, a, b = (ns.name for ns in t.namespaces)
    # ``ip -batch`` takes no per-line ``-n``: one batch for the root namespace, then
    # one per namespace (five processes instead of forty).
    root = [f"netns add {ns.name}" for ns in t.namespaces] + [
        f"link add eth0 netns {c} type veth peer name to_client netns {r}",
        f"link add {t.gw_ifname} netns {a} type veth peer name {t.router_a_ifname} netns {r}",
        f"link add {t.gw_ifname} netns {b} type veth peer name {t.router_b_ifname} netns {r}",
    ]
    per_ns: dict[str, list[str]] = {ns: ["link set lo up"] for ns in (c, r, a, b)}
    wiring = [
        (c, "eth0", "10.77.0.2/24", "fd77::2/64"),
        (r, "to_client", "10.77.0.1/24", "fd77::1/64"),
        (r, t.router_a_ifname, f"{t.router_a_ip}/24", "fd77:1::1/64"),
        (r, t.router_b_ifname, f"{t.router_b_ip}/24", "fd77:2::1/64"),
        (a, t.gw_ifname, f"{t.gw_a_ip}/24", f"{t.gw_a_ip6}/64"),
        (b, t.gw_ifname, f"{t.gw_b_ip}/24", f"{t.gw_b_ip6}/64"),
    ]
    for ns, dev, ip4, ip6 in wiring:
        per_ns[ns] += [
            f"addr add {ip4} dev {dev}",
            f"addr add {ip6} dev {dev} nodad",
            f"link set {dev} up",
        ]
    per_ns[c] += ["route add default via 10.77.0.1", "route add default via fd77::1"]
    for ns, via4, via6 in ((a, t.router_a_ip, "fd77:1::1"), (b, t.router_b_ip, "fd77:2::1")):
        per_ns[ns] += [f"route add default via {via4}", f"route add default via {via6}"]
    per_ns[a] += [
        f"addr add {t.vip}/32 dev {t.gw_ifname}",
        f"addr add {t.vip6}/128 dev {t.gw_ifname} nodad",
    ]
    per_ns[r] += [
        f"route add {t.vip}/32 via {t.gw_a_ip}",
        f"route add {t.vip6}/128 via {t.gw_a_ip6}",
    ]
    _ip(["-batch", "-"], "\n".join(root) + "\n")
    for ns, lines in per_ns.items():
        _ip(["-n", ns, "-batch", "-"], "\n".join(lines) + "\n")
    t.router.write_sysctl("ipv4/ip_forward", "1")
    t.router.write_sysctl("ipv6/conf/all/forwarding", "1")


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    """Build the four namespaces; delete them on exit, even after a failure."""
    remove_stale()
    base = f"{PREFIX}{os.getpid()}-{next(_counter)}"
    t = Topology(
        client=Netns(f"{base}-client"),
        router=Netns(f"{base}-router"),
        gw_a=Netns(f"{base}-a"),
        gw_b=Netns(f"{base}-b"),
    )
    try:
        _build(t)
        yield t
    finally:
        for ns in t.namespaces:
            if ns.path.exists():
                _delete(ns.name)
