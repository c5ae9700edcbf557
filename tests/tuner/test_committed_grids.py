"""The grid tables committed under benchmarks/grids/ still load and replay with today's code: the figures
docs/tuner.md reports come from them, so a change of the table format or of the study driver that broke them
would otherwise go unnoticed until someone re-ran the benchmark."""

from pathlib import Path

import pytest

from tuner.efficiency import SETTINGS, Replay, describe_prior, replay_setting
from tuner.grid_report import markdown_table
from tuner.tabular import GridTable

GRIDS = sorted((Path(__file__).parents[2] / "benchmarks" / "grids").glob("*.json"))


def test_grids_are_committed():
    assert len(GRIDS) >= 2


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_a_committed_grid_replays(path, monkeypatch):
    monkeypatch.chdir(path.parents[2])  # tables name their profile and deviation file from the repository root
    table = GridTable.load(path)
    replay = Replay.of(table)
    assert 0 < replay.configurations <= table.meta["configurations"]
    assert "grid best" in describe_prior(table)
    result = replay_setting(replay, SETTINGS[0], range(3))
    assert len(result.trials) == 3 and all(t is None or 1 <= t <= result.budget for t in result.trials)


@pytest.mark.parametrize("path", GRIDS[:1], ids=[p.stem for p in GRIDS[:1]])
def test_a_grid_prints_as_markdown_best_first(path, monkeypatch):
    monkeypatch.chdir(path.parents[2])
    table = GridTable.load(path)
    lines = markdown_table(table).splitlines()
    assert len(lines) == 2 + len(table.rows)
    best_row, _ = table.optimum()
    assert lines[2].startswith(f"| {best_row.candidate.label()} |") and "| yes |" in lines[2]
