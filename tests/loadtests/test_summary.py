import random

import pytest

from loadtests.records import Phase, RequestRecord
from loadtests.summary import format_table, percentile, progress_line, summarize


def rec(index, start_s, e2e_s, ttft_s, tokens, *, ok=True, error=None, status=200, prompt=100):
    return RequestRecord(index=index, start_s=start_s, e2e_s=e2e_s, ttft_s=ttft_s, output_tokens=tokens,
                         prompt_tokens=prompt, ok=ok, status=status, error=error)


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


def test_progress_line_shows_the_phase():
    warming = progress_line([rec(0, 0.0, 1.0, 0.1, 3)], elapsed_s=3.0)
    assert "warm-up" in warming and "1 requests" in warming
    measuring = progress_line([Phase("measure", 0.0), rec(1, 0.0, 2.0, 0.3, 5)], elapsed_s=4.0)
    assert "measuring" in measuring and "1 requests (0 failed)" in measuring and "TTFT p50 300 ms" in measuring


def test_progress_line_shows_the_drain():
    entries = [Phase("measure", 0.0), rec(1, 0.0, 2.0, 0.3, 5), Phase("stop", 3.0), rec(2, 1.0, 4.0, 0.2, 5)]
    line = progress_line(entries, elapsed_s=6.0)
    assert "draining" in line and "1 requests (0 failed)" in line and line.endswith("(1 drained)")
