"""The record of one trial, stored with the Optuna trial (``user_attrs``) and read back by reports and reruns.

Pure. One JSON-safe mapping per trial under :data:`RECORD_ATTR` (non-finite numbers become None). The study
driver also gives Optuna the constraint values (``Trial.set_constraint``), which is what samplers read.

Outcomes:

- ``feasible``: measured, every SLO met;
- ``infeasible``: measured, an SLO broken;
- ``rejected``: the planner refused the combination; never deployed;
- ``failed``: deployed but could not be measured (cannot be placed, engine crashed, not ready in time, load
  failed); told to the sampler as infeasible, like ``rejected``;
- ``invalid``: measured, but the measurement cannot be trusted (a simulated clock lagging beyond tolerance);
  told to Optuna as FAIL, so the sampler ignores it;
- ``avoided``: never deployed, because configurations near it failed (the feasibility model of
  :mod:`tuner.feasibility` gives it too high a probability of failing); told as infeasible with that probability.

A configuration can be measured more than once (:mod:`tuner.standings`): ``run`` counts its runs (0 first, each
with another load seed) and ``remeasure_of`` names the trial of its first run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tuner.objectives import ObjectiveSpec, SloResult, pareto_front
from tuner.space import Candidate
from tuner.timescale import ClockCheck
from tuner.window import WindowFigures

RECORD_ATTR = "tpgate_record"
Outcome = Literal["feasible", "infeasible", "rejected", "failed", "invalid", "avoided"]
OUTCOMES: tuple[Outcome, ...] = ("feasible", "infeasible", "rejected", "failed", "invalid", "avoided")
MEASURED_OUTCOMES = ("feasible", "infeasible")


@dataclass(frozen=True)
class TrialRecord:
    """Everything known about one trial. Figures in ``measured`` are in the engines' clock."""

    number: int
    candidate: Candidate
    outcome: Outcome
    reason: str | None = None
    pool_id: str | None = None
    route: str | None = None
    objectives: tuple[float, ...] | None = None  # the values told to Optuna (None for an invalid trial)
    constraints: tuple[float, ...] = ()
    slo: tuple[SloResult, ...] = ()
    predicted: Mapping[str, float | None] = field(default_factory=dict)
    measured: WindowFigures | None = None
    clock: ClockCheck | None = None
    source: str | None = None  # "prometheus" or "scrape"
    planner: Mapping[str, float] = field(default_factory=dict)  # weights and KV cache per GPU (bytes), tokens
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds, and the window's Unix start/end
    guided: bool = False  # one of the performance model's first picks
    reused_from: int | None = None  # a repeated configuration: the trial whose measurement was told again
    run: int = 0  # which run of the configuration (0: its first; n: the n-th re-measurement, load seed + n)
    remeasure_of: int | None = None  # a re-measurement: the trial of the configuration's first run
    parallel_round: int | None = None  # the round of trials measured at once it ran in (tuning.parallel_trials)
    failure_probability: float | None = None  # the feasibility model's estimate when the trial was asked

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {self.outcome!r}")

    @property
    def measured_ok(self) -> bool:
        """Deployed and measured (feasible or infeasible)."""
        return self.outcome in MEASURED_OUTCOMES

    def to_attrs(self) -> dict[str, Any]:
        """JSON-safe user attributes of the Optuna trial."""
        record = {
            "number": self.number,
            "params": self.candidate.params(),
            "label": self.candidate.label(),
            "gpus": self.candidate.gpus,
            "outcome": self.outcome,
            "reason": self.reason,
            "pool_id": self.pool_id,
            "route": self.route,
            "objectives": None if self.objectives is None else list(self.objectives),
            "constraints": list(self.constraints),
            "slo": [r.as_dict() for r in self.slo],
            "predicted": dict(self.predicted),
            "measured": None if self.measured is None else self.measured.as_dict(),
            "clock": None if self.clock is None else self.clock.as_dict(),
            "source": self.source,
            "planner": dict(self.planner),
            "timings": dict(self.timings),
            "guided": self.guided,
            "reused_from": self.reused_from,
            "run": self.run,
            "remeasure_of": self.remeasure_of,
            "parallel_round": self.parallel_round,
            "failure_probability": self.failure_probability,
        }
        return {RECORD_ATTR: json_safe(record)}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> TrialRecord:
        """Read a record back from a trial's user attributes; KeyError when the trial has none."""
        data = attrs[RECORD_ATTR]
        clock = data.get("clock")
        return cls(
            number=int(data["number"]),
            candidate=Candidate.from_params(data["params"]),
            outcome=data["outcome"],
            reason=data.get("reason"),
            pool_id=data.get("pool_id"),
            route=data.get("route"),
            objectives=None if data.get("objectives") is None else tuple(data["objectives"]),
            constraints=tuple(data.get("constraints") or ()),
            slo=tuple(SloResult.from_dict(r) for r in data.get("slo") or ()),
            predicted=dict(data.get("predicted") or {}),
            measured=None if data.get("measured") is None else WindowFigures.from_dict(data["measured"]),
            clock=None if clock is None else ClockCheck(**{**clock, "restarted": tuple(clock.get("restarted", ()))}),
            source=data.get("source"),
            planner=dict(data.get("planner") or {}),
            timings=dict(data.get("timings") or {}),
            guided=bool(data.get("guided", False)),
            reused_from=data.get("reused_from"),
            run=int(data.get("run") or 0),
            remeasure_of=data.get("remeasure_of"),
            parallel_round=data.get("parallel_round"),
            failure_probability=data.get("failure_probability"),
        )


def best_records(records: Sequence[TrialRecord], specs: Sequence[ObjectiveSpec]) -> list[TrialRecord]:
    """The best single trials among feasible measured ones: the best one for one objective (the earliest of
    equals), the Pareto front for several. Repeats of a configuration are not counted twice. A study's winners
    rank configurations by their worst run instead (:func:`tuner.standings.best_of`)."""
    feasible = [r for r in records if r.outcome == "feasible" and r.reused_from is None and r.objectives]
    if not feasible:
        return []
    if len(specs) == 1:
        best = feasible[0]
        for record in feasible[1:]:
            if specs[0].better((record.objectives or ())[0], (best.objectives or ())[0]):
                best = record
        return [best]
    return [feasible[i] for i in pareto_front([r.objectives or () for r in feasible], specs)]


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, tuples by lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
