"""Live token streams moved from gateway A to gateway B in namespaces.

Every test checks what a client would notice: the exact bytes (no gap, no
duplicate), no error, and no RST sent by any host or seen by the client (SNMP
counters of each namespace). Timings are printed by benchmarks/netmove.py, not
asserted here.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from netmove_fixtures import assert_no_resets, needs_root

from albatross.testing.moverig import MoveRig
from albatross.testing.netns import Topology

pytestmark = [pytest.mark.root, needs_root]


def assert_exact(report: dict[str, object]) -> None:
    assert report["errors"] == [], report["errors"]
    assert report["all_exact"], [c for c in report["conns"] if not c["exact"]][:3]  # type: ignore[attr-defined]


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_stream_moves_mid_body_without_gap_duplicate_or_reset(topo: Topology, ipv6: bool) -> None:
    with MoveRig(topo, ipv6=ipv6) as rig:
        client = rig.start_client(conns=1, tokens=120)
        rig.wait_streaming(1, min_tokens=40)
        move = rig.move()
        assert move.failed == [] and move.drained
        report = rig.finish_client(client)
        assert_exact(report)
        assert [s.next_token for s in rig.wait_finished(1)] == [120]
        assert_no_resets(rig)


def test_client_uploading_while_held_loses_nothing(topo: Topology) -> None:
    upload = 400_000
    with MoveRig(topo) as rig:
        client = rig.start_client(conns=2, tokens=200, upload_bytes=upload, upload_rate=200_000)
        rig.wait_streaming(2, min_tokens=60)
        move = rig.move()
        assert move.failed == []
        assert move.held_packets > 0  # the hold did set the window to 0 on the way out
        report = rig.finish_client(client)
        assert_exact(report)
        assert [c["uploaded"] for c in report["conns"]] == [upload, upload]
        # Every uploaded byte reached a server exactly once and in order: A's part,
        # A's unread receive queue (carried) and B's part match the pattern.
        assert rig.streamer_a.upload_errors == [] and rig.streamer_b.upload_errors == []
        assert sorted(s.upload_received for s in rig.wait_finished(2)) == [upload, upload]
        assert_no_resets(rig)


def test_clients_survive_a_sixty_second_hold(topo: Topology) -> None:
    with MoveRig(topo) as rig:
        client = rig.start_client(
            conns=2, tokens=150, upload_bytes=200_000, upload_rate=100_000, timeout_s=150
        )
        rig.wait_streaming(2, min_tokens=50)
        move = rig.move(wait_before_restore_s=60.0)
        assert move.failed == []
        assert move.guarded_packets > 0  # the clients' window probes met the guard on B
        report = rig.finish_client(client, timeout_s=150)
        assert_exact(report)
        assert sorted(s.upload_received for s in rig.wait_finished(2)) == [200_000, 200_000]
        assert rig.streamer_b.upload_errors == []
        assert rig.counters()["client"]["TcpExt.TCPWinProbe"] > 0  # held at window 0
        assert_no_resets(rig)


def test_hundred_connections_move_at_once(topo: Topology) -> None:
    with MoveRig(topo) as rig:
        client = rig.start_client(conns=100, tokens=120, timeout_s=90)
        rig.wait_streaming(100, min_tokens=30)
        move = rig.move()
        assert move.failed == [] and len(move.states) == 100
        report = rig.finish_client(client, timeout_s=120)
        assert_exact(report)
        assert len(rig.wait_finished(100)) == 100
        assert_no_resets(rig)


TCP_REPAIR, TCP_TIMESTAMP = 19, 24


def jump_timestamp_forward(sock: socket.socket, delta: int) -> None:
    """Move a live socket's TCP timestamp clock ahead (what a host with another
    clock offset would have), leaving repair mode without a probe."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    now = struct.unpack("=I", sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, 4))[0]
    sock.setsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, struct.pack("=I", (now + delta) % 2**32))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, struct.pack("=i", -1))


@pytest.mark.parametrize("restore_timestamp", [False, True], ids=["without", "with"])
def test_backward_timestamp_stalls_unless_restored(topo: Topology, restore_timestamp: bool) -> None:
    # No random per-connection offset on A, then A's clock 2**30 ms ahead: a restore
    # that does not set TCP_TIMESTAMP starts from B's raw clock, far behind.
    topo.gw_a.write_sysctl("ipv4/tcp_timestamps", "2")
    with MoveRig(topo) as rig:
        client = rig.start_client(conns=1, tokens=150, timeout_s=6)
        rig.wait_streaming(1)
        for sock in rig.streamer_a.sockets():
            jump_timestamp_forward(sock, 2**30)
        time.sleep(0.3)
        move = rig.move(restore_timestamp=restore_timestamp)
        assert move.failed == []
        report = rig.finish_client(client, timeout_s=30)
        paws = rig.counters()["client"]["TcpExt.PAWSEstab"]
        if restore_timestamp:
            assert_exact(report)
            assert paws == 0
        else:
            # The client drops every segment from B (PAWS) and the stream hangs.
            assert report["errors"] == ["timed out"] and not report["all_exact"]
            assert paws > 0
