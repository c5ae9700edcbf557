"""How few trials the tuner needs to come within 5 % of a measured grid's best: whole studies replayed against
a :class:`~tuner.tabular.GridTable`.

Each *setting* runs the real :class:`~tuner.study.StudyDriver` (guided start, sampler, hidden constraints,
re-measurement, as configured) with a :class:`~tuner.tabular.TableRunner` as its measurement, once per seed (the
sampler's seed, and which stored run of each configuration its first measurement is). After every round the
driver's own winner — what the study would declare if it stopped there — is looked up in the table: the study
is *within 5 %* once that winner is truly feasible (its mean figures meet every SLO) and its true first
objective is within 5 % of the grid's best truly feasible configuration. The figure of a run is the count of
deployed trials (re-measurements included) at that point; a run that never gets there counts as
``budget + 1``.

Settings: the tuner as configured (prior on); without the model-guided start (prior off); without
re-measurement; two trials at once; Optuna's default sampler alone (no guided start, no re-measurement, no
hidden constraints); and random search (configurations in a random order, each measured once, the best single
measurement wins). Where a table was measured against engines with a deviation file, two targets apply to the
tuner as configured: median trials at most a quarter of the grid, and p90 no worse than random search's.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config import TpgateConfig, load_config
from loadtests import load_profile
from tuner.evaluate import TrialContext, TrialJudge
from tuner.prior import WorkloadShape, predict_figures, rank_candidates
from tuner.records import TrialRecord, best_records
from tuner.space import Candidate, SearchSpace, build_space
from tuner.standings import candidate_key
from tuner.study import StudyDriver, StudyOptions
from tuner.tabular import GridTable, TableError, TableRunner

WITHIN = 0.05  # within 5 % of the grid's best
TARGET_SHARE = 0.25  # the tuner's median, as a share of the grid's configurations
BUDGET_FACTOR = 2  # a replayed study may deploy up to this many times the grid's configurations


@dataclass(frozen=True)
class Setting:
    """One way of searching: ``tuning`` overrides for the study driver, or random search."""

    name: str
    sampler: str = "tpe"
    tuning: Mapping[str, Any] = field(default_factory=dict)
    random_search: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("tuner"),
    Setting("tuner, prior off", tuning={"guided_trials": 0}),
    Setting("tuner, no re-measure", tuning={"remeasure_runs": 0}),
    Setting("tuner, 2 at once", tuning={"parallel_trials": 2}),
    Setting("optuna default", sampler="default",
            tuning={"guided_trials": 0, "remeasure_runs": 0, "max_failure_probability": 1.0}),
    Setting("random search", random_search=True),
)


@dataclass(frozen=True)
class SettingResult:
    """A setting's trials to within 5 % per seed (None: not within the budget), and rounds for parallel runs."""

    setting: str
    seeds: tuple[int, ...]
    trials: tuple[int | None, ...]
    rounds: tuple[int | None, ...]
    budget: int

    def filled(self) -> list[int]:
        return sorted(t if t is not None else self.budget + 1 for t in self.trials)

    @property
    def median(self) -> float:
        return float(statistics.median(self.filled()))

    @property
    def p90(self) -> int:
        filled = self.filled()
        return filled[min(len(filled) - 1, math.ceil(0.9 * len(filled)) - 1)]

    @property
    def missed(self) -> int:
        return sum(t is None for t in self.trials)

    def rounds_median(self) -> float | None:
        done = [r for r in self.rounds if r is not None]
        return float(statistics.median(done)) if done and len(done) == len(self.rounds) else None

    def as_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "median": self.median, "p90": self.p90, "missed": self.missed,
                "budget": self.budget, "rounds_median": self.rounds_median(),
                "per_seed": {str(s): t for s, t in zip(self.seeds, self.trials, strict=True)}}


@dataclass(frozen=True)
class Replay:
    """What replaying needs from a table: the configuration it was measured with, its space and workload."""

    table: GridTable
    config: TpgateConfig
    space: SearchSpace
    workload: WorkloadShape
    worst_latency_s: float

    @classmethod
    def of(cls, table: GridTable) -> Replay:
        """Rebuild the measuring configuration (``meta.config``) and check its space is the table's."""
        try:
            config = load_config(str(table.meta["config"]))
        except (OSError, KeyError) as exc:
            raise TableError(f"{table.name}: cannot load the configuration it was measured with: {exc}") from None
        space = build_space(config, str(table.meta["class"]))
        if space.describe() != table.meta.get("space"):
            raise TableError(f"{table.name}: {table.meta['config']} describes another search space than the table")
        missing = [c.label() for c in space.candidates() if candidate_key(c) not in _keys(table)]
        if missing:
            space = MeasuredSpace.of(space, table)
        profile = load_profile(str(table.meta.get("profile") or table.meta["class"]))
        return cls(table, config, space, WorkloadShape.of(profile), profile.request_timeout_s)

    @property
    def configurations(self) -> int:
        return len(self.space.candidates())

    def within(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` is truly feasible and truly within 5 % of the grid's best."""
        row = self.table.row(candidate)
        value = self.table.true_value(candidate)
        if value is None or not self.table.truly_feasible(row):
            return False
        _, best = self.table.optimum()
        spec = self.table.specs[0]
        bound = best * (1 + WITHIN) if spec.direction == "minimize" else best * (1 - WITHIN)
        return value <= bound if spec.direction == "minimize" else value >= bound


@dataclass(frozen=True)
class MeasuredSpace(SearchSpace):
    """A search space cut down to the configurations a partly measured table has rows for; the rest are
    rejected as never measured (told as infeasible, like the planner's rejections)."""

    measured: frozenset[tuple[Any, ...]] = frozenset()

    @classmethod
    def of(cls, space: SearchSpace, table: GridTable) -> MeasuredSpace:
        fields = {name: getattr(space, name) for name in SearchSpace.__dataclass_fields__}
        return cls(**fields, measured=frozenset(_keys(table)))

    def check(self, candidate: Candidate) -> str | None:
        reason = super().check(candidate)
        if reason is None and candidate_key(candidate) not in self.measured:
            return f"{candidate.label()} was not measured in the grid"
        return reason


def _keys(table: GridTable) -> set[tuple[Any, ...]]:
    return {candidate_key(r.candidate) for r in table.rows if r.runs}


def deployed(records: Sequence[TrialRecord]) -> int:
    """Trials that deployed something (what ``n_trials`` counts)."""
    return sum(1 for r in records if r.outcome not in ("rejected", "avoided") and r.reused_from is None)


async def replay_study(replay: Replay, setting: Setting, seed: int) -> tuple[int | None, int | None]:
    """One study of ``setting``: (deployed trials, rounds) until its winner is within 5 %, or (None, None)."""
    tuning = replay.config.tuning.model_copy(update=dict(setting.tuning))
    config = replay.config.model_copy(update={"tuning": tuning})
    budget = BUDGET_FACTOR * replay.configurations
    reached: list[tuple[int, int]] = []
    holder: list[StudyDriver] = []

    def stop(records: Sequence[TrialRecord]) -> bool:
        best = holder[0].best(records)
        if best and replay.within(best[0].candidate):
            trials = deployed(records)
            rounds = max((r.parallel_round or 0 for r in records), default=0) or trials  # one at a time: trials
            reached.append((trials, rounds))
            return True
        return False

    driver = StudyDriver(
        config=config, space=replay.space, runner=TableRunner(replay.table, seed=seed),
        options=StudyOptions(storage=None, study_name=f"replay-{seed}", n_trials=budget, seed=seed,
                             sampler=setting.sampler),
        workload=replay.workload, worst_latency_s=replay.worst_latency_s, stop=stop,
    )
    holder.append(driver)
    result = await driver.run()
    if not reached and result.stopped_by != "target":
        stop(result.records)  # the last round's verdict, when the budget or the grid ran out
    return reached[0] if reached else (None, None)


def random_search(replay: Replay, seed: int) -> int | None:
    """Random search: the grid in a random order, each configuration measured once (its stored run picked by
    the seed), the best single feasible measurement is the winner; trials until it is within 5 %."""
    table, space = replay.table, replay.space
    workload_class = replay.config.classes[space.class_name]
    judge = TrialJudge(table.specs, workload_class.slo, replay.worst_latency_s)
    runner = TableRunner(table, seed=seed)
    order = space.candidates()
    random.Random(seed).shuffle(order)
    records: list[TrialRecord] = []
    for number, candidate in enumerate(order, start=1):
        measurement = asyncio.run(runner.run(candidate, number=number))
        context = TrialContext(number=number, candidate=candidate,
                               predicted=predict_figures(space, candidate, replay.workload))
        records.append(judge.judge(context, measurement))
        best = best_records(records, table.specs)
        if best and replay.within(best[0].candidate):
            return number
    return None


def replay_setting(replay: Replay, setting: Setting, seeds: Sequence[int]) -> SettingResult:
    trials: list[int | None] = []
    rounds: list[int | None] = []
    for seed in seeds:
        if setting.random_search:
            found = random_search(replay, seed)
            trials.append(found)
            rounds.append(found)
        else:
            count, round_count = asyncio.run(replay_study(replay, setting, seed))
            trials.append(count)
            rounds.append(round_count)
    return SettingResult(setting.name, tuple(seeds), tuple(trials), tuple(rounds),
                         budget=BUDGET_FACTOR * replay.configurations)


def replay_table(table: GridTable, *, seeds: Sequence[int], settings: Sequence[Setting] = SETTINGS,
                 progress: Callable[[str], None] = lambda line: None) -> list[SettingResult]:
    """Every setting, every seed, against ``table``."""
    replay = Replay.of(table)
    results = []
    for setting in settings:
        results.append(replay_setting(replay, setting, seeds))
        progress(f"  replayed {setting.name}: {len(seeds)} seeds")
    return results


def describe_prior(table: GridTable) -> str:
    """The grid's best against the performance model's: how far the prior was off."""
    replay = Replay.of(table)
    space, spec = replay.space, table.specs[0]
    workload_class = replay.config.classes[space.class_name]
    ranked = rank_candidates(space, space.candidates(), replay.workload, table.specs, workload_class.slo)
    best_row, best_value = table.optimum()
    pick = ranked[0].candidate
    pick_value = table.true_value(pick)
    position = next(i for i, r in enumerate(ranked, start=1) if candidate_key(r.candidate)
                    == candidate_key(best_row.candidate))
    predicted_best = ranked[position - 1].predicted.get(spec.figure)
    pick_text = "no figure" if pick_value is None else f"{_fmt(pick_value)} {spec.unit}"
    if pick_value is not None:
        pick_text += f", {abs(pick_value / best_value - 1):.0%} {'worse' if pick_value != best_value else 'off'}"
    if pick_value is not None and not table.truly_feasible(table.row(pick)):
        pick_text += ", breaks an SLO"
    feasible = sum(1 for r in table.rows if table.truly_feasible(r))
    return (f"{table.name}: {replay.configurations} configurations ({feasible} truly feasible), "
            f"{len(table.rows)} rows x up to {table.runs} runs; grid best {best_row.candidate.label()} "
            f"{spec.label} {_fmt(best_value)} {spec.unit} (predicted {_fmt(predicted_best)}), the prior's "
            f"#{position} of {len(ranked)}; the prior's first pick {pick.label()} measured {pick_text}")


def format_line(result: SettingResult, configurations: int) -> str:
    rounds = result.rounds_median()
    extra = f", rounds median {rounds:g}" if rounds is not None and result.setting.endswith("at once") else ""
    share = result.median / configurations
    return (f"{result.setting:<22} trials to within 5 %: median {result.median:g} ({share:.0%} of "
            f"{configurations}), p90 {result.p90}, missed {result.missed}/{len(result.trials)}{extra}")


def check_targets(table: GridTable, results: Sequence[SettingResult], configurations: int) -> list[str]:
    """The targets that apply to ``table`` (deviated engines) and are missed, in words."""
    engine = table.meta.get("engine") or {}
    if not engine.get("deviation_file"):
        return []
    by_name = {r.setting: r for r in results}
    tuner, rand = by_name.get("tuner"), by_name.get("random search")
    missed = []
    if tuner is not None and tuner.median > TARGET_SHARE * configurations:
        missed.append(f"tuner median {tuner.median:g} trials > {TARGET_SHARE:.0%} of {configurations} "
                      f"configurations ({TARGET_SHARE * configurations:g})")
    if tuner is not None and rand is not None and tuner.p90 > rand.p90:
        missed.append(f"tuner p90 {tuner.p90} trials > random search's p90 {rand.p90}")
    return missed


def _fmt(value: Any) -> str:
    """Three significant digits, whole numbers from 1,000 up (6,942 tok/s, not 6.94e+03)."""
    if not isinstance(value, int | float):
        return "none"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
