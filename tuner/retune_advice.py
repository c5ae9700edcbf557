"""What a re-tune of a drifted class would likely find: the performance model's best configuration for the live
profile, against the class's current configuration under the same load.

Pure. The live profile becomes the model's workload (the mean requests in flight as its closed-loop users, the
measured mean and p99 lengths); the candidates are the class's search space on the GPUs a re-tune may use
(:func:`tuner.space.build_space`), ranked as a study's first trials are (:func:`tuner.prior.rank_candidates`).
The gain is a prediction, said as one: the re-tune measures, and :func:`tuner.guard_rails.judge` decides on the
measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.config import TpgateConfig
from gateway.errors import UserError
from tuner.drift import figure
from tuner.live_profile import LiveProfile
from tuner.objectives import ObjectiveSpec, objective_specs
from tuner.prior import WorkloadShape, rank_candidates
from tuner.space import Candidate, build_space

NOTHING_BETTER_RATIO = 0.005  # a predicted gain below half a percent is no gain


@dataclass(frozen=True)
class PredictedGain:
    """The model's best candidate and the current configuration, in the class's first objective."""

    current: Candidate
    best: Candidate
    objective: ObjectiveSpec
    current_value: float
    best_value: float

    @property
    def gain_ratio(self) -> float:
        """Relative improvement of the best over the current (positive is better, whichever the direction)."""
        if self.current_value == 0:
            return 0.0
        change = (self.best_value - self.current_value) / abs(self.current_value)
        return change if self.objective.direction == "maximize" else -change

    def describe(self) -> str:
        unit = self.objective.unit
        current = f"{self.objective.label} {figure(self.current_value)} {unit} for the current {self.current.label()}"
        if self.gain_ratio < NOTHING_BETTER_RATIO:
            return f"the performance model predicts nothing better than {current} within these GPUs"
        return (f"the performance model predicts {self.best.label()} at {figure(self.best_value)} {unit} against "
                f"{current} ({self.gain_ratio:+.0%})")


def workload_of(live: LiveProfile) -> WorkloadShape | None:
    """The model's workload for a live profile (None without measured lengths)."""
    prompt, output = live.prompt, live.output
    if prompt.mean is None or output.mean is None:
        return None
    return WorkloadShape(
        users=max(1, math.ceil(live.concurrency_mean or 1.0)),
        prompt_mean=max(1.0, prompt.mean), prompt_p99=max(1.0, prompt.quantiles.get(0.99, prompt.mean)),
        output_mean=max(1.0, output.mean), output_p99=max(1.0, output.quantiles.get(0.99, output.mean)),
    )


def predicted_gain(config: TpgateConfig, class_name: str, live: LiveProfile, current: Candidate, *,
                   gpus: int) -> PredictedGain | None:
    """None when the live profile has no lengths or no candidate fits ``gpus``."""
    workload = workload_of(live)
    if workload is None:
        return None
    try:
        space = build_space(config, class_name, gpus_free=gpus)
    except UserError:
        return None
    candidates = space.candidates()
    if not candidates:
        return None
    workload_class = config.classes[class_name]
    specs = objective_specs(workload_class.objectives)[:1]
    best = rank_candidates(space, candidates, workload, specs, workload_class.slo)[0]
    now = rank_candidates(space, [current], workload, specs, workload_class.slo)[0]
    return PredictedGain(current=current, best=best.candidate, objective=specs[0],
                         current_value=now.objectives[0], best_value=best.objectives[0])
