import random

import pytest

from loadtests.records import ClientLoad, Phase, RequestRecord, Sent
from loadtests.summary import format_table, percentile, progress_line, summarize


def rec(index, start_s, e2e_s, ttft_s, tokens, *, ok=True, error=None, status=200, prompt=100, cause=None):
    return RequestRecord(index=index, start_s=start_s, e2e_s=e2e_s, ttft_s=ttft_s, output_tokens=tokens,
                         prompt_tokens=prompt, ok=ok, status=status, error=error, cause=cause)


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(values, 99) == pytest.approx(3.97)  # 3 + 0.97 * (4 - 3)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="within 0 and 100"):
        percentile(values, 101)


def test_percentile_matches_numpy_linear():
    numpy = pytest.importorskip("numpy")
    rng = random.Random(5)
    values = [rng.lognormvariate(0, 1) for _ in range(1001)]
    for q in (50, 95, 99, 99.9):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))


def test_the_window_holds_the_requests_that_finished_in_it():
    entries = [
        rec(0, 100.0, 1.0, 0.2, 10),  # finished at 101, in the warm-up
        rec(9, 103.0, 3.0, 0.2, 10),  # started in the warm-up, finished at 106: measured
        Phase("measure", 105.0),
        rec(1, 105.0, 2.0, 0.2, 10),  # tpot (2.0 - 0.2) / 9 = 0.2
        rec(3, 107.0, 0.1, None, 0, ok=False, status=503, error="HTTP 503: overloaded"),
        rec(4, 108.0, 7.0, 1.0, 31),  # tpot 0.2, finished at 115
        Phase("stop", 115.0, "duration"),
        rec(5, 112.0, 4.0, 0.1, 10),  # in flight at the stop, finished at 116: drained
    ]
    s = summarize(entries, profile="p", host="http://127.0.0.1:1")
    assert (s.requests, s.failures, s.warmup_requests, s.drained_requests) == (4, 1, 1, 1)
    assert s.failure_ratio == 0.25
    assert s.window_start_s == 105.0 and s.elapsed_s == 10.0
    assert s.requests_per_s == pytest.approx(0.3)  # 3 successful / 10 s
    assert s.output_tokens == 51 and s.output_tokens_per_s == pytest.approx(5.1)
    assert s.prompt_tokens == 300
    assert s.ttft_p50_s == pytest.approx(0.2)
    assert s.ttft_p99_s == pytest.approx(0.2 + 0.98 * 0.8)
    tpots = sorted([2.8 / 9, 0.2, 0.2])  # index 9: (3.0 - 0.2) / 9
    assert s.tpot_p50_s == pytest.approx(tpots[1])
    assert s.tpot_p99_s == pytest.approx(tpots[1] + 0.98 * (tpots[2] - tpots[1]))
    assert s.e2e_p50_s == pytest.approx(3.0) and s.e2e_p99_s == pytest.approx(3.0 + 0.98 * 4.0)
    assert s.stopped_by == "duration"
    assert s.errors == {"HTTP 503: overloaded": 1}
    assert s.as_dict()["ttft_p95_s"] == s.ttft_p95_s


def test_without_phases_the_window_spans_the_requests():
    s = summarize([rec(0, 50.0, 1.0, 0.1, 5), rec(1, 52.0, 2.0, 0.1, 5)])
    assert s.window_start_s == 50.0 and s.elapsed_s == 4.0 and s.stopped_by is None
    assert (s.requests, s.warmup_requests, s.drained_requests) == (2, 0, 0)


def test_empty_run():
    s = summarize([Phase("measure", 10.0), Phase("stop", 20.0, "max_requests")])
    assert (s.requests, s.failures, s.requests_per_s, s.output_tokens_per_s, s.failure_ratio) == (0, 0, 0.0, 0.0, 0.0)
    assert s.elapsed_s == 10.0
    assert s.ttft_p50_s is None and s.e2e_p99_s is None
    assert "TTFT p50 / p95 / p99  - / - / -" in format_table(s)


def test_errors_without_message_show_the_status_and_keep_the_top_five():
    entries = [rec(i, 1.0, 0.1, None, 0, ok=False, status=500 + i % 7) for i in range(70)]
    s = summarize(entries)
    assert len(s.errors) == 5 and sum(s.errors.values()) == 50
    assert all(key.startswith("HTTP 50") for key in s.errors)


def test_table_is_readable():
    entries = [Phase("measure", 0.0), rec(1, 0.0, 2.0, 0.25, 11), rec(2, 1.0, 1.0, 0.05, 3), Phase("stop", 2.0)]
    table = format_table(summarize(entries, profile="batch", host="http://127.0.0.1:8000"))
    lines = table.splitlines()
    assert lines[0].split() == ["profile", "batch"]
    assert "requests              2 (0 failed, 0.00%)" in table
    assert "TTFT p50 / p95 / p99  150.0 ms / 240.0 ms / 248.0 ms" in table
    assert "output tokens/s       7.0 (14 tokens)" in table


def test_failures_are_counted_by_cause():
    refused = "connection refused: [Errno 111] Connection refused"
    entries = [
        Phase("measure", 0.0),
        *[rec(i, 0.0, 0.001, None, 0, ok=False, status=0, error=refused, cause="connection refused") for i in range(3)],
        rec(3, 0.0, 1.0, None, 0, ok=False, status=503, error="HTTP 503: overloaded", cause="HTTP 503"),
        rec(4, 0.0, 1.0, None, 0, ok=False, status=0, error="timeout: Timeout: 300 seconds", cause="timeout"),
        rec(5, 0.0, 1.0, 0.1, 5),
        Phase("stop", 2.0, "duration"),
    ]
    s = summarize(entries)
    assert s.failure_causes == {"connection refused": 3, "HTTP 503": 1, "timeout": 1}
    assert list(s.failure_causes) == ["connection refused", "HTTP 503", "timeout"]  # most frequent first
    assert s.errors[refused] == 3
    assert "failures by cause     connection refused x3, HTTP 503 x1, timeout x1" in format_table(s)
    assert "failures by cause" not in format_table(summarize([rec(0, 0.0, 1.0, 0.1, 5)]))


def test_records_without_a_cause_get_one_from_their_status():
    s = summarize([rec(0, 0.0, 1.0, None, 0, ok=False, status=0), rec(1, 0.0, 1.0, None, 0, ok=False, status=429),
                   rec(2, 0.0, 1.0, None, 0, ok=False, status=200, error="response has no choices")])
    assert s.failure_causes == {"connection error": 1, "HTTP 429": 1, "bad response": 1}


def test_warm_up_progress_counts_requests_in_flight():
    # four sent, none finished yet: the line says so instead of "0 requests"
    assert "warm-up    4 requests in flight, 0 finished (0 failed)" in progress_line([Sent(1.0, 4)], elapsed_s=2.0)
    entries = [Sent(1.0, 4), rec(0, 0.0, 1.0, 0.1, 3), Sent(2.0, 6),
               rec(1, 0.0, 0.1, None, 0, ok=False, status=503, cause="HTTP 503")]
    assert "warm-up    4 requests in flight, 2 finished (1 failed)" in progress_line(entries, elapsed_s=3.0)
    # without a count of sent requests (older records) nothing is known to be in flight
    assert "0 requests in flight, 1 finished" in progress_line([rec(0, 0.0, 1.0, 0.1, 3)], elapsed_s=3.0)


def test_sent_counts_do_not_change_the_summary():
    entries = [Phase("measure", 0.0), rec(1, 0.0, 2.0, 0.3, 5), Phase("stop", 3.0)]
    assert summarize([Sent(0.5, 9), *entries]) == summarize(entries)


def test_progress_line_shows_the_phase():
    warming = progress_line([rec(0, 0.0, 1.0, 0.1, 3)], elapsed_s=3.0)
    assert "warm-up" in warming and "1 finished" in warming
    measuring = progress_line([Phase("measure", 0.0), rec(1, 0.0, 2.0, 0.3, 5)], elapsed_s=4.0)
    assert "measuring" in measuring and "1 requests (0 failed)" in measuring and "TTFT p50 300 ms" in measuring


def test_progress_line_shows_the_drain():
    entries = [Phase("measure", 0.0), rec(1, 0.0, 2.0, 0.3, 5), Phase("stop", 3.0), rec(2, 1.0, 4.0, 0.2, 5)]
    line = progress_line(entries, elapsed_s=6.0)
    assert "draining" in line and "1 requests (0 failed)" in line and line.endswith("(1 drained)")


def client_run(*loads):
    return [Phase("measure", 100.0), rec(0, 100.5, 1.0, 0.2, 10), *loads, Phase("stop", 110.0, "duration")]


def test_a_client_short_of_cpu_is_flagged_as_the_bottleneck():
    busy = summarize(client_run(*(ClientLoad(101.0 + i, cpu_ratio=0.97, lag_s=0.004) for i in range(5))))
    late = summarize(client_run(*(ClientLoad(101.0 + i, cpu_ratio=0.40, lag_s=0.080) for i in range(5))))
    assert busy.client_bottleneck and busy.client_cpu_p50_ratio == pytest.approx(0.97)
    assert late.client_bottleneck and late.client_lag_p50_s == pytest.approx(0.080)
    assert "CLIENT WAS THE BOTTLENECK" in format_table(late)


def test_a_client_with_cpu_to_spare_is_not_flagged_and_samples_outside_the_window_do_not_count():
    starved_in_warmup = [ClientLoad(99.0 - i, cpu_ratio=1.0, lag_s=0.5) for i in range(9)]
    s = summarize(client_run(*starved_in_warmup, ClientLoad(105.0, cpu_ratio=0.3, lag_s=0.002)))
    assert not s.client_bottleneck and s.client_cpu_p50_ratio == pytest.approx(0.3)
    assert "not a bottleneck" in format_table(s)
    assert not summarize(client_run()).client_bottleneck  # no samples: nothing to say
