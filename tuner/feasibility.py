"""Hidden constraints: which configurations fail to start or crash, learned from the study's own trials.

Pure. The planner rejects what it can see (heads not divisible, weights or one session's KV cache not fitting);
what it cannot see — an engine that runs out of memory at start-up for its activations, a kernel that does not
support a shape, a crash under load — shows only when a configuration is deployed. Such failures cluster: the
neighbours of a configuration that ran out of memory (one more step of ``max_batch_size`` or of the KV-cache
share) are likely to as well. So the study keeps a model of the probability that a configuration fails, fitted
on every configuration it deployed, and does not deploy one the model gives a probability above
``tuning.max_failure_probability`` (SCOOT's probability-of-feasibility filter, WWW 2025).

The model is a kernel estimate over the configurations' positions in the search space. Each parameter is an
ordered axis (TP sizes, replica counts and every knob's values, ascending); the distance between two
configurations counts the steps between their positions along each axis, a replica step weighing
:data:`REPLICA_STEP_WEIGHT` (an engine's memory does not depend on how many replicas run). A deployed
configuration at distance ``d`` weighs ``DECAY ** d``, and::

    p_fail(x) = sum(w_i * failed_i) / (PRIOR_WEIGHT + sum(w_i))

with no failure anywhere near, ``p_fail`` is 0; one failure one step away gives exactly ``1/2`` (just not
avoided at the default threshold of 0.5), two failures one step away ``2/3``, and one failure beside a
configuration that ran, both one step away, ``1/3``. A configuration at distance 0 of a failure (the same
engine, another replica count) gets ``0.7/1.2 = 0.59``. Only deployments count: a configuration the model
avoided teaches it nothing, so its predictions never feed on themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tuner.space import KNOB_NAMES, Candidate, SearchSpace

DECAY = 0.5  # the weight of a deployed configuration halves with every step away
PRIOR_WEIGHT = 0.5  # pseudo-observations of "runs" at every configuration
REPLICA_STEP_WEIGHT = 0.5  # one more replica is half a step (placement, not the engine's memory)


@dataclass(frozen=True)
class Deployment:
    """A configuration the study deployed, and whether it failed (could not be placed, crashed, timed out)."""

    number: int  # the trial's number
    candidate: Candidate
    failed: bool


@dataclass(frozen=True)
class FailureEstimate:
    """The model's verdict on one configuration: the probability of failing and the failures behind it."""

    probability: float
    failed_neighbours: tuple[int, ...]  # trial numbers of the nearest failures, nearest first

    def explain(self) -> str:
        """``predicted to fail (p 0.67: near failed trials #4, #6)``."""
        like = ", ".join(f"#{n}" for n in self.failed_neighbours)
        trials = "trials" if len(self.failed_neighbours) > 1 else "trial"
        return f"predicted to fail (p {self.probability:.2f}: near failed {trials} {like})"


class FeasibilityModel:
    """The probability that a configuration of ``space`` fails, from the study's deployments."""

    def __init__(self, space: SearchSpace, deployments: Sequence[Deployment] = ()) -> None:
        self._axes: dict[str, tuple[float, ...]] = {
            "tp": tuple(sorted(space.tp_sizes)),
            **{name: tuple(sorted(float(v) for v in space.knob_choices[name])) for name in KNOB_NAMES},
        }
        self._deployments = list(deployments)

    def add(self, deployment: Deployment) -> None:
        self._deployments.append(deployment)

    @property
    def failures(self) -> int:
        return sum(d.failed for d in self._deployments)

    def distance(self, a: Candidate, b: Candidate) -> float:
        """Steps between two configurations (see the module's docstring)."""
        steps = REPLICA_STEP_WEIGHT * abs(a.replicas - b.replicas)
        pa, pb = a.params(), b.params()
        for name, axis in self._axes.items():
            steps += abs(_position(axis, float(pa[name])) - _position(axis, float(pb[name])))
        return steps

    def estimate(self, candidate: Candidate) -> FailureEstimate:
        """The probability that ``candidate`` fails, and the failed trials nearest to it."""
        if not any(d.failed for d in self._deployments):
            return FailureEstimate(0.0, ())
        weighted = [(self.distance(candidate, d.candidate), d) for d in self._deployments]
        total = sum(DECAY**distance for distance, _ in weighted)
        failed = sum(DECAY**distance for distance, d in weighted if d.failed)
        nearest = sorted(((distance, d.number) for distance, d in weighted if d.failed))[:3]
        return FailureEstimate(failed / (PRIOR_WEIGHT + total), tuple(number for _, number in nearest))


def _position(axis: Sequence[float], value: float) -> float:
    """The index of ``value`` on an ordered axis; a value off the axis sits between its neighbours."""
    for index, point in enumerate(axis):
        if value <= point:
            if value == point or index == 0:
                return float(index)
            below = axis[index - 1]
            return index - 1 + (value - below) / (point - below)
    return float(len(axis) - 1)
