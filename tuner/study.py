"""The study driver: an Optuna study per workload class, run trial by trial with ask/tell.

- Storage: any Optuna storage URL (SQLite file by default), so ``optuna-dashboard`` opens it and a rerun with
  the same storage and study name resumes. A study remembers its class and search space; reopening it with a
  different space is refused (name a new study).
- Model-guided start: once per study, :func:`tuner.prior.rank_candidates` ranks every feasible candidate and the
  best of each pool shape is enqueued first (``guided_trials`` of them); then the sampler takes over.
- Every asked configuration the planner rejects is told as infeasible without being deployed, and one measured
  before is told its earlier result again; neither counts as a trial (``n_trials`` counts deployments). When the
  sampler only proposes such configurations, the best-predicted candidate not yet measured is enqueued.
- Interruption (Ctrl-C, task cancellation): the trial in flight is told FAIL and its configuration queued
  again, the runner removes its trial pool and route, and the storage stays consistent; a rerun continues up to
  ``n_trials`` measured trials. Trials left RUNNING by a killed process are failed and requeued on reopening
  (one driver per study at a time).

No global state: everything lives in the driver, which runs inside any event loop (``await driver.run()``).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from gateway.config import TpgateConfig
from gateway.errors import UserError
from tuner.evaluate import Measurement, TrialContext, TrialJudge, told_values
from tuner.objectives import ObjectiveSpec, objective_specs, slo_names
from tuner.prior import Ranked, WorkloadShape, guided_picks, rank_candidates
from tuner.progress import progress_bar, trial_line
from tuner.records import RECORD_ATTR, TrialRecord, best_records
from tuner.space import KNOB_NAMES, Candidate, SearchSpace

STUDY_ATTR = "tpgate_study"
GUIDED_ATTR = "tpgate_guided"
MAX_FREE_ASKS = 30  # sampler proposals in a row that need no deployment before the model picks the next one
SAMPLERS = ("tpe", "gp", "random")
DEFAULT_SAMPLER = "tpe"


class TrialRunnerLike(Protocol):
    """What the driver needs of a trial runner (:class:`tuner.runner.TrialRunner`)."""

    async def run(self, candidate: Candidate, *, number: int) -> Measurement: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class StudyOptions:
    """Where the study lives and how long it runs. ``n_trials`` counts measured (deployed) trials, including
    those of earlier runs of the same study; ``timeout_s`` bounds this run's wall time."""

    storage: str | None  # an Optuna storage URL; None: in memory (tests, replays)
    study_name: str
    n_trials: int
    timeout_s: float | None = None
    seed: int | None = None
    sampler: str = DEFAULT_SAMPLER


@dataclass(frozen=True)
class StudyResult:
    """Every trial's record and the winners: the best feasible trial, or the Pareto front of several
    objectives (empty when no configuration met the SLOs)."""

    study_name: str
    storage: str | None
    class_name: str
    objectives: tuple[str, ...]
    records: tuple[TrialRecord, ...]
    best: tuple[TrialRecord, ...]
    measured_trials: int
    source: str = ""
    stopped_by: str = ""  # "trials", "timeout", "exhausted"

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_name": self.study_name,
            "storage": self.storage,
            "class": self.class_name,
            "objectives": list(self.objectives),
            "measured_trials": self.measured_trials,
            "source": self.source,
            "stopped_by": self.stopped_by,
            "best": [r.to_attrs()[RECORD_ATTR] for r in self.best],
            "trials": [r.to_attrs()[RECORD_ATTR] for r in self.records],
        }


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """The Optuna search space: TP sizes and knob values as choices, replicas as an integer range."""
    dists: dict[str, BaseDistribution] = {
        "tp": CategoricalDistribution(list(space.tp_sizes)),
        "replicas": IntDistribution(space.min_replicas, space.max_replicas),
    }
    for name in KNOB_NAMES:
        dists[name] = CategoricalDistribution(list(space.knob_choices[name]))
    return dists


def study_identity(config: TpgateConfig, space: SearchSpace) -> dict[str, Any]:
    """What a study is about; reopening it requires the same (hashed into the default study name)."""
    workload_class = config.classes[space.class_name]
    return {
        "space": space.describe(),
        "objectives": list(workload_class.objectives),
        "slo": workload_class.slo.model_dump(),
        "profile": workload_class.profile,
        "engine": {"kind": config.engine.kind, "time_scale": config.engine.time_scale},
    }


def default_study_name(config: TpgateConfig, space: SearchSpace) -> str:
    """``<class>-<8 hex>``: the same class, space, objectives, SLOs, profile and engine resume the same study."""
    digest = hashlib.sha256(json.dumps(study_identity(config, space), sort_keys=True).encode()).hexdigest()[:8]
    return f"{space.class_name}-{digest}"


def make_sampler(name: str, *, seed: int | None, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    """A sampler by name. TPE and GP read the trials' constraints (``Trial.set_constraint``); ``gp`` needs
    torch and scipy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")


class StudyDriver:
    """Runs one class's study against a trial runner."""

    def __init__(
        self,
        *,
        config: TpgateConfig,
        space: SearchSpace,
        runner: TrialRunnerLike,
        options: StudyOptions,
        workload: WorkloadShape,
        worst_latency_s: float,
        progress: Callable[[str], None] = lambda line: None,
        source: str = "",
        clock: Callable[[], float] = time.monotonic,
        first: Sequence[Candidate] = (),
    ) -> None:
        """``workload`` feeds the model-guided start; ``worst_latency_s`` (engine clock) is the latency told
        for a configuration that served nothing; ``first``: configurations measured before the model's picks
        (a re-tune measures the class's current configuration under the same load this way)."""
        workload_class = config.classes[space.class_name]
        self._config = config
        self._space = space
        self._runner = runner
        self._options = options
        self._progress = progress
        self._source = source
        self._clock = clock
        self._first = tuple(first)
        self.specs: tuple[ObjectiveSpec, ...] = objective_specs(workload_class.objectives)
        self._judge = TrialJudge(self.specs, workload_class.slo, worst_latency_s)
        self._constraint_names = ("deployed", *slo_names(workload_class.slo))
        self._ranked: list[Ranked] = rank_candidates(space, space.candidates(), workload, self.specs,
                                                     workload_class.slo)
        self._predicted = {_key(r.candidate): r.predicted for r in self._ranked}

    def open_study(self) -> optuna.Study:
        """Create the study or reopen it (checking it is the same study); fail and requeue stale trials."""
        options = self._options
        identity = study_identity(self._config, self._space)
        sampler = make_sampler(options.sampler, seed=options.seed,
                               n_startup_trials=max(1, self._config.tuning.guided_trials))
        study = optuna.create_study(
            storage=options.storage, study_name=options.study_name, sampler=sampler, load_if_exists=True,
            directions=[spec.direction for spec in self.specs],
        )
        stored = study.user_attrs.get(STUDY_ATTR)
        if stored is None:
            study.set_user_attr(STUDY_ATTR, identity)
        elif stored != identity:
            changed = sorted(k for k in identity if stored.get(k) != identity[k])
            raise UserError(f"study {options.study_name!r} in {options.storage} was made with another "
                            f"{', '.join(changed)}; name a new study (--study-name)")
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs=_guided_attrs(trial))
        return study

    async def run(self) -> StudyResult:
        """Run trials until ``n_trials`` measured ones, the timeout, or no candidate is left."""
        study = self.open_study()
        self._enqueue_guided(study)
        records = self.records(study)
        measured = {_key(r.candidate): r for r in records if r.outcome in ("feasible", "infeasible", "failed")}
        counted = sum(1 for r in records if _counts(r))
        started = self._clock()
        free_asks, stopped_by = 0, "trials"
        dists = distributions(self._space)
        try:
            while counted < self._options.n_trials:
                if self._options.timeout_s is not None and self._clock() - started >= self._options.timeout_s:
                    stopped_by = "timeout"
                    break
                if free_asks >= MAX_FREE_ASKS:
                    if not self._enqueue_next_predicted(study, measured):
                        stopped_by = "exhausted"
                        break
                    free_asks = 0
                trial = study.ask(fixed_distributions=dists)
                candidate = Candidate.from_params(trial.params)
                context = self._context(trial, candidate)
                reason = self._space.check(candidate)
                if reason is not None:
                    record = self._judge.rejected(context, reason)
                elif _key(candidate) in measured:
                    record = self._judge.repeated(context, measured[_key(candidate)])
                else:
                    record = await self._measure(study, trial, context)
                self._tell(study, trial, record)
                records.append(record)
                if _counts(record):
                    counted += 1
                    free_asks = 0
                    if record.outcome != "invalid":
                        measured[_key(candidate)] = record
                else:
                    free_asks += 1
                position = f"{counted}/{self._options.n_trials}" if _counts(record) else "not deployed"
                self._progress(trial_line(record, self.specs, position=position, best=self._best_one(records)))
                if _counts(record):
                    self._progress(progress_bar(counted, self._options.n_trials, elapsed_s=self._clock() - started,
                                                timeout_s=self._options.timeout_s))
        finally:
            await self._runner.close()
        return StudyResult(
            study_name=self._options.study_name, storage=self._options.storage, class_name=self._space.class_name,
            objectives=tuple(s.name for s in self.specs), records=tuple(records),
            best=tuple(best_records(records, self.specs)), measured_trials=counted, source=self._source,
            stopped_by=stopped_by,
        )

    def records(self, study: optuna.Study) -> list[TrialRecord]:
        """The records of the study's finished trials, in order."""
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        return [TrialRecord.from_attrs(t.user_attrs) for t in finished if RECORD_ATTR in t.user_attrs]

    async def _measure(self, study: optuna.Study, trial: optuna.Trial, context: TrialContext) -> TrialRecord:
        try:
            measurement = await self._runner.run(context.candidate, number=trial.number)
        except BaseException:
            # interrupted (Ctrl-C, cancellation) or the gateway failed: keep the storage consistent and let a
            # rerun measure this configuration
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs=_guided_attrs(trial))
            raise
        return self._judge.judge(context, measurement)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, record: TrialRecord) -> None:
        for key, value in record.to_attrs().items():
            trial.set_user_attr(key, value)
        values = told_values(record)
        if values is None:
            study.tell(trial, state=TrialState.FAIL)
            return
        for name, value in zip(self._constraint_names, record.constraints, strict=True):
            trial.set_constraint(name, value)
        study.tell(trial, list(values))

    def _context(self, trial: optuna.Trial, candidate: Candidate) -> TrialContext:
        verdict = self._space.verdict(candidate)
        planner = {
            "weights_per_gpu_bytes": float(verdict.weights_per_gpu_bytes),
            "kv_cache_bytes_per_gpu": float(verdict.kv_cache_bytes_per_gpu),
            "kv_cache_tokens_per_replica": float(verdict.kv_cache_tokens_per_replica),
        }
        return TrialContext(number=trial.number, candidate=candidate, planner=planner,
                            predicted=self._predicted.get(_key(candidate), {}),
                            guided=bool(trial.user_attrs.get(GUIDED_ATTR, False)))

    def _enqueue_guided(self, study: optuna.Study) -> None:
        """Once per study: the ``first`` configurations, then the model's best candidate of each pool shape, best
        first."""
        if study.user_attrs.get(GUIDED_ATTR):
            return
        for candidate in self._first:
            reason = self._space.check(candidate)
            if reason is None:
                study.enqueue_trial(candidate.params())
            else:  # Optuna would sample another value in its place: say so and leave it out
                self._progress(f"{candidate.label()} is not measured: {reason}")
        for ranked in guided_picks(self._ranked, self._config.tuning.guided_trials):
            study.enqueue_trial(ranked.candidate.params(), user_attrs={GUIDED_ATTR: True})
        study.set_user_attr(GUIDED_ATTR, True)

    def _enqueue_next_predicted(self, study: optuna.Study, measured: Mapping[tuple[Any, ...], TrialRecord]) -> bool:
        for ranked in self._ranked:
            if _key(ranked.candidate) not in measured:
                study.enqueue_trial(ranked.candidate.params(), user_attrs={GUIDED_ATTR: True})
                return True
        return False

    def _best_one(self, records: Sequence[TrialRecord]) -> TrialRecord | None:
        best = best_records(records, self.specs)
        return best[0] if best else None


def _key(candidate: Candidate) -> tuple[Any, ...]:
    return tuple(sorted(candidate.params().items()))


def _counts(record: TrialRecord) -> bool:
    """Whether a trial deployed something (and so counts towards ``n_trials``)."""
    return record.outcome != "rejected" and record.reused_from is None


def _guided_attrs(trial: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    return {GUIDED_ATTR: True} if trial.user_attrs.get(GUIDED_ATTR) else {}

