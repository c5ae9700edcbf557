"""The performance model's view of a search space: predicted figures per candidate, and the ranking that picks a
study's first trials.

Pure. :func:`gateway.planner.perf.predict` gives one replica's steady state for a closed loop of clients at
mean prompt and output lengths; a pool of ``r`` replicas gets ``users / r`` clients per replica (rounded up) and
``r`` times the throughput. Percentiles are estimated from the profile's length distributions: TTFT p99 scales
the prefill with the p99 prompt, e2e p99 adds ``(p99 output - 1)`` token gaps to it. Think times are ignored
(the model sees every user always waiting), which overstates the load of a light interactive profile; the
ranking, not the absolute figure, is what the study uses.

The guided start takes the best-ranked candidate of each TP size, then of each further pool shape (TP x
replicas), in rank order: when the model is wrong about all-reduce cost or KV-cache pressure it is wrong about
a whole TP size, so the first trials spread over them and the sampler refines replicas and knobs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from gateway.config import SloConfig
from gateway.planner.perf import Workload, predict
from loadtests.profile import Fixed, LogNormal, Profile, Uniform
from tuner.objectives import ObjectiveSpec, constraint_values, objective_values, slo_results
from tuner.space import Candidate, SearchSpace

P99 = 0.99


@dataclass(frozen=True)
class WorkloadShape:
    """What the model needs of a load profile: clients and token lengths (means and p99s)."""

    users: int
    prompt_mean: float
    prompt_p99: float
    output_mean: float
    output_p99: float

    @classmethod
    def of(cls, profile: Profile) -> WorkloadShape:
        return cls(
            users=profile.users,
            prompt_mean=max(1.0, profile.prompt_tokens.mean_value),
            prompt_p99=max(1.0, distribution_quantile(profile.prompt_tokens, P99)),
            output_mean=max(1.0, profile.output_tokens.mean_value),
            output_p99=max(1.0, distribution_quantile(profile.output_tokens, P99)),
        )


def distribution_quantile(distribution: Fixed | Uniform | LogNormal, q: float) -> float:
    """The ``q`` quantile (0-1) of a profile's length distribution, bounds applied."""
    if isinstance(distribution, Fixed):
        return distribution.value
    if isinstance(distribution, Uniform):
        return distribution.low + q * (distribution.high - distribution.low)
    mu = math.log(distribution.mean) - distribution.sigma**2 / 2
    value = max(distribution.low, math.exp(mu + NormalDist().inv_cdf(q) * distribution.sigma))
    return value if distribution.high is None else min(distribution.high, value)


def predict_figures(space: SearchSpace, candidate: Candidate, workload: WorkloadShape) -> dict[str, float | None]:
    """Predicted figures of a planner-feasible candidate, named as :class:`tuner.window.WindowFigures` fields
    (engine clock; no goodput: see :func:`rank_candidates`)."""
    per_replica = Workload(
        concurrency=max(1, math.ceil(workload.users / candidate.replicas)),
        mean_prompt_tokens=workload.prompt_mean,
        mean_output_tokens=workload.output_mean,
    )
    p = predict(space.model, space.gpu, candidate.tp, per_replica, knobs=candidate.knobs)
    prefill_s = p.ttft_s - p.queue_s
    ttft_p99_s = p.queue_s + prefill_s * workload.prompt_p99 / workload.prompt_mean
    return {
        "requests_per_s": p.requests_per_s * candidate.replicas,
        "output_tokens_per_s": p.output_tokens_per_s * candidate.replicas,
        "error_rate": 0.0,
        "ttft_p50_s": p.ttft_s,
        "ttft_p99_s": ttft_p99_s,
        "tpot_p50_s": p.tpot_s,
        "tpot_p99_s": p.tpot_s,
        "e2e_p50_s": p.e2e_latency_s,
        "e2e_p99_s": ttft_p99_s + (workload.output_p99 - 1) * p.tpot_s,
        "running_batch": float(p.running_batch),
    }


@dataclass(frozen=True)
class Ranked:
    """A candidate with its predicted figures, objective values and predicted SLO verdict."""

    candidate: Candidate
    predicted: Mapping[str, Any]
    objectives: tuple[float, ...]
    slo_violation: float  # sum of the predicted constraint violations (0: every SLO predicted met)


def rank_candidates(
    space: SearchSpace,
    candidates: Sequence[Candidate],
    workload: WorkloadShape,
    specs: Sequence[ObjectiveSpec],
    slo: SloConfig,
) -> list[Ranked]:
    """Candidates best first: those predicted to meet every SLO, by the first objective (the others break
    ties), then the rest by how far they miss. Predicted goodput is the predicted request rate when every SLO
    is predicted met, else 0."""
    ranked = []
    for candidate in candidates:
        predicted: dict[str, Any] = predict_figures(space, candidate, workload)
        violation = sum(max(0.0, c) for c in constraint_values(slo_results(slo, predicted), slo=slo))
        predicted["goodput_requests_per_s"] = predicted["requests_per_s"] if violation == 0 else 0.0
        ranked.append(Ranked(candidate, predicted, tuple(objective_values(specs, predicted)), violation))

    def key(r: Ranked) -> tuple[float, ...]:
        signed = [v if spec.direction == "minimize" else -v for spec, v in zip(specs, r.objectives, strict=True)]
        return (r.slo_violation, *signed)

    return sorted(ranked, key=key)


def guided_picks(ranked: Sequence[Ranked], count: int) -> list[Ranked]:
    """At most ``count`` first trials, in rank order: the best-ranked candidate of each TP size first, then of
    each further pool shape (TP x replicas). TP sizes come first because the model's likeliest error is the
    cost of tensor parallelism itself (all-reduce, kernel efficiency at small shards), which moves the optimum
    from one TP size to another; replica counts and knobs are what the sampler refines."""
    chosen: dict[int, Ranked] = {}  # position in ``ranked`` -> pick
    for key in (lambda r: r.candidate.tp, lambda r: r.candidate.shape):
        seen = {key(r) for r in chosen.values()}
        for position, r in enumerate(ranked):
            if len(chosen) >= count:
                break
            if key(r) not in seen:
                seen.add(key(r))
                chosen[position] = r
    return [chosen[position] for position in sorted(chosen)]
