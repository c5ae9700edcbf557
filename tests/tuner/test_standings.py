from gateway.planner import EngineKnobs
from tuner.objectives import objective_specs
from tuner.records import TrialRecord
from tuner.space import Candidate
from tuner.standings import best_of, challengers, leaders, standings

SPECS = objective_specs(["min_e2e_p99"])


def config(tp: int) -> Candidate:
    return Candidate(tp, 1, EngineKnobs.of({"max_batch_size": 64, "cache_max_entry_count": 0.9, "quant_policy": 0,
                                            "max_prefill_token_num": 8192}))


def record(number: int, tp: int, value: float, outcome: str = "feasible", **fields) -> TrialRecord:
    return TrialRecord(number=number, candidate=config(tp), outcome=outcome, objectives=(value,), **fields)


def test_configurations_rank_by_their_worst_run():
    records = [record(0, 2, 3.0), record(1, 4, 2.5), record(2, 4, 3.4, run=1, remeasure_of=1),
               record(3, 2, 3.1, run=1, remeasure_of=0)]
    table = standings(records)
    assert [len(s.runs) for s in table] == [2, 2]
    assert [s.candidate.tp for s in leaders(table, SPECS, runs_required=2)] == [2]
    assert best_of(records, SPECS, runs_required=2)[0].number == 3  # tp2's worst run stands for it
    assert best_of(records, SPECS, runs_required=1)[0].candidate.tp == 2  # tp4's worst run (3.4) still loses


def test_only_configurations_that_can_still_win_are_measured_again():
    records = [record(0, 2, 3.0), record(1, 2, 3.2, run=1, remeasure_of=0), record(2, 4, 2.9),
               record(3, 8, 3.5), record(4, 1, 2.0, outcome="infeasible")]
    found = challengers(standings(records), SPECS, runs_required=2)
    assert [s.candidate.tp for s in found] == [4]  # tp8 cannot beat tp2's worst 3.2; tp1 broke an SLO


def test_without_a_confirmed_configuration_the_winner_is_provisional():
    records = [record(0, 2, 3.0), record(1, 4, 2.5)]
    table = leaders(standings(records), SPECS, runs_required=2)
    assert [s.candidate.tp for s in table] == [4] and len(table[0].runs) == 1


def test_a_failed_run_makes_a_configuration_infeasible_and_invalid_ones_are_not_runs():
    records = [record(0, 2, 3.0), record(1, 2, 300.0, outcome="failed", run=1, remeasure_of=0),
               record(2, 4, 2.5), record(3, 4, 1.0, outcome="invalid", run=1, remeasure_of=2)]
    table = standings(records)
    assert [len(s.runs) for s in table] == [2, 1]
    assert [s.feasible for s in table] == [False, True]
    assert [s.candidate.tp for s in leaders(table, SPECS, runs_required=2)] == [4]
