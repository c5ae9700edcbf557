"""Synthetic class traffic recorded through the gateway's own metrics, and scraped as Prometheus text."""

from gateway.dataplane.metrics import GatewayMetrics
from tuner.scrape import Samples, parse_exposition


class ClassTraffic:
    """One router's metrics, fed requests of known shape; :meth:`scrape` reads them as Prometheus would."""

    def __init__(self) -> None:
        self.metrics = GatewayMetrics()

    def request(self, route: str, *, prompt: int, output: int, stream: bool = True, status: str = "200",
                path: str = "/v1/chat/completions", slo_met: bool = True, pool: str = "pa") -> None:
        """A request that arrived and finished."""
        self.metrics.class_series(route).arrived(path, stream)
        self.finish(route, prompt=prompt, output=output, status=status, slo_met=slo_met, pool=pool)

    def finish(self, route: str, *, prompt: int, output: int, status: str = "200", slo_met: bool = True,
               pool: str = "pa") -> None:
        series = self.metrics.class_series(route)
        series.inflight.dec()
        route_series = self.metrics.series(route, pool)
        route_series.requests(status).inc()
        if status == "200":
            series.prompt_length.observe(prompt)
            series.output_length.observe(output)
            if slo_met:
                route_series.slo_met.inc()

    def set_inflight(self, route: str, value: int) -> None:
        self.metrics.class_series(route).inflight.set(value)

    def scrape(self) -> Samples:
        return parse_exposition(self.metrics.exposition().decode())
