"""Moving the service address (VIP) from one gateway host to another.

Two halves, because two hosts do them: the source :meth:`release`\\ s the address
(before its sockets are dumped: from then on it drops the clients' segments silently
instead of answering them with RSTs), the target :meth:`claim`\\ s it (after its guard
is in place, before the sockets are restored).

- :class:`LocalVip`: the address on one of this host's interfaces, through netlink
  (pyroute2; 1-2 ms, against 8-12 ms for spawning ``ip``).
- :class:`VipRoute`: a /32 (/128) route on a router the operator controls, pointed at
  whichever gateway holds the address. Both gateways then need not share a link.
- :class:`AwsVip`: a secondary private IP of an EC2 network interface, moved with
  ``AssignPrivateIpAddresses(AllowReassignment=True)``; the instance must also carry
  the address on its interface (a :class:`LocalVip`). Both hosts must be in the
  address's subnet. boto3 blocks: call these from a worker thread in async code.

Every call is idempotent (claiming a held address, releasing a free one: no error),
so a retried move does not fail half-way. Netlink handles are opened at construction,
in the calling thread's network namespace, and used from anywhere afterwards.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from albatross.netmove.errors import KernelError, VipError

__all__ = ["AwsVip", "LocalVip", "VipRoute"]

IFA_F_NODAD = 0x02


def _host_prefix(address: str) -> int:
    try:
        return 32 if ipaddress.ip_address(address).version == 4 else 128
    except ValueError as exc:
        raise VipError(f"address: {address!r} is not an IP address") from exc


class _Netlink:
    def __init__(self) -> None:
        self._ipr: Any = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LocalVip(_Netlink):
    """``address``/``prefixlen`` (host prefix by default) on interface ``ifname``."""

    def __init__(self, address: str, ifname: str, prefixlen: int | None = None) -> None:
        self.address = address
        self.prefixlen = prefixlen if prefixlen is not None else _host_prefix(address)
        self.ifname = ifname
        super().__init__()
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            self.close()
            raise VipError(f"ifname: {ifname!r} is not an interface in this network namespace")
        self._index = int(found[0])

    def held(self) -> bool:
        """Whether this host carries the address now."""
        return any(
            a.get_attr("IFA_ADDRESS") == self.address for a in self._ipr.get_addr(index=self._index)
        )

    def claim(self) -> None:
        """Add the address. IPv6 skips duplicate address detection: the address moves
        on purpose, and a tentative address (about 1 s of DAD) cannot send."""
        v6 = ipaddress.ip_address(self.address).version == 6
        kwargs = {"flags": IFA_F_NODAD} if v6 else {}
        try:
            self._ipr.addr(
                "add", index=self._index, address=self.address, prefixlen=self.prefixlen, **kwargs
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise KernelError(f"adding {self.address} to {self.ifname}", exc.code) from exc

    def release(self) -> None:
        try:
            self._ipr.addr("del", index=self._index, address=self.address, prefixlen=self.prefixlen)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise KernelError(f"removing {self.address} from {self.ifname}", exc.code) from exc


class VipRoute(_Netlink):
    """A host route for ``address`` on a router, pointed at the gateway holding it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.prefixlen = _host_prefix(address)
        self._family = socket.AF_INET if self.prefixlen == 32 else socket.AF_INET6
        super().__init__()

    def point(self, via: str) -> None:
        """Send the address's traffic to gateway ``via`` (replacing the old route)."""
        try:
            self._ipr.route(
                "replace",
                dst=self.address,
                dst_len=self.prefixlen,
                gateway=via,
                family=self._family,
            )
        except NetlinkError as exc:
            raise KernelError(f"route {self.address}/{self.prefixlen} via {via}", exc.code) from exc


def _default_ec2(region: str) -> Any:
    import boto3

    return boto3.client("ec2", region_name=region)


class AwsVip:
    """A secondary private IP moved between network interfaces (ENIs) of one subnet."""

    def __init__(
        self,
        private_ip: str,
        region: str,
        client_factory: Callable[[str], Any] = _default_ec2,
    ) -> None:
        _host_prefix(private_ip)
        self.private_ip = private_ip
        self._ec2 = client_factory(region)

    def _call(self, action: str, **params: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._ec2, action)(**params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise VipError(
                f"EC2 {action} for {self.private_ip}: {error.get('Code', 'Unknown')}: "
                f"{error.get('Message', exc)}"
            ) from exc
        except BotoCoreError as exc:
            raise VipError(f"EC2 {action} for {self.private_ip}: {exc}") from exc

    def holder(self, among: Sequence[str]) -> str | None:
        """Which of the network interfaces ``among`` carries the address now, if any.

        Asking about named interfaces (the gateways' own) rather than filtering the
        whole account keeps the call cheap and its permissions narrow.
        """
        found = self._call("describe_network_interfaces", NetworkInterfaceIds=list(among))
        for iface in found["NetworkInterfaces"]:
            addresses = {p["PrivateIpAddress"] for p in iface.get("PrivateIpAddresses", [])}
            if self.private_ip in addresses:
                return str(iface["NetworkInterfaceId"])
        return None

    def claim(self, eni_id: str) -> None:
        """Take the address onto ``eni_id``, from whichever interface had it."""
        self._call(
            "assign_private_ip_addresses",
            NetworkInterfaceId=eni_id,
            PrivateIpAddresses=[self.private_ip],
            AllowReassignment=True,
        )

    def release(self, eni_id: str) -> None:
        """Drop the address from ``eni_id``; nothing to do when it is not there."""
        if self.holder([eni_id]) != eni_id:
            return
        self._call(
            "unassign_private_ip_addresses",
            NetworkInterfaceId=eni_id,
            PrivateIpAddresses=[self.private_ip],
        )
