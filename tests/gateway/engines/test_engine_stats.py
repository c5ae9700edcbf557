# ruff: noqa: E501  (LMDEPLOY_0_18_SCRAPE keeps LMDeploy's exposition lines whole)
"""EngineStats.from_scrape: LMDeploy 0.18's exposition, several data-parallel ranks, other exporters' styles,
missing metrics and malformed text; and, where lmdeploy is installed, a scrape of LMDeploy's own exporter."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest

from gateway.engines import metric_names as names
from gateway.engines.engine_stats import EXPECTED_METRICS, EngineStats, HistogramTotals

# /metrics of LMDeploy 0.18 after one finished request (500 prompt tokens, 150 generated), as its
# PrometheusStatLogger exports it through prometheus_client 0.26; trimmed to fewer buckets and metrics.
LMDEPLOY_0_18_SCRAPE = """\
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 3.39
# HELP lmdeploy:backend_config_info information of backend_config
# TYPE lmdeploy:backend_config_info gauge
lmdeploy:backend_config_info 1.0
# HELP lmdeploy:num_requests_running Number of requests in model execution batches.
# TYPE lmdeploy:num_requests_running gauge
lmdeploy:num_requests_running{engine="0",model_name="internvl2_5-38b"} 3.0
# HELP lmdeploy:num_requests_waiting Number of requests waiting to be processed.
# TYPE lmdeploy:num_requests_waiting gauge
lmdeploy:num_requests_waiting{engine="0",model_name="internvl2_5-38b"} 2.0
# HELP lmdeploy:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE lmdeploy:gpu_cache_usage_perc gauge
lmdeploy:gpu_cache_usage_perc{engine="0",model_name="internvl2_5-38b"} 0.25
# HELP lmdeploy:prompt_tokens_total Number of prefill tokens processed.
# TYPE lmdeploy:prompt_tokens_total counter
lmdeploy:prompt_tokens_total{engine="0",model_name="internvl2_5-38b"} 500.0
# HELP lmdeploy:generation_tokens_total Number of generation tokens processed.
# TYPE lmdeploy:generation_tokens_total counter
lmdeploy:generation_tokens_total{engine="0",model_name="internvl2_5-38b"} 150.0
# HELP lmdeploy:request_success_total Count of successfully processed requests.
# TYPE lmdeploy:request_success_total counter
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.SUCCESS",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.FINISH",model_name="internvl2_5-38b"} 1.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.ENGINE_STOP_ERROR",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.SESSION_REPEAT",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.SESSION_NOT_EXIST",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.HANDLER_NOT_EXIST",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.INPUT_LENGTH_ERROR",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.INTERNAL_ENGINE_ERROR",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.CANCEL",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.PREFIX_CACHE_CONFLICT",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.NO_QUEUE",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.NOT_SUPPORTED",model_name="internvl2_5-38b"} 0.0
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.OUT_OF_MEMORY",model_name="internvl2_5-38b"} 0.0
# HELP lmdeploy:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE lmdeploy:iteration_tokens_total histogram
lmdeploy:iteration_tokens_total_bucket{engine="0",le="+Inf",model_name="internvl2_5-38b"} 2.0
lmdeploy:iteration_tokens_total_count{engine="0",model_name="internvl2_5-38b"} 2.0
lmdeploy:iteration_tokens_total_sum{engine="0",model_name="internvl2_5-38b"} 650.0
# HELP lmdeploy:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE lmdeploy:time_to_first_token_seconds histogram
lmdeploy:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="internvl2_5-38b"} 0.0
lmdeploy:time_to_first_token_seconds_bucket{engine="0",le="0.25",model_name="internvl2_5-38b"} 1.0
lmdeploy:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="internvl2_5-38b"} 1.0
lmdeploy:time_to_first_token_seconds_count{engine="0",model_name="internvl2_5-38b"} 1.0
lmdeploy:time_to_first_token_seconds_sum{engine="0",model_name="internvl2_5-38b"} 0.12
# HELP lmdeploy:time_per_output_token_seconds Histogram of time per output token in seconds.
# TYPE lmdeploy:time_per_output_token_seconds histogram
lmdeploy:time_per_output_token_seconds_bucket{engine="0",le="0.025",model_name="internvl2_5-38b"} 2.0
lmdeploy:time_per_output_token_seconds_bucket{engine="0",le="0.3",model_name="internvl2_5-38b"} 2.0
lmdeploy:time_per_output_token_seconds_bucket{engine="0",le="5.0",model_name="internvl2_5-38b"} 2.0
lmdeploy:time_per_output_token_seconds_bucket{engine="0",le="+Inf",model_name="internvl2_5-38b"} 2.0
lmdeploy:time_per_output_token_seconds_count{engine="0",model_name="internvl2_5-38b"} 2.0
lmdeploy:time_per_output_token_seconds_sum{engine="0",model_name="internvl2_5-38b"} 0.041
# HELP lmdeploy:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE lmdeploy:e2e_request_latency_seconds histogram
lmdeploy:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="internvl2_5-38b"} 0.0
lmdeploy:e2e_request_latency_seconds_bucket{engine="0",le="5.0",model_name="internvl2_5-38b"} 1.0
lmdeploy:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="internvl2_5-38b"} 1.0
lmdeploy:e2e_request_latency_seconds_count{engine="0",model_name="internvl2_5-38b"} 1.0
lmdeploy:e2e_request_latency_seconds_sum{engine="0",model_name="internvl2_5-38b"} 3.2
# HELP lmdeploy:request_queue_time_seconds Histogram of time spent in WAITING phase for request.
# TYPE lmdeploy:request_queue_time_seconds histogram
lmdeploy:request_queue_time_seconds_bucket{engine="0",le="0.3",model_name="internvl2_5-38b"} 1.0
lmdeploy:request_queue_time_seconds_bucket{engine="0",le="5.0",model_name="internvl2_5-38b"} 1.0
lmdeploy:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="internvl2_5-38b"} 1.0
lmdeploy:request_queue_time_seconds_count{engine="0",model_name="internvl2_5-38b"} 1.0
lmdeploy:request_queue_time_seconds_sum{engine="0",model_name="internvl2_5-38b"} 0.01
"""


def test_lmdeploy_0_18_exposition():
    stats = EngineStats.from_scrape(LMDEPLOY_0_18_SCRAPE)
    assert stats.num_requests_running == 3
    assert stats.num_requests_waiting == 2
    assert stats.gpu_cache_usage_ratio == 0.25
    assert stats.prompt_tokens_total == 500
    assert stats.generation_tokens_total == 150
    assert stats.requests_finished_by_reason["ResponseType.FINISH"] == 1
    assert len(stats.requests_finished_by_reason) == 13  # every ResponseType, zeros included
    assert stats.requests_finished_total == 1
    assert stats.time_to_first_token == HistogramTotals(
        count=1, sum_s=0.12, buckets=((0.1, 0), (0.25, 1), (math.inf, 1))
    )
    assert stats.time_per_output_token.count == 2
    assert stats.time_per_output_token.sum_s == pytest.approx(0.041)
    assert stats.time_per_output_token.mean_s == pytest.approx(0.0205)
    assert stats.e2e_request_latency.buckets == ((0.3, 0), (5.0, 1), (math.inf, 1))
    assert (stats.request_queue_time.count, stats.request_queue_time.sum_s) == (1, 0.01)
    assert stats.missing_metrics == frozenset()


def test_a_histogram_named_total_is_not_taken_for_a_counter():
    # lmdeploy:iteration_tokens_total is a histogram: its _count must not leak into anything we read
    scrape = LMDEPLOY_0_18_SCRAPE.replace(
        'lmdeploy:iteration_tokens_total_count{engine="0",model_name="internvl2_5-38b"} 2.0',
        'lmdeploy:iteration_tokens_total_count{engine="0",model_name="internvl2_5-38b"} 99.0',
    )
    assert "99.0" in scrape
    assert EngineStats.from_scrape(scrape) == EngineStats.from_scrape(LMDEPLOY_0_18_SCRAPE)


DP2_SCRAPE = """\
# TYPE lmdeploy:num_requests_running gauge
lmdeploy:num_requests_running{engine="0",model_name="m"} 4.0
lmdeploy:num_requests_running{engine="1",model_name="m"} 6.0
# TYPE lmdeploy:gpu_cache_usage_perc gauge
lmdeploy:gpu_cache_usage_perc{engine="0",model_name="m"} 0.2
lmdeploy:gpu_cache_usage_perc{engine="1",model_name="m"} 0.6
# TYPE lmdeploy:request_success_total counter
lmdeploy:request_success_total{engine="0",finished_reason="ResponseType.FINISH",model_name="m"} 7.0
lmdeploy:request_success_total{engine="1",finished_reason="ResponseType.FINISH",model_name="m"} 5.0
lmdeploy:request_success_total{engine="1",finished_reason="ResponseType.CANCEL",model_name="m"} 2.0
# TYPE lmdeploy:time_to_first_token_seconds histogram
lmdeploy:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="m"} 3.0
lmdeploy:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 7.0
lmdeploy:time_to_first_token_seconds_count{engine="0",model_name="m"} 7.0
lmdeploy:time_to_first_token_seconds_sum{engine="0",model_name="m"} 4.5
lmdeploy:time_to_first_token_seconds_bucket{engine="1",le="0.5",model_name="m"} 5.0
lmdeploy:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 7.0
lmdeploy:time_to_first_token_seconds_count{engine="1",model_name="m"} 7.0
lmdeploy:time_to_first_token_seconds_sum{engine="1",model_name="m"} 2.5
"""


def test_data_parallel_ranks_are_summed_and_cache_usage_averaged():
    stats = EngineStats.from_scrape(DP2_SCRAPE)
    assert stats.num_requests_running == 10
    assert stats.gpu_cache_usage_ratio == pytest.approx(0.4)
    assert dict(stats.requests_finished_by_reason) == {"ResponseType.CANCEL": 2, "ResponseType.FINISH": 12}
    assert stats.requests_finished_total == 14
    assert stats.time_to_first_token == HistogramTotals(count=14, sum_s=7.0, buckets=((0.5, 8), (math.inf, 14)))


def test_older_counter_style_and_created_samples():
    # prometheus_client before 0.22 writes counter TYPE lines without _total, and _created samples unless disabled
    scrape = """\
# HELP lmdeploy:prompt_tokens_total Number of prefill tokens processed.
# TYPE lmdeploy:prompt_tokens counter
lmdeploy:prompt_tokens_total{engine="0",model_name="m"} 1200.0
lmdeploy:prompt_tokens_created{engine="0",model_name="m"} 1.7e+09
# HELP lmdeploy:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE lmdeploy:e2e_request_latency_seconds histogram
lmdeploy:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 3.0
lmdeploy:e2e_request_latency_seconds_count{engine="0",model_name="m"} 3.0
lmdeploy:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 6.0
lmdeploy:e2e_request_latency_seconds_created{engine="0",model_name="m"} 1.7e+09
"""
    stats = EngineStats.from_scrape(scrape)
    assert stats.prompt_tokens_total == 1200
    assert stats.e2e_request_latency == HistogramTotals(count=3, sum_s=6.0, buckets=((math.inf, 3),))
    assert stats.e2e_request_latency.mean_s == 2.0


def test_metrics_of_other_exporters_are_ignored():
    scrape = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 9.0
# TYPE num_requests_running gauge
num_requests_running 9.0
# TYPE tpgate_requests_total counter
tpgate_requests_total{class="batch"} 9.0
"""
    assert EngineStats.from_scrape(scrape).num_requests_running == 0


def test_an_empty_scrape_is_all_zero_and_says_what_is_missing():
    stats = EngineStats.from_scrape("")
    assert stats == EngineStats(missing_metrics=EXPECTED_METRICS)
    assert stats.time_to_first_token.mean_s is None
    assert stats.requests_finished_total == 0


def test_missing_metrics_lists_exactly_the_absent_ones():
    request_gauges = [line for line in LMDEPLOY_0_18_SCRAPE.splitlines() if "lmdeploy:num_requests_" in line]
    stats = EngineStats.from_scrape("\n".join(request_gauges) + "\n")
    assert (stats.num_requests_running, stats.num_requests_waiting) == (3, 2)
    assert stats.missing_metrics == EXPECTED_METRICS - {names.NUM_REQUESTS_RUNNING, names.NUM_REQUESTS_WAITING}


@pytest.mark.parametrize(
    "text",
    [
        "<html>502 Bad Gateway</html>",
        'lmdeploy:num_requests_running{engine="0" 3.0',
        "lmdeploy:num_requests_running three",
    ],
)
def test_malformed_text_is_a_value_error(text):
    with pytest.raises(ValueError, match="not a Prometheus text exposition"):
        EngineStats.from_scrape(text)


def test_stats_are_immutable():
    stats = EngineStats.from_scrape(DP2_SCRAPE)
    with pytest.raises(TypeError):
        stats.requests_finished_by_reason["ResponseType.FINISH"] = 0  # type: ignore[index]


# LMDeploy's own exporter (PrometheusStatLogger), fed one request's statistics; in a child process because it
# registers its metrics in prometheus_client's global registry.
RECORD_WITH_LMDEPLOY = textwrap.dedent(
    """
    from types import SimpleNamespace as Stats

    import prometheus_client
    from lmdeploy.messages import ResponseType
    from lmdeploy.metrics.loggers import PrometheusStatLogger

    logger = PrometheusStatLogger("internvl2_5-38b", max_model_len=8192, dp_rank=0)
    logger.record_schedule(Stats(num_succeeded_reqs=1, num_failed_reqs=0, num_api_routed_reqs=4,
                                 num_api_waiting_reqs=0, num_running_reqs=4, num_waiting_reqs=9,
                                 gpu_cache_usage=0.75, prefix_cache_hit_rate=0.0))
    logger.record_iteration(Stats(prompt_tokens=480, new_generation_tokens=1, ttft=0.3, tpot=None, itl=None))
    logger.record_iteration(Stats(prompt_tokens=0, new_generation_tokens=99, ttft=None, tpot=0.04, itl=0.04))
    logger.record_finish(Stats(finish_reason=ResponseType.CANCEL, e2e_latency=4.3, queued_time_interval=0.2,
                               prefill_time_interval=0.1, inference_time_interval=4.0, decode_time_interval=3.9,
                               prompt_tokens=480, generation_tokens=100, cached_tokens=0))
    print(prometheus_client.generate_latest().decode())
    """
)


@pytest.mark.integration
def test_a_scrape_of_lmdeploys_own_exporter():
    try:
        import lmdeploy.metrics.loggers  # noqa: F401
    except ImportError as exc:
        reason = f"lmdeploy cannot be imported ({exc}); `make test` installs it"
        if os.environ.get("REQUIRE_LMDEPLOY_CONTRACT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(
        [sys.executable, "-c", RECORD_WITH_LMDEPLOY], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    stats = EngineStats.from_scrape(result.stdout)
    assert stats.missing_metrics == frozenset()  # LMDeploy exports every name in metric_names
    assert (stats.num_requests_running, stats.num_requests_waiting) == (4, 9)
    assert stats.gpu_cache_usage_ratio == 0.75
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (480, 100)
    assert stats.requests_finished_by_reason["ResponseType.CANCEL"] == 1
    assert stats.requests_finished_total == 1
    assert (stats.time_to_first_token.count, stats.time_to_first_token.sum_s) == (1, 0.3)
    assert (stats.time_per_output_token.count, stats.time_per_output_token.sum_s) == (1, 0.04)
    assert (stats.e2e_request_latency.count, stats.e2e_request_latency.sum_s) == (1, 4.3)
    assert (stats.request_queue_time.count, stats.request_queue_time.sum_s) == (1, 0.2)
