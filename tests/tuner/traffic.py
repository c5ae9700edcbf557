"""Gateway traffic recorded the way the router records it, in the gateway's own metrics registry."""

from __future__ import annotations

from gateway.dataplane.metrics import GatewayMetrics


class GatewayTraffic:
    """One router's metrics, recorded as the router records a finished request."""

    def __init__(self) -> None:
        self.metrics = GatewayMetrics()

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
            series.slo_met.inc()

    def exposition(self) -> str:
        return self.metrics.exposition().decode()
