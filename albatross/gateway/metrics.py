"""Prometheus metrics, in a registry of their own (no global state to reset in tests).

Children are bound once per model (:meth:`Metrics.model`) so the token path never
looks up labels; histograms are observed once per client write, not per token.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

# The *_created series double the exposition size and tell nothing a scrape needs.
disable_created_metrics()  # type: ignore[no-untyped-call]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class LoopHistogram:
    """A histogram observed only from the event loop thread: no locks, one list index.

    prometheus_client's Histogram takes two mutexes per observation; on the token path
    that is a measurable share of the gateway's CPU. Exposed by :class:`_LoopCollector`.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v


class _LoopCollector(Collector):
    def __init__(self, name: str, doc: str, label: str) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.children: dict[str, LoopHistogram] = {}

    def collect(self) -> Iterable[Metric]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for value, h in self.children.items():
            acc, buckets = 0, []
            for bound, c in zip((*h.bounds, float("inf")), h.counts, strict=True):
                acc += c
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            fam.add_metric([value], buckets, h.sum)
        yield fam


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    tokens: MetricWrapperBase
    ttft: LoopHistogram
    itl: LoopHistogram
    in_flight: MetricWrapperBase


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "albatross_requests",
            "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self._tokens = Counter(
            "albatross_tokens", "Tokens generated for clients.", ["model"], registry=r
        )
        self._ttft = _LoopCollector(
            "albatross_time_to_first_token_seconds",
            "From request received to the first token written to the client.",
            "model",
        )
        self._itl = _LoopCollector(
            "albatross_inter_token_seconds",
            "Time between successive writes of tokens to a client (tokens that arrive together are written together).",
            "model",
        )
        r.register(self._ttft)
        r.register(self._itl)
        self._in_flight = Gauge(
            "albatross_requests_in_flight", "Requests being generated.", ["model"], registry=r
        )
        self.replica_state = Gauge(
            "albatross_replica_state",
            "1 for the state each replica is in.",
            ["model", "replica", "state"],
            registry=r,
        )
        self.replica_restarts = Counter(
            "albatross_replica_losses",
            "Times a replica process was lost (exited or killed).",
            ["model", "replica"],
            registry=r,
        )
        self.migrations = Counter(
            "albatross_migrations",
            "Streams moved to another replica, by reason (crashed, engine_error, stalled, "
            "replica_lost, drained, moved) and path (kv, prewarm, reprefill).",
            ["reason", "path"],
            registry=r,
        )
        self.continuation_failures = Counter(
            "albatross_continuation_failures",
            "Streams that could not be continued and ended with an error event, by reason.",
            ["reason"],
            registry=r,
        )
        self._stall = _LoopCollector(
            "albatross_migration_stall_seconds",
            "Client-visible gap at a move: last token before it to first token after it, by path.",
            "path",
        )
        r.register(self._stall)
        self._models: dict[str, ModelMetrics] = {}

    def stall(self, path: str) -> LoopHistogram:
        h = self._stall.children.get(path)
        if h is None:
            h = self._stall.children[path] = LoopHistogram(_STALL_BUCKETS)
        return h

    def model(self, name: str) -> ModelMetrics:
        m = self._models.get(name)
        if m is None:
            ttft = self._ttft.children[name] = LoopHistogram(_TTFT_BUCKETS)
            itl = self._itl.children[name] = LoopHistogram(_ITL_BUCKETS)
            m = self._models[name] = ModelMetrics(
                tokens=self._tokens.labels(name),
                ttft=ttft,
                itl=itl,
                in_flight=self._in_flight.labels(name),
            )
        return m

    def set_replica_state(
        self, model: str, replica: str, state: str, states: tuple[str, ...]
    ) -> None:
        for s in states:
            self.replica_state.labels(model, replica, s).set(1 if s == state else 0)

    def forget_replica(self, model: str, replica: str, states: tuple[str, ...]) -> None:
        for s in states:
            with contextlib.suppress(KeyError):
                self.replica_state.remove(model, replica, s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_SWITCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class SwitchMetrics:
    """Models taking turns on a GPU (a few events per switch: plain prometheus types)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.switches = Counter(
            "albatross_switches",
            "Model switches, by the models put to sleep (comma-separated, none), the model "
            "woken and the result (ok, failed, abandoned).",
            ["from", "to", "result"],
            registry=r,
        )
        self.phase_seconds = Histogram(
            "albatross_switch_phase_seconds",
            "Duration of each phase of a switch: drain (streams ending), sleep, wake.",
            ["phase"],
            buckets=_SWITCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "albatross_switch_queue_depth",
            "Requests waiting for their model to wake.",
            ["model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "albatross_switch_queue_wait_seconds",
            "Time a request waited for its model (0 when it was awake).",
            ["model"],
            buckets=(0.0, *_SWITCH_BUCKETS),
            registry=r,
        )
        self.awake = Gauge(
            "albatross_model_awake",
            "1 while the model is awake and serving.",
            ["model"],
            registry=r,
        )
