"""Which configuration wins: every configuration ranked by its worst run, so a lucky trial does not win.

Pure. A measurement is one window of one load sequence: another seed (other prompt lengths, another order of
arrivals and think times) gives another figure, and on a landscape where many configurations lie within a few
percent of each other the best single measurement is as often luck as merit. So a configuration that takes the
lead is measured again — ``tuning.remeasure_runs`` more times, each with another load seed — before it can be
declared the winner, and configurations are compared by their *worst* run: feasible only when every run met
every SLO, and worth the worst of their runs' objective values.

This is racing (SMAC's intensification) on a budget: since more runs can only lower a configuration's worst
run, one whose first run does not beat the leader's worst can never win, and is not measured again. Only
challengers are: configurations whose every run so far is feasible and beats (single objective) or is not
dominated by (several objectives) the worst runs of the confirmed leaders.

Winners are the leaders among configurations with every run done (``runs_required``); while none has them (the
study ran out of trials first), the leaders among all configurations, marked provisional.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuner.objectives import ObjectiveSpec, pareto_front
from tuner.records import TrialRecord
from tuner.space import Candidate

RUN_OUTCOMES = ("feasible", "infeasible", "failed")  # runs of a configuration; invalid ones are not runs


def candidate_key(candidate: Candidate) -> tuple[Any, ...]:
    """A hashable identity of a configuration."""
    return tuple(sorted(candidate.params().items()))


@dataclass(frozen=True)
class Standing:
    """A configuration and its runs (first run first): deployed trials that measured it or failed."""

    candidate: Candidate
    runs: tuple[TrialRecord, ...]

    @property
    def feasible(self) -> bool:
        """Every run met every SLO."""
        return all(r.outcome == "feasible" for r in self.runs)

    @property
    def first(self) -> TrialRecord:
        return self.runs[0]

    def worst(self, specs: Sequence[ObjectiveSpec]) -> tuple[float, ...]:
        """Per objective, the worst value over the runs."""
        values = [r.objectives or () for r in self.runs]
        return tuple(
            (max if spec.direction == "minimize" else min)(v[i] for v in values) for i, spec in enumerate(specs)
        )

    def representative(self, specs: Sequence[ObjectiveSpec]) -> TrialRecord:
        """The run that stands for the configuration: its worst on the first objective (the earliest of equals)."""
        spec = specs[0]
        worst = self.runs[0]
        for run in self.runs[1:]:
            if spec.better((worst.objectives or ())[0], (run.objectives or ())[0]):
                worst = run
        return worst


def standings(records: Sequence[TrialRecord]) -> list[Standing]:
    """Every deployed configuration with its runs, in the order each was first deployed. Repeats told
    without deploying and invalid measurements are not runs."""
    runs: dict[tuple[Any, ...], list[TrialRecord]] = {}
    for record in sorted(records, key=lambda r: r.number):
        if record.reused_from is None and record.outcome in RUN_OUTCOMES:
            runs.setdefault(candidate_key(record.candidate), []).append(record)
    return [Standing(group[0].candidate, tuple(group)) for group in runs.values()]


def leaders(table: Sequence[Standing], specs: Sequence[ObjectiveSpec], *, runs_required: int = 1) -> list[Standing]:
    """The winners: among feasible configurations with ``runs_required`` runs, the best worst run (one
    objective: the earliest of equals) or the Pareto front of worst runs (several); while none has every run
    done, the same among every feasible configuration (provisional winners)."""
    feasible = [s for s in table if s.feasible and all(r.objectives for r in s.runs)]
    confirmed = [s for s in feasible if len(s.runs) >= runs_required]
    pool = confirmed or feasible
    if not pool:
        return []
    if len(specs) == 1:
        best = pool[0]
        for standing in pool[1:]:
            if specs[0].better(standing.worst(specs)[0], best.worst(specs)[0]):
                best = standing
        return [best]
    return [pool[i] for i in pareto_front([s.worst(specs) for s in pool], specs)]


def confirmed(standing: Standing, *, runs_required: int) -> bool:
    return len(standing.runs) >= runs_required


def challengers(table: Sequence[Standing], specs: Sequence[ObjectiveSpec], *, runs_required: int) -> list[Standing]:
    """Configurations to measure again: feasible so far, short of ``runs_required`` runs, and able to win —
    better than the confirmed leader's worst run (one objective), or not dominated by a confirmed leader's
    worst runs (several). Best first."""
    confirmed_leaders = [s for s in leaders(table, specs, runs_required=runs_required)
                         if len(s.runs) >= runs_required]
    found = []
    for standing in table:
        if len(standing.runs) >= runs_required or not standing.feasible or not all(r.objectives for r in standing.runs):
            continue
        worst = standing.worst(specs)
        if all(_can_beat(worst, leader.worst(specs), specs) for leader in confirmed_leaders):
            found.append(standing)
    if len(specs) == 1:
        spec = specs[0]
        found.sort(key=lambda s: s.worst(specs)[0] if spec.direction == "minimize" else -s.worst(specs)[0])
    return found


def best_of(records: Sequence[TrialRecord], specs: Sequence[ObjectiveSpec], *, runs_required: int = 1
            ) -> list[TrialRecord]:
    """The winners' representative runs (see :func:`leaders`)."""
    return [s.representative(specs) for s in leaders(standings(records), specs, runs_required=runs_required)]


def _can_beat(point: Sequence[float], leader: Sequence[float], specs: Sequence[ObjectiveSpec]) -> bool:
    if len(specs) == 1:
        return specs[0].better(point[0], leader[0])
    leader_dominates = all(not spec.better(x, y) for spec, x, y in zip(specs, point, leader, strict=True)) and any(
        spec.better(y, x) for spec, x, y in zip(specs, point, leader, strict=True))
    return not leader_dominates
