"""From what a trial observed to what the study records and tells the sampler.

Pure. :class:`TrialJudge` holds a class's objectives and SLOs; given a trial's context (number, candidate,
prediction) and its :class:`Measurement`, it converts the wall-clock figures into the engines' clock, judges each
SLO, and decides the outcome (see :mod:`tuner.records`) with the values and constraints Optuna is told.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config import SloConfig
from tuner.objectives import (
    MissingFigure,
    ObjectiveSpec,
    constraint_values,
    objective_values,
    pessimistic_values,
    slo_results,
)
from tuner.records import TrialRecord
from tuner.space import Candidate
from tuner.timescale import ClockCheck, to_engine_clock
from tuner.window import WindowFigures


@dataclass(frozen=True)
class Measurement:
    """What a trial observed (the trial runner's result). ``wall`` figures are in the wall clock; ``clock`` says
    how the engines' clocks ran over the window. ``failure``: the configuration could not be measured (it was
    refused, could not be placed, crashed, timed out, or no request succeeded); ``invalid``: it was measured,
    but the measurement cannot be trusted."""

    pool_id: str
    route: str
    source: str  # "prometheus" or "scrape"
    failure: str | None = None
    invalid: str | None = None
    wall: WindowFigures | None = None
    clock: ClockCheck | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    load: Mapping[str, Any] | None = None  # the load generator's own summary (client side, wall clock)


@dataclass(frozen=True)
class TrialContext:
    """What the study knows of a trial before it runs."""

    number: int
    candidate: Candidate
    predicted: Mapping[str, Any] = field(default_factory=dict)  # engine clock, see tuner.prior
    planner: Mapping[str, float] = field(default_factory=dict)  # weights and KV cache per GPU
    guided: bool = False
    run: int = 0  # 0: the configuration's first run; n: its n-th re-measurement
    remeasure_of: int | None = None  # a re-measurement: the trial of the first run
    parallel_round: int | None = None
    failure_probability: float | None = None  # the feasibility model's estimate (None: no failure seen yet)


@dataclass(frozen=True)
class TrialJudge:
    """A class's objectives and SLOs, applied to trials. ``worst_latency_s``: the latency told for a
    configuration that served nothing (the profile's request timeout, engine clock)."""

    specs: tuple[ObjectiveSpec, ...]
    slo: SloConfig
    worst_latency_s: float

    def rejected(self, context: TrialContext, reason: str) -> TrialRecord:
        """The planner refused the candidate: never deployed, told as infeasible."""
        return self._not_run(context, "rejected", reason)

    def avoided(self, context: TrialContext, reason: str, probability: float) -> TrialRecord:
        """The feasibility model expects the candidate to fail: never deployed, told as infeasible with the
        predicted probability as its ``deployed`` constraint (a failure that really happened tells 1)."""
        record = self._not_run(context, "avoided", reason)
        return dataclasses.replace(record, constraints=(probability, *record.constraints[1:]))

    def judge(self, context: TrialContext, measurement: Measurement) -> TrialRecord:
        """The record of a trial that ran (or tried to)."""
        base: dict[str, Any] = {"pool_id": measurement.pool_id, "route": measurement.route,
                                "source": measurement.source, "timings": measurement.timings}
        if measurement.failure is not None:
            return dataclasses.replace(self._not_run(context, "failed", measurement.failure), **base)
        clock = measurement.clock
        if measurement.invalid is not None or measurement.wall is None or clock is None or not clock.valid:
            reason = measurement.invalid or (clock.reason if clock is not None else None) or "no window was measured"
            return self._record(context, "invalid", reason, clock=clock, **base)
        engine = to_engine_clock(measurement.wall, clock)
        figures = engine.as_dict()
        if engine.requests_per_s <= 0:
            record = self._not_run(context, "failed", f"no request succeeded in the window ({engine.errors:.0f} "
                                   f"failed)")
            return dataclasses.replace(record, measured=engine, clock=measurement.clock, **base)
        results = slo_results(self.slo, figures)
        try:
            values = objective_values(self.specs, figures)
        except MissingFigure as exc:
            return self._record(context, "invalid", str(exc), measured=engine, clock=measurement.clock,
                                slo=tuple(results), **base)
        broken = [r.label for r in results if not r.met]
        return self._record(
            context, "infeasible" if broken else "feasible",
            f"broke {', '.join(broken)}" if broken else None,
            objectives=tuple(values), constraints=tuple(constraint_values(results, slo=self.slo)),
            slo=tuple(results), measured=engine, clock=measurement.clock, **base,
        )

    def repeated(self, context: TrialContext, earlier: TrialRecord) -> TrialRecord:
        """A candidate measured before: the earlier trial's result told again, without deploying."""
        return dataclasses.replace(earlier, number=context.number, guided=context.guided,
                                   reused_from=earlier.reused_from if earlier.reused_from is not None
                                   else earlier.number, parallel_round=context.parallel_round,
                                   failure_probability=context.failure_probability)

    def _not_run(self, context: TrialContext, outcome: str, reason: str) -> TrialRecord:
        return self._record(
            context, outcome, reason,
            objectives=tuple(pessimistic_values(self.specs, worst_latency_s=self.worst_latency_s)),
            constraints=tuple(constraint_values(None, slo=self.slo)),
        )

    def _record(self, context: TrialContext, outcome: str, reason: str | None, **fields: Any) -> TrialRecord:
        return TrialRecord(number=context.number, candidate=context.candidate, outcome=outcome,  # type: ignore[arg-type]
                           reason=reason, predicted=context.predicted, planner=context.planner,
                           guided=context.guided, run=context.run, remeasure_of=context.remeasure_of,
                           parallel_round=context.parallel_round, failure_probability=context.failure_probability,
                           **fields)


def told_values(record: TrialRecord) -> Sequence[float] | None:
    """What Optuna is told for a record: its objective values, or None for a FAIL (invalid)."""
    return None if record.outcome == "invalid" else record.objectives
