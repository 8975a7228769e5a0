"""Connection migration at the kernel level: the client-visible hiccup and its cost.

Builds the namespace topology (client, router, gateway A, gateway B), streams fixed-size
tokens every ``--interval-ms`` from A, moves every connection to B mid-stream with
:mod:`albatross.netmove` (zero-window hold, drain barrier, VIP move, TCP repair dump and
restore, sealed handoff), and reports, for 1 and for 100 connections:

- the client-observed largest gap between two tokens (the one at the move) against the
  median gap, and the added gap (largest - median) against the 20 ms target;
- the control-plane split: hold, drain barrier, VIP release, dump, handoff (seal +
  verify), guard, VIP claim (+ route), restore, and the total.

Needs root. Each case runs ``--rounds`` times on a fresh topology; medians and the
worst round are printed. The machine is shared: read the worst column with care.

    sudo .venv/bin/python benchmarks/netmove.py [--rounds 3] [--interval-ms 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from albatross.testing.moverig import MoveRig
from albatross.testing.netns import topology

STEPS = (
    "hold",
    "drain",
    "release_vip",
    "dump",
    "handoff",
    "guard",
    "claim_vip",
    "restore",
    "total",
)
TARGET_ADDED_GAP_MS = 20.0


def one_round(
    conns: int, interval_s: float, ipv6: bool
) -> tuple[dict[str, float], float, float, bool]:
    with topology() as topo, MoveRig(topo, ipv6=ipv6, interval_s=interval_s) as rig:
        tokens = int(2.0 / interval_s)
        client = rig.start_client(conns=conns, tokens=tokens, timeout_s=120)
        rig.wait_streaming(conns, min_tokens=int(0.6 / interval_s))
        move = rig.move()
        report = rig.finish_client(client)
        ok = report["all_exact"] and not report["errors"] and not move.failed
        counters = rig.counters()
        resets = sum(c["Tcp.OutRsts"] for c in counters.values())
        ok = ok and resets == 0 and counters["client"]["Tcp.EstabResets"] == 0
        return (
            {k: 1000 * v for k, v in move.times.items()},
            float(report["max_gap_ms"]),
            float(report["median_gap_ms"]),
            bool(ok),
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval-ms", type=float, default=10.0)
    p.add_argument("--ipv6", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/netmove.py needs root (namespaces, TCP_REPAIR, eBPF)", file=sys.stderr)
        return 2
    interval = args.interval_ms / 1000
    print(f"token every {args.interval_ms:g} ms, {args.rounds} rounds per case, "
          f"{'IPv6' if args.ipv6 else 'IPv4'}; times in ms (median / worst)")  # fmt: skip
    for conns in (1, 100):
        rounds = [one_round(conns, interval, args.ipv6) for _ in range(args.rounds)]
        print(f"\n== {conns} connection{'s' if conns > 1 else ''}: "
              f"{sum(r[3] for r in rounds)}/{len(rounds)} rounds exact with 0 RST")  # fmt: skip
        for step in STEPS:
            values = [r[0].get(step, 0.0) for r in rounds]
            print(f"  {step:<12} {statistics.median(values):8.2f} / {max(values):8.2f}")
        max_gaps = [r[1] for r in rounds]
        normal = statistics.median(r[2] for r in rounds)
        added = [g - normal for g in max_gaps]
        med_added = statistics.median(added)
        print(f"  client gap at the move {statistics.median(max_gaps):.1f} / {max(max_gaps):.1f} ms, "
              f"normal gap {normal:.1f} ms")  # fmt: skip
        print(f"  added gap {med_added:.1f} / {max(added):.1f} ms = "
              f"{med_added / TARGET_ADDED_GAP_MS:.2f}x / {max(added) / TARGET_ADDED_GAP_MS:.2f}x "
              f"the {TARGET_ADDED_GAP_MS:g} ms target")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
