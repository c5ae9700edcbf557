"""Fitting a live profile's lengths and writing it as a load profile that ``tpgate load`` reads."""

import math
import random

import pytest

from loadtests.profile import LogNormal, OpenLoop, Uniform, load_profile, sample_count
from tests.tuner.profile_traffic import ClassTraffic
from tuner.live_profile import LengthSummary, LiveProfile, from_scrapes
from tuner.profile_fit import ProfileFitError, fit_lengths, load_profile_data, load_profile_yaml


def recorded(prompts, outputs, *, window_s=60.0, stream_every=1, inflight=(0, 8, 6)):
    """The live profile of requests with these lengths, through the gateway's metrics and a scrape."""
    traffic = ClassTraffic()
    scrapes = [(0.0, (traffic.scrape(),))]
    for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        traffic.request("batch", prompt=prompt, output=output, stream=i % stream_every == 0)
    for step, value in enumerate(inflight[1:], start=1):
        traffic.set_inflight("batch", value)
        scrapes.append((window_s * step / (len(inflight) - 1), (traffic.scrape(),)))
    return from_scrapes("batch", scrapes)


def test_log_normal_lengths_are_fitted_as_log_normal():
    rng = random.Random(7)
    prompts = [round(rng.lognormvariate(math.log(1000), 0.4)) for _ in range(4000)]
    live = recorded(prompts, [50] * len(prompts))
    fit = fit_lengths(live.prompt, what="prompt")
    assert fit.kind == "lognormal"
    distribution = LogNormal(**fit.data)
    assert math.exp(distribution.mu) == pytest.approx(1000, rel=0.08)  # the median
    assert distribution.sigma == pytest.approx(0.4, rel=0.15)
    assert distribution.low <= min(prompts) and distribution.high >= max(prompts)


def test_uniform_lengths_are_fitted_as_uniform():
    rng = random.Random(8)
    outputs = [rng.randint(200, 800) for _ in range(4000)]
    live = recorded([100] * len(outputs), outputs)
    fit = fit_lengths(live.output, what="output")
    assert fit.kind == "uniform"
    distribution = Uniform(**fit.data)
    assert distribution.low == pytest.approx(200, rel=0.1)
    assert distribution.high == pytest.approx(800, rel=0.1)


def test_a_single_length_is_fixed_at_its_exact_mean():
    live = recorded([300] * 50, [77] * 50)
    assert fit_lengths(live.prompt, what="prompt").data == {"kind": "fixed", "value": 300}
    assert fit_lengths(live.output, what="output").data == {"kind": "fixed", "value": 77}


def test_no_measured_length_cannot_be_fitted():
    with pytest.raises(ProfileFitError, match="no prompt lengths"):
        fit_lengths(LengthSummary(count=0, mean=None), what="prompt")


def test_the_profile_replays_the_observed_rate_as_an_open_loop(tmp_path):
    rng = random.Random(9)
    prompts = [round(rng.lognormvariate(math.log(600), 0.3)) for _ in range(600)]
    outputs = [rng.randint(100, 300) for _ in range(600)]
    live = recorded(prompts, outputs, window_s=60.0, stream_every=3, inflight=(0, 12, 8))
    data = load_profile_data(live, model="internvl2_5-38b")
    assert data["arrival"] == {"kind": "open", "rate_per_s": 10.0}
    assert data["users"] == 24  # twice the peak in flight
    assert data["stream"] is False  # a third streamed
    assert data["workload_class"] == {"name": "batch", "via": "header"}
    assert data["duration_s"] == 60 and data["max_requests"] == 900 + 24
    path = tmp_path / "live.yaml"
    path.write_text(load_profile_yaml(live, model="internvl2_5-38b"))
    profile = load_profile(str(path))
    assert isinstance(profile.arrival, OpenLoop) and profile.arrival.rate_per_s == 10.0
    assert profile.model == "internvl2_5-38b" and profile.users == 24
    assert profile.prompt_tokens.kind == "lognormal"
    replayed_median = sorted(sample_count(profile.prompt_tokens, rng) for _ in range(2001))[1000]
    assert replayed_median == pytest.approx(sorted(prompts)[300], rel=0.1)


def test_a_profile_without_arrivals_is_refused():
    live = LiveProfile(class_name="batch", window_s=60, end_s=60, arrivals=0, streamed=0, chat=0, requests=0,
                       ok_requests=0, slo_met_requests=None, concurrency_mean=0, concurrency_peak=0,
                       prompt=LengthSummary(count=0, mean=None), output=LengthSummary(count=0, mean=None))
    with pytest.raises(ProfileFitError, match="no request of class 'batch' arrived"):
        load_profile_data(live)
