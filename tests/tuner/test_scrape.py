import math
import random

import pytest

from gateway.dataplane.metrics import LATENCY_BUCKETS_S
from gateway.exposition import histogram_quantile, parse_exposition
from tests.tuner.traffic import GatewayTraffic
from tuner.scrape import window_values
from tuner.window import HISTOGRAMS, OUTPUT_TOKENS_TOTAL, PROMPT_TOKENS_TOTAL, REQUESTS_TOTAL, WindowFigures

INF = math.inf


def test_the_names_the_tuner_reads_are_the_gateways():
    traffic = GatewayTraffic()
    traffic.request("interactive", "p", e2e_s=0.4, ttft_s=0.1, tpot_s=0.01)
    names = {name for name, _ in parse_exposition(traffic.metrics.exposition().decode())}
    assert {REQUESTS_TOTAL, OUTPUT_TOKENS_TOTAL, PROMPT_TOKENS_TOTAL} <= names
    for metric in HISTOGRAMS.values():
        assert {f"{metric}_bucket", f"{metric}_sum", f"{metric}_count"} <= names


def test_window_quantile_is_the_quantile_of_the_windows_own_observations():
    """Bucket deltas between two scrapes give the histogram of exactly the window's observations."""
    rng = random.Random(7)
    traffic = GatewayTraffic()
    for _ in range(300):  # before the window: slow requests that must not count
        traffic.request("r", "p", e2e_s=rng.uniform(5, 20))
    start = parse_exposition(traffic.exposition())
    inside = [rng.lognormvariate(-1, 0.8) for _ in range(500)]
    for e2e in inside:
        traffic.request("r", "p", e2e_s=e2e)
    values = window_values([start], [parse_exposition(traffic.exposition())], route="r", pool="p")
    own = [(bound, sum(1 for e in inside if e <= bound)) for bound in (*LATENCY_BUCKETS_S, INF)]
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        assert values[f"e2e_{label}"] == pytest.approx(histogram_quantile(q, own))
    assert values["e2e_count"] == 500 and values["e2e_sum"] == pytest.approx(sum(inside))


def test_window_values_sum_routers_and_survive_a_router_restart():
    a, b = GatewayTraffic(), GatewayTraffic()
    for traffic in (a, b):
        for _ in range(10):
            traffic.request("r", "p", e2e_s=0.5, ttft_s=0.1, tpot_s=0.02, output_tokens=50, slo_met=True)
    start = [parse_exposition(a.exposition()), parse_exposition(b.exposition())]
    for _ in range(4):
        a.request("r", "p", e2e_s=0.5, ttft_s=0.1, tpot_s=0.02, output_tokens=50, slo_met=True)
    a.request("r", "p", e2e_s=0.5, status="503")
    a.request("r", "none", e2e_s=0.0, status="429")  # refused before a pool was chosen
    a.request("other", "p", e2e_s=0.5)  # another route: not counted
    b = GatewayTraffic()  # router b restarted: its counters start again from zero
    for _ in range(3):
        b.request("r", "p", e2e_s=0.5, ttft_s=0.1, tpot_s=0.02, output_tokens=50)
    end = [parse_exposition(a.exposition()), parse_exposition(b.exposition())]
    values = window_values(start, end, route="r", pool="p")
    assert (values["requests"], values["ok_requests"]) == (9, 7)
    assert (values["output_tokens"], values["slo_met_requests"]) == (350, 4)
    assert values["ttft_count"] == 7 and values["ttft_p50"] == pytest.approx(0.0875)
    figures = WindowFigures.from_values(values, window_s=2.0)
    assert figures.error_rate == pytest.approx(2 / 9) and figures.requests_per_s == 3.5
    assert figures.goodput_requests_per_s == 2.0 and figures.output_tokens_per_s == 175.0
    assert figures.ttft_mean_s == pytest.approx(0.1)


def test_series_that_never_appear_are_none():
    empty = parse_exposition(GatewayTraffic().exposition())
    values = window_values([empty], [empty], route="r", pool="p")
    assert values["requests"] is None and values["ttft_p99"] is None
    figures = WindowFigures.from_values(values, window_s=1.0)
    assert (figures.requests, figures.error_rate, figures.ttft_p99_s, figures.goodput_requests_per_s) == (
        0.0, 0.0, None, None)
    with pytest.raises(ValueError, match="scrapes at the window's start"):
        window_values([empty], [], route="r", pool="p")
