"""Staged promotion of a workload class to a new pool: a pure state machine.

A promotion moves one class from the pools its route names now (the *old* pools, with their weights) to one
new pool (the *candidate*, e.g. a tuning study's winner):

1. **starting** — the candidate is deployed with as many replicas as the free GPUs hold (all of them when the
   budget holds both) and the promotion waits until they are ready;
2. **shifting** — at step ``i`` the candidate gets ``steps[i]`` of the class's traffic (the old pools share the
   rest in their old proportions); once the candidate's replicas for that step are ready, a window opens, and
   the candidate is judged on it (:mod:`gateway.control.promotion_analysis`) every check: a failed check rolls
   back at once; after ``dwell_s`` a passed check moves on; too few requests hold the step ("inconclusive")
   until ``max_inconclusive_s``, then roll back;
3. **finishing** — the last step (100 %) passed: the old pools leave (drained, then deleted) and the candidate
   grows to its full size; then **succeeded**;
4. a failed check, a candidate that fails or is not ready in time, or an operator's abort: **rolled_back** — the
   old weights at once, the candidate drained and removed, the old pools back to their size.

**Making room.** When the GPU budget cannot hold both, the candidate starts smaller and the old pools give up
replicas as it grows, one at a time, never below the share of their replicas that their share of the traffic
needs (``ceil((1 - w) x replicas)``, and at least one until the end, so a rollback always has somewhere to go).
So the class never drops below its serving capacity: each side keeps replicas in proportion to its traffic.

Pure: :func:`advance` takes a promotion and what the driver observed (plain values, wall-clock Unix seconds,
since promotions persist across restarts) and returns the next promotion with the actions for the driver
(:class:`SetPool`, :class:`SetWeights`, :class:`RemovePool`, :class:`OpenWindow`) and the events to record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from gateway.control.promotion_analysis import Verdict
from gateway.control.state import PoolSpec, StateError, pool_from_dict, pool_to_dict

Phase = Literal["starting", "shifting", "finishing", "succeeded", "rolled_back"]
TERMINAL_PHASES: frozenset[str] = frozenset({"succeeded", "rolled_back"})


class PromotionConflict(StateError):
    """A promotion cannot start or an action is refused now (another promotion of the class, no room)."""


class UnknownPromotion(StateError):
    """No promotion has that id."""


@dataclass(frozen=True)
class PromotionPolicy:
    """How a promotion shifts and judges (``promotion:`` in the configuration, and the class's SLOs). Seconds are
    wall-clock; SLO latencies are in the engine's clock. ``judge`` False: an operator's rollback to a known
    configuration, which moves in one step without analysis."""

    steps: tuple[float, ...] = (0.1, 0.5, 1.0)
    dwell_s: float = 30.0
    min_requests: int = 20
    max_inconclusive_s: float = 120.0
    ready_timeout_s: float = 600.0
    max_latency_ratio: float = 1.5
    error_rate_max: float = 0.01
    max_5xx: int = 5
    check_period_s: float = 2.0
    ttft_p99_s: float | None = None
    tpot_p99_s: float | None = None
    judge: bool = True

    def __post_init__(self) -> None:
        if not self.steps or any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)) \
                or self.steps[-1] != 1 or self.steps[0] <= 0:
            raise ValueError(f"steps must increase within (0, 1] and end at 1, not {list(self.steps)}")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = list(self.steps)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromotionPolicy:
        return cls(**{**data, "steps": tuple(data["steps"])})


@dataclass(frozen=True)
class StepRecord:
    """One judged check that ended a step (passed), or the one that failed it."""

    step: int
    weight: float
    verdict: str  # pass | fail | inconclusive
    reason: str
    at_s: float
    figures: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Promotion:
    """One promotion and where it stands. Times are Unix seconds."""

    id: str
    class_name: str
    candidate: PoolSpec  # at its full size
    old_weights: Mapping[str, float]  # the class's route when the promotion began
    old_pools: Mapping[str, PoolSpec]  # its pools then, at their size then (a rollback restores them)
    policy: PromotionPolicy
    source: str  # what asked for it: "study <id>", "rollback of <id>", "api"
    created_s: float
    phase: Phase = "starting"
    step: int = -1  # index into policy.steps; -1 before the first
    waiting_since_s: float | None = None  # replicas requested then, not all ready yet (None: window open)
    window_opened_s: float | None = None  # the current step's window began then
    candidate_replicas: int = 0  # the candidate's replicas requested so far (0: not deployed yet)
    current_old_replicas: Mapping[str, int] = field(default_factory=dict)  # old pools' replicas requested now
    shared: frozenset[str] = frozenset()  # old pools another route uses too: never shrunk nor removed
    reason: str | None = None  # why it rolled back (or what is worth knowing about its success)
    history: tuple[StepRecord, ...] = ()
    updated_s: float = 0.0
    last_verdict: Mapping[str, Any] | None = None  # the latest check, for people watching

    @property
    def active(self) -> bool:
        return self.phase not in TERMINAL_PHASES

    @property
    def weight(self) -> float:
        """The candidate's current share of the class's traffic."""
        if self.phase in ("finishing", "succeeded"):
            return 1.0
        return self.policy.steps[self.step] if self.step >= 0 and self.phase == "shifting" else 0.0

    @property
    def old_replicas(self) -> dict[str, int]:
        return {pool_id: pool.replicas for pool_id, pool in self.old_pools.items()}

    @property
    def pools(self) -> set[str]:
        """Every pool the promotion manages (the candidate and the old pools)."""
        return {self.candidate.id, *self.old_weights}


@dataclass(frozen=True)
class Observation:
    """What the driver saw just now."""

    now_s: float
    free_gpus: int  # the budget minus the desired state's GPUs
    ready: Mapping[str, int]  # pool id -> routable replicas
    failures: Mapping[str, str] = field(default_factory=dict)  # pool id -> why it failed to deploy
    verdict: Verdict | None = None  # the current step's window, judged (None: no window open)


@dataclass(frozen=True)
class SetPool:
    """Deploy the pool or resize it."""

    pool: PoolSpec


@dataclass(frozen=True)
class SetWeights:
    """Set the class's route."""

    weights: Mapping[str, float]


@dataclass(frozen=True)
class RemovePool:
    """Take the pool out of every route, drain it, delete it."""

    pool_id: str


@dataclass(frozen=True)
class OpenWindow:
    """Start the current step's window at the routers' current counts."""


Action = SetPool | SetWeights | RemovePool | OpenWindow


@dataclass(frozen=True)
class Transition:
    promotion: Promotion
    actions: tuple[Action, ...] = ()
    events: tuple[tuple[str, str], ...] = ()  # (kind, message)


# --- starting ------------------------------------------------------------------------------------------------


def begin(
    *,
    promotion_id: str,
    class_name: str,
    candidate: PoolSpec,
    routes: Mapping[str, Mapping[str, float]],
    pools: Mapping[str, PoolSpec],
    free_gpus: int,
    policy: PromotionPolicy,
    source: str,
    now_s: float,
) -> Transition:
    """A new promotion of ``class_name`` (``routes`` and ``pools``: the desired state now) to ``candidate``,
    with its first actions; :class:`PromotionConflict` naming the numbers when not even one candidate replica
    can be made room for."""
    old = {pool_id: w for pool_id, w in routes.get(class_name, {}).items() if w > 0}
    if not old:
        raise PromotionConflict(f"class {class_name!r} has no pool with traffic to promote from")
    if candidate.id in pools:
        raise PromotionConflict(f"pool {candidate.id!r} exists already; a promotion brings up a new pool")
    shared = frozenset(pool_id for pool_id in old for name, weights in routes.items()
                       if name != class_name and weights.get(pool_id, 0) > 0)
    promotion = Promotion(
        id=promotion_id, class_name=class_name, candidate=candidate, old_weights=dict(old),
        old_pools={pool_id: pools[pool_id] for pool_id in old}, policy=policy, source=source, created_s=now_s,
        updated_s=now_s, current_old_replicas={pool_id: pools[pool_id].replicas for pool_id in old}, shared=shared,
    )
    grow, shrink = _make_room(promotion, free_gpus, weight=policy.steps[0])
    if grow == 0:
        room = sum((promotion.current_old_replicas[p] - _floor(promotion, p, policy.steps[0])) * pools[p].tp
                   for p in old if p not in shared)
        detail = ", ".join(f"{p} {pools[p].replicas} x tp{pools[p].tp}" + (" (shared)" if p in shared else "")
                           for p in old)
        raise PromotionConflict(
            f"no room for the new pool {candidate.id!r} ({candidate.replicas} x tp{candidate.tp}): one replica needs "
            f"{candidate.tp} GPUs, {free_gpus} are free, and the old pools ({detail}) can give up {room} while "
            f"keeping replicas for their {1 - policy.steps[0]:.0%} of the traffic at the first step; free GPUs "
            f"(remove a pool, stop a study) or promote a smaller configuration")
    actions: list[Action] = [SetPool(replace(promotion.old_pools[p], replicas=r)) for p, r in shrink.items()]
    actions.append(SetPool(replace(candidate, replicas=grow)))
    events = [("promotion.started", _started_message(promotion, grow, shrink))]
    promotion = replace(promotion, candidate_replicas=grow, waiting_since_s=now_s,
                        current_old_replicas={**promotion.current_old_replicas, **shrink})
    return Transition(promotion, tuple(actions), tuple(events))


def _started_message(p: Promotion, grow: int, shrink: Mapping[str, int]) -> str:
    c = p.candidate
    steps = " -> ".join(f"{w:.0%}" for w in p.policy.steps)
    size = f"{c.replicas} x tp{c.tp}" + (f", starting with {grow} replicas" if grow < c.replicas else "")
    made = "".join(f"; {pool} down to {r} replicas to make room" for pool, r in shrink.items())
    return (f"promotion {p.id}: class {p.class_name} from {_describe(p.old_weights)} to {c.id} ({size}) in steps "
            f"{steps} ({p.source}){made}")


# --- the state machine ---------------------------------------------------------------------------------------


def advance(p: Promotion, obs: Observation) -> Transition:
    """The next state of an active promotion, given what was observed."""
    if not p.active:
        return Transition(p)
    candidate = p.candidate.id
    if candidate in obs.failures:
        return roll_back(p, obs.now_s, f"the new pool failed: {obs.failures[candidate]}")
    if p.waiting_since_s is not None:
        return _wait_ready(p, obs)
    if p.phase == "shifting":
        return _judge(p, obs)
    return Transition(p)


def _wait_ready(p: Promotion, obs: Observation) -> Transition:
    assert p.waiting_since_s is not None
    ready = obs.ready.get(p.candidate.id, 0)
    if ready < p.candidate_replicas:
        waited_s = obs.now_s - p.waiting_since_s
        if waited_s <= p.policy.ready_timeout_s:
            return Transition(p)
        message = (f"the new pool had {ready}/{p.candidate_replicas} replicas ready after {waited_s:.0f} s "
                   f"(promotion.ready_timeout_s {p.policy.ready_timeout_s:g})")
        if p.phase == "finishing":
            return _succeed(p, obs.now_s, note=message)
        return roll_back(p, obs.now_s, message)
    if p.phase == "finishing":
        return _succeed(p, obs.now_s)
    if p.phase == "starting":
        return _enter_step(p, 0, obs)
    opened = replace(p, waiting_since_s=None, window_opened_s=obs.now_s, updated_s=obs.now_s)
    weight = p.policy.steps[p.step]
    return Transition(opened, (OpenWindow(),), (("promotion.step", (
        f"promotion {p.id}: step {p.step + 1}/{len(p.policy.steps)}: {p.candidate.id} has {weight:.0%} of class "
        f"{p.class_name} on {ready} ready replicas; judging from now")),))


def _enter_step(p: Promotion, step: int, obs: Observation) -> Transition:
    """Shift to ``steps[step]``, make room for the candidate to grow, and wait for its new replicas."""
    weight = p.policy.steps[step]
    actions: list[Action] = [SetWeights(_mix(p, weight))]
    moved = replace(p, phase="shifting", step=step, window_opened_s=None, updated_s=obs.now_s)
    grow, shrink = _make_room(moved, obs.free_gpus, weight=weight)
    actions += [SetPool(replace(p.old_pools[pool_id], replicas=r)) for pool_id, r in shrink.items()]
    events = [("promotion.step", f"promotion {p.id}: class {p.class_name} now {_describe(_mix(p, weight))}")]
    for pool_id, replicas in shrink.items():
        events.append(("promotion.room", f"promotion {p.id}: old pool {pool_id} down to {replicas} replicas to make "
                       f"room for {p.candidate.id}"))
    if grow > p.candidate_replicas:
        actions.append(SetPool(replace(p.candidate, replicas=grow)))
        events.append(("promotion.room", f"promotion {p.id}: {p.candidate.id} grows to {grow}/"
                       f"{p.candidate.replicas} replicas"))
    moved = replace(moved, candidate_replicas=grow, waiting_since_s=obs.now_s,
                    current_old_replicas={**p.current_old_replicas, **shrink})
    return Transition(moved, tuple(actions), tuple(events))


def _judge(p: Promotion, obs: Observation) -> Transition:
    verdict = obs.verdict
    if obs.ready.get(p.candidate.id, 0) == 0:
        return roll_back(p, obs.now_s, "the new pool has no ready replica left")
    if p.window_opened_s is None:
        return Transition(p)
    elapsed_s = obs.now_s - p.window_opened_s
    if not p.policy.judge:
        verdict = None
        if elapsed_s < p.policy.check_period_s:
            return Transition(p)
    elif verdict is None:
        return Transition(p)
    seen = replace(p, updated_s=obs.now_s, last_verdict=None if verdict is None else verdict.as_dict())
    weight = p.policy.steps[p.step]
    if verdict is not None and verdict.kind == "fail":
        record = StepRecord(p.step, weight, "fail", verdict.reason, obs.now_s, verdict.as_dict())
        return roll_back(replace(seen, history=(*p.history, record)), obs.now_s,
                         f"step {p.step + 1} ({weight:.0%}) failed: {verdict.reason}")
    if elapsed_s < p.policy.dwell_s and p.policy.judge:
        return Transition(seen)
    if verdict is not None and verdict.kind == "inconclusive":
        if elapsed_s < p.policy.max_inconclusive_s:
            return Transition(seen)
        record = StepRecord(p.step, weight, "inconclusive", verdict.reason, obs.now_s, verdict.as_dict())
        return roll_back(replace(seen, history=(*p.history, record)), obs.now_s,
                         f"step {p.step + 1} ({weight:.0%}) inconclusive after {elapsed_s:.0f} s "
                         f"(promotion.max_inconclusive_s {p.policy.max_inconclusive_s:g}): {verdict.reason}")
    reason = verdict.reason if verdict is not None else "moved without analysis (a rollback to a known pool)"
    record = StepRecord(p.step, weight, "pass", reason, obs.now_s, {} if verdict is None else verdict.as_dict())
    passed = replace(seen, history=(*p.history, record))
    event = ("promotion.check", f"promotion {p.id}: step {p.step + 1} ({weight:.0%}) passed: {reason}")
    if p.step + 1 < len(p.policy.steps):
        following = _enter_step(passed, p.step + 1, obs)
        return replace(following, events=(event, *following.events))
    finished = _finish(passed, obs)
    return replace(finished, events=(event, *finished.events))


def _finish(p: Promotion, obs: Observation) -> Transition:
    """The last step passed: the old pools leave, the candidate grows to its full size."""
    actions: list[Action] = [SetWeights({p.candidate.id: 1.0})]
    leaving = [pool_id for pool_id in p.old_weights if pool_id not in p.shared]
    actions += [RemovePool(pool_id) for pool_id in leaving]
    if p.candidate_replicas < p.candidate.replicas:
        actions.append(SetPool(p.candidate))
    finishing = replace(p, phase="finishing", candidate_replicas=p.candidate.replicas, waiting_since_s=obs.now_s,
                        window_opened_s=None, current_old_replicas={}, updated_s=obs.now_s)
    return Transition(finishing, tuple(actions), (("promotion.step", (
        f"promotion {p.id}: class {p.class_name} now {p.candidate.id} 100%"
        + (f"; old pools {', '.join(leaving)} draining" if leaving else ""))),))


def _succeed(p: Promotion, now_s: float, *, note: str | None = None) -> Transition:
    done = replace(p, phase="succeeded", waiting_since_s=None, reason=note, updated_s=now_s)
    return Transition(done, (), (("promotion.succeeded", f"promotion {p.id}: class {p.class_name} runs on "
                                  f"{p.candidate.id}" + (f" ({note})" if note else "")),))


def roll_back(p: Promotion, now_s: float, reason: str) -> Transition:
    """The old weights at once, the candidate drained and removed, the old pools back to their size."""
    if not p.active:
        return Transition(p)
    actions: list[Action] = [SetWeights(dict(p.old_weights))]
    if p.candidate_replicas > 0:
        actions.append(RemovePool(p.candidate.id))
    for pool_id, pool in p.old_pools.items():
        if p.current_old_replicas.get(pool_id, pool.replicas) != pool.replicas:
            actions.append(SetPool(pool))
    done = replace(p, phase="rolled_back", reason=reason, waiting_since_s=None, window_opened_s=None,
                   current_old_replicas=dict(p.old_replicas), updated_s=now_s)
    return Transition(done, tuple(actions), (("promotion.rolled_back", (
        f"promotion {p.id}: class {p.class_name} rolled back to {_describe(p.old_weights)}: {reason}")),))


def after_restart(p: Promotion, obs: Observation) -> Transition:
    """A promotion found active when the controller starts: one that was finishing completes, any other rolls
    back (its window's counts died with the routers)."""
    if not p.active:
        return Transition(p)
    if p.phase == "finishing":
        return replace(_finish(p, obs), events=(("promotion.step", f"promotion {p.id}: resumed after a restart: "
                                                                   "completing"),))
    return roll_back(p, obs.now_s, f"interrupted by a restart during {p.phase} (step {p.step + 1}); rolled back")


# --- making room -----------------------------------------------------------------------------------------------


def _floor(p: Promotion, pool_id: str, weight: float) -> int:
    """The fewest replicas an old pool keeps while the candidate has ``weight`` of the traffic."""
    return max(1, math.ceil((1 - weight) * p.old_replicas[pool_id] - 1e-9))


def _make_room(p: Promotion, free_gpus: int, *, weight: float) -> tuple[int, dict[str, int]]:
    """How far the candidate can grow for a step at ``weight``: (its replicas, the old pools shrunk to make room).
    Free GPUs first; then old pools (not shared with another class) give up one replica at a time, the largest
    share first, down to their floor; a shrink that would not let the candidate grow is not made."""
    tp = p.candidate.tp
    grown, free = p.candidate_replicas, free_gpus
    shrink: dict[str, int] = {}
    committed: dict[str, int] = {}
    donors = sorted((pool_id for pool_id in p.old_pools if pool_id not in p.shared),
                    key=lambda pool_id: (-p.old_weights.get(pool_id, 0), pool_id))
    while grown < p.candidate.replicas:
        if free >= tp:
            more = min(p.candidate.replicas - grown, free // tp)
            grown += more
            free -= more * tp
            committed = dict(shrink)
            continue
        donor = next((pool_id for pool_id in donors
                      if shrink.get(pool_id, p.current_old_replicas[pool_id]) > _floor(p, pool_id, weight)), None)
        if donor is None:
            break
        shrink[donor] = shrink.get(donor, p.current_old_replicas[donor]) - 1
        free += p.old_pools[donor].tp
    return grown, committed


def _mix(p: Promotion, weight: float) -> dict[str, float]:
    """The class's route with ``weight`` on the candidate and the rest on the old pools, in their proportions."""
    if weight >= 1:
        return {p.candidate.id: 1.0}
    total = sum(p.old_weights.values())
    mixed = {pool_id: (1 - weight) * w / total for pool_id, w in p.old_weights.items()}
    mixed[p.candidate.id] = weight
    return mixed


def _describe(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{pool_id} {w:.0%}" for pool_id, w in weights.items())


# --- (de)serialization ---------------------------------------------------------------------------------------


def promotion_to_dict(p: Promotion) -> dict[str, Any]:
    """JSON-safe, for the store and the admin API."""
    return {
        "id": p.id, "class": p.class_name, "candidate": pool_to_dict(p.candidate),
        "old_weights": dict(p.old_weights), "old_pools": [pool_to_dict(pool) for pool in p.old_pools.values()],
        "shared": sorted(p.shared), "policy": p.policy.as_dict(),
        "source": p.source, "created_s": p.created_s, "updated_s": p.updated_s, "phase": p.phase, "step": p.step,
        "weight": p.weight, "waiting_since_s": p.waiting_since_s, "window_opened_s": p.window_opened_s,
        "candidate_replicas": p.candidate_replicas, "current_old_replicas": dict(p.current_old_replicas),
        "reason": p.reason, "history": [asdict(r) for r in p.history], "last_verdict": p.last_verdict,
    }


def promotion_from_dict(data: Mapping[str, Any]) -> Promotion:
    """Inverse of :func:`promotion_to_dict`; KeyError, TypeError or ValueError on a malformed record."""
    return Promotion(
        id=str(data["id"]), class_name=str(data["class"]), candidate=pool_from_dict(data["candidate"]),
        old_weights={str(k): float(v) for k, v in data["old_weights"].items()},
        old_pools={pool.id: pool for pool in map(pool_from_dict, data["old_pools"])},
        shared=frozenset(data.get("shared", ())),
        policy=PromotionPolicy.from_dict(data["policy"]), source=str(data["source"]),
        created_s=float(data["created_s"]), updated_s=float(data["updated_s"]), phase=data["phase"],
        step=int(data["step"]), waiting_since_s=data["waiting_since_s"], window_opened_s=data["window_opened_s"],
        candidate_replicas=int(data["candidate_replicas"]),
        current_old_replicas={str(k): int(v) for k, v in data["current_old_replicas"].items()},
        reason=data["reason"], history=tuple(StepRecord(**r) for r in data["history"]),
        last_verdict=data.get("last_verdict"),
    )


def active_for_class(promotions: Sequence[Promotion], class_name: str) -> Promotion | None:
    return next((p for p in promotions if p.active and p.class_name == class_name), None)
