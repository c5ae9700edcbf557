import random

from tests.tuner.fakes import synthetic_table
from tuner.efficiency import (
    SETTINGS,
    MeasuredSpace,
    Replay,
    SettingResult,
    check_targets,
    describe_prior,
    random_search,
    replay_setting,
)

DEVIATION = "benchmarks/grids/deviation-tp-costlier.yaml"


def test_random_search_stops_at_the_first_configuration_within_5_percent(tmp_path):
    replay = Replay.of(synthetic_table(tmp_path, runs=1, noise=0.0))
    for seed in range(5):
        order = replay.space.candidates()
        random.Random(seed).shuffle(order)
        best = None
        expected = None
        for position, candidate in enumerate(order, start=1):
            value = replay.table.true_value(candidate)
            if replay.table.truly_feasible(replay.table.row(candidate)) and (best is None or value < best[1]):
                best = (candidate, value)
            if best is not None and replay.within(best[0]):
                expected = position
                break
        assert random_search(replay, seed) == expected


def test_the_tuner_replayed_reaches_the_grids_best_within_its_budget(tmp_path):
    replay = Replay.of(synthetic_table(tmp_path))
    result = replay_setting(replay, SETTINGS[0], range(4))
    assert result.missed == 0 and all(1 <= t <= replay.configurations * 2 for t in result.trials)
    parallel = replay_setting(replay, next(s for s in SETTINGS if s.name == "tuner, 2 at once"), range(4))
    assert all(r is not None and r <= t for r, t in zip(parallel.rounds, parallel.trials, strict=True))


def test_a_partly_measured_grid_is_searched_only_where_it_was_measured(tmp_path):
    full = Replay.of(synthetic_table(tmp_path))
    partial = Replay.of(synthetic_table(tmp_path, skip=2))
    assert isinstance(partial.space, MeasuredSpace)
    assert partial.configurations == full.configurations - 2
    left_out = full.space.candidates()[0]
    assert partial.space.check(left_out) == f"{left_out.label()} was not measured in the grid"
    assert replay_setting(partial, SETTINGS[0], [0]).missed == 0


def test_targets_apply_to_tables_measured_with_a_deviation(tmp_path):
    plain = synthetic_table(tmp_path)
    deviated = synthetic_table(tmp_path, deviation_file=DEVIATION)
    slow = SettingResult("tuner", (0, 1), (5, 6), (5, 6), budget=12)
    quick_random = SettingResult("random search", (0, 1), (2, 3), (2, 3), budget=12)
    assert check_targets(plain, [slow, quick_random], 6) == []
    missed = check_targets(deviated, [slow, quick_random], 6)
    assert missed == ["tuner median 5.5 trials > 25% of 6 configurations (1.5)",
                      "tuner p90 6 trials > random search's p90 3"]
    assert "grid best" in describe_prior(deviated) and "the prior's first pick" in describe_prior(deviated)
