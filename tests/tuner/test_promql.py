import pytest

from tuner.promql import Window, label_matchers, latest_sample_query, range_selector, window_queries
from tuner.window import value_names


def test_every_window_value_has_one_query_over_the_exact_window():
    window = Window(1000.0, 1020.5)
    queries = window_queries("trial-ab12cd-3", "t-ab12cd-tp2x1", window)
    assert set(queries) == set(value_names())
    assert range_selector(window) == "[20500ms]"
    assert all("[20500ms]" in expr for expr in queries.values())


def test_counters_sum_increases_and_requests_count_errors_before_a_pool_was_chosen():
    queries = window_queries("trial-x-1", "t-x-tp2x1", Window(0, 10))
    assert queries["requests"] == (
        'sum(increase(tpgate_requests_total{class="trial-x-1",pool=~"t-x-tp2x1|none"}[10000ms]))')
    assert queries["ok_requests"] == (
        'sum(increase(tpgate_requests_total{class="trial-x-1",pool="t-x-tp2x1",status=~"2.."}[10000ms]))')
    assert queries["slo_met_requests"] == (
        'sum(increase(tpgate_slo_met_requests_total{class="trial-x-1",pool="t-x-tp2x1"}[10000ms]))')


def test_quantiles_pool_buckets_by_le():
    queries = window_queries("r", "p", Window(0, 10))
    assert queries["ttft_p99"] == ('histogram_quantile(0.99, sum by (le) (increase('
                                   'tpgate_time_to_first_token_seconds_bucket{class="r",pool="p"}[10000ms])))')
    assert queries["e2e_p50"].startswith("histogram_quantile(0.5, sum by (le) (increase("
                                         "tpgate_request_duration_seconds_bucket")
    assert queries["tpot_sum"] == 'sum(increase(tpgate_time_per_output_token_seconds_sum{class="r",pool="p"}[10000ms]))'


def test_label_values_are_quoted_and_regex_escaped():
    assert label_matchers('a"b', "p.1", "all") == '{class="a\\"b",pool=~"p\\\\.1|none"}'
    assert latest_sample_query("r") == 'max(timestamp(tpgate_requests_total{class="r"}))'


def test_a_window_must_end_after_it_starts():
    with pytest.raises(ValueError, match="must end after it starts"):
        Window(5.0, 5.0)
