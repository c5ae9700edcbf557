"""Drift detection on synthetic interval series: sustained shifts are caught, bursts shorter than the window are
not, a drifted class clears only after a whole window back within its reference."""

import pytest

from gateway.config import DriftClassConfig
from loadtests.profile import load_profile
from tuner.drift import DriftDetector, ReferenceProfile, distribution_median, measure
from tuner.live_profile import LengthSummary, LiveProfile

INTERVAL_S = 30.0
REFERENCE = ReferenceProfile(class_name="batch", source="test", set_at_s=0.0, concurrency=8.0,
                             arrival_rate_per_s=2.0, prompt_median=4000.0, output_median=200.0)


def interval(end_s, *, concurrency=8.0, rate=2.0, prompt=4000.0, output=200.0, requests=60, slo_met=None):
    """One interval's live profile with these figures (lengths measured over ``requests`` requests)."""
    return LiveProfile(
        class_name="batch", window_s=INTERVAL_S, end_s=end_s, arrivals=rate * INTERVAL_S, streamed=0, chat=0,
        requests=requests, ok_requests=requests, slo_met_requests=requests if slo_met is None else slo_met,
        concurrency_mean=concurrency, concurrency_peak=concurrency,
        prompt=LengthSummary(count=requests, mean=prompt, quantiles={0.5: prompt}),
        output=LengthSummary(count=requests, mean=output, quantiles={0.5: output}),
    )


def run(detector, figures, *, start_s=0.0):
    """Feed one interval per entry of ``figures`` (keyword arguments of :func:`interval`); the verdicts."""
    return [detector.observe(interval(start_s + INTERVAL_S * (i + 1), **f)) for i, f in enumerate(figures)]


def config(**overrides):
    return DriftClassConfig(window_s=300, **overrides)


def test_a_sustained_shift_to_many_users_with_short_prompts_is_caught_with_its_numbers():
    detector = DriftDetector(config(), REFERENCE)
    verdicts = run(detector, [{}] * 10 + [{"concurrency": 256.0, "prompt": 500.0}] * 10)
    assert not any(v.drifted for v in verdicts[:19])
    last = verdicts[-1]
    assert last.drifted and last.changed
    sustained = {s.name: s for s in last.sustained}
    assert set(sustained) == {"concurrency", "prompt_median"}
    assert sustained["concurrency"].ratio == 32 and sustained["concurrency"].breached_intervals == 10
    assert sustained["prompt_median"].observed == 500 and sustained["prompt_median"].reference == 4000
    assert "concurrency 256 vs 8 (x32.00" in last.reason and "prompt median 500 vs 4,000 (x0.12" in last.reason


def test_a_burst_shorter_than_the_window_is_ignored():
    detector = DriftDetector(config(), REFERENCE)
    burst = [{"concurrency": 100.0}] * 9  # 270 s of a 300 s window
    verdicts = run(detector, [{}] * 10 + burst + [{}] * 10 + burst)
    assert not any(v.drifted for v in verdicts)


def test_fewer_users_drift_too():
    detector = DriftDetector(config(), REFERENCE)
    verdicts = run(detector, [{"concurrency": 1.0}] * 10)
    assert verdicts[-1].drifted and verdicts[-1].sustained[0].ratio == pytest.approx(1 / 8)


def test_nothing_is_decided_before_the_history_covers_the_window():
    detector = DriftDetector(config(), REFERENCE)
    verdicts = run(detector, [{"concurrency": 100.0}] * 10)
    assert [v.drifted for v in verdicts] == [False] * 9 + [True]
    assert verdicts[3].reason == "watching: 120 s of the 300 s window seen so far"


def test_a_drifted_class_clears_only_after_a_whole_window_within_the_reference():
    detector = DriftDetector(config(), REFERENCE)
    verdicts = run(detector, [{"concurrency": 64.0}] * 10 + [{}] * 10)
    states = [v.drifted for v in verdicts]
    assert states[9] and all(states[9:19]) and not states[19]
    assert verdicts[19].changed and verdicts[19].reason == "back within the reference over the whole window"
    assert verdicts[12].reason == "drifted: still outside the reference in part of the window"


def test_a_sustained_share_below_one_tolerates_a_quiet_interval():
    figures = [{"concurrency": 64.0}] * 4 + [{}] + [{"concurrency": 64.0}] * 5
    assert not run(DriftDetector(config(), REFERENCE), figures)[-1].drifted
    assert run(DriftDetector(config(sustained_share=0.9), REFERENCE), figures)[-1].drifted


def test_lengths_of_intervals_with_too_few_requests_are_not_measured():
    detector = DriftDetector(config(min_requests=20), REFERENCE)
    verdicts = run(detector, [{"prompt": 100.0, "requests": 5}] * 10)
    assert not verdicts[-1].drifted
    latest = {d.name: d for d in verdicts[-1].latest}
    assert latest["prompt_median"].breached is None and latest["concurrency"].breached is False


def test_slo_attainment_below_its_minimum_is_a_drift():
    detector = DriftDetector(config(slo_attainment_min=0.95), REFERENCE)
    verdicts = run(detector, [{"slo_met": 50}] * 10)  # 50 of 60 met every SLO
    assert verdicts[-1].drifted
    assert verdicts[-1].sustained[0].name == "slo_attainment"
    assert "SLO attainment 83.3% < 95.0%" in verdicts[-1].reason


def test_distances_turned_off_or_without_a_reference_figure_are_not_measured():
    live = interval(30.0, concurrency=100.0, rate=50.0)
    names = [d.name for d in measure(REFERENCE, live, config(concurrency_ratio=None))]
    assert names == ["prompt_median", "output_median"]
    with_rate = measure(REFERENCE, live, config(arrival_rate_ratio=4))
    assert [d.breached for d in with_rate if d.name == "arrival_rate"] == [True]
    open_loop = ReferenceProfile(class_name="batch", source="open", set_at_s=0.0, arrival_rate_per_s=2.0)
    assert {d.name: d.breached for d in measure(open_loop, live, config())}["concurrency"] is None


def test_a_new_reference_starts_the_window_again():
    detector = DriftDetector(config(), REFERENCE)
    assert run(detector, [{"concurrency": 64.0}] * 10)[-1].drifted
    detector.set_reference(ReferenceProfile.from_live(interval(300.0, concurrency=64.0), source="re-tuned"))
    verdicts = run(detector, [{"concurrency": 64.0}] * 10, start_s=300.0)
    assert not any(v.drifted for v in verdicts)


def test_intervals_must_come_in_time_order():
    detector = DriftDetector(config(), REFERENCE)
    detector.observe(interval(60.0))
    with pytest.raises(ValueError, match="not after the last one"):
        detector.observe(interval(30.0))


def test_the_reference_from_a_shipped_load_profile():
    batch = ReferenceProfile.from_load_profile("batch", load_profile("batch"), set_at_s=5.0)
    assert batch.concurrency == 256 and batch.arrival_rate_per_s is None
    assert batch.prompt_median == pytest.approx(1000 * 2.718281828 ** (-0.3**2 / 2))  # log-normal median
    sharegpt = ReferenceProfile.from_load_profile("x", load_profile("sharegpt-like"), set_at_s=5.0)
    assert sharegpt.concurrency is None and sharegpt.arrival_rate_per_s == 8
    assert ReferenceProfile.from_dict(batch.as_dict()) == batch


def test_medians_of_fixed_and_uniform_lengths():
    profile = load_profile("interactive")
    assert distribution_median(profile.arrival.think_time_s) == 1.25  # uniform 0.5 .. 2.0
