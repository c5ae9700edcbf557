import dataclasses
import json

import pytest

from gateway.config import SloConfig
from gateway.planner import EngineKnobs
from tests.tuner.test_timescale import readings, wall_figures
from tuner.evaluate import Measurement, TrialContext, TrialJudge, told_values
from tuner.objectives import objective_specs
from tuner.records import TrialRecord, best_records
from tuner.space import Candidate
from tuner.timescale import check_clocks

SLO = SloConfig(ttft_p99_s=0.5, tpot_p99_s=0.04)
JUDGE = TrialJudge(objective_specs(["min_e2e_p99"]), SLO, worst_latency_s=60.0)
CANDIDATE = Candidate(2, 2, EngineKnobs.of(max_batch_size=256, max_prefill_token_num=8192))
CONTEXT = TrialContext(number=4, candidate=CANDIDATE, predicted={"e2e_p99_s": 3.9}, guided=True,
                       planner={"weights_per_gpu_bytes": 3.8e10})


def measured(scale: float = 9.2, **changes) -> Measurement:
    start, end = readings(a=scale, b=scale)
    return Measurement("t-x-tp2x2", "trial-x-4", "prometheus",
                       wall=dataclasses.replace(wall_figures(), **changes),
                       clock=check_clocks(start, end, nominal_scale=10.0, tolerance=0.15), timings={"total_s": 40.0})


def test_a_measured_trial_is_judged_in_the_engine_clock():
    record = JUDGE.judge(CONTEXT, measured())
    assert record.outcome == "feasible" and record.reason is None
    assert record.objectives == pytest.approx((0.5 * 9.2,))
    assert record.measured.clock == "engine" and record.measured.ttft_p99_s == pytest.approx(0.276)
    assert [r.met for r in record.slo] == [True, True]
    assert record.constraints[0] == 0.0 and all(c <= 0 for c in record.constraints)
    assert (record.pool_id, record.route, record.source, record.guided) == ("t-x-tp2x2", "trial-x-4",
                                                                            "prometheus", True)
    assert told_values(record) == record.objectives


def test_a_broken_slo_makes_the_trial_infeasible_with_its_measured_values():
    record = JUDGE.judge(CONTEXT, measured(tpot_p99_s=0.006))  # 55 ms in the engine's clock
    assert record.outcome == "infeasible" and record.reason == "broke TPOT p99"
    assert record.constraints[2] == pytest.approx(0.006 * 9.2 / 0.04 - 1)
    assert told_values(record) == pytest.approx((4.6,))


def test_a_failure_is_told_as_infeasible_with_pessimistic_values():
    record = JUDGE.judge(CONTEXT, Measurement("t-x", "trial-x-4", "scrape", failure="engine crashed"))
    assert (record.outcome, record.reason) == ("failed", "engine crashed")
    assert record.objectives == (60.0,) and record.constraints == (1.0, 0.0, 0.0)
    assert record.measured is None and record.pool_id == "t-x"


def test_no_successful_request_is_a_failure():
    record = JUDGE.judge(CONTEXT, measured(requests_per_s=0.0, requests=40, errors=40, error_rate=1.0))
    assert record.outcome == "failed" and record.reason == "no request succeeded in the window (40 failed)"
    assert record.objectives == (60.0,) and record.measured is not None


def test_an_untrustworthy_window_is_invalid_and_told_as_fail():
    record = JUDGE.judge(CONTEXT, measured(scale=7.0))
    assert record.outcome == "invalid" and "lag" in record.reason
    assert told_values(record) is None and record.objectives is None


def test_a_missing_objective_figure_is_invalid():
    judge = TrialJudge(objective_specs(["max_goodput"]), SLO, worst_latency_s=60.0)
    record = judge.judge(CONTEXT, measured(goodput_requests_per_s=None))
    assert record.outcome == "invalid" and "goodput" in record.reason


def test_rejected_and_repeated_trials():
    rejected = JUDGE.rejected(CONTEXT, "tp=3: 40 attention heads are not divisible by 3")
    assert (rejected.outcome, rejected.objectives, rejected.constraints) == ("rejected", (60.0,), (1.0, 0.0, 0.0))
    earlier = JUDGE.judge(CONTEXT, measured())
    again = JUDGE.repeated(dataclasses.replace(CONTEXT, number=9, guided=False), earlier)
    assert (again.number, again.reused_from, again.objectives, again.guided) == (9, 4, earlier.objectives, False)


def test_records_round_trip_through_strict_json():
    for record in (JUDGE.judge(CONTEXT, measured()), JUDGE.rejected(CONTEXT, "no"),
                   JUDGE.judge(CONTEXT, measured(scale=7.0))):
        attrs = json.loads(json.dumps(record.to_attrs(), allow_nan=False))
        assert TrialRecord.from_attrs(attrs) == record
    with_inf = dataclasses.replace(JUDGE.judge(CONTEXT, measured()), predicted={"e2e_p99_s": float("inf")})
    assert TrialRecord.from_attrs(with_inf.to_attrs()).predicted == {"e2e_p99_s": None}


def test_best_records_single_and_pareto():
    fast = JUDGE.judge(CONTEXT, measured(e2e_p99_s=0.3))
    slow = JUDGE.judge(dataclasses.replace(CONTEXT, number=5), measured(e2e_p99_s=0.6))
    broken = JUDGE.judge(dataclasses.replace(CONTEXT, number=6), measured(e2e_p99_s=0.1, tpot_p99_s=0.01))
    assert best_records([slow, broken, fast], JUDGE.specs) == [fast]
    assert best_records([broken], JUDGE.specs) == []
    two = objective_specs(["min_e2e_p99", "max_output_tokens_per_s"])
    a = dataclasses.replace(fast, objectives=(1.0, 100.0))
    b = dataclasses.replace(slow, objectives=(2.0, 300.0))
    c = dataclasses.replace(slow, number=7, objectives=(2.5, 200.0))
    assert best_records([a, b, c], two) == [a, b]
