"""Shared by the namespace tests: skip unless root, a fresh topology per test."""

from __future__ import annotations

import os

import pytest

from albatross.testing.moverig import MoveRig

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (namespaces, TCP_REPAIR, eBPF)"
)


def resets(rig: MoveRig) -> dict[str, int]:
    """RSTs sent in each namespace, and connections the client saw reset."""
    c = rig.counters()
    out = {f"{ns}.OutRsts": k["Tcp.OutRsts"] for ns, k in c.items()}
    out["client.EstabResets"] = c["client"]["Tcp.EstabResets"]
    return out


def assert_no_resets(rig: MoveRig) -> None:
    counts = resets(rig)
    assert counts == dict.fromkeys(counts, 0), counts
