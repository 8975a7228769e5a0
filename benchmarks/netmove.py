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

``--gateway`` measures the same through real gateways: ``albatross serve`` in A's and
B's namespaces sharing llama-server engines (in the router's namespace, on the slow
random model), streaming chat completions read by a raw-socket client
(:mod:`albatross.testing.sseclient`), moved by ``albatross migrate-gateway``. The
client's largest gap between text events (the move) is compared with its median gap;
the split is A's (stop, flush, hold, drain, VIP release, dump, handoff round trip)
and B's (decode, guard, VIP claim + route, restore, attach) as the gateways report them.

    sudo .venv/bin/python benchmarks/netmove.py [--rounds 3] [--interval-ms 10]
    sudo .venv/bin/python benchmarks/netmove.py --gateway [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

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


GATEWAY_STEPS_A = ("stop", "flush", "hold", "drain", "release_vip", "dump", "handoff", "total")
GATEWAY_STEPS_B = ("decode", "guard", "claim_vip", "restore", "attach", "total")


def gateway_round(conns: int, model: Path, binary: Path) -> dict[str, Any]:
    import json
    import tempfile

    from albatross.testing.gatewayrig import MODEL, PORT, GatewayPair

    max_tokens = 1500 if conns == 1 else 400
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about an albatross."}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        topology() as topo,
        GatewayPair(
            topo,
            Path(tmp),
            binary=binary,
            model_path=model,
            parallel=conns,
            ctx_size=2048 if conns == 1 else 512,
            numerics="fast",
            shared_engines=True,
        ) as gw,
    ):
        client = gw.client(
            sys.executable, "-m", "albatross.testing.sseclient", "--host", topo.vip,
            "--port", str(PORT), "--conns", str(conns), "--timeout", "300",
            "--body", json.dumps(body),
        )  # fmt: skip
        gw.wait_position("a", 100 if conns == 1 else 30, count=conns, timeout_s=120)
        moved = gw.migrate("a", "gw-b")
        out, err = client.communicate(timeout=400)
        if client.returncode != 0:
            raise RuntimeError(f"sseclient exited {client.returncode}: {err[-2000:]}")
        streams = json.loads(out)["conns"]
        adopted = gw.get("b", "/admin/migrate-gateway")["history"][-1]
        counters = topo.client.counters()
        resets = counters["Tcp.OutRsts"] + counters["Tcp.EstabResets"]
        ok = (
            moved["moved"] == conns
            and all(s["done"] and not s["errors"] for s in streams)
            and resets == 0
        )
        return {
            "a": moved["times_ms"],
            "b": adopted["times_ms"],
            "max_gap": statistics.median(s["max_gap_ms"] for s in streams),
            "worst_gap": max(s["max_gap_ms"] for s in streams),
            "normal": statistics.median(s["median_gap_ms"] for s in streams),
            "ok": ok,
        }


def gateway_main(rounds: int) -> int:
    import tempfile

    from albatross.config import LlamaServerConfig
    from albatross.engines.llama_build import llama_server_binary
    from albatross.testing.tinymodel import make_tiny_model

    binary = llama_server_binary(LlamaServerConfig())
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp), hidden=512, layers=4, ffn=1024, name="slow")
        print(f"real gateways, shared llama-server engines (slow random model), "
              f"{rounds} rounds per case; times in ms (median / worst)")  # fmt: skip
        for conns in (1, 100):
            rs = [gateway_round(conns, model, binary) for _ in range(rounds)]
            print(f"\n== {conns} connection{'s' if conns > 1 else ''}: "
                  f"{sum(r['ok'] for r in rs)}/{len(rs)} rounds whole with 0 RST at the client")  # fmt: skip
            for side, steps in (("a", GATEWAY_STEPS_A), ("b", GATEWAY_STEPS_B)):
                for step in steps:
                    v = [r[side].get(step, 0.0) for r in rs]
                    print(
                        f"  {side.upper()} {step:<12} {statistics.median(v):8.2f} / {max(v):8.2f}"
                    )
            gaps = [r["max_gap"] for r in rs]
            normal = statistics.median(r["normal"] for r in rs)
            added = [g - normal for g in gaps]
            med = statistics.median(added)
            print(f"  client gap at the move (median over connections) "
                  f"{statistics.median(gaps):.1f} / {max(gaps):.1f} ms, worst connection "
                  f"{max(r['worst_gap'] for r in rs):.1f} ms, normal gap {normal:.1f} ms")  # fmt: skip
            print(f"  added gap {med:.1f} / {max(added):.1f} ms = "
                  f"{med / TARGET_ADDED_GAP_MS:.2f}x / {max(added) / TARGET_ADDED_GAP_MS:.2f}x "
                  f"the {TARGET_ADDED_GAP_MS:g} ms target")  # fmt: skip
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval-ms", type=float, default=10.0)
    p.add_argument("--ipv6", action="store_true")
    p.add_argument("--gateway", action="store_true", help="through real gateways")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/netmove.py needs root (namespaces, TCP_REPAIR, eBPF)", file=sys.stderr)
        return 2
    if args.gateway:
        return gateway_main(args.rounds)
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
