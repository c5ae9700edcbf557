"""Automatic re-tuning of a drifted class: what ``drift.classes.<class>.mode: auto`` does once the guard rails say
``retune``.

1. An online study of the class on the GPUs the decision names, with the class's **live profile** as the trials'
   load (fitted exactly as ``tpgate profile`` fits it, put into the engines' clock), and the class's **current
   configuration measured first** under that same load (where it fits those GPUs), then — the warm start — the
   winners of the class's earlier studies, newest first (those that still fit the GPUs and knobs; their old
   figures were measured under another load, so they are measured again), then the performance model's picks for
   the live profile, then the sampler.
2. The study's best other feasible configuration is **judged** against that measurement of the current one
   (:func:`tuner.guard_rails.judge`, with the class's ``margin_ratio``): nothing clearly better keeps what runs.
3. A clearly better winner goes through the gateway's normal **staged, SLO-guarded promotion**; the re-tune ends
   when the promotion has succeeded or rolled back.

The gateway is reached through :class:`RetuneBackend` (the admin API: :class:`tuner.admin_http.AdminHttp`), so
the orchestration is tested with a stand-in backend and no network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.config import TpgateConfig
from tuner.guard_rails import judge
from tuner.live_profile import LiveProfile
from tuner.objectives import objective_specs
from tuner.profile_fit import load_profile_data
from tuner.records import TrialRecord, best_records
from tuner.space import Candidate

POLL_S = 1.0
TRIAL_MAX_REQUESTS = 1_000_000  # the trial's warm-up and window bound it, not a request count
WARM_START_WINNERS = 3  # earlier studies' winners measured after the current configuration

RetuneResult = Literal["promoted", "kept", "rolled_back", "failed"]


class RetuneBackend(Protocol):
    """What a re-tune needs of the gateway (the admin API's tuning and promotion routes)."""

    async def start_study(self, request: Mapping[str, Any]) -> dict[str, Any]: ...

    async def studies(self) -> list[dict[str, Any]]: ...

    async def study(self, study_id: str) -> dict[str, Any]: ...

    async def promote(self, study_id: str, *, trial: int) -> dict[str, Any]: ...

    async def promotion(self, promotion_id: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RetuneOutcome:
    """How a re-tune ended: ``promoted`` (the winner serves the class), ``kept`` (nothing clearly better, or
    nothing measured), ``rolled_back`` (the promotion's checks failed), ``failed`` (the study failed)."""

    result: RetuneResult
    reason: str
    study_id: str | None = None
    promotion_id: str | None = None
    winner: str | None = None  # the promoted configuration's label


def study_profile(live: LiveProfile, *, time_scale: float) -> dict[str, Any]:
    """The live profile (wall clock) as the study's load profile, in the engines' clock: the arrival rate
    ``/ time_scale`` (the tuner puts it back into wall time for each trial); lengths, stream and api as fitted."""
    data = load_profile_data(live, name=f"{live.class_name}-retune")
    data["arrival"] = {"kind": "open", "rate_per_s": data["arrival"]["rate_per_s"] / time_scale}
    data["max_requests"] = TRIAL_MAX_REQUESTS
    return data


def earlier_winners(studies: Sequence[Mapping[str, Any]], class_name: str, current: Candidate, *,
                    limit: int = WARM_START_WINNERS) -> list[Candidate]:
    """The best feasible configuration of each earlier study of the class (as ``GET /admin/tuning`` lists them),
    newest study first, without the current configuration or repeats; at most ``limit``."""
    winners: list[Candidate] = []
    for study in sorted(studies, key=lambda s: s.get("started_unix_s") or 0.0, reverse=True):
        best = study.get("best")
        if study.get("class") != class_name or not best or best.get("outcome") != "feasible":
            continue
        candidate = Candidate.from_params(best["params"])
        if candidate != current and candidate not in winners:
            winners.append(candidate)
    return winners[:limit]


def described_record(raw: Mapping[str, Any]) -> TrialRecord:
    """A trial as the admin API describes it, as a record :func:`judge` reads (configuration, outcome,
    objectives)."""
    objectives = raw.get("objectives")
    return TrialRecord(number=int(raw["number"]), candidate=Candidate.from_params(raw["params"]),
                       outcome=raw["outcome"], reason=raw.get("reason"),
                       objectives=None if objectives is None else tuple(float(v) for v in objectives))


def choose(trials: Sequence[Mapping[str, Any]], current: Candidate, config: TpgateConfig, class_name: str, *,
           margin_ratio: float) -> tuple[TrialRecord | None, str]:
    """The trial to promote (None: keep the current configuration) and why, from a finished re-tune study's
    trials: the current configuration's measurement against the best other feasible trial."""
    specs = objective_specs(config.classes[class_name].objectives)
    records = [described_record(t) for t in trials]
    measured_now = [r for r in records if r.candidate == current and r.outcome != "rejected"]
    if not measured_now:
        return None, (f"keep: the current configuration {current.label()} was not measured under the live load "
                      "(it does not fit the re-tune's GPUs or knobs)")
    now = measured_now[0]
    others = [r for r in records if r.candidate != current and r.outcome == "feasible" and r.objectives is not None]
    if not others:
        return None, "keep: no other configuration met every SLO under the live load"
    best = best_records(others, specs)[0]
    judgement = judge(now, best, specs, margin_ratio=margin_ratio)
    return (best if judgement.switch else None), judgement.reason


class Retuner:
    """Runs one class's re-tune through a :class:`RetuneBackend` (see the module's description)."""

    def __init__(self, config: TpgateConfig, backend: RetuneBackend, *, seed: int | None = None,
                 say: Callable[[str], None] = lambda line: None, poll_s: float = POLL_S) -> None:
        self._config = config
        self._backend = backend
        self._seed = seed
        self._say = say
        self._poll_s = poll_s

    async def retune(self, class_name: str, live: LiveProfile, *, gpus: int, current: Candidate) -> RetuneOutcome:
        """Study, judge, and promote a clearly better winner; returns when the promotion has ended."""
        settings = self._config.drift.classes[class_name]
        warm = earlier_winners(await self._backend.studies(), class_name, current)
        request: dict[str, Any] = {
            "class": class_name, "trials": settings.retune_trials, "max_gpus": gpus,
            "first": [current.params(), *(c.params() for c in warm)],
            "profile": study_profile(live, time_scale=self._config.engine.time_scale),
        }
        if settings.retune_timeout_s is not None:
            request["timeout_s"] = settings.retune_timeout_s
        if self._seed is not None:
            request["seed"] = self._seed
        study = await self._backend.start_study(request)
        study_id = str(study["id"])
        self._say(f"class {class_name}: re-tune study {study_id} on up to {study['gpus']} GPUs, "
                  f"{settings.retune_trials} trials, the current {current.label()} measured first"
                  + (f", then earlier winners {', '.join(c.label() for c in warm)}" if warm else ""))
        detail = await self._wait_study(study_id)
        if detail["state"] != "completed":
            return RetuneOutcome("failed", f"study {study_id} {detail['state']}: {detail.get('reason')}", study_id)
        chosen, reason = choose(detail["trial_records"], current, self._config, class_name,
                                margin_ratio=settings.margin_ratio)
        self._say(f"class {class_name}: study {study_id}: {reason}")
        if chosen is None:
            return RetuneOutcome("kept", reason, study_id)
        promotion = await self._backend.promote(study_id, trial=chosen.number)
        promotion_id = str(promotion["id"])
        self._say(f"class {class_name}: promotion {promotion_id} to {chosen.candidate.label()}")
        ended = await self._wait_promotion(promotion_id)
        if ended["phase"] == "succeeded":
            return RetuneOutcome("promoted", f"{reason}; promoted", study_id, promotion_id, chosen.candidate.label())
        return RetuneOutcome("rolled_back", f"{reason}; the promotion rolled back: {ended.get('reason')}", study_id,
                             promotion_id, chosen.candidate.label())

    async def _wait_study(self, study_id: str) -> dict[str, Any]:
        while True:
            detail = await self._backend.study(study_id)
            if detail["state"] != "running":
                return detail
            await asyncio.sleep(self._poll_s)

    async def _wait_promotion(self, promotion_id: str) -> dict[str, Any]:
        while True:
            promotion = await self._backend.promotion(promotion_id)
            if promotion["phase"] in ("succeeded", "rolled_back"):
                return promotion
            await asyncio.sleep(self._poll_s)
