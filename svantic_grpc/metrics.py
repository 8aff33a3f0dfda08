"""Prometheus metrics of one server process, served at ``GET /metrics`` on the HTTP server.

``PrometheusMetrics`` is the core's metrics seam (``svantic_grpc.core.metrics.Metrics``)
fed into ``prometheus_client`` instruments, plus the gRPC interceptor's per-call
observation. Each server has its own registry (two servers in one process, as in the
tests, never mix their numbers). Levels (sessions by status, connected agents, ...) are
read from the mesh when scraped, so the hot path pays nothing for them.

Names follow the OpenTelemetry conventions where one exists (``grpc_server_call_duration_seconds``
is gRFC A66's ``grpc.server.call.duration``), the rest carry the ``svantic_`` prefix. Label
values are bounded: method names the server registered, status codes, transports, states,
surfaces; never a session, message or request id. Agent types are chosen by whoever registers
an agent, so any number of them may come and go: the first ``agent_types`` (100) a process
dispatches to are labelled by name, later ones as ``other``.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.values import MutexValue
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from svantic_grpc.core.metrics import Levels, Metrics

__all__ = ["PrometheusMetrics"]

#: Seconds, from a fast unary call on loopback to a human answering after an hour.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_HUMAN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 86400)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

AGENT_TYPES = 100
"""Agent types labelled by name in one process; the ones dispatched to after these are ``other``."""

OTHER = "other"


class PrometheusMetrics(Metrics):
    """The mesh's metrics in a registry of their own; ``routes`` serves them."""

    def __init__(self, *, agent_types: int = AGENT_TYPES) -> None:
        """
        Args:
            agent_types: How many agent types get a label of their own (the rest are ``other``).
        """
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._rpc = Histogram(
            "grpc_server_call_duration_seconds",
            "gRPC calls handled, by method and status code, and how long each took",
            ("grpc_method", "grpc_status"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._dispatch = Histogram(
            "svantic_dispatch_duration_seconds",
            "Dispatches to remote agents by agent type, transport and outcome, and their duration",
            ("agent_type", "transport", "outcome"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._message = Histogram(
            "svantic_message_duration_seconds",
            "Messages finished, by final state, and the time from send to that state",
            ("state",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._input = Histogram(
            "svantic_input_request_duration_seconds",
            "Input requests ended, by surface and outcome (resolved, expired, ...), and how long they waited",
            ("surface", "outcome"),
            buckets=_HUMAN_BUCKETS,
            registry=r,
        )
        self._commit = Histogram(
            "svantic_store_commit_duration_seconds",
            "Store transactions committed (SQLite, PostgreSQL) and how long each took",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._batch = Histogram(
            "svantic_store_commit_batch_size",
            "Writes carried by one store transaction (group commit)",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self._sessions = Gauge("svantic_sessions", "Open sessions by status", ("status",), registry=r)
        self._messages = Gauge("svantic_messages", "Unfinished messages by state", ("state",), registry=r)
        self._connected = Gauge(
            "svantic_connected_agents", "Agents with an open Connect stream to this process", registry=r
        )
        self._pending = Gauge(
            "svantic_input_requests_pending", "Input requests waiting for a human", registry=r
        )
        self._subscribers = Gauge(
            "svantic_event_subscribers", "Live event-stream subscribers in this process", registry=r
        )
        self._lag = Gauge(
            "svantic_event_subscriber_lag_events",
            "Events the slowest live subscriber in this process has yet to read",
            registry=r,
        )
        self._from_replica = Histogram(
            "svantic_event_replica_delay_seconds",
            "Events written by another replica (PostgreSQL): from the writer's stamp to this "
            "process's subscribers",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._leases = Counter(
            "svantic_session_lease_changes",
            "PostgreSQL replicas: sessions whose lease changed hands here, taken over (their owner's "
            "lease expired) or lost (taken by another replica)",
            ("change",),
            registry=r,
        )
        self._rpc_series: dict[tuple[str, ...], Observe] = {}
        """What observes the RPC histogram's child per (method, code): ``labels()`` looked up once,
        not per call."""
        self._dispatch_series: dict[tuple[str, ...], Observe] = {}
        self._message_series: dict[tuple[str, ...], Observe] = {}
        self._agent_types: set[str] = set()
        """Agent types labelled by name (at most ``agent_types``)."""
        self._max_agent_types = agent_types

    # The core's events

    def dispatch_done(self, *, agent_type: str, transport: str, outcome: str, latency_s: float) -> None:
        if agent_type not in self._agent_types:
            if len(self._agent_types) < self._max_agent_types:
                self._agent_types.add(agent_type)
            else:
                agent_type = OTHER
        _series(self._dispatch_series, self._dispatch, agent_type, transport or "unknown", outcome)(latency_s)

    def message_done(self, *, state: str, latency_s: float) -> None:
        _series(self._message_series, self._message, state)(latency_s)

    def input_ended(self, *, surface: str, outcome: str, latency_s: float) -> None:
        self._input.labels(surface, outcome).observe(latency_s)

    def store_commit(self, *, latency_s: float, batch: int) -> None:
        self._commit.observe(latency_s)
        self._batch.observe(batch)

    def event_from_replica(self, *, delay_s: float) -> None:
        self._from_replica.observe(delay_s)

    def lease_changes(self, *, change: str, count: int) -> None:
        self._leases.labels(change).inc(count)

    # The interceptor's

    def rpc_done(self, method: str, code: str, latency_s: float) -> None:
        """One gRPC call ended with ``code`` (a ``grpc.StatusCode`` name) after ``latency_s``."""
        observe = self._rpc_series.get((method, code))
        if observe is None:
            observe = _series(self._rpc_series, self._rpc, method, code)
        observe(latency_s)

    def count_dropped_spans(self, dropped: Callable[[], int]) -> None:
        """``svantic_trace_spans_dropped_total``: spans never exported, ``dropped()`` read on each
        scrape (the server's tracer provider: its queue was full, or the exporting child lagged)."""
        self.registry.register(_DroppedSpans(dropped))

    # Scraping

    def set_levels(self, levels: Levels) -> None:
        """Replace the gauges' values with what the mesh holds now."""
        _replace(self._sessions, levels.sessions)
        _replace(self._messages, levels.messages)
        self._connected.set(levels.connected_agents)
        self._pending.set(levels.inputs_pending)
        self._subscribers.set(levels.subscribers)
        self._lag.set(levels.subscriber_lag)

    def routes(self, levels: Callable[[], Awaitable[Levels]]) -> Sequence[BaseRoute]:
        """``GET /metrics`` in the Prometheus text format; ``levels`` is read on each scrape."""

        async def scrape(request: Request) -> Response:
            self.set_levels(await levels())
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return [Route("/metrics", scrape, methods=["GET"])]


Observe = Callable[[float], None]


def _series(cache: dict[tuple[str, ...], Observe], histogram: Histogram, *labels: str) -> Observe:
    """What observes ``histogram``'s child for ``labels``, from ``cache`` once made (label values
    are bounded: methods, codes, agent types, transports, states), so the hot path skips
    ``labels()``'s checks."""
    observe = cache.get(labels)
    if observe is None:
        observe = cache[labels] = _observer(histogram.labels(*labels))
    return observe


def _observer(child: Histogram) -> Observe:
    """``child.observe``, or what it does in fewer steps when the child is laid out as
    ``prometheus_client`` has long laid it out (bounds ending at +Inf, one in-process value per
    bucket and one for the sum): the bucket found by bisection instead of a scan, its value and
    the sum added to under their own locks, as ``MutexValue.inc`` adds. The text scraped is the
    same; anything else (multiprocess mode, another layout) observes through ``observe``."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if not (
        isinstance(bounds, list)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets) > 0
        and bounds == sorted(bounds)
        and bounds[-1] == math.inf
        and type(total) is MutexValue
        and all(type(bucket) is MutexValue for bucket in buckets)
        and all(hasattr(value, "_value") and hasattr(value, "_lock") for value in (total, *buckets))
    ):
        return child.observe
    counted: list[MutexValue] = buckets
    summed: MutexValue = total

    def observe(amount: float) -> None:
        with summed._lock:
            summed._value += amount
        if amount == amount:  # NaN falls in no bucket, as with observe
            bucket = counted[bisect_left(bounds, amount)]  # the first bound >= amount
            with bucket._lock:
                bucket._value += 1

    return observe


def _replace(gauge: Gauge, values: dict[str, int]) -> None:
    gauge.clear()  # a state with nothing in it left: its series goes rather than staying stale
    for label, value in values.items():
        gauge.labels(label).set(value)


class _DroppedSpans(Collector):
    def __init__(self, dropped: Callable[[], int]) -> None:
        self._dropped = dropped

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "svantic_trace_spans_dropped",
            "Spans never exported: the span queue was full, or the exporting child process lagged",
            value=self._dropped(),
        )
