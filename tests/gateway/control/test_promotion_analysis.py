"""Judging a promotion step from routers' series: windows per pool set in the engine's clock, and each rule."""

import pytest

from gateway.control.promotion_analysis import Limits, PoolWindow, judge, pool_window
from gateway.exposition import parse_exposition
from tests.tuner.traffic import GatewayTraffic

LIMITS = Limits(min_requests=10, max_5xx=3, error_rate_max=0.05, max_latency_ratio=1.5, ttft_p99_s=0.5,
                tpot_p99_s=0.05)


def window(requests, *, errors=0, errors_5xx=0, ttft=0.2, tpot=0.02):
    return PoolWindow(requests=requests, errors=errors, errors_5xx=errors_5xx, ttft_p99_s=ttft, tpot_p99_s=tpot)


def test_a_window_sums_routers_and_pools_of_one_class_in_the_engine_clock():
    a, b = GatewayTraffic(), GatewayTraffic()
    for _ in range(50):  # before the window
        a.request("batch", "old", e2e_s=9.0, ttft_s=9.0, tpot_s=0.5)
    start = [parse_exposition(a.exposition()), parse_exposition(b.exposition())]
    for _ in range(30):
        a.request("batch", "old", e2e_s=0.1, ttft_s=0.01, tpot_s=0.001)
        b.request("batch", "also-old", e2e_s=0.1, ttft_s=0.01, tpot_s=0.001)
        b.request("interactive", "old", e2e_s=5.0, ttft_s=5.0, tpot_s=0.5)  # another class: not counted
    a.request("batch", "old", e2e_s=0.1, status="503")
    b.request("batch", "also-old", e2e_s=0.1, status="429")
    b.request("batch", "new", e2e_s=0.1, status="502")  # another pool: not counted
    end = [parse_exposition(a.exposition()), parse_exposition(b.exposition())]
    old = pool_window(start, end, class_name="batch", pools={"old", "also-old"}, time_scale=10.0)
    assert (old.requests, old.errors, old.errors_5xx) == (62, 2, 1)
    assert old.error_rate == pytest.approx(2 / 62)
    # 60 observations of 10 ms wall in the (5 ms, 10 ms] bucket: p99 at 9.95 ms, x10 in the engine's clock
    assert old.ttft_p99_s == pytest.approx(0.0995) and old.tpot_p99_s == pytest.approx(0.0099)
    new = pool_window(start, end, class_name="batch", pools={"new"}, time_scale=10.0)
    assert (new.requests, new.errors_5xx, new.ttft_p99_s) == (1, 1, None)


def test_a_burst_of_5xx_fails_at_once_whatever_the_sample():
    verdict = judge(window(2, errors=3, errors_5xx=3), None, LIMITS)
    assert verdict.kind == "fail" and verdict.reason == "3 5xx answers from the new pool (promotion.max_5xx 3)"


def test_too_few_requests_are_inconclusive():
    verdict = judge(window(4), window(100), LIMITS)
    assert verdict.kind == "inconclusive" and verdict.reason.startswith("4 of the 10 requests needed")


def test_error_rate_and_slos_are_checked():
    assert judge(window(100, errors=6), None, LIMITS).reason == "error rate 6.00% over 5.00% (6 of 100)"
    over = judge(window(100, ttft=0.8), None, LIMITS)
    assert over.kind == "fail" and over.reason == "TTFT p99 800 ms over the class's SLO of 500 ms"
    assert judge(window(100, tpot=0.06), None, LIMITS).reason == "TPOT p99 60 ms over the class's SLO of 50 ms"


def test_an_slo_the_old_pools_broke_as_badly_does_not_fail_the_candidate():
    verdict = judge(window(100, ttft=0.8), window(100, ttft=0.9), LIMITS)
    assert verdict.kind == "pass" and verdict.reason.endswith("within the SLOs and the old pools")
    worse = judge(window(100, ttft=0.95), window(100, ttft=0.9), LIMITS)
    assert worse.kind == "fail" and worse.reason == "TTFT p99 950 ms over the class's SLO of 500 ms (old pools 900 ms)"


def test_the_candidate_is_compared_with_the_old_pools():
    verdict = judge(window(100, ttft=0.4), window(100, ttft=0.2), LIMITS)
    assert verdict.kind == "fail" and verdict.reason == ("TTFT p99 400 ms is 2.00x the old pools' 200 ms "
                                                         "(promotion.max_latency_ratio 1.5)")
    assert judge(window(100, ttft=0.28), window(100, ttft=0.2), LIMITS).kind == "pass"
    # an old window with too few requests is no comparison
    ignored = judge(window(100, ttft=0.4), window(5, ttft=0.2), LIMITS)
    assert ignored.kind == "pass" and ignored.baseline is None and ignored.reason.endswith("within the SLOs")


def test_a_verdict_survives_json():
    verdict = judge(window(100), window(100), LIMITS)
    data = verdict.as_dict()
    assert data["candidate"]["error_rate"] == 0.0
    assert PoolWindow.from_dict(data["baseline"]) == window(100)
