"""Objectives and SLO constraints of a workload class, over a trial's figures (measured or predicted).

Pure. A class names one objective or several (``objective: [max_goodput, min_e2e_p99]``: a multi-objective study
with a Pareto front). Its SLOs become Optuna constraints, one value per SLO where ``<= 0`` is met, so a
configuration that breaks one is infeasible rather than merely bad:

- latency SLOs: ``measured / limit - 1`` (0.2 = 20 % over the limit);
- the error-rate SLO: ``(measured - limit) / max(limit, 0.001)``;
- a figure that could not be measured (no successful request) breaks its SLO with 1.0.

Every study's constraint vector starts with a ``deployed`` entry: 0 for a configuration that ran, 1 for one the
planner rejected or that failed to deploy or crashed, so the sampler learns where configurations do not run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gateway.config import SloConfig

Direction = Literal["minimize", "maximize"]
ERROR_RATE_FLOOR = 1e-3
UNMEASURED_VIOLATION = 1.0


class MissingFigure(ValueError):
    """An objective's figure was not measured (e.g. goodput without the gateway's SLO counter)."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective: the figure it reads and which way is better."""

    name: str
    figure: str  # a WindowFigures field
    direction: Direction
    label: str
    unit: str

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "minimize" else a > b


OBJECTIVES: dict[str, ObjectiveSpec] = {
    spec.name: spec
    for spec in (
        ObjectiveSpec("min_e2e_p99", "e2e_p99_s", "minimize", "e2e p99", "s"),
        ObjectiveSpec("max_output_tokens_per_s", "output_tokens_per_s", "maximize", "output tokens/s", "tok/s"),
        ObjectiveSpec("max_goodput", "goodput_requests_per_s", "maximize", "goodput", "req/s"),
    )
}

# SloConfig field -> (figure it limits, label)
SLO_FIGURES: dict[str, tuple[str, str]] = {
    "ttft_p99_s": ("ttft_p99_s", "TTFT p99"),
    "tpot_p99_s": ("tpot_p99_s", "TPOT p99"),
    "e2e_p99_s": ("e2e_p99_s", "e2e p99"),
    "error_rate_max": ("error_rate", "error rate"),
}


def objective_specs(names: Sequence[str]) -> tuple[ObjectiveSpec, ...]:
    """The specs of ``names``; ValueError naming an unknown one."""
    unknown = [name for name in names if name not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective(s) {unknown} (known: {', '.join(OBJECTIVES)})")
    return tuple(OBJECTIVES[name] for name in names)


def objective_values(specs: Sequence[ObjectiveSpec], figures: Mapping[str, Any]) -> list[float]:
    """The objective values of a trial's figures; MissingFigure when one was not measured."""
    values = []
    for spec in specs:
        value = figures.get(spec.figure)
        if value is None or not math.isfinite(value):
            raise MissingFigure(f"{spec.label} ({spec.figure}) was not measured")
        values.append(float(value))
    return values


def pessimistic_values(specs: Sequence[ObjectiveSpec], *, worst_latency_s: float) -> list[float]:
    """Values told for a configuration that served nothing: no throughput, and latency as bad as a request
    that timed out (``worst_latency_s``, engine clock). Bounded, so model-based samplers keep a sane scale."""
    return [worst_latency_s if spec.direction == "minimize" else 0.0 for spec in specs]


@dataclass(frozen=True)
class SloResult:
    """One SLO of a trial: its limit, what was measured (or predicted), and the constraint value."""

    name: str  # the SloConfig field, e.g. "ttft_p99_s"
    label: str
    limit: float
    measured: float | None
    met: bool
    constraint: float  # <= 0 when met

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SloResult:
        return cls(**data)


def slo_names(slo: SloConfig) -> list[str]:
    """The configured SLOs, in a fixed order (the order of the constraint vector after ``deployed``)."""
    return [name for name in SLO_FIGURES if getattr(slo, name) is not None]


def slo_results(slo: SloConfig, figures: Mapping[str, Any]) -> list[SloResult]:
    """Each configured SLO judged on ``figures``."""
    results = []
    for name in slo_names(slo):
        figure, label = SLO_FIGURES[name]
        limit = float(getattr(slo, name))
        measured = figures.get(figure)
        if measured is None or not math.isfinite(measured):
            results.append(SloResult(name, label, limit, None, met=False, constraint=UNMEASURED_VIOLATION))
            continue
        scale = max(limit, ERROR_RATE_FLOOR) if name == "error_rate_max" else limit
        constraint = (measured - limit) / scale
        results.append(SloResult(name, label, limit, float(measured), met=constraint <= 0, constraint=constraint))
    return results


def constraint_values(results: Sequence[SloResult] | None, *, slo: SloConfig) -> list[float]:
    """The Optuna constraint vector: ``[deployed, *SLOs]``. ``results`` None: the configuration did not run
    (rejected, failed): ``deployed`` is violated and the SLOs, unknown, are left at 0."""
    if results is None:
        return [1.0] + [0.0] * len(slo_names(slo))
    return [0.0] + [r.constraint for r in results]


def pareto_front(points: Sequence[Sequence[float]], specs: Sequence[ObjectiveSpec]) -> list[int]:
    """Indices of the points no other point dominates (better or equal in every objective, better in one)."""

    def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
        no_worse = all(not spec.better(y, x) for spec, x, y in zip(specs, a, b, strict=True))
        return no_worse and any(spec.better(x, y) for spec, x, y in zip(specs, a, b, strict=True))

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
