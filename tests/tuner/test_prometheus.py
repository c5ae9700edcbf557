"""Against a real Prometheus server (Debian's ``prometheus``), scraping a real gateway-metrics endpoint and a
simulated engine: the PromQL window and the direct-scrape window agree."""

import asyncio
import contextlib
import shutil

import pytest

from tests.tuner.servers import metrics_server, steady_traffic
from tests.tuner.traffic import GatewayTraffic
from tuner.prometheus_server import PrometheusServer, PrometheusServerError
from tuner.session import open_metric_source
from tuner.sources import PrometheusSource, ScrapeSource, SimClockReader
from tuner.timescale import check_clocks
from tuner.window import WindowFigures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROUTE, POOL = "trial-abc123-1", "t-abc123-tp1x1-mbs128-kv8-q0-pf8192"
WINDOW_S = 10.0


def require_prometheus() -> None:
    assert shutil.which("prometheus"), "Debian's prometheus is needed: apt-get install -y prometheus"


async def test_promql_and_direct_scrapes_measure_the_same_window(sim_engine):
    require_prometheus()
    traffic = GatewayTraffic()
    async with metrics_server(traffic) as gateway_url, PrometheusServer() as server:
        await server.watch({"router-0": gateway_url}, {POOL: {"r0": sim_engine}})
        load = asyncio.create_task(steady_traffic(traffic, ROUTE, POOL))
        scrape, promql = ScrapeSource([gateway_url + "/metrics"]), PrometheusSource(server.url)
        try:
            await asyncio.sleep(3.0)  # a few scrapes of steady traffic before the window
            start = await scrape.mark()
            await asyncio.sleep(WINDOW_S)
            end = await scrape.mark()
            await asyncio.sleep(1.5)  # traffic stays steady past the window's end
            scraped = await scrape.window_values(start, end, route=ROUTE, pool=POOL)
            queried = await promql.window_values(start, end, route=ROUTE, pool=POOL)
            engine_up = await promql.query('up{job="tpgate-engines"}')
            engine_series = await promql.query("lmdeploy:num_requests_running")
        finally:
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
            await scrape.aclose()
            await promql.aclose()
    assert [float(r["value"][1]) for r in engine_up] == [1.0] and engine_series  # the engine was scraped too
    window_s = end.at_s - start.at_s
    by_scrape = WindowFigures.from_values(scraped, window_s=window_s)
    by_promql = WindowFigures.from_values(queried, window_s=window_s)
    assert by_scrape.requests > 400  # about 60 requests/s
    # counts: Prometheus extrapolates from 1 s samples inside the window; the scrape counts exactly
    for name in ("requests", "requests_per_s", "output_tokens_per_s", "goodput_requests_per_s"):
        assert getattr(by_promql, name) == pytest.approx(getattr(by_scrape, name), rel=0.05), name
    assert by_promql.error_rate == pytest.approx(by_scrape.error_rate, abs=0.005)
    # quantiles and means: the same steady mix of requests on both sides
    for name in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s",
                 "ttft_mean_s", "tpot_mean_s", "e2e_mean_s"):
        assert getattr(by_promql, name) == pytest.approx(getattr(by_scrape, name), rel=0.05), name


async def test_engine_clock_of_an_idle_simulated_engine_runs_at_its_scale(sim_engine):
    clocks = SimClockReader()
    try:
        start = {"r0": await clocks.read(sim_engine)}
        await asyncio.sleep(1.0)
        end = {"r0": await clocks.read(sim_engine)}
    finally:
        await clocks.aclose()
    check = check_clocks(start, end, nominal_scale=10.0, tolerance=0.05)
    assert check.valid and check.effective_scale == pytest.approx(10.0, rel=0.05)


async def test_targets_that_never_come_up_are_named():
    require_prometheus()
    async with PrometheusServer() as server:
        with pytest.raises(PrometheusServerError, match="targets not up after 2 s: tpgate-gateway 127.0.0.1:9"):
            await server.watch({"router-0": "http://127.0.0.1:9"}, {}, timeout_s=2.0)


async def test_a_session_without_a_url_starts_its_own_prometheus_and_points_it_at_the_pool(sim_engine):
    require_prometheus()
    traffic = GatewayTraffic()
    async with metrics_server(traffic) as gateway_url:
        async with open_metric_source(prometheus_url=None) as source:
            assert source.name == "prometheus" and "started by the tuner" in source.description
            await source.watch(gateway_url, {POOL: {"r0": sim_engine}})  # returns once both targets are up
            load = asyncio.create_task(steady_traffic(traffic, ROUTE, POOL))
            try:
                await asyncio.sleep(2.0)
                start = await source.mark()
                await asyncio.sleep(4.0)
                end = await source.mark()
                values = await source.window_values(start, end, route=ROUTE, pool=POOL)
            finally:
                load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
        server_url = source.description.split(" at ")[1].split(" ")[0]
    figures = WindowFigures.from_values(values, window_s=end.at_s - start.at_s)
    assert figures.requests_per_s == pytest.approx(60, rel=0.25) and figures.e2e_p50_s is not None
    with pytest.raises(OSError):  # the server stopped with the session
        await asyncio.open_connection(*server_url.removeprefix("http://").split(":"))
