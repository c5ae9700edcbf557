"""The study driver: an Optuna study per workload class, run round by round with ask/tell.

- Storage: any Optuna storage URL (SQLite file by default), so ``optuna-dashboard`` opens it and a rerun with
  the same storage and study name resumes. A study remembers its class and search space; reopening it with a
  different space is refused (name a new study).
- Model-guided start: once per study, :func:`tuner.prior.rank_candidates` ranks every feasible candidate and the
  best of each pool shape is enqueued first (``guided_trials`` of them); then the sampler takes over.
- Every asked configuration the planner rejects is told as infeasible without being deployed, and one measured
  before is told its earlier result again; neither counts as a trial (``n_trials`` counts deployments). When the
  sampler only proposes such configurations, the best-predicted candidate not yet measured is enqueued.
- Hidden constraints (:mod:`tuner.feasibility`): configurations near ones that failed to start or crashed are
  not deployed when the feasibility model gives them more than ``tuning.max_failure_probability``; they are told
  as infeasible with that probability (``avoided``), so the sampler learns the region too.
- Parallel trials: each round asks up to ``tuning.parallel_trials`` configurations that fit the study's GPU
  budget together, measures them at once and tells each (TPE then runs with the constant liar, so it does not
  propose what is being measured). A configuration that does not fit waits for the next round.
- Re-measurement (:mod:`tuner.standings`): a configuration that takes the lead is measured again, up to
  ``tuning.remeasure_runs`` more times, each with another load seed, and configurations are ranked by their
  worst run. Re-measurements count as trials.
- Interruption (Ctrl-C, task cancellation): the trial in flight is told FAIL and its configuration queued
  again, the runner removes its trial pool and route, and the storage stays consistent; a rerun continues up to
  ``n_trials`` measured trials. Trials left RUNNING by a killed process are failed and requeued on reopening
  (one driver per study at a time).

No global state: everything lives in the driver, which runs inside any event loop (``await driver.run()``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from gateway.config import TpgateConfig
from gateway.errors import UserError
from tuner.evaluate import Measurement, TrialContext, TrialJudge, told_values
from tuner.feasibility import Deployment, FeasibilityModel
from tuner.objectives import ObjectiveSpec, objective_specs, slo_names
from tuner.prior import Ranked, WorkloadShape, guided_picks, rank_candidates
from tuner.progress import progress_bar, round_line, trial_line
from tuner.records import RECORD_ATTR, TrialRecord
from tuner.space import KNOB_NAMES, Candidate, SearchSpace
from tuner.standings import best_of, candidate_key, challengers, leaders, standings

STUDY_ATTR = "tpgate_study"
GUIDED_ATTR = "tpgate_guided"
REMEASURE_ATTR = "tpgate_remeasure_of"  # a queued re-measurement: the trial number of the first run
RUN_ATTR = "tpgate_run"  # ... and which run it is
MAX_FREE_ASKS = 30  # sampler proposals in a row that need no deployment before the model picks the next one
SAMPLERS = ("tpe", "gp", "random", "default")
DEFAULT_SAMPLER = "tpe"


class TrialRunnerLike(Protocol):
    """What the driver needs of a trial runner (:class:`tuner.runner.TrialRunner`)."""

    async def run(self, candidate: Candidate, *, number: int, run: int = 0) -> Measurement: ...

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
    stopped_by: str = ""  # "trials", "timeout", "exhausted", "target" (a replay's stop condition)
    best_confirmed: bool = True  # every winner had all its runs (tuning.remeasure_runs); else provisional
    rounds: int = 0  # rounds of trials measured at once, in this run of the study

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_name": self.study_name,
            "storage": self.storage,
            "class": self.class_name,
            "objectives": list(self.objectives),
            "measured_trials": self.measured_trials,
            "source": self.source,
            "stopped_by": self.stopped_by,
            "best_confirmed": self.best_confirmed,
            "rounds": self.rounds,
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


def make_sampler(name: str, *, seed: int | None, n_startup_trials: int,
                 constant_liar: bool = False) -> optuna.samplers.BaseSampler:
    """A sampler by name. TPE and GP read the trials' constraints (``Trial.set_constraint``); ``gp`` needs
    torch and scipy; ``default`` is Optuna's own default (TPE with its default settings), for comparisons.
    ``constant_liar``: TPE counts trials being measured as bad ones, so parallel asks spread out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True,
                                              constant_liar=constant_liar)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "default":
            return optuna.samplers.TPESampler(seed=seed)
    raise UserError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")


@dataclass
class _Run:
    """The state of one run of a study (what :meth:`StudyDriver.run` carries from round to round)."""

    records: list[TrialRecord]
    measured: dict[tuple[Any, ...], TrialRecord]  # each deployed configuration's first run (not invalid)
    feasibility: FeasibilityModel
    counted: int  # deployed trials of the study, earlier runs included
    free_asks: int = 0
    rounds: int = 0
    carried: list[optuna.Trial] = field(default_factory=list)  # asked, waiting for a round with room


@dataclass(frozen=True)
class _Planned:
    trial: optuna.Trial
    context: TrialContext


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
        stop: Callable[[Sequence[TrialRecord]], bool] | None = None,
        first: Sequence[Candidate] = (),
    ) -> None:
        """``workload`` feeds the model-guided start; ``worst_latency_s`` (engine clock) is the latency told
        for a configuration that served nothing; ``stop``, asked before every round with the records so far,
        ends the study early when it returns true (replays stop once they know what they measure); ``first``:
        configurations measured before the model's picks (a re-tune measures the class's current configuration
        under the same load this way)."""
        workload_class = config.classes[space.class_name]
        tuning = config.tuning
        self._config = config
        self._space = space
        self._runner = runner
        self._options = options
        self._progress = progress
        self._source = source
        self._clock = clock
        self._first = tuple(first)
        self._stop = stop
        self._parallel = tuning.parallel_trials
        self.runs_required = 1 + tuning.remeasure_runs
        self._max_failure_probability = tuning.max_failure_probability
        self.specs: tuple[ObjectiveSpec, ...] = objective_specs(workload_class.objectives)
        self._judge = TrialJudge(self.specs, workload_class.slo, worst_latency_s)
        self._constraint_names = ("deployed", *slo_names(workload_class.slo))
        self._ranked: list[Ranked] = rank_candidates(space, space.candidates(), workload, self.specs,
                                                     workload_class.slo)
        self._predicted = {_key(r.candidate): r.predicted for r in self._ranked}
        self._dists = distributions(space)

    def open_study(self) -> optuna.Study:
        """Create the study or reopen it (checking it is the same study); fail and requeue stale trials."""
        options = self._options
        identity = study_identity(self._config, self._space)
        sampler = make_sampler(options.sampler, seed=options.seed,
                               n_startup_trials=max(1, self._config.tuning.guided_trials),
                               constant_liar=self._parallel > 1)
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
            study.enqueue_trial(trial.params, user_attrs=_queued_attrs(trial))
        return study

    async def run(self) -> StudyResult:
        """Run rounds of trials until ``n_trials`` measured ones, the timeout, the stop condition, or no candidate
        is left."""
        study = self.open_study()
        self._enqueue_guided(study)
        state = self._resume(study)
        started = self._clock()
        stopped_by = "trials"
        try:
            while True:
                if state.counted >= self._options.n_trials:
                    break
                if self._options.timeout_s is not None and self._clock() - started >= self._options.timeout_s:
                    stopped_by = "timeout"
                    break
                if self._stop is not None and self._stop(state.records):
                    stopped_by = "target"
                    break
                self._schedule_remeasurement(study, state)
                planned = self._plan_round(study, state)
                if not planned:
                    stopped_by = "exhausted"
                    break
                await self._run_round(study, state, planned, started)
        finally:
            for trial in state.carried:  # asked but never measured: back to the queue
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs=_queued_attrs(trial))
            state.carried.clear()
            await self._runner.close()
        table = leaders(standings(state.records), self.specs, runs_required=self.runs_required)
        return StudyResult(
            study_name=self._options.study_name, storage=self._options.storage, class_name=self._space.class_name,
            objectives=tuple(s.name for s in self.specs), records=tuple(state.records),
            best=tuple(s.representative(self.specs) for s in table), measured_trials=state.counted,
            source=self._source, stopped_by=stopped_by,
            best_confirmed=all(len(s.runs) >= self.runs_required for s in table), rounds=state.rounds,
        )

    def records(self, study: optuna.Study) -> list[TrialRecord]:
        """The records of the study's finished trials, in order."""
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        return [TrialRecord.from_attrs(t.user_attrs) for t in finished if RECORD_ATTR in t.user_attrs]

    def best(self, records: Sequence[TrialRecord]) -> list[TrialRecord]:
        """The winners so far: configurations ranked by their worst run (see :mod:`tuner.standings`)."""
        return best_of(records, self.specs, runs_required=self.runs_required)

    def _resume(self, study: optuna.Study) -> _Run:
        records = self.records(study)
        measured: dict[tuple[Any, ...], TrialRecord] = {}
        deployments = []
        for record in records:
            if record.reused_from is None and record.outcome in _DEPLOYED:
                deployments.append(Deployment(record.number, record.candidate, record.outcome == "failed"))
                if record.outcome != "invalid":
                    measured.setdefault(_key(record.candidate), record)
        rounds = max((r.parallel_round or 0 for r in records), default=0)
        return _Run(records=records, measured=measured, feasibility=FeasibilityModel(self._space, deployments),
                    counted=sum(1 for r in records if _counts(r)), rounds=rounds)

    def _schedule_remeasurement(self, study: optuna.Study, state: _Run) -> None:
        """Queue the next re-measurements of the best challengers (at most one per round's slot): a
        configuration that may win is measured again before it can."""
        if self.runs_required <= 1:
            return
        waiting = [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                   if REMEASURE_ATTR in t.user_attrs]
        queued = {_key(Candidate.from_params(t.system_attrs["fixed_params"])) for t in waiting}
        queued |= {_key(Candidate.from_params(t.params)) for t in state.carried if REMEASURE_ATTR in t.user_attrs}
        room = self._parallel - len(queued)
        for standing in challengers(standings(state.records), self.specs, runs_required=self.runs_required):
            if room <= 0:
                break
            if _key(standing.candidate) in queued:
                continue
            study.enqueue_trial(standing.candidate.params(),
                                user_attrs={REMEASURE_ATTR: standing.first.number, RUN_ATTR: len(standing.runs)})
            room -= 1

    def _plan_round(self, study: optuna.Study, state: _Run) -> list[_Planned]:
        """Ask configurations for the next round: as many as ``parallel_trials`` and the trials left allow,
        fitting the study's GPUs together. Configurations that need no deployment are told at once."""
        slots = min(self._parallel, self._options.n_trials - state.counted)
        gpus_left = self._space.gpus
        planned: list[_Planned] = []
        pending, state.carried = state.carried, []
        while len(planned) < slots:
            if pending:
                trial = pending.pop(0)
            else:
                if state.free_asks >= MAX_FREE_ASKS:
                    if not self._enqueue_next_predicted(study, state, {_key(p.context.candidate) for p in planned}):
                        break
                    state.free_asks = 0
                trial = study.ask(fixed_distributions=self._dists)
            candidate = Candidate.from_params(trial.params)
            context = self._context(trial, candidate, state)
            record = self._free_record(context, state)
            if record is not None:
                self._tell(study, trial, record)
                state.records.append(record)
                state.free_asks += 1
                self._progress(trial_line(record, self.specs, position="not deployed",
                                          best=self._best_one(state.records), best_note=self._best_note(state)))
                continue
            if any(_key(p.context.candidate) == _key(candidate) for p in planned) or candidate.gpus > gpus_left:
                state.carried.append(trial)  # the same configuration is measured now, or no room: next round
                break
            planned.append(_Planned(trial, context))
            gpus_left -= candidate.gpus
        state.carried = state.carried + pending
        return planned

    def _free_record(self, context: TrialContext, state: _Run) -> TrialRecord | None:
        """The record of an asked configuration that is not deployed (rejected by the planner, measured before,
        avoided as likely to fail, or a re-measurement no longer needed); None when it is to be measured."""
        candidate = context.candidate
        key = _key(candidate)
        if context.remeasure_of is not None:
            still = any(_key(s.candidate) == key for s in challengers(standings(state.records), self.specs,
                                                                      runs_required=self.runs_required))
            return None if still else self._judge.repeated(context, state.measured[key])
        reason = self._space.check(candidate)
        if reason is not None:
            return self._judge.rejected(context, reason)
        if key in state.measured:
            return self._judge.repeated(context, state.measured[key])
        if context.failure_probability is not None and context.failure_probability > self._max_failure_probability:
            estimate = state.feasibility.estimate(candidate)
            return self._judge.avoided(context, estimate.explain(), estimate.probability)
        return None

    async def _run_round(self, study: optuna.Study, state: _Run, planned: Sequence[_Planned],
                         started: float) -> None:
        state.rounds += 1
        number = state.rounds if self._parallel > 1 else None  # one trial at a time: no rounds to tell apart
        planned = [_Planned(p.trial, dataclasses.replace(p.context, parallel_round=number)) for p in planned]
        if len(planned) > 1:
            self._progress(round_line(state.rounds, [p.context.candidate for p in planned],
                                      [p.trial.number for p in planned], gpus=self._space.gpus))
        if len(planned) == 1:
            records = [await self._measure(study, planned[0])]
        else:
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._measure(study, p)) for p in planned]
            except BaseExceptionGroup as failures:  # the gateway failed: one of them is enough to say so
                raise failures.exceptions[0] from None
            records = [task.result() for task in tasks]
        for record, p in zip(records, planned, strict=True):
            self._tell(study, p.trial, record)
            state.records.append(record)
            state.counted += 1
            state.free_asks = 0
            state.feasibility.add(Deployment(record.number, record.candidate, record.outcome == "failed"))
            if record.outcome != "invalid":
                state.measured.setdefault(_key(record.candidate), record)
            position = f"{state.counted}/{self._options.n_trials}"
            self._progress(trial_line(record, self.specs, position=position, best=self._best_one(state.records),
                                      best_note=self._best_note(state)))
        self._progress(progress_bar(state.counted, self._options.n_trials, elapsed_s=self._clock() - started,
                                    timeout_s=self._options.timeout_s))

    async def _measure(self, study: optuna.Study, planned: _Planned) -> TrialRecord:
        trial, context = planned.trial, planned.context
        started_unix_s = time.time()
        try:
            measurement = await self._runner.run(context.candidate, number=trial.number, run=context.run)
        except BaseException:
            # interrupted (Ctrl-C, cancellation) or the gateway failed: keep the storage consistent and let a
            # rerun measure this configuration
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs=_queued_attrs(trial))
            raise
        timings = {**measurement.timings, "started_unix_s": started_unix_s, "ended_unix_s": time.time()}
        return self._judge.judge(context, dataclasses.replace(measurement, timings=timings))

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

    def _context(self, trial: optuna.Trial, candidate: Candidate, state: _Run) -> TrialContext:
        verdict = self._space.verdict(candidate)
        planner = {
            "weights_per_gpu_bytes": float(verdict.weights_per_gpu_bytes),
            "kv_cache_bytes_per_gpu": float(verdict.kv_cache_bytes_per_gpu),
            "kv_cache_tokens_per_replica": float(verdict.kv_cache_tokens_per_replica),
        }
        remeasure_of = trial.user_attrs.get(REMEASURE_ATTR)
        probability = None
        if state.feasibility.failures:
            probability = state.feasibility.estimate(candidate).probability
        return TrialContext(number=trial.number, candidate=candidate, planner=planner,
                            predicted=self._predicted.get(_key(candidate), {}),
                            guided=bool(trial.user_attrs.get(GUIDED_ATTR, False)),
                            run=int(trial.user_attrs.get(RUN_ATTR, 0)),
                            remeasure_of=None if remeasure_of is None else int(remeasure_of),
                            failure_probability=probability)

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

    def _enqueue_next_predicted(self, study: optuna.Study, state: _Run, busy: set[tuple[Any, ...]]) -> bool:
        """The best-predicted candidate not measured, not being measured and not likely to fail."""
        for ranked in self._ranked:
            key = _key(ranked.candidate)
            if key in state.measured or key in busy:
                continue
            if state.feasibility.estimate(ranked.candidate).probability > self._max_failure_probability:
                continue
            study.enqueue_trial(ranked.candidate.params(), user_attrs={GUIDED_ATTR: True})
            return True
        return False

    def _best_one(self, records: Sequence[TrialRecord]) -> TrialRecord | None:
        best = self.best(records)
        return best[0] if best else None

    def _best_note(self, state: _Run) -> str:
        if self.runs_required <= 1:
            return ""
        table = leaders(standings(state.records), self.specs, runs_required=self.runs_required)
        if not table:
            return ""
        runs = len(table[0].runs)
        if runs >= self.runs_required:
            return f"worst of {runs} runs"
        return "provisional: not re-measured yet"


_DEPLOYED = ("feasible", "infeasible", "failed", "invalid")


def _key(candidate: Candidate) -> tuple[Any, ...]:
    return candidate_key(candidate)


def _counts(record: TrialRecord) -> bool:
    """Whether a trial deployed something (and so counts towards ``n_trials``)."""
    return record.outcome not in ("rejected", "avoided") and record.reused_from is None


def _queued_attrs(trial: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    """What a trial put back in the queue keeps: whether the model chose it, and which run of which
    configuration it re-measures."""
    return {k: v for k, v in trial.user_attrs.items() if k in (GUIDED_ATTR, REMEASURE_ATTR, RUN_ATTR)}
