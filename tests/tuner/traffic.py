"""Gateway traffic recorded the way the router records it, in the gateway's own metrics registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from gateway.dataplane.metrics import GatewayMetrics


class GatewayTraffic:
    """One router's metrics. The per-request SLO counter is the tuner's reading of goodput; it is registered
    here next to the gateway's registry, under the name the tuner reads."""

    def __init__(self) -> None:
        self.metrics = GatewayMetrics()
        self._extra = CollectorRegistry()
        self._slo_met = Counter("tpgate_slo_met_requests", "requests that met every SLO", ["class", "pool"],
                                registry=self._extra)

    def request(self, route: str, pool: str, *, e2e_s: float, ttft_s: float | None = None,
                tpot_s: float | None = None, status: str = "200", output_tokens: int = 10,
                prompt_tokens: int = 100, slo_met: bool = False) -> None:
        series = self.metrics.series(route, pool)
        series.requests(status).inc()
        if status != "200":
            return
        series.request_duration.observe(e2e_s)
        series.output_tokens.inc(output_tokens)
        series.prompt_tokens.inc(prompt_tokens)
        if ttft_s is not None:
            series.time_to_first_token.observe(ttft_s)
        if tpot_s is not None:
            series.time_per_output_token.observe(tpot_s)
        if slo_met:
            self._slo_met.labels(route, pool).inc()

    def exposition(self) -> str:
        return (self.metrics.exposition() + generate_latest(self._extra)).decode()
