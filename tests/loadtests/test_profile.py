import math
import random
import statistics

import pytest

from loadtests import LoadTestInputError, Profile, load_profile, shipped_profiles, with_overrides
from loadtests.profile import ClosedLoop, LogNormal, OpenLoop, sample_count, sample_lengths, validate_profile

MINIMAL = {
    "name": "t",
    "users": 2,
    "arrival": {"kind": "closed"},
    "prompt_tokens": {"kind": "fixed", "value": 100},
    "output_tokens": {"kind": "uniform", "low": 10, "high": 20},
    "duration_s": 5,
    "max_requests": 10,
}


def test_ships_the_four_profiles_of_the_issue():
    assert shipped_profiles() == ["batch", "interactive", "long-context", "sharegpt-like"]
    interactive, batch = load_profile("interactive"), load_profile("batch")
    long_context, sharegpt = load_profile("long-context"), load_profile("sharegpt-like")
    assert (interactive.users, interactive.prompt_tokens.mean_value, interactive.output_tokens.mean_value) == (
        4, 500, 150)
    assert interactive.stream and interactive.workload_class.name == "interactive"
    assert (batch.users, batch.prompt_tokens.mean_value, batch.output_tokens.mean_value) == (256, 1000, 300)
    assert batch.workload_class.name == "batch"
    assert (long_context.users, long_context.prompt_tokens.mean_value, long_context.output_tokens.mean_value) == (
        8, 8000, 200)
    assert isinstance(sharegpt.prompt_tokens, LogNormal) and isinstance(sharegpt.arrival, OpenLoop)
    for name in shipped_profiles():
        profile = load_profile(name)
        assert profile.name == name
        assert profile.duration_s > 0 and profile.max_requests > 0


def test_a_yaml_path_loads_too(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("users: 3\narrival: {kind: open, rate_per_s: 2.5}\nprompt_tokens: {kind: fixed, value: 50}\n"
                    "output_tokens: {kind: fixed, value: 5}\nduration_s: 10\nmax_requests: 40\napi: completions\n")
    profile = load_profile(str(path))
    assert profile.name == "mine" and profile.arrival == OpenLoop(kind="open", rate_per_s=2.5)
    assert profile.api == "completions" and profile.warmup_s == 0 and profile.run_time_s == 10


def test_closed_loop_defaults_to_no_think_time():
    profile = validate_profile(MINIMAL)
    assert isinstance(profile.arrival, ClosedLoop)
    assert profile.arrival.think_time_s.sample(random.Random(0)) == 0
    assert profile.spawn_rate == 2  # all users within one second


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"users": 0}, "users: Input should be greater than or equal to 1 (got 0)"),
        ({"output_tokens": {"kind": "uniform", "low": 20, "high": 10}}, "high (10) is below low (20)"),
        ({"prompt_tokens": {"kind": "fixed", "value": 0}}, "prompt_tokens: token counts must be at least 1 (got 0)"),
        ({"prompt_tokens": {"kind": "lognormal", "mean": 50, "sigma": 0.5, "low": 100}},
         "mean (50) must lie within low (100)"),
        ({"prompt_tokens": {"kind": "gamma", "value": 3}}, "prompt_tokens: Input tag 'gamma' found using 'kind'"),
        ({"arrival": {"kind": "open", "rate_per_s": 0}}, "arrival.rate_per_s: Input should be greater than 0"),
        ({"api": "embeddings"}, "api: Input should be 'chat' or 'completions'"),
        ({"workload_class": {"name": "batch", "via": "cookie"}}, "workload_class.via:"),
        ({"duration_s": -1}, "duration_s: Input should be greater than 0"),
    ],
)
def test_invalid_fields_are_named(change, message):
    with pytest.raises(LoadTestInputError) as info:
        validate_profile({**MINIMAL, **change}, source="p.yaml")
    assert str(info.value).startswith("p.yaml: ")
    assert message in str(info.value)


def test_missing_fields_are_named():
    data = {k: v for k, v in MINIMAL.items() if k not in ("users", "max_requests")}
    with pytest.raises(LoadTestInputError, match=r"users: Field required; max_requests: Field required"):
        validate_profile(data)


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(LoadTestInputError, match=r"unknown profile 'nope'.*batch, interactive, long-context"):
        load_profile("nope")


def test_malformed_and_non_mapping_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("users: [1, 2\n")
    with pytest.raises(LoadTestInputError, match="malformed YAML"):
        load_profile(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(LoadTestInputError, match="a profile must be a mapping"):
        load_profile(bad)


def test_overrides_replace_fields_and_are_validated():
    profile = load_profile("batch")
    smaller = with_overrides(profile, users=16, duration_s=3, max_requests=None)
    assert (smaller.users, smaller.duration_s, smaller.max_requests) == (16, 3, profile.max_requests)
    assert profile.users == 256  # the original is untouched
    with pytest.raises(LoadTestInputError, match="users: Input should be greater than or equal to 1"):
        with_overrides(profile, users=0)


def test_profiles_are_frozen():
    with pytest.raises(ValueError, match="frozen"):
        load_profile("interactive").users = 5  # type: ignore[misc]


def test_lognormal_has_the_requested_mean_and_stays_in_bounds():
    distribution = LogNormal(kind="lognormal", mean=247, sigma=1.0, low=4, high=4096)
    rng = random.Random(7)
    samples = [sample_count(distribution, rng) for _ in range(40_000)]
    assert statistics.fmean(samples) == pytest.approx(247, rel=0.03)
    assert min(samples) >= 4 and max(samples) <= 4096
    assert statistics.median(samples) < 200  # long-tailed: the median sits well below the mean


def test_token_counts_are_at_least_one():
    distribution = LogNormal(kind="lognormal", mean=2, sigma=2.0)
    rng = random.Random(1)
    assert min(sample_count(distribution, rng) for _ in range(2000)) == 1


def test_profile_model_round_trips_through_json():
    profile = load_profile("sharegpt-like")
    assert Profile.model_validate(profile.model_dump(mode="json")) == profile


def test_sharegpt_like_has_the_benchmark_filter_and_lmdeploys_means_after_it():
    profile = load_profile("sharegpt-like")
    rng = random.Random(3)
    pairs = [sample_lengths(profile, rng) for _ in range(30_000)]
    prompts, outputs = [p for p, _ in pairs], [o for _, o in pairs]
    # LMDeploy's (and vLLM's) ShareGPT filter: both sides at least 4, prompt at most 1,024, sum at most 2,048.
    assert min(prompts) >= 4 and min(outputs) >= 4
    assert max(prompts) <= 1024 and max(p + o for p, o in pairs) <= 2048
    # The means after the filter are those of LMDeploy's published Llama-2 rows: 246.9 and 232.7 tokens.
    assert statistics.fmean(prompts) == pytest.approx(246.9, rel=0.03)
    assert statistics.fmean(outputs) == pytest.approx(232.7, rel=0.03)
    # Heavy-tailed: a log-normal spread near 1 (not 0.4), the median well below the mean, a long tail.
    assert statistics.pstdev(math.log(p) for p in prompts) > 0.8
    assert statistics.pstdev(math.log(o) for o in outputs) > 0.8
    assert statistics.median(outputs) < 0.7 * statistics.fmean(outputs)
    assert sum(o > 1000 for o in outputs) > 0.01 * len(outputs)


def test_redraw_drops_the_tail_where_clip_piles_it_on_the_bound():
    clip = LogNormal(kind="lognormal", mean=300, sigma=1.0, low=4, high=1024)
    redraw = clip.model_copy(update={"truncate": "redraw"})
    rng = random.Random(5)
    clipped = [sample_count(clip, rng) for _ in range(20_000)]
    redrawn = [sample_count(redraw, rng) for _ in range(20_000)]
    assert clipped.count(1024) > 300  # about 3 % of the draws land on the bound
    assert redrawn.count(1024) < 20
    assert max(redrawn) <= 1024 and min(redrawn) >= 4
    assert statistics.fmean(redrawn) < statistics.fmean(clipped)


def test_probability_at_most_matches_the_sampled_share():
    rng = random.Random(9)
    for distribution in (
        LogNormal(kind="lognormal", mean=300, sigma=1.0, low=4, high=1024, truncate="redraw"),
        LogNormal(kind="lognormal", mean=300, sigma=1.0, low=4, high=1024),
    ):
        samples = [distribution.sample(rng) for _ in range(20_000)]
        for x in (50.0, 200.0, 800.0):
            share = sum(v <= x for v in samples) / len(samples)
            assert distribution.probability_at_most(x) == pytest.approx(share, abs=0.015)
        assert distribution.probability_at_most(1024) == 1.0
        assert distribution.probability_at_most(3) == 0.0


def test_max_total_tokens_redraws_pairs_and_is_validated():
    data = {**MINIMAL, "prompt_tokens": {"kind": "uniform", "low": 10, "high": 100},
            "output_tokens": {"kind": "uniform", "low": 10, "high": 100}, "max_total_tokens": 120}
    profile = validate_profile(data)
    rng = random.Random(2)
    pairs = [sample_lengths(profile, rng) for _ in range(5000)]
    assert max(p + o for p, o in pairs) <= 120
    assert max(p for p, _ in pairs) > 95  # long prompts still come, with short outputs
    # Without a cap, a pair is just one draw of each, in order (what the load generator has always sent).
    without_cap, same = validate_profile(data | {"max_total_tokens": None}), random.Random(4)
    expected = (sample_count(without_cap.prompt_tokens, same), sample_count(without_cap.output_tokens, same))
    assert sample_lengths(without_cap, random.Random(4)) == expected
    with pytest.raises(LoadTestInputError, match="max_total_tokens: 30 rejects nearly every"):
        validate_profile({**data, "max_total_tokens": 30})
    with pytest.raises(LoadTestInputError, match="fewer than 1% of the draws"):
        validate_profile({**MINIMAL, "prompt_tokens": {"kind": "lognormal", "mean": 99.95, "sigma": 0.1,
                                                       "low": 99.9, "high": 100, "truncate": "redraw"}})
