import asyncio
import statistics

import pytest

from tests.tuner.fakes import synthetic_table
from tuner.tabular import GridTable, TableError, TableRunner


def test_a_table_round_trips_through_json(tmp_path):
    table = synthetic_table(tmp_path)
    table.save(tmp_path / "t.json")
    loaded = GridTable.load(tmp_path / "t.json")
    assert loaded.meta == table.meta and loaded.runs == 2
    assert [r.candidate for r in loaded.rows] == [r.candidate for r in table.rows]
    assert loaded.rows[0].runs[1].measured == table.rows[0].runs[1].measured
    assert loaded.optimum()[0].candidate == table.optimum()[0].candidate


def test_the_truth_is_the_mean_of_the_runs_and_the_optimum_is_truly_feasible(tmp_path):
    table = synthetic_table(tmp_path)
    row = table.rows[0]
    expected = statistics.fmean(r.measured.e2e_p99_s for r in row.runs)
    assert table.true_value(row.candidate) == pytest.approx(expected)
    best, value = table.optimum()
    assert table.truly_feasible(best)
    assert all(value <= table.true_value(r.candidate) for r in table.rows if table.truly_feasible(r))
    assert not all(table.truly_feasible(r) for r in table.rows)  # one sequence per replica queues: TTFT breaks


def test_the_runner_rotates_stored_runs_across_seeds(tmp_path):
    table = synthetic_table(tmp_path)
    candidate = table.rows[0].candidate
    firsts = {TableRunner(table, seed=seed).stored_run(candidate, 0).run for seed in range(20)}
    assert firsts == {0, 1}
    runner = TableRunner(table, seed=5)
    assert {runner.stored_run(candidate, n).run for n in (0, 1)} == {0, 1}
    measurement = asyncio.run(runner.run(candidate, number=7, run=1))
    assert measurement.wall.e2e_p99_s == runner.stored_run(candidate, 1).measured.e2e_p99_s
    assert measurement.clock.valid and runner.deployments == 1


def test_a_missing_row_or_format_is_an_error(tmp_path):
    table = synthetic_table(tmp_path, skip=1)
    missing = synthetic_table(tmp_path).rows[0].candidate
    with pytest.raises(TableError, match="no row for"):
        table.row(missing)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(TableError, match="not a grid table"):
        GridTable.load(tmp_path / "bad.json")
