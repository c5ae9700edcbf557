"""Guard rails of the closed loop, as pure policy: may a drifted class be re-tuned now, and does a re-tune's
winner replace the class's current configuration?

:func:`decide` reads the class's drift verdict and the facts around it and answers ``retune`` (mode ``auto``),
``advise`` (mode ``advisory``: what ``auto`` would do, and why) or ``hold``, with the reason. The rails, in order:

1. drift watching off for the class → hold;
2. the class has not drifted → hold;
3. a promotion or rollback of the class (or a study of it) is in progress → hold: one change at a time;
4. the class was re-tuned less than ``min_retune_interval_s`` ago → hold;
5. the GPUs a re-tune may use — the free GPUs, at most ``max_gpus`` — cannot hold the smallest pool the planner
   accepts for the model → hold.

Otherwise a re-tune on that many GPUs (``advise`` in advisory mode).

:func:`judge` compares two measured records of the same load (the current configuration's and a re-tune's
winner's): the winner replaces the current configuration only when it meets every SLO and is better by at least
``margin_ratio`` in one objective and worse in none — or when the current configuration breaks an SLO under the
load and the winner does not. Anything less keeps what runs: a re-tune that finds nothing clearly better
changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.config import DriftClassConfig, TpgateConfig
from gateway.planner import find_gpu, load_model, plan
from tuner.objectives import ObjectiveSpec
from tuner.records import TrialRecord

Action = Literal["retune", "advise", "hold"]


@dataclass(frozen=True)
class RetuneFacts:
    """What the rails read besides the configuration. Seconds; GPU counts."""

    drifted: bool
    drift_reason: str
    since_last_retune_s: float | None  # None: never re-tuned
    in_progress: str | None  # a promotion, rollback or study of the class that runs now (what it is), or None
    free_gpus: int
    min_pool_gpus: int  # GPUs of the smallest pool the planner accepts for the model


@dataclass(frozen=True)
class RetuneDecision:
    action: Action
    reason: str
    gpus: int = 0  # GPUs the re-tune may use (retune and advise)


def decide(facts: RetuneFacts, config: DriftClassConfig) -> RetuneDecision:
    """The rails above, in order; the first that holds gives the reason."""
    if config.mode == "off":
        return RetuneDecision("hold", "drift watching is off for the class")
    if not facts.drifted:
        return RetuneDecision("hold", f"not drifted ({facts.drift_reason})")
    if facts.in_progress is not None:
        return RetuneDecision("hold", f"{facts.in_progress} is in progress; one change of the class at a time")
    if facts.since_last_retune_s is not None and facts.since_last_retune_s < config.min_retune_interval_s:
        return RetuneDecision(
            "hold", f"re-tuned {_duration(facts.since_last_retune_s)} ago; at most one re-tune every "
                    f"{_duration(config.min_retune_interval_s)}")
    gpus = facts.free_gpus if config.max_gpus is None else min(facts.free_gpus, config.max_gpus)
    if gpus < facts.min_pool_gpus:
        cap = "" if config.max_gpus is None else f", at most {config.max_gpus} for a re-tune"
        return RetuneDecision(
            "hold", f"{facts.free_gpus} GPUs free{cap}: too few for the smallest pool ({facts.min_pool_gpus} GPUs)")
    if config.mode == "advisory":
        return RetuneDecision("advise", f"would re-tune on {gpus} GPUs: {facts.drift_reason}", gpus)
    return RetuneDecision("retune", f"re-tune on {gpus} GPUs: {facts.drift_reason}", gpus)


@dataclass(frozen=True)
class Judgement:
    """``switch``: the candidate replaces the current configuration. ``gains``: per objective, the candidate's
    relative improvement over the current one (positive is better, whichever the direction)."""

    switch: bool
    reason: str
    gains: tuple[float, ...] = ()


def judge(current: TrialRecord, candidate: TrialRecord, specs: Sequence[ObjectiveSpec], *,
          margin_ratio: float) -> Judgement:
    """Keep the current configuration unless the candidate is clearly better (see the module's description)."""
    if candidate.outcome != "feasible" or candidate.objectives is None:
        return Judgement(False, f"keep: the candidate {candidate.candidate.label()} is {candidate.outcome}")
    if current.outcome != "feasible" or current.objectives is None:
        return Judgement(True, f"switch: the current configuration is {current.outcome} under this load and "
                               f"{candidate.candidate.label()} meets every SLO")
    gains = tuple(_gain(spec, now, then) for spec, now, then in
                  zip(specs, candidate.objectives, current.objectives, strict=True))
    described = ", ".join(f"{spec.label} {gain:+.1%}" for spec, gain in zip(specs, gains, strict=True))
    if min(gains) < 0:
        return Judgement(False, f"keep: {candidate.candidate.label()} is worse in one objective ({described})",
                         gains)
    if max(gains) < margin_ratio:
        return Judgement(False, f"keep: {candidate.candidate.label()} is not better by the {margin_ratio:.0%} "
                                f"margin ({described})", gains)
    return Judgement(True, f"switch: {candidate.candidate.label()} is better ({described})", gains)


def _gain(spec: ObjectiveSpec, candidate: float, current: float) -> float:
    if current == 0:
        return 0.0 if candidate == current else (1.0 if spec.better(candidate, current) else -1.0)
    change = (candidate - current) / abs(current)
    return change if spec.direction == "maximize" else -change


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def smallest_pool_gpus(config: TpgateConfig) -> int:
    """GPUs of the smallest pool the planner accepts for the configured model and GPU (one replica of the
    smallest feasible TP, default knobs); more than the budget when none is feasible."""
    gpu = find_gpu(config.gpu, config.catalog())
    verdicts = plan(load_model(config.model), gpu, gpus=config.gpus, gpus_per_node=config.node_size)
    feasible = [verdict.tp for verdict in verdicts if verdict.feasible]
    return min(feasible) if feasible else config.gpus + 1
