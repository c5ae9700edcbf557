import pytest

from gateway.config import SloConfig
from loadtests import load_profile
from tests.tuner.conftest import config_with
from tuner.objectives import objective_specs
from tuner.prior import WorkloadShape, distribution_quantile, guided_picks, predict_figures, rank_candidates
from tuner.space import build_space


def test_length_quantiles_of_profile_distributions():
    profile = load_profile("interactive")
    shape = WorkloadShape.of(profile)
    assert (shape.users, shape.prompt_mean, shape.output_mean) == (4, 500, 150)
    assert 500 < shape.prompt_p99 < 2048 and 150 < shape.output_p99 < 512
    think = profile.arrival.think_time_s
    assert distribution_quantile(think, 0.5) == pytest.approx(1.25)


def test_more_replicas_share_the_users_and_add_throughput(internvl_8):
    space = build_space(internvl_8, "batch")
    shape = WorkloadShape.of(load_profile("batch"))
    one, two = (next(c for c in space.candidates() if c.shape == (2, r) and c.knobs.max_batch_size == 128
                 and c.knobs.cache_max_entry_count == 0.9) for r in (1, 2))
    single, double = predict_figures(space, one, shape), predict_figures(space, two, shape)
    assert double["running_batch"] == single["running_batch"] == 128  # max_batch_size binds at 128 and 256 users
    assert double["output_tokens_per_s"] == pytest.approx(2 * single["output_tokens_per_s"], rel=0.01)
    assert single["e2e_p99_s"] > single["e2e_p50_s"] and single["ttft_p99_s"] > single["ttft_p50_s"]


def test_ranking_puts_predicted_slo_breakers_last_and_picks_span_tp_sizes_then_shapes(internvl_8):
    space = build_space(internvl_8, "interactive")
    shape = WorkloadShape.of(load_profile("interactive"))
    specs = objective_specs(["min_e2e_p99"])
    tight = SloConfig(tpot_p99_s=0.012)  # only large TP sizes decode this fast
    ranked = rank_candidates(space, space.candidates(), shape, specs, tight)
    assert len(ranked) == len(space.candidates())
    violations = [r.slo_violation for r in ranked]
    assert violations == sorted(violations)
    meeting = [r for r in ranked if r.slo_violation == 0]
    assert meeting and [r.objectives[0] for r in meeting] == sorted(r.objectives[0] for r in meeting)
    picks = guided_picks(ranked, 3)
    assert sorted(p.candidate.tp for p in picks) == [2, 4, 8]  # one per TP size first
    assert picks[0] is ranked[0]
    positions = [ranked.index(p) for p in picks]
    assert positions == sorted(positions)  # in rank order
    assert all(p is next(r for r in ranked if r.candidate.tp == p.candidate.tp) for p in picks)
    more = guided_picks(ranked, 5)
    assert len({p.candidate.shape for p in more}) == 5 and {p.candidate.tp for p in more} == {2, 4, 8}
    assert guided_picks(ranked, 0) == []


def test_goodput_prediction_counts_only_configurations_that_meet_the_slos():
    config = config_with(gpus=8, classes={"a": {"objective": "max_goodput", "profile": "batch",
                                                "slo": {"tpot_p99_s": 0.001}}}, default_class="a")
    space = build_space(config, "a")
    shape = WorkloadShape.of(load_profile("batch"))
    ranked = rank_candidates(space, space.candidates(), shape, objective_specs(["max_goodput"]),
                             config.classes["a"].slo)
    assert all(r.predicted["goodput_requests_per_s"] == 0.0 and r.slo_violation > 0 for r in ranked)
