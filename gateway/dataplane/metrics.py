"""The gateway's own metrics, all declared here (prefix ``tpgate_``, base units in the name, small label sets).

This is the per-class view the tuner and the SLO guard read. Labels come from fixed sets: class (workload
classes and trial routes; ``none`` for a request refused before its class was known), pool (``none`` for a
request answered before a pool was chosen), replica (bounded by the pool's replica count), status (HTTP status
code), reason. Series of pools, replicas and trial routes that are gone are removed (:meth:`GatewayMetrics.forget`),
so the set stays bounded however many trials run. Each router process owns one :class:`GatewayMetrics` with its
own registry (no global state).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                     7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
FRONT_WAIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOKEN_GAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                       0.3, 0.5, 1.0)


class RouteSeries:
    """The series of one (class, pool), bound once: label lookups cost more than the updates themselves."""

    def __init__(self, metrics: GatewayMetrics, route: str, pool: str) -> None:
        self._metrics = metrics
        self._labels = (route, pool)
        self._requests_by_status: dict[str, Any] = {}
        self.request_duration = metrics.request_duration.labels(route, pool)
        self.time_to_first_token = metrics.time_to_first_token.labels(route, pool)
        self.time_per_output_token = metrics.time_per_output_token.labels(route, pool)
        self.output_tokens = metrics.output_tokens.labels(route, pool)
        self.prompt_tokens = metrics.prompt_tokens.labels(route, pool)
        self.queue_wait = metrics.queue_wait.labels(route, pool)
        self.front_wait = metrics.front_wait.labels(route, pool)
        self.slo_met = metrics.slo_met.labels(route, pool)

    def statuses(self) -> list[str]:
        return list(self._requests_by_status)

    def requests(self, status: str) -> Any:
        counter = self._requests_by_status.get(status)
        if counter is None:
            counter = self._requests_by_status[status] = self._metrics.requests.labels(*self._labels, status)
        return counter


class GatewayMetrics:
    """Counters, histograms and gauges of one router process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tpgate_requests", "Requests finished, by class, pool and HTTP status", ["class", "pool", "status"],
            registry=r)
        self.request_duration = Histogram(
            "tpgate_request_duration_seconds",
            "End-to-end latency seen by the gateway, from the front door on the HAProxy fast path", ["class", "pool"],
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.time_to_first_token = Histogram(
            "tpgate_time_to_first_token_seconds",
            "Time from request (the front door on the fast path) to the first streamed token", ["class", "pool"],
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.time_per_output_token = Histogram(
            "tpgate_time_per_output_token_seconds", "Mean gap between output tokens of a streamed request",
            ["class", "pool"], buckets=TOKEN_GAP_BUCKETS_S, registry=r)
        self.output_tokens = Counter(
            "tpgate_output_tokens", "Completion tokens returned", ["class", "pool"], registry=r)
        self.prompt_tokens = Counter(
            "tpgate_prompt_tokens", "Prompt tokens of finished requests (when the engine reports usage)",
            ["class", "pool"], registry=r)
        self.slo_met = Counter(
            "tpgate_slo_met_requests", "Successful requests that met every per-request SLO of their class "
            "(TTFT, TPOT, e2e; judged in the engine's clock): goodput is its rate", ["class", "pool"], registry=r)
        self.inflight = Gauge(
            "tpgate_inflight_requests", "Requests in flight to an engine replica", ["pool", "replica"], registry=r)
        self.queue_wait = Histogram(
            "tpgate_queue_wait_seconds", "Time spent waiting for a pool's concurrency slot", ["class", "pool"],
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.front_wait = Histogram(
            "tpgate_front_wait_seconds", "Time from the front door (HAProxy) receiving a request to the router "
            "starting on it: HAProxy's queue, Serve's replica HTTP stack, a busy router (already inside the "
            "request duration and TTFT, which count from the front door)", ["class", "pool"],
            buckets=FRONT_WAIT_BUCKETS_S, registry=r)
        self.retries = Counter(
            "tpgate_upstream_retries", "Requests retried on another replica before any byte was sent", ["pool"],
            registry=r)
        self.upstream_errors = Counter(
            "tpgate_upstream_errors", "Failed upstream attempts, by reason", ["pool", "reason"], registry=r)
        self.route_weight = Gauge(
            "tpgate_route_weight_ratio", "Share of a class's traffic routed to a pool", ["class", "pool"], registry=r)
        self.pool_replicas = Gauge(
            "tpgate_pool_replicas", "Healthy engine replicas of a pool", ["pool", "tp"], registry=r)
        self.pool_desired_replicas = Gauge(
            "tpgate_pool_desired_replicas", "Engine replicas a pool should have", ["pool", "tp"], registry=r)
        self.state_version = Gauge(
            "tpgate_state_version", "Version of the controller state this router follows", registry=r)

        self._series: dict[tuple[str, str], RouteSeries] = {}
        self._inflight: dict[tuple[str, str], Any] = {}
        self._error_labels: set[tuple[str, str]] = set()
        self._retry_pools: set[str] = set()

    def series(self, route: str, pool: str) -> RouteSeries:
        series = self._series.get((route, pool))
        if series is None:
            series = self._series[(route, pool)] = RouteSeries(self, route, pool)
        return series

    def inflight_gauge(self, pool: str, replica: str) -> Any:
        gauge = self._inflight.get((pool, replica))
        if gauge is None:
            gauge = self._inflight[(pool, replica)] = self.inflight.labels(pool, replica)
        return gauge

    def count_upstream_error(self, pool: str, reason: str) -> None:
        self._error_labels.add((pool, reason))
        self.upstream_errors.labels(pool, reason).inc()

    def count_retry(self, pool: str) -> None:
        self._retry_pools.add(pool)
        self.retries.labels(pool).inc()

    def forget(self, *, routes: set[str], pools: set[str]) -> None:
        """Remove every series of a (class, pool) or (pool, replica) whose route or pool is not kept."""
        for (route, pool), series in list(self._series.items()):
            if (route not in routes and route != NO_CLASS) or (pool not in pools and pool != NO_POOL):
                del self._series[(route, pool)]
                for metric in self._per_route_metrics():
                    metric.remove(route, pool)
                for status in series.statuses():
                    self.requests.remove(route, pool, status)
        for pool, replica in [key for key in self._inflight if key[0] not in pools]:
            del self._inflight[(pool, replica)]
            self.inflight.remove(pool, replica)
        for pool, reason in [key for key in self._error_labels if key[0] not in pools]:
            self._error_labels.discard((pool, reason))
            self.upstream_errors.remove(pool, reason)
        for pool in self._retry_pools - pools:
            self._retry_pools.discard(pool)
            self.retries.remove(pool)

    def _per_route_metrics(self) -> tuple[Any, ...]:
        return (self.request_duration, self.time_to_first_token, self.time_per_output_token, self.output_tokens,
                self.prompt_tokens, self.queue_wait, self.front_wait, self.slo_met)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


NO_POOL = "none"  # the pool label of a request answered before a pool was chosen
NO_CLASS = "none"  # the class label of a request refused before its class was known

