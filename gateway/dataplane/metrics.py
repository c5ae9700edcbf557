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
# Token counts per request: powers of the square root of two, so a quantile read from a bucket is off by at most
# that factor and usually far less (the live profile's length distributions come from these).
TOKEN_COUNT_BUCKETS = (1, 2, 4, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512, 724, 1024, 1448, 2048,
                       2896, 4096, 5793, 8192, 11585, 16384, 23170, 32768, 46341, 65536, 131072)
API_BY_PATH = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}  # the ``api`` label of arrivals


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


class ClassSeries:
    """The live-profile series of one workload class, bound once: arrivals by API and streaming, requests in
    flight, and the prompt and output token counts of each successful request (from the engine's ``usage``)."""

    def __init__(self, metrics: GatewayMetrics, route: str) -> None:
        self._arrivals = {(path, stream): metrics.arrivals.labels(route, api, "true" if stream else "false")
                          for path, api in API_BY_PATH.items() for stream in (False, True)}
        self.inflight = metrics.class_inflight.labels(route)
        self.prompt_length = metrics.request_prompt_tokens.labels(route)
        self.output_length = metrics.request_output_tokens.labels(route)

    def arrived(self, path: str, stream: bool) -> None:
        """A request of this class arrived (classified) and is now in flight."""
        arrivals = self._arrivals.get((path, stream))
        if arrivals is not None:
            arrivals.inc()
        self.inflight.inc()


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
        self.arrivals = Counter(
            "tpgate_arrivals", "Requests that arrived for a class (counted once classified), by API and streaming",
            ["class", "api", "stream"], registry=r)
        self.class_inflight = Gauge(
            "tpgate_class_inflight_requests", "Requests of a class in the gateway now (classified, not finished)",
            ["class"], registry=r)
        self.request_prompt_tokens = Histogram(
            "tpgate_request_prompt_tokens", "Prompt tokens of each successful request (engine usage)", ["class"],
            buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.request_output_tokens = Histogram(
            "tpgate_request_output_tokens", "Output tokens of each successful request (engine usage)", ["class"],
            buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.route_weight = Gauge(
            "tpgate_route_weight_ratio", "Share of a class's traffic routed to a pool", ["class", "pool"], registry=r)
        self.pool_replicas = Gauge(
            "tpgate_pool_replicas", "Healthy engine replicas of a pool", ["pool", "tp"], registry=r)
        self.pool_desired_replicas = Gauge(
            "tpgate_pool_desired_replicas", "Engine replicas a pool should have", ["pool", "tp"], registry=r)
        self.state_version = Gauge(
            "tpgate_state_version", "Version of the controller state this router follows", registry=r)
        self.promotion_step = Gauge(
            "tpgate_promotion_step", "Step of the class's promotion in progress (1 = the first; 0 = its new pool "
            "is coming up); no series when none runs", ["class"], registry=r)
        self.promotion_weight = Gauge(
            "tpgate_promotion_weight_ratio", "Share of the class's traffic its promotion has moved to the new pool",
            ["class"], registry=r)
        self.class_drifted = Gauge(
            "tpgate_class_drifted", "1 when the drift monitor finds the class's live traffic far from what it was "
            "tuned for; no series without a current verdict", ["class"], registry=r)

        self._series: dict[tuple[str, str], RouteSeries] = {}
        self._class_series: dict[str, ClassSeries] = {}
        self._inflight: dict[tuple[str, str], Any] = {}
        self._error_labels: set[tuple[str, str]] = set()
        self._retry_pools: set[str] = set()

    def series(self, route: str, pool: str) -> RouteSeries:
        series = self._series.get((route, pool))
        if series is None:
            series = self._series[(route, pool)] = RouteSeries(self, route, pool)
        return series

    def class_series(self, route: str) -> ClassSeries:
        series = self._class_series.get(route)
        if series is None:
            series = self._class_series[route] = ClassSeries(self, route)
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
        for route in [route for route in self._class_series if route not in routes and route != NO_CLASS]:
            del self._class_series[route]
            for api in API_BY_PATH.values():
                for stream in ("false", "true"):
                    self.arrivals.remove(route, api, stream)
            for metric in (self.class_inflight, self.request_prompt_tokens, self.request_output_tokens):
                metric.remove(route)
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



class DriftMetrics:
    """The drift monitor's metrics, in a registry of its own (the monitor serves them; routers do not)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.drifted = Gauge(
            "tpgate_class_drifted", "1 when the class's live traffic has drifted from the profile it was tuned for",
            ["class"], registry=r)
        self.drift_ratio = Gauge(
            "tpgate_class_drift_ratio", "The last interval's live figure over the reference's, by distance "
            "(slo_attainment: the attainment itself)", ["class", "distance"], registry=r)
        self.retune_advised = Gauge(
            "tpgate_class_retune_advised", "1 when the guard rails would re-tune the class now", ["class"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
