import math
import random

import pytest

from gateway.dataplane.metrics import LATENCY_BUCKETS_S
from tests.tuner.traffic import GatewayTraffic
from tuner.scrape import counter_increase, histogram_quantile, parse_exposition, window_values
from tuner.window import HISTOGRAMS, OUTPUT_TOKENS_TOTAL, PROMPT_TOKENS_TOTAL, REQUESTS_TOTAL, WindowFigures

INF = math.inf


def test_parse_reads_labels_escapes_and_special_values():
    samples = parse_exposition('# HELP x y\n# TYPE x counter\nx_total{a="1",b="q\\"uo\\\\te\\n"} 3.5\n'
                               'y{le="+Inf"} +Inf\nz NaN\nw 7 1700000000000\n')
    assert samples[("x_total", frozenset({("a", "1"), ("b", 'q"uo\\te\n')}))] == 3.5
    assert samples[("y", frozenset({("le", "+Inf")}))] == INF
    assert math.isnan(samples[("z", frozenset())])
    assert samples[("w", frozenset())] == 7
    with pytest.raises(ValueError, match="line 1: not a Prometheus sample"):
        parse_exposition("what is this\n")


def test_the_names_the_tuner_reads_are_the_gateways():
    traffic = GatewayTraffic()
    traffic.request("interactive", "p", e2e_s=0.4, ttft_s=0.1, tpot_s=0.01)
    names = {name for name, _ in parse_exposition(traffic.metrics.exposition().decode())}
    assert {REQUESTS_TOTAL, OUTPUT_TOKENS_TOTAL, PROMPT_TOKENS_TOTAL} <= names
    for metric in HISTOGRAMS.values():
        assert {f"{metric}_bucket", f"{metric}_sum", f"{metric}_count"} <= names


def test_counter_increase_handles_resets_and_new_series():
    assert counter_increase(10, 25) == 15
    assert counter_increase(10, 4) == 4  # reset in between: counts from zero
    assert counter_increase(None, 6) == 6  # born in the window
    assert counter_increase(5, None) == 0


def test_histogram_quantile_interpolates_inside_the_bucket():
    buckets = [(1.0, 2), (2.0, 6), (4.0, 9), (INF, 10)]  # cumulative counts
    assert histogram_quantile(0.5, buckets) == pytest.approx(1.75)  # rank 5: (1, 2] holds ranks 3-6 -> 1 + 3/4
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.5)  # lowest bucket: from 0
    assert histogram_quantile(0.9, buckets) == pytest.approx(4.0)
    assert histogram_quantile(0.95, buckets) == 4.0  # in the +Inf bucket: the highest finite bound


def test_histogram_quantile_special_cases_follow_prometheus():
    buckets = [(1.0, 2), (2.0, 6), (INF, 10)]
    assert histogram_quantile(-0.1, buckets) == -INF
    assert histogram_quantile(1.1, buckets) == INF
    assert math.isnan(histogram_quantile(math.nan, buckets))
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0), (INF, 0)]))  # no observations
    assert math.isnan(histogram_quantile(0.5, [(1.0, 3), (2.0, 4)]))  # no +Inf bucket
    assert math.isnan(histogram_quantile(0.5, [(INF, 4)]))  # one bucket only
    assert histogram_quantile(0.5, [(-1.0, 3), (INF, 4)]) == -1.0  # lowest bound <= 0: no interpolation
    # unsorted, duplicated bounds merged, counts made non-decreasing
    assert histogram_quantile(0.5, [(INF, 10), (2.0, 3), (1.0, 2), (2.0, 3), (4.0, 5)]) == pytest.approx(1.75)
    assert histogram_quantile(0.5, [(1.0, 6), (2.0, 4), (INF, 10)]) == pytest.approx(5 / 6)


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
