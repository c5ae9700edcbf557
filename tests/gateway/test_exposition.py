"""Exposition arithmetic: parsing a scrape, counter increases across resets, Prometheus's histogram_quantile,
and window sums over several routers."""

import math

import pytest

from gateway.exposition import (
    counter_increase,
    histogram_quantile,
    parse_exposition,
    series_increases,
    summed_increase,
    window_quantile,
)

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

def _scrape(text):
    return parse_exposition(text)


def test_window_sums_over_routers_per_label_set_and_filters_by_labels():
    start = [_scrape('c_total{class="a",pool="p"} 10\nc_total{class="a",pool="q"} 1\n'),
             _scrape('c_total{class="a",pool="p"} 5\n')]
    end = [_scrape('c_total{class="a",pool="p"} 14\nc_total{class="a",pool="q"} 3\nc_total{class="b",pool="p"} 9\n'),
           _scrape('c_total{class="a",pool="p"} 2\n')]  # the second router restarted: counts from zero
    in_a = lambda labels: labels["class"] == "a"  # noqa: E731
    increases = series_increases(start, end, "c_total", in_a)
    assert increases == {frozenset({("class", "a"), ("pool", "p")}): 6.0,
                         frozenset({("class", "a"), ("pool", "q")}): 2.0}
    assert summed_increase(start, end, "c_total", in_a) == 8.0
    assert summed_increase(start, end, "c_total", lambda labels: labels["class"] == "z") is None
    with pytest.raises(ValueError, match="1 scrapes at the window's start but 2 at its end"):
        series_increases(start[:1], end, "c_total", in_a)


def test_window_quantile_merges_the_buckets_of_every_matching_series():
    def histogram(pool, counts):
        bounds = ("0.1", "1.0", "+Inf")
        return "".join(f'h_bucket{{class="a",pool="{pool}",le="{b}"}} {c}\n'
                       for b, c in zip(bounds, counts, strict=True))

    start = [_scrape(histogram("p", (0, 0, 0)) + histogram("q", (0, 0, 0)))]
    end = [_scrape(histogram("p", (4, 4, 4)) + histogram("q", (0, 4, 4)))]
    both = lambda labels: True  # noqa: E731
    assert window_quantile(0.5, start, end, "h", both) == pytest.approx(0.1)  # rank 4 of 8: the first bucket's top
    assert window_quantile(0.75, start, end, "h", both) == pytest.approx(0.55)
    assert window_quantile(0.5, start, start, "h", both) is None  # no observation in the window
