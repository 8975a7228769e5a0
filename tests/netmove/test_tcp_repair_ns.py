"""TCP repair export/import between namespaces, the drain barrier and eBPF clean-up."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from netmove_fixtures import needs_root

from albatross.netmove.hold import Guard, Hold, remove_leftovers
from albatross.netmove.state import Flow, decode_state, encode_state
from albatross.netmove.tcp_repair import (
    close_silently,
    drain_barrier,
    export_socket,
    import_socket,
)
from albatross.netmove.vip import LocalVip, VipRoute
from albatross.testing.netns import Topology

pytestmark = [pytest.mark.root, needs_root]


def connect(t: Topology, ipv6: bool) -> tuple[socket.socket, socket.socket]:
    vip = t.vip6 if ipv6 else t.vip
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    with t.gw_a.entered():
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((vip, 9100))
        listener.listen()
    with t.client.entered():
        client = socket.create_connection((vip, 9100), timeout=10)
    server, _ = listener.accept()
    listener.close()
    server.settimeout(10)
    return client, server


def move_vip(t: Topology, ipv6: bool) -> None:
    vip = t.vip6 if ipv6 else t.vip
    with t.gw_a.entered(), LocalVip(vip, t.gw_ifname) as a:
        a.release()
    with t.gw_b.entered(), LocalVip(vip, t.gw_ifname) as b:
        b.claim()
        assert b.held()
        # Usable at once: an IPv6 address in duplicate address detection cannot send.
        assert "tentative" not in subprocess.run(
            ["ip", "-n", t.gw_b.name, "addr", "show", "to", vip],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    with t.router.entered(), VipRoute(vip) as route:
        route.point(t.gw_b_ip6 if ipv6 else t.gw_b_ip)


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_connection_continues_on_another_host_with_both_queues(topo: Topology, ipv6: bool) -> None:
    client, server = connect(topo, ipv6)
    server.sendall(b"before;")
    assert client.recv(100) == b"before;"
    client.sendall(b"unread by A;")
    time.sleep(0.05)
    move_vip(topo, ipv6)  # A drops the client's segments silently from here on
    state = export_socket(server)
    close_silently(server)
    assert state.recv_queue == b"unread by A;"
    assert state.timestamps and state.sack and state.wscale
    with topo.gw_b.entered():
        moved = import_socket(decode_state(encode_state(state)))
    moved.settimeout(10)
    assert moved.recv(100) == b"unread by A;"
    moved.sendall(b"after;")
    assert client.recv(100) == b"after;"
    client.sendall(b"ping")
    assert moved.recv(100) == b"ping"
    # Full-size segments (the clamp minus the 12-byte timestamp option), not the
    # 536-byte default a repair connect() would otherwise leave.
    assert moved.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == state.mss - 12
    for ns in topo.namespaces:
        assert ns.counters()["Tcp.OutRsts"] == 0, ns.name
    client.close()
    moved.close()


def test_undrained_queue_is_carried_after_the_barrier_times_out(topo: Topology) -> None:
    client, server = connect(topo, ipv6=False)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    payload = bytes(i % 253 for i in range(3 * 1024 * 1024))
    server.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the client does not read: fill until it blocks
        try:
            sent += server.send(payload[sent : sent + 65536])
        except BlockingIOError:
            break
    server.setblocking(True)
    result = drain_barrier([server], timeout_s=0.2)
    assert not result.drained and result.unacked[0] > 0
    move_vip(topo, ipv6=False)
    state = export_socket(server)
    close_silently(server)
    assert len(state.send_queue) == result.unacked[0] and state.unsent_len > 0
    with topo.gw_b.entered():
        moved = import_socket(state)
    got = bytearray()
    client.settimeout(10)
    while len(got) < sent:
        got += client.recv(1 << 20)
    assert bytes(got) == payload[:sent]
    client.close()
    moved.close()


def test_export_refuses_a_connection_the_peer_closed(topo: Topology) -> None:
    client, server = connect(topo, ipv6=False)
    client.close()
    time.sleep(0.05)
    from albatross.netmove.errors import ConnectionNotMovable

    with pytest.raises(ConnectionNotMovable, match="CLOSE_WAIT"):
        export_socket(server)
    server.close()


def tc_egress(t: Topology) -> str:
    return subprocess.run(
        ["tc", "-n", t.gw_a.name, "filter", "show", "dev", t.gw_ifname, "egress"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def xdp_of(t: Topology) -> str:
    return subprocess.run(
        ["ip", "-n", t.gw_a.name, "link", "show", t.gw_ifname],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_hold_and_guard_detach_and_leftovers_are_removed(topo: Topology) -> None:
    with topo.gw_a.entered():
        with Hold(topo.gw_ifname) as hold, Guard(topo.gw_ifname) as guard:
            hold.add([Flow("10.77.100.1", 1, "10.77.0.2", 2)])
            guard.add([Flow("10.77.100.1", 1, "10.77.0.2", 2)])
            assert "albatross_hold" in tc_egress(topo) and "albatross_guard" in xdp_of(topo)
        assert "albatross_hold" not in tc_egress(topo) and "xdp" not in xdp_of(topo)

        # A process that dies attached leaves both behind; the next attach (or an
        # explicit clean-up) removes them.
        crashed_hold, crashed_guard = Hold(topo.gw_ifname), Guard(topo.gw_ifname)
        crashed_hold.attach()
        crashed_guard.attach()
        for prog in (crashed_hold, crashed_guard):
            prog._obj.close()  # type: ignore[union-attr]  # what process exit does
        assert "albatross_hold" in tc_egress(topo) and "albatross_guard" in xdp_of(topo)
        with Hold(topo.gw_ifname):
            assert tc_egress(topo).count("albatross_hold direct-action") == 1
        removed = remove_leftovers(topo.gw_ifname)
        assert any("xdp" in r for r in removed)
        assert "albatross" not in tc_egress(topo) + xdp_of(topo)
