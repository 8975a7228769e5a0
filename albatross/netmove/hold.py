"""Zero-window hold (source gateway) and guard (target gateway), in eBPF.

:class:`Hold` attaches ``bpf/hold_egress.c`` as a direct-action classifier on an
interface's TC egress hook (a ``clsact`` qdisc). Flows added to it leave the host with
an advertised window of 0, so their clients stop sending (uploads included) while the
sockets are drained, dumped and moved; nothing else is touched.

:class:`Guard` attaches ``bpf/guard_xdp.c`` as the interface's XDP program on the
target. Flows added to it have their incoming packets dropped until they are removed,
i.e. until their sockets exist again: a segment reaching the target before its socket
would be answered with a RST.

Both are loaded with libbpf (:mod:`.libbpf`) and attached with pyroute2 (netlink), in
the network namespace of the calling thread at :meth:`attach`; the netlink handle is
kept, so :meth:`detach` works from anywhere. Use them as context managers: they always
detach. A process that dies while attached leaves its filter and program behind (the
kernel keeps them alive, and with them every held flow at window 0):
:func:`remove_leftovers` removes anything of ours on an interface, and :meth:`attach`
calls it first, so the next start cleans up after a crash. One gateway per network
namespace is assumed: leftovers are recognised by name, not by owner.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from albatross.netmove.errors import KernelError
from albatross.netmove.libbpf import BPF_NOEXIST, BpfMap, BpfObject, prog_name_by_id
from albatross.netmove.state import Flow

__all__ = ["Guard", "Hold", "remove_leftovers"]

HOLD_PROGRAM = "albatross_hold"
GUARD_PROGRAM = "albatross_guard"
FLOW_KEY_SIZE = 40
TC_EGRESS_PARENT = 0xFFFFFFF3
TC_PRIO = 0xA1B
"""Priority of our egress filter; with the name it identifies ours among others."""
XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
_COUNTER = struct.Struct("=Q")


def _netlink(operation: str, exc: NetlinkError, hint: str = "") -> KernelError:
    return KernelError(operation, int(exc.code), hint)


def _ifindex(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise KernelError(f"interface {ifname!r} lookup", errno.ENODEV, "no such interface here")
    return int(found[0])


def _our_filters(ipr: Any, index: int) -> list[int]:
    """Priorities of egress filters named like ours."""
    prios = []
    for msg in ipr.get_filters(index=index, parent=TC_EGRESS_PARENT):
        options = msg.get_attr("TCA_OPTIONS")
        if options is not None and options.get_attr("TCA_BPF_NAME") == HOLD_PROGRAM:
            prios.append(int(msg["info"]) >> 16)
    return sorted(set(prios))


def _xdp_attached(ipr: Any, index: int) -> tuple[int | None, int]:
    """(program id, mode flags) of the interface's XDP program."""
    link = ipr.get_links(index)[0]
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return None, 0
    prog_id = xdp.get_attr("IFLA_XDP_PROG_ID")
    mode = xdp.get_attr("IFLA_XDP_ATTACHED")
    flags = XDP_FLAGS_SKB_MODE if mode == "xdpgeneric" else XDP_FLAGS_DRV_MODE
    return (int(prog_id) if prog_id else None), flags


def _set_xdp(ipr: Any, index: int, fd: int, flags: int) -> None:
    ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})


def remove_leftovers(
    ifname: str, kinds: tuple[str, ...] = (HOLD_PROGRAM, GUARD_PROGRAM), ipr: Any = None
) -> list[str]:
    """Detach the hold filters and guard programs of ours (those named in ``kinds``)
    from ``ifname``, in the calling thread's network namespace; returns what was
    removed."""
    own = ipr is None
    ipr = IPRoute() if own else ipr
    removed: list[str] = []
    try:
        index = _ifindex(ipr, ifname)
        for prio in _our_filters(ipr, index) if HOLD_PROGRAM in kinds else []:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del-filter", "bpf", index, parent=TC_EGRESS_PARENT, prio=prio)
                removed.append(f"tc egress filter {HOLD_PROGRAM} prio {prio} on {ifname}")
        prog_id, flags = _xdp_attached(ipr, index)
        if (
            GUARD_PROGRAM in kinds
            and prog_id is not None
            and prog_name_by_id(prog_id) == GUARD_PROGRAM
        ):
            with contextlib.suppress(NetlinkError):
                _set_xdp(ipr, index, -1, flags)
                removed.append(f"xdp program {GUARD_PROGRAM} (id {prog_id}) on {ifname}")
    finally:
        if own:
            ipr.close()
    return removed


class _FlowProgram:
    """A BPF program keyed by :class:`Flow`, attached to one interface."""

    program: str
    object_name: str
    map_name: str

    def __init__(self, ifname: str, *, object_path: Path | None = None) -> None:
        self.ifname = ifname
        self._object_path = object_path
        self._obj: BpfObject | None = None
        self._map: BpfMap | None = None
        self._ipr: Any = None
        self._index = 0

    @property
    def attached(self) -> bool:
        return self._map is not None

    def _flows_map(self) -> BpfMap:
        if self._map is None:
            raise RuntimeError(f"{self.program} on {self.ifname} is not attached")
        return self._map

    def attach(self) -> None:
        """Load and attach in the calling thread's network namespace."""
        if self._map is not None:
            return
        # Imported here: ``python -m albatross.netmove.build`` imports this package
        # first, and the module must not be in sys.modules before runpy runs it.
        from albatross.netmove.build import bpf_object

        path = self._object_path or bpf_object(self.object_name)
        obj = BpfObject(path)
        ipr = IPRoute()
        try:
            self._index = _ifindex(ipr, self.ifname)
            remove_leftovers(self.ifname, (self.program,), ipr)
            self._attach(ipr, obj.program_fd(self.program))
            self._map = obj.map(self.map_name, FLOW_KEY_SIZE, _COUNTER.size)
        except BaseException:
            ipr.close()
            obj.close()
            raise
        self._obj, self._ipr = obj, ipr

    def detach(self) -> None:
        """Detach and unload; safe to call twice, and after the interface is gone."""
        if self._obj is None:
            return
        try:
            with contextlib.suppress(NetlinkError, KernelError):
                self._detach(self._ipr)
        finally:
            self._ipr.close()
            self._obj.close()
            self._obj = self._map = self._ipr = None

    def add(self, flows: Iterable[Flow]) -> None:
        """Put ``flows`` under the program; a flow already there keeps its counter."""
        m = self._flows_map()
        for flow in flows:
            try:
                m.update(flow.key(), _COUNTER.pack(0), BPF_NOEXIST)
            except KernelError as exc:
                if exc.errno != errno.EEXIST:
                    raise

    def remove(self, flows: Iterable[Flow]) -> None:
        m = self._flows_map()
        for flow in flows:
            m.delete(flow.key())

    def packets(self, flow: Flow) -> int | None:
        """Packets this program acted on for ``flow``; None when it is not in the map."""
        raw = self._flows_map().lookup(flow.key())
        return None if raw is None else int(_COUNTER.unpack(raw)[0])

    def flows_count(self) -> int:
        return len(self._flows_map().keys())

    def _attach(self, ipr: Any, fd: int) -> None:
        raise NotImplementedError

    def _detach(self, ipr: Any) -> None:
        raise NotImplementedError

    def __enter__(self) -> _FlowProgram:
        self.attach()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()


class Hold(_FlowProgram):
    """Zero-window hold on ``ifname``'s egress; see the module docstring."""

    program = HOLD_PROGRAM
    object_name = "hold_egress"
    map_name = "held_flows"

    def __init__(self, ifname: str, *, object_path: Path | None = None) -> None:
        super().__init__(ifname, object_path=object_path)
        self._made_qdisc = False

    def __enter__(self) -> Hold:
        self.attach()
        return self

    def _attach(self, ipr: Any, fd: int) -> None:
        try:
            ipr.tc("add", "clsact", self._index)
            self._made_qdisc = True
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _netlink(f"tc qdisc add clsact dev {self.ifname}", exc) from exc
        try:
            ipr.tc(
                "add-filter", "bpf", self._index, ":1", fd=fd, name=HOLD_PROGRAM,
                parent=TC_EGRESS_PARENT, classid=1, direct_action=True, prio=TC_PRIO,
            )  # fmt: skip
        except NetlinkError as exc:
            raise _netlink(
                f"tc filter add dev {self.ifname} egress bpf da", exc, "needs CAP_NET_ADMIN"
            ) from exc

    def _detach(self, ipr: Any) -> None:
        ipr.tc("del-filter", "bpf", self._index, parent=TC_EGRESS_PARENT, prio=TC_PRIO)
        if self._made_qdisc and not list(
            ipr.get_filters(index=self._index, parent=TC_EGRESS_PARENT)
        ):
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", self._index)


class Guard(_FlowProgram):
    """Drop incoming packets of guarded flows on ``ifname`` (XDP); see the module
    docstring. ``mode="native"`` runs in the driver (real NICs), ``"generic"`` anywhere."""

    program = GUARD_PROGRAM
    object_name = "guard_xdp"
    map_name = "guarded_flows"

    def __init__(
        self,
        ifname: str,
        *,
        mode: Literal["generic", "native"] = "generic",
        object_path: Path | None = None,
    ) -> None:
        super().__init__(ifname, object_path=object_path)
        self._mode_flags = XDP_FLAGS_SKB_MODE if mode == "generic" else XDP_FLAGS_DRV_MODE

    def __enter__(self) -> Guard:
        self.attach()
        return self

    def _attach(self, ipr: Any, fd: int) -> None:
        try:
            _set_xdp(ipr, self._index, fd, self._mode_flags | XDP_FLAGS_UPDATE_IF_NOEXIST)
        except NetlinkError as exc:
            hint = "another XDP program is attached" if exc.code == errno.EBUSY else ""
            raise _netlink(f"xdp attach on {self.ifname}", exc, hint) from exc

    def _detach(self, ipr: Any) -> None:
        _set_xdp(ipr, self._index, -1, self._mode_flags)
