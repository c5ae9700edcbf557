import asyncio

import optuna
import pytest
from optuna.trial import TrialState

from gateway.errors import UserError
from loadtests import load_profile
from tests.tuner.conftest import config_with
from tests.tuner.fakes import ScriptedRunner
from tuner.feasibility import FeasibilityModel
from tuner.objectives import objective_specs
from tuner.prior import WorkloadShape, guided_picks, rank_candidates
from tuner.replay import Deviation, SyntheticRunner
from tuner.space import Candidate, build_space
from tuner.study import StudyDriver, StudyOptions, default_study_name

WORKLOAD = WorkloadShape.of(load_profile("batch"))


def setup(config=None, *, storage=None, n_trials=4, study_name="s", seed=3, sampler="tpe", runner=None,
          timeout_s=None, clock=None, first=()):
    config = config or config_with(gpus=8)
    space = build_space(config, "batch")
    inner = SyntheticRunner(space, WORKLOAD, Deviation(noise=0.0), seed=seed)
    scripted = runner or ScriptedRunner(inner)
    lines = []
    driver = StudyDriver(config=config, space=space, runner=scripted, workload=WORKLOAD, worst_latency_s=300.0,
                         options=StudyOptions(storage=storage, study_name=study_name, n_trials=n_trials, seed=seed,
                                              sampler=sampler, timeout_s=timeout_s),
                         progress=lines.append, first=first, **({"clock": clock} if clock else {}))
    return driver, scripted, space, config, lines


async def test_the_models_best_candidate_of_each_shape_goes_first():
    driver, runner, space, config, lines = setup(n_trials=5)
    result = await driver.run()
    batch = config.classes["batch"]
    expected = guided_picks(rank_candidates(space, space.candidates(), WORKLOAD,
                                            objective_specs(batch.objectives), batch.slo), 3)
    assert [r.candidate for r in result.records[:3]] == [p.candidate for p in expected]
    assert [r.guided for r in result.records[:3]] == [True] * 3
    assert runner.runs[:3] == [p.candidate for p in expected]
    assert result.measured_trials == 5 and len(runner.runs) == 5 and runner.closed == 1
    assert all(r.predicted.get("output_tokens_per_s") for r in result.records if r.outcome != "rejected")
    assert sum("guided" in line for line in lines) == 3 and any(line.startswith("[") for line in lines)
    assert all(r.parallel_round is None for r in result.records)  # one at a time: no rounds in the lines
    assert not any(" round " in line or line.startswith("round ") for line in lines)


async def test_first_configurations_are_measured_before_the_models_picks_and_a_rejected_one_is_said():
    knobs = build_space(config_with(gpus=8), "batch").candidates()[0].knobs
    current, too_big = Candidate(2, 2, knobs), Candidate(4, 2, knobs)
    driver, runner, *_, lines = setup(n_trials=3, first=(too_big, current))
    result = await driver.run()
    assert runner.runs[0] == current and result.records[0].candidate == current and not result.records[0].guided
    assert all(r.candidate != too_big for r in result.records)
    assert any(line.startswith(f"{too_big.label()} is not measured: 2 x tp4 needs 8 GPUs") for line in lines)


async def test_rejected_and_repeated_configurations_are_told_without_deploying(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    driver, runner, space, _, _ = setup(storage=storage, n_trials=2)
    study = driver.open_study()
    knobs = space.candidates()[0].knobs
    over_budget = Candidate(4, 2, knobs)  # 8 GPUs > the class's 4
    fine = Candidate(2, 1, knobs)
    for candidate in (over_budget, fine, fine):
        study.enqueue_trial(candidate.params())
    study.set_user_attr("tpgate_guided", True)  # no model picks: only what was enqueued above, then the sampler
    result = await driver.run()
    assert runner.runs[0] == fine and len(runner.runs) == 2
    rejected, first, again = result.records[:3]
    assert rejected.outcome == "rejected"
    assert rejected.reason == "2 x tp4 needs 8 GPUs, more than the 4 the study may use"
    assert again.reused_from == first.number and again.objectives == first.objectives
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert trials[0].state == TrialState.COMPLETE and trials[0].values == [0.0]  # no throughput
    assert trials[0].constraints["deployed"] == 1.0
    assert trials[1].constraints == dict(zip(["deployed", "ttft_p99_s", "error_rate_max"], first.constraints,
                                             strict=True))
    assert trials[1].constraints["deployed"] == 0.0


async def test_failed_trials_are_infeasible_and_invalid_ones_fail():
    config = config_with(gpus=8)
    space = build_space(config, "batch")
    runner = ScriptedRunner(SyntheticRunner(space, WORKLOAD, Deviation(noise=0.0), seed=1),
                            fail={4: "engine exited: CUDA out of memory"}, invalid={2: "clock lag 30 %"})
    driver, *_ = setup(config, runner=runner, n_trials=3)
    result = await driver.run()
    outcomes = {r.candidate.tp: r.outcome for r in result.records}
    assert outcomes == {4: "failed", 2: "invalid"}
    failed = next(r for r in result.records if r.outcome == "failed")
    assert failed.reason == "engine exited: CUDA out of memory" and failed.objectives == (0.0,)
    assert result.best == ()


async def test_an_interrupted_study_resumes_from_its_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'resume.db'}"
    first, runner, _, config, _ = setup(storage=storage, n_trials=4)
    runner.cancel_at = 2
    with pytest.raises(asyncio.CancelledError):
        await first.run()
    study = optuna.load_study(study_name="s", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 1 and states.count(TrialState.FAIL) == 1
    interrupted = runner.runs[1]
    requeued = [t for t in study.trials if t.state == TrialState.WAITING]
    assert Candidate.from_params(requeued[-1].system_attrs["fixed_params"]) == interrupted

    second, rerun, *_ = setup(config, storage=storage, n_trials=4)
    result = await second.run()
    assert result.measured_trials == 4 and len(rerun.runs) == 3  # one was measured before the interruption
    assert interrupted in rerun.runs
    deployed = [r for r in result.records if r.outcome != "rejected" and r.reused_from is None]
    assert len(deployed) == 4 and all(r.remeasure_of is None or r.run == 1 for r in deployed)
    first_runs = {tuple(sorted(r.candidate.params().items())) for r in deployed if r.remeasure_of is None}
    assert len(first_runs) == 4 - sum(r.remeasure_of is not None for r in deployed)


async def test_trials_left_running_by_a_killed_process_are_failed_and_requeued(tmp_path):
    storage = f"sqlite:///{tmp_path / 'killed.db'}"
    driver, _, _, config, _ = setup(storage=storage, n_trials=1)
    study = driver.open_study()
    orphan = study.ask({"tp": optuna.distributions.CategoricalDistribution([2, 4])})
    reopened = setup(config, storage=storage, n_trials=1)[0].open_study()
    assert reopened.trials[orphan.number].state == TrialState.FAIL
    assert reopened.trials[-1].state == TrialState.WAITING
    assert reopened.trials[-1].system_attrs["fixed_params"] == {"tp": orphan.params["tp"]}


async def test_a_study_reopened_with_another_space_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'other.db'}"
    setup(storage=storage)[0].open_study()
    changed = config_with(gpus=8, tuning={"knobs": {"max_batch_size": [64, 128]}})
    with pytest.raises(UserError, match="was made with another space; name a new study"):
        setup(changed, storage=storage)[0].open_study()


def test_default_study_names_follow_the_class_and_its_space():
    config = config_with(gpus=8)
    name = default_study_name(config, build_space(config, "batch"))
    assert name.startswith("batch-") and len(name) == len("batch-") + 8
    assert name == default_study_name(config_with(gpus=8), build_space(config, "batch"))
    slower = config_with(gpus=8, engine={"time_scale": 10})
    assert name != default_study_name(slower, build_space(slower, "batch"))


async def test_a_study_stops_when_every_candidate_was_measured():
    config = config_with(gpus=2, classes={"batch": {"objective": "max_output_tokens_per_s", "profile": "batch"}},
                         default_class="batch", tuning={"knobs": {"max_batch_size": [128, 256],
                                                                  "cache_max_entry_count": [0.9],
                                                                  "max_prefill_token_num": [8192]}})
    driver, runner, space, *_ = setup(config, n_trials=5)
    result = await driver.run()
    assert len(space.candidates()) == 2
    # both configurations, and the leader once more (with the next load seed) before it could win
    assert result.stopped_by == "exhausted" and result.measured_trials == 3 and len(runner.runs) == 3
    assert sorted(runner.run_numbers) == [0, 0, 1]
    assert len(result.best) == 1 and result.best[0].outcome == "feasible" and result.best_confirmed
    assert runner.runs[runner.run_numbers.index(1)] == result.best[0].candidate


async def test_the_timeout_stops_starting_trials():
    ticks = iter(range(0, 1000, 30))  # the driver reads the clock before each trial and for its progress bar
    driver, runner, *_ = setup(n_trials=10, timeout_s=100, clock=lambda: float(next(ticks)))
    result = await driver.run()
    assert result.stopped_by == "timeout" and len(runner.runs) == 2


async def test_several_objectives_give_a_pareto_front():
    config = config_with(gpus=8, classes={
        "batch": {"objective": ["max_output_tokens_per_s", "min_e2e_p99"], "profile": "batch",
                  "slo": {"ttft_p99_s": 5.0}}}, default_class="batch")
    driver, *_ = setup(config, n_trials=5)
    result = await driver.run()
    assert result.objectives == ("max_output_tokens_per_s", "min_e2e_p99")
    front = result.best
    assert front and all(r.outcome == "feasible" for r in front)
    for r in front:  # nothing measured is better in both
        assert not any(o.objectives[0] > r.objectives[0] and o.objectives[1] < r.objectives[1]
                       for o in result.records if o.outcome == "feasible")


async def test_parallel_rounds_fit_the_gpu_budget_and_are_measured_at_once():
    batch = {"objective": "max_output_tokens_per_s", "profile": "batch", "gpu_budget": 8,
             "slo": {"ttft_p99_s": 5.0, "error_rate_max": 0.001}}
    config = config_with(gpus=8, classes={"batch": batch}, default_class="batch",
                         tuning={"parallel_trials": 2, "remeasure_runs": 0})
    driver, _, space, _, lines = setup(config, n_trials=8)
    result = await driver.run()
    deployed = [r for r in result.records if r.outcome not in ("rejected", "avoided") and r.reused_from is None]
    by_round: dict[int, list] = {}
    for r in deployed:
        by_round.setdefault(r.parallel_round, []).append(r)
    assert result.measured_trials == 8 and result.rounds == len(by_round) < 8
    assert all(sum(r.candidate.gpus for r in group) <= space.gpus for group in by_round.values())
    assert any(len(group) == 2 for group in by_round.values())
    assert any(line.startswith("round ") for line in lines)


async def test_neighbours_of_failed_configurations_are_avoided_without_deploying(tmp_path):
    config = config_with(gpus=8, tuning={"max_failure_probability": 0.3, "remeasure_runs": 0})
    space = build_space(config, "batch")
    failing_tp = space.tp_sizes[-1]
    runner = ScriptedRunner(SyntheticRunner(space, WORKLOAD, Deviation(noise=0.0), seed=1),
                            fail={failing_tp: "engine exited: CUDA out of memory"})
    driver, *_ = setup(config, runner=runner, n_trials=3, storage=f"sqlite:///{tmp_path / 's.db'}")
    study = driver.open_study()
    model = FeasibilityModel(space)
    first = next(c for c in space.candidates() if c.tp == failing_tp)
    neighbour = next(c for c in space.candidates() if model.distance(first, c) == 1)
    study.enqueue_trial(first.params())
    study.enqueue_trial(neighbour.params())
    study.set_user_attr("tpgate_guided", True)  # only what was enqueued above, then the sampler
    result = await driver.run()
    failed, avoided = result.records[:2]
    assert failed.outcome == "failed" and runner.runs[0] == first
    assert avoided.outcome == "avoided" and avoided.candidate == neighbour and neighbour not in runner.runs
    assert avoided.failure_probability == 0.5 and avoided.constraints[0] == 0.5
    assert avoided.reason == f"predicted to fail (p 0.50: near failed trial #{failed.number})"
    assert result.measured_trials == len(runner.runs) == 3  # an avoided configuration is not a trial
