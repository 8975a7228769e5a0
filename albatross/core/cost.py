"""What the fleet costs, and what it would have cost on demand.

Per replica: its instance type, spot and on-demand prices per hour (from config), the
time it was up (ready, unhealthy or draining: paid for), the tokens it generated and
the preemptions it survived. Pure: time comes in as ``now`` (seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Price:
    spot_per_hour: float = 0.0
    on_demand_per_hour: float = 0.0


@dataclass(slots=True)
class ReplicaLedger:
    replica_id: str
    instance_type: str
    price: Price
    uptime_s: float = 0.0
    up_since: float | None = None
    tokens: int = 0
    preemptions: int = 0
    starts: int = field(default=0)

    def up(self, now: float) -> None:
        """The replica is being paid for from ``now`` (idempotent while up)."""
        if self.up_since is None:
            self.up_since = now
            self.starts += 1

    def down(self, now: float) -> None:
        if self.up_since is not None:
            self.uptime_s += max(0.0, now - self.up_since)
            self.up_since = None

    def total_uptime(self, now: float) -> float:
        running = max(0.0, now - self.up_since) if self.up_since is not None else 0.0
        return self.uptime_s + running

    def summary(self, now: float) -> dict[str, Any]:
        hours = self.total_uptime(now) / 3600.0
        spend = hours * self.price.spot_per_hour
        on_demand = hours * self.price.on_demand_per_hour
        return {
            "replica": self.replica_id,
            "instance_type": self.instance_type,
            "price_spot_per_hour": self.price.spot_per_hour,
            "price_on_demand_per_hour": self.price.on_demand_per_hour,
            "uptime_s": round(self.total_uptime(now), 3),
            "tokens": self.tokens,
            "preemptions_survived": self.preemptions,
            "spend": round(spend, 6),
            "on_demand_equivalent": round(on_demand, 6),
            "savings": round(on_demand - spend, 6),
        }


def fleet_summary(ledgers: list[ReplicaLedger], now: float) -> dict[str, Any]:
    """Per-replica lines and totals; ``savings_ratio`` is savings / on-demand cost."""
    rows = [led.summary(now) for led in ledgers]
    spend = sum(r["spend"] for r in rows)
    on_demand = sum(r["on_demand_equivalent"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return {
        "replicas": rows,
        "total": {
            "spend": round(spend, 6),
            "on_demand_equivalent": round(on_demand, 6),
            "savings": round(on_demand - spend, 6),
            "savings_ratio": round((on_demand - spend) / on_demand, 4) if on_demand > 0 else None,
            "tokens": tokens,
            "spend_per_million_tokens": round(spend / tokens * 1e6, 6) if tokens else None,
            "preemptions_survived": sum(r["preemptions_survived"] for r in rows),
        },
    }
