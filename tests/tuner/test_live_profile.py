"""Live profile arithmetic: from direct scrapes (through the gateway's real metrics) and from PromQL results."""

import math
import random

import pytest

from tests.tuner.profile_traffic import ClassTraffic
from tuner.live_profile import (
    LengthSummary,
    LiveProfile,
    from_promql,
    from_scrapes,
    promql_queries,
)


def test_counters_shares_and_lengths_over_the_window_only():
    traffic = ClassTraffic()
    traffic.request("batch", prompt=5000, output=5000)  # before the window: must not count
    start = traffic.scrape()
    for i in range(10):
        traffic.request("batch", prompt=100 + i, output=50, stream=i < 7, slo_met=i < 8,
                        path="/v1/chat/completions" if i < 6 else "/v1/completions")
    traffic.request("batch", prompt=1, output=1, status="503")
    traffic.request("interactive", prompt=9000, output=9000)  # another class
    live = from_scrapes("batch", [(100.0, (start,)), (120.0, (traffic.scrape(),))])
    assert live.window_s == 20 and live.end_s == 120
    assert live.arrivals == 11 and live.arrival_rate_per_s == pytest.approx(11 / 20)
    assert live.streaming_share == pytest.approx(8 / 11)  # the 503 was streamed too
    assert live.chat_share == pytest.approx(7 / 11)
    assert (live.requests, live.ok_requests) == (11, 10)
    assert live.error_share == pytest.approx(1 / 11)
    assert live.slo_attainment == pytest.approx(0.8)
    assert live.prompt.count == 10 and live.prompt.mean == pytest.approx(104.5)  # exact, from the sum
    assert 91 <= live.prompt.median <= 128  # the bucket that holds them
    assert live.prompt.single_bucket and (live.prompt.low, live.prompt.high) == (91, 128)
    assert live.output.mean == 50


def test_concurrency_is_the_time_weighted_mean_and_peak_of_the_gauge():
    traffic = ClassTraffic()
    scrapes = []
    for at_s, inflight in ((0.0, 0), (1.0, 10), (2.0, 10), (4.0, 2)):
        traffic.set_inflight("batch", inflight)
        scrapes.append((at_s, (traffic.scrape(),)))
    live = from_scrapes("batch", scrapes)
    # trapezoids: 0-1 s: 5, 1-2 s: 10, 2-4 s: 2 * 6 = 12 -> 27 over 4 s
    assert live.concurrency_mean == pytest.approx(27 / 4)
    assert live.concurrency_peak == 10


def test_router_replicas_are_summed_and_a_restarted_router_counts_from_zero():
    one, two = ClassTraffic(), ClassTraffic()
    for _ in range(5):
        one.request("batch", prompt=200, output=20)
    start = (one.scrape(), two.scrape())
    restarted = ClassTraffic()  # router one restarts: its counters start again from zero
    for _ in range(3):
        restarted.request("batch", prompt=200, output=20)
        two.request("batch", prompt=200, output=20)
    two.set_inflight("batch", 4)
    restarted.set_inflight("batch", 2)
    live = from_scrapes("batch", [(0.0, start), (10.0, (restarted.scrape(), two.scrape()))])
    assert live.arrivals == 6 and live.prompt.count == 6
    assert live.concurrency_peak == 6  # 4 + 2 at the same moment
    assert live.concurrency_mean == pytest.approx(3.0)


@pytest.mark.parametrize(("scrapes", "message"), [
    ([(0.0, ())], "at least two scrapes"),
    ([(0.0, ({},)), (1.0, ({}, {}))], "router replicas scraped changed"),
    ([(1.0, ({},)), (1.0, ({},))], "increasing time order"),
])
def test_bad_scrape_sequences_are_refused(scrapes, message):
    with pytest.raises(ValueError, match=message):
        from_scrapes("batch", scrapes)


def test_a_class_without_traffic_has_empty_lengths_and_no_shares():
    traffic = ClassTraffic()
    live = from_scrapes("batch", [(0.0, (traffic.scrape(),)), (5.0, (traffic.scrape(),))])
    assert live.arrivals == 0 and live.streaming_share is None and live.slo_attainment is None
    assert live.prompt.count == 0 and live.prompt.median is None


def test_spread_lengths_give_quantiles_between_the_extremes():
    rng = random.Random(3)
    traffic = ClassTraffic()
    start = traffic.scrape()
    lengths = sorted(round(rng.lognormvariate(math.log(800), 0.5)) for _ in range(2000))
    for length in lengths:
        traffic.request("batch", prompt=length, output=10)
    live = from_scrapes("batch", [(0.0, (start,)), (60.0, (traffic.scrape(),))])
    true_median = lengths[len(lengths) // 2]
    assert live.prompt.median == pytest.approx(true_median, rel=0.1)
    assert live.prompt.quantiles[0.1] < live.prompt.quantiles[0.5] < live.prompt.quantiles[0.9]
    assert not live.prompt.single_bucket
    assert live.prompt.low <= lengths[0] and live.prompt.high >= lengths[-1]


def test_promql_queries_name_the_class_and_cover_the_window():
    queries = promql_queries("batch", 1800, peak_resolution_s=5)
    assert queries["arrivals"] == 'sum by (api, stream) (increase(tpgate_arrivals_total{class="batch"}[1800000ms]))'
    assert queries["concurrency_peak"] == (
        'max_over_time(sum(tpgate_class_inflight_requests{class="batch"})[1800s:5s])')
    assert queries["prompt_buckets"].startswith("sum by (le) (increase(tpgate_request_prompt_tokens_bucket")
    assert all('class="batch"' in expr for expr in queries.values())


def test_promql_results_give_the_same_profile_as_scrapes():
    traffic = ClassTraffic()
    start = traffic.scrape()
    for i in range(40):
        traffic.request("batch", prompt=300 + 20 * i, output=100 + i, stream=i % 4 != 0, slo_met=i % 10 != 0)
    traffic.request("batch", prompt=1, output=1, status="500")
    end = traffic.scrape()
    scraped = from_scrapes("batch", [(0.0, (start,)), (30.0, (end,))])

    def vector(metric, *labels):  # Prometheus's answer to "sum by (labels) (increase(metric{class=batch}))"
        sums = {}
        for (name, label_set), value in end.items():
            label_map = dict(label_set)
            if name == metric and label_map.get("class") == "batch":
                key = tuple((label, label_map[label]) for label in labels)
                sums[key] = sums.get(key, 0.0) + value - start.get((name, label_set), 0.0)
        return [{"metric": dict(key), "value": [30.0, str(value)]} for key, value in sums.items()]

    results = {
        "arrivals": vector("tpgate_arrivals_total", "api", "stream"),
        "statuses": vector("tpgate_requests_total", "status"),
        "slo_met": vector("tpgate_slo_met_requests_total"),
        "concurrency_mean": [{"metric": {}, "value": [30.0, "0"]}],
        "concurrency_peak": [{"metric": {}, "value": [30.0, "0"]}],
    }
    for short, metric in (("prompt", "tpgate_request_prompt_tokens"), ("output", "tpgate_request_output_tokens")):
        results[f"{short}_buckets"] = vector(f"{metric}_bucket", "le")
        results[f"{short}_sum"] = vector(f"{metric}_sum")
        results[f"{short}_count"] = vector(f"{metric}_count")
    queried = from_promql("batch", 30.0, 30.0, results)
    assert queried == scraped


def test_a_profile_survives_its_dict_form():
    live = LiveProfile(
        class_name="batch", window_s=60, end_s=1000, arrivals=120, streamed=60, chat=120, requests=118,
        ok_requests=117, slo_met_requests=110, concurrency_mean=12.5, concurrency_peak=20,
        prompt=LengthSummary(count=117, mean=980.0, quantiles={0.5: 950.0, 0.9: 1500.0}, low=512, high=2048),
        output=LengthSummary(count=117, mean=300.0, quantiles={0.5: 290.0}, low=181, high=362),
    )
    assert LiveProfile.from_dict(live.as_dict()) == live
