"""The closed loop's guard rails, one by one, and the keep-unless-clearly-better judge."""

import pytest

from gateway.config import DriftClassConfig, load_config
from gateway.planner import EngineKnobs
from tuner.guard_rails import RetuneFacts, decide, judge, smallest_pool_gpus
from tuner.objectives import objective_specs
from tuner.records import TrialRecord
from tuner.space import Candidate

KNOBS = EngineKnobs.of(max_batch_size=256, max_prefill_token_num=8192)
DRIFTED = RetuneFacts(drifted=True, drift_reason="concurrency 256 vs 8", since_last_retune_s=None, in_progress=None,
                      free_gpus=8, min_pool_gpus=2)


def rails(**overrides):
    return DriftClassConfig(mode="auto", min_retune_interval_s=3600, **overrides)


def facts(**changes):
    return RetuneFacts(**{**DRIFTED.__dict__, **changes})


def test_a_drifted_class_with_room_is_re_tuned_on_the_free_gpus_up_to_the_cap():
    decision = decide(DRIFTED, rails(max_gpus=4))
    assert (decision.action, decision.gpus) == ("retune", 4)
    assert decision.reason == "re-tune on 4 GPUs: concurrency 256 vs 8"
    assert decide(DRIFTED, rails()).gpus == 8


def test_advisory_mode_says_what_it_would_do():
    decision = decide(DRIFTED, DriftClassConfig(mode="advisory", max_gpus=2))
    assert (decision.action, decision.gpus) == ("advise", 2)
    assert decision.reason.startswith("would re-tune on 2 GPUs")


def test_off_holds_even_when_drifted():
    assert decide(DRIFTED, DriftClassConfig(mode="off")).action == "hold"


def test_a_class_that_has_not_drifted_is_held():
    decision = decide(facts(drifted=False, drift_reason="within the reference"), rails())
    assert (decision.action, decision.reason) == ("hold", "not drifted (within the reference)")


def test_no_re_tune_while_a_promotion_or_rollback_of_the_class_runs():
    decision = decide(facts(in_progress="promotion p-3 of class batch"), rails())
    assert decision.action == "hold" and decision.reason.startswith("promotion p-3 of class batch is in progress")


@pytest.mark.parametrize(("since_s", "action"), [(1800.0, "hold"), (3599.0, "hold"), (3600.0, "retune")])
def test_at_most_one_re_tune_per_interval(since_s, action):
    decision = decide(facts(since_last_retune_s=since_s), rails())
    assert decision.action == action
    if action == "hold":
        assert "at most one re-tune every 1.0 h" in decision.reason


@pytest.mark.parametrize(("free", "cap", "action"), [(1, None, "hold"), (8, 1, "hold"), (2, None, "retune")])
def test_a_re_tune_needs_room_for_the_smallest_pool(free, cap, action):
    decision = decide(facts(free_gpus=free), rails(max_gpus=cap))
    assert decision.action == action
    if action == "hold":
        assert "too few for the smallest pool (2 GPUs)" in decision.reason


def test_the_rails_apply_in_order():
    everything_wrong = facts(in_progress="rollback of class batch", since_last_retune_s=10.0, free_gpus=0)
    assert decide(everything_wrong, rails()).reason.startswith("rollback of class batch")


def record(outcome, *objectives, tp=2):
    return TrialRecord(number=1, candidate=Candidate(tp, 8 // tp // 2 or 1, KNOBS), outcome=outcome,
                       objectives=tuple(objectives) if objectives else None)


THROUGHPUT = objective_specs(["max_output_tokens_per_s"])
LATENCY = objective_specs(["min_e2e_p99"])


def test_a_winner_better_by_the_margin_replaces_the_current_configuration():
    judgement = judge(record("feasible", 1000.0), record("feasible", 1100.0, tp=4), THROUGHPUT, margin_ratio=0.05)
    assert judgement.switch and judgement.gains == (pytest.approx(0.1),)


def test_a_winner_within_the_margin_changes_nothing():
    judgement = judge(record("feasible", 1000.0), record("feasible", 1030.0), THROUGHPUT, margin_ratio=0.05)
    assert not judgement.switch and "not better by the 5% margin" in judgement.reason


def test_lower_latency_is_better_for_a_minimised_objective():
    assert judge(record("feasible", 2.0), record("feasible", 1.5), LATENCY, margin_ratio=0.1).switch
    assert not judge(record("feasible", 1.5), record("feasible", 2.0), LATENCY, margin_ratio=0.1).switch


def test_worse_in_one_objective_keeps_the_current_configuration():
    both = objective_specs(["max_output_tokens_per_s", "min_e2e_p99"])
    judgement = judge(record("feasible", 1000.0, 2.0), record("feasible", 1500.0, 2.2), both, margin_ratio=0.05)
    assert not judgement.switch and "worse in one objective" in judgement.reason


def test_a_candidate_that_breaks_an_slo_never_replaces_anything():
    assert not judge(record("feasible", 1000.0), record("infeasible", 5000.0), THROUGHPUT, margin_ratio=0.05).switch
    assert not judge(record("infeasible", 1000.0), record("failed"), THROUGHPUT, margin_ratio=0.05).switch


def test_a_current_configuration_that_breaks_its_slo_gives_way_to_a_feasible_winner():
    judgement = judge(record("infeasible", 3000.0), record("feasible", 900.0), THROUGHPUT, margin_ratio=0.05)
    assert judgement.switch and "current configuration is infeasible" in judgement.reason


def test_the_smallest_pool_follows_the_planner():
    assert smallest_pool_gpus(load_config()) == 2  # InternVL2.5-38B on H100s: TP1 leaves no room for a KV cache
    assert smallest_pool_gpus(load_config(overrides={"model": "llama-3-8b"})) == 1
