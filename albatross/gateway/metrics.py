"""Prometheus metrics, in a registry of their own (no global state to reset in tests).

Children are bound once per model (:meth:`Metrics.model`) so the token path never
looks up labels; histograms are observed once per client write, not per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

# The *_created series double the exposition size and tell nothing a scrape needs.
disable_created_metrics()  # type: ignore[no-untyped-call]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    tokens: MetricWrapperBase
    ttft: MetricWrapperBase
    itl: MetricWrapperBase
    in_flight: MetricWrapperBase


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "albatross_requests", "Requests answered, by endpoint and HTTP status.", ["endpoint", "status"], registry=r
        )
        self._tokens = Counter("albatross_tokens", "Tokens generated for clients.", ["model"], registry=r)
        self._ttft = Histogram(
            "albatross_time_to_first_token_seconds",
            "From request received to the first token written to the client.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self._itl = Histogram(
            "albatross_inter_token_seconds",
            "Time between successive writes of tokens to a client (tokens that arrive together are written together).",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self._in_flight = Gauge("albatross_requests_in_flight", "Requests being generated.", ["model"], registry=r)
        self.replica_state = Gauge(
            "albatross_replica_state", "1 for the state each replica is in.", ["model", "replica", "state"], registry=r
        )
        self.replica_restarts = Counter(
            "albatross_replica_losses", "Times a replica process was lost (exited or killed).", ["model", "replica"], registry=r
        )
        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        m = self._models.get(name)
        if m is None:
            m = self._models[name] = ModelMetrics(
                tokens=self._tokens.labels(name),
                ttft=self._ttft.labels(name),
                itl=self._itl.labels(name),
                in_flight=self._in_flight.labels(name),
            )
        return m

    def set_replica_state(self, model: str, replica: str, state: str, states: tuple[str, ...]) -> None:
        for s in states:
            self.replica_state.labels(model, replica, s).set(1 if s == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
