"""The cost ledger on a virtual clock."""

from __future__ import annotations

import pytest

from albatross.core.cost import Price, ReplicaLedger, fleet_summary


def test_uptime_counts_only_while_up_and_prices_apply() -> None:
    led = ReplicaLedger("m/0", "g5.xlarge", Price(spot_per_hour=0.3, on_demand_per_hour=1.0))
    led.up(0.0)
    led.up(100.0)  # idempotent while up
    led.down(3600.0)
    led.down(4000.0)  # idempotent while down
    led.up(7200.0)
    s = led.summary(9000.0)
    assert s["uptime_s"] == pytest.approx(3600 + 1800)
    assert s["spend"] == pytest.approx(1.5 * 0.3)
    assert s["on_demand_equivalent"] == pytest.approx(1.5)
    assert s["savings"] == pytest.approx(1.5 - 0.45)
    assert led.starts == 2


def test_fleet_totals_and_ratio() -> None:
    a = ReplicaLedger("m/0", "t", Price(0.25, 1.0))
    b = ReplicaLedger("m/1", "t", Price(0.25, 1.0))
    a.up(0.0)
    b.up(0.0)
    a.tokens, b.tokens = 600_000, 400_000
    b.preemptions = 2
    total = fleet_summary([a, b], 3600.0)["total"]
    assert total["spend"] == pytest.approx(0.5)
    assert total["on_demand_equivalent"] == pytest.approx(2.0)
    assert total["savings_ratio"] == pytest.approx(0.75)
    assert total["spend_per_million_tokens"] == pytest.approx(0.5)
    assert total["preemptions_survived"] == 2


def test_free_replicas_have_no_ratio() -> None:
    led = ReplicaLedger("m/0", "local", Price())
    led.up(0.0)
    total = fleet_summary([led], 10.0)["total"]
    assert total["savings_ratio"] is None and total["spend_per_million_tokens"] is None
