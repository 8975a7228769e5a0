"""Connection migration: move live client TCP connections to another gateway host.

The building blocks, each a narrow verb with an undo:

- :mod:`.tcp_repair`: :func:`export_socket` / :func:`import_socket` (TCP_REPAIR), the
  SIOCOUTQ :func:`drain_barrier`, :func:`close_silently`;
- :mod:`.state`: :class:`TcpState` and its versioned binary form;
- :mod:`.hold`: :class:`Hold` (TC egress, zero window) and :class:`Guard` (XDP drop),
  eBPF programs built by :mod:`.build`;
- :mod:`.vip`: :class:`LocalVip`, :class:`VipRoute`, :class:`AwsVip`;
- :mod:`.handoff` and :mod:`.channel`: the authenticated handoff message and its
  transport;
- :mod:`.migrate`: the two halves of a move, in the order that gives no RST.
"""

from albatross.netmove.handoff import ConnectionHandoff, HandoffAck, HandoffMessage, ReplayCache
from albatross.netmove.hold import Guard, Hold, remove_leftovers
from albatross.netmove.migrate import adopt_connections, freeze, release_connections
from albatross.netmove.state import Flow, TcpState, TcpWindow, decode_state, encode_state
from albatross.netmove.tcp_repair import (
    close_silently,
    drain_barrier,
    drain_barrier_async,
    export_socket,
    import_socket,
    resume_socket,
)
from albatross.netmove.vip import AwsVip, LocalVip, VipRoute

__all__ = [
    "AwsVip",
    "ConnectionHandoff",
    "Flow",
    "Guard",
    "HandoffAck",
    "HandoffMessage",
    "Hold",
    "LocalVip",
    "ReplayCache",
    "TcpState",
    "TcpWindow",
    "VipRoute",
    "adopt_connections",
    "close_silently",
    "decode_state",
    "drain_barrier",
    "drain_barrier_async",
    "encode_state",
    "export_socket",
    "freeze",
    "import_socket",
    "release_connections",
    "remove_leftovers",
    "resume_socket",
]
