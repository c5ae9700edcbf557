import dataclasses

import pytest

from loadtests import load_profile
from tuner.timescale import ClockReading, check_clocks, real_clock, to_engine_clock, wall_profile
from tuner.window import WindowFigures


def readings(**scales):
    """Each replica read at wall 100 s and 120 s, its simulated clock having run ``scale`` x 20 s."""
    start = {r: ClockReading(wall_s=100.0, simulated_s=1000.0) for r in scales}
    end = {r: ClockReading(wall_s=120.0, simulated_s=1000.0 + 20 * s) for r, s in scales.items()}
    return start, end


def wall_figures() -> WindowFigures:
    return WindowFigures(
        clock="wall", window_s=20.0, requests=200, errors=2, error_rate=0.01, requests_per_s=9.9,
        output_tokens_per_s=1500.0, prompt_tokens_per_s=5000.0, goodput_requests_per_s=9.0,
        ttft_p50_s=0.01, ttft_p90_s=0.02, ttft_p99_s=0.03, ttft_mean_s=0.012, tpot_p50_s=0.002, tpot_p90_s=None,
        tpot_p99_s=0.004, tpot_mean_s=0.0021, e2e_p50_s=0.3, e2e_p90_s=0.4, e2e_p99_s=0.5, e2e_mean_s=0.31,
    )


def test_lag_within_tolerance_is_corrected_with_the_effective_scale():
    start, end = readings(a=9.1, b=9.3)  # 9 % and 7 % behind scale 10
    check = check_clocks(start, end, nominal_scale=10.0, tolerance=0.15)
    assert check.valid and check.corrected and check.reason is None
    assert check.effective_scale == pytest.approx(9.2)
    assert check.lag_ratio == pytest.approx(0.09)
    assert check.per_replica == pytest.approx({"a": 9.1, "b": 9.3})


def test_engine_clock_figures_stretch_durations_and_slow_rates():
    start, end = readings(a=9.2)
    engine = to_engine_clock(wall_figures(), check_clocks(start, end, nominal_scale=10.0, tolerance=0.15))
    assert engine.clock == "engine" and engine.window_s == pytest.approx(184.0)
    assert engine.ttft_p99_s == pytest.approx(0.276) and engine.e2e_p99_s == pytest.approx(4.6)
    assert engine.tpot_mean_s == pytest.approx(0.01932) and engine.tpot_p90_s is None
    assert engine.requests_per_s == pytest.approx(9.9 / 9.2)
    assert engine.output_tokens_per_s == pytest.approx(1500 / 9.2)
    assert engine.goodput_requests_per_s == pytest.approx(9.0 / 9.2)
    assert (engine.requests, engine.errors, engine.error_rate) == (200, 2, 0.01)
    with pytest.raises(ValueError, match="already in the engine's clock"):
        to_engine_clock(engine, real_clock())


def test_lag_beyond_tolerance_makes_the_window_invalid():
    start, end = readings(a=9.5, b=7.5)
    check = check_clocks(start, end, nominal_scale=10.0, tolerance=0.15)
    assert not check.valid and check.lag_ratio == pytest.approx(0.25)
    assert check.reason == "replica b's clock ran at 7.5x instead of 10x (+25.0% lag, tolerance 15%)"


def test_a_clock_that_went_back_means_a_restarted_engine():
    start, end = readings(a=10.0, b=10.0)
    end["b"] = ClockReading(wall_s=120.0, simulated_s=3.0)
    check = check_clocks(start, end, nominal_scale=10.0, tolerance=0.15)
    assert not check.valid and check.restarted == ("b",)
    assert "engine restarted" in check.reason


def test_a_replica_missing_at_one_edge_makes_the_window_invalid():
    start, end = readings(a=10.0, b=10.0)
    del end["b"]
    check = check_clocks(start, end, nominal_scale=10.0, tolerance=0.15)
    assert not check.valid and "replica b has no clock reading at the window's end" in check.reason
    nothing = check_clocks({}, {}, nominal_scale=10.0, tolerance=0.15)
    assert not nothing.valid and nothing.reason == "no engine clock could be read"


def test_real_engines_need_no_conversion():
    check = real_clock()
    assert check.valid and not check.corrected
    assert to_engine_clock(wall_figures(), check) == dataclasses.replace(wall_figures(), clock="engine")


def test_closed_loop_profile_in_wall_time():
    profile = wall_profile(load_profile("interactive"), 10.0, warmup_s=3.0, duration_s=12.0, route="trial-ab-1")
    assert profile.arrival.kind == "closed"
    assert (profile.arrival.think_time_s.low, profile.arrival.think_time_s.high) == pytest.approx((0.05, 0.2))
    assert profile.request_timeout_s == pytest.approx(6.0) and profile.drain_timeout_s == pytest.approx(3.0)
    assert (profile.warmup_s, profile.duration_s) == (3.0, 12.0)
    assert profile.workload_class.name == "trial-ab-1" and profile.workload_class.via == "header"
    assert profile.users == 4 and profile.prompt_tokens == load_profile("interactive").prompt_tokens


def test_open_loop_profile_in_wall_time():
    original = load_profile("sharegpt-like")
    profile = wall_profile(original, 10.0, warmup_s=2.0, duration_s=5.0, route="trial-ab-2")
    assert profile.arrival.rate_per_s == pytest.approx(80.0)
    assert profile.spawn_rate_per_s == pytest.approx(2560.0)
    assert profile.users == original.users
    with pytest.raises(ValueError, match="time_scale must be positive"):
        wall_profile(original, 0.0, warmup_s=2.0, duration_s=5.0, route="trial-ab-2")
