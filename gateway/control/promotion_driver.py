"""Drives promotions: one asyncio task in the controller turns what it observes into the state machine's
transitions (:mod:`gateway.control.promotion`) and carries out their actions through the controller's own
writes.

Every tick (a fraction of a second) each active promotion is observed — the desired pools, their ready replicas
and failures, the GPUs free, and, while a step's window is open, the window judged from the routers' reported
series (at most every ``check_period_s``) — and advanced. Actions run in order; one that the controller refuses
rolls the promotion back with the refusal as the reason. Every transition is persisted (the ``promotions``
record section of the store) before the next tick, and its events are recorded. When the controller starts with
promotions still active in its store, each is resolved first: one that was finishing completes, any other rolls
back (:func:`gateway.control.promotion.after_restart`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from gateway.control.metric_reports import MetricReports, paired
from gateway.control.promotion import (
    Action,
    Observation,
    OpenWindow,
    Promotion,
    PromotionConflict,
    PromotionPolicy,
    RemovePool,
    SetPool,
    SetWeights,
    Transition,
    UnknownPromotion,
    advance,
    after_restart,
    begin,
    promotion_from_dict,
    promotion_to_dict,
    roll_back,
)
from gateway.control.promotion_analysis import Limits, PoolWindow, Verdict, judge, pool_window
from gateway.control.state import DesiredState, PoolSpec, StateError
from gateway.exposition import Samples

logger = logging.getLogger("tpgate.controller")

RECORD_SECTION = "promotions"
TICK_S = 0.5
KEEP_FINISHED = 50  # finished promotions kept in the store (the oldest are forgotten)


class PromotionHost(Protocol):
    """What the driver needs of the controller: its desired state and pool readiness, and writes that go
    through the controller's one writer (validated, persisted, versioned)."""

    def desired_state(self) -> DesiredState: ...

    def free_gpus(self) -> int: ...

    def ready_replicas(self, pool_id: str) -> int: ...

    def pool_failure(self, pool_id: str) -> str | None: ...

    async def set_pool(self, pool: PoolSpec) -> None: ...

    async def set_weights(self, class_name: str, weights: Mapping[str, float]) -> None: ...

    async def remove_pool(self, pool_id: str) -> None: ...

    def record_event(self, kind: str, message: str, *, pool: str | None, route: str | None) -> None: ...

    async def save_records(self, section: str, value: Any) -> None: ...


class PromotionDriver:
    """Every promotion of this controller, and the task that drives the active ones."""

    def __init__(
        self, host: PromotionHost, reports: MetricReports, *, stored: Any, wall_clock: Callable[[], float]
    ) -> None:
        """``stored``: the ``promotions`` record section (id -> record), or None."""
        self._host = host
        self._reports = reports
        self._wall_clock = wall_clock
        self._promotions: dict[str, Promotion] = {}
        self._windows: dict[str, dict[str, Samples]] = {}  # promotion id -> the routers' series at its start
        self._checked_at: dict[str, float] = {}
        self._lock = asyncio.Lock()  # one transition at a time (the task, starts and aborts)
        self._interrupted: set[str] = set()  # active in the store when this controller started
        for record in (stored or {}).values():
            try:
                promotion = promotion_from_dict(record)
            except (KeyError, TypeError, ValueError) as exc:  # an unreadable record is dropped, and said so
                logger.warning("promotion record dropped: %s: %r", type(exc).__name__, exc)
                continue
            self._promotions[promotion.id] = promotion
            if promotion.active:
                self._interrupted.add(promotion.id)

    # --- reading ---------------------------------------------------------------------------------------------

    def all(self) -> list[Promotion]:
        return sorted(self._promotions.values(), key=lambda p: p.created_s)

    def get(self, promotion_id: str) -> Promotion:
        promotion = self._promotions.get(promotion_id)
        if promotion is None:
            raise UnknownPromotion(f"no promotion {promotion_id!r}")
        return promotion

    def active(self) -> list[Promotion]:
        return [p for p in self.all() if p.active]

    def owner_of_class(self, class_name: str) -> Promotion | None:
        return next((p for p in self.active() if p.class_name == class_name), None)

    def owner_of_pool(self, pool_id: str) -> Promotion | None:
        return next((p for p in self.active() if pool_id in p.pools), None)

    def watched(self) -> dict[str, tuple[int, float]]:
        """Classes under promotion -> (step number from 1, 0 before the first; the candidate's share)."""
        return {p.class_name: (p.step + 1 if p.phase == "shifting" else 0, p.weight) for p in self.active()}

    # --- writing ---------------------------------------------------------------------------------------------

    async def start(
        self, *, promotion_id: str, class_name: str, candidate: PoolSpec, policy: PromotionPolicy, source: str
    ) -> Promotion:
        """Begin a promotion and carry out its first actions; :class:`PromotionConflict` when the class is being
        promoted already, a pool is another promotion's, or no room can be made."""
        await self.resolve_interrupted()
        async with self._lock:
            owner = self.owner_of_class(class_name)
            if owner is not None:
                raise PromotionConflict(f"class {class_name!r} is being promoted already by {owner.id} "
                                        f"({owner.phase}, step {owner.step + 1}/{len(owner.policy.steps)}); abort it "
                                        "first")
            state = self._host.desired_state()
            transition = begin(promotion_id=promotion_id, class_name=class_name, candidate=candidate,
                               routes=state.routes, pools=state.pools, free_gpus=self._host.free_gpus(),
                               policy=policy, source=source, now_s=self._wall_clock())
            busy = next((p for p in self.active() if p.pools & transition.promotion.pools), None)
            if busy is not None:
                raise PromotionConflict(f"pools {sorted(busy.pools & transition.promotion.pools)} belong to "
                                        f"promotion {busy.id} of class {busy.class_name}")
            await self._apply(transition)
            return self._promotions[promotion_id]

    async def mark_undone(self, promotion_id: str, reason: str) -> Promotion:
        """Record that a succeeded promotion was undone outside the driver (its class routed straight back to the
        pools it replaced, which still ran): ``rolled_back`` with ``reason``."""
        async with self._lock:
            promotion = replace(self.get(promotion_id), phase="rolled_back", reason=reason,
                                updated_s=self._wall_clock())
            self._promotions[promotion_id] = promotion
            self._host.record_event("promotion.rolled_back", f"promotion {promotion_id}: {reason}",
                                    pool=promotion.candidate.id, route=promotion.class_name)
            await self._save()
            return promotion

    async def abort(self, promotion_id: str, reason: str) -> Promotion:
        """Roll an active promotion back now (a finished one is returned as it is)."""
        async with self._lock:
            promotion = self.get(promotion_id)
            if promotion.active:
                await self._apply(roll_back(promotion, self._wall_clock(), reason))
            return self._promotions[promotion_id]

    async def run_forever(self) -> None:
        """Resolve promotions a restart interrupted, then drive the active ones."""
        await self.resolve_interrupted()
        while True:
            await asyncio.sleep(TICK_S)
            await self.tick()

    async def tick(self) -> None:
        """Observe and advance every active promotion once."""
        for promotion in self.active():
            try:
                async with self._lock:
                    current = self._promotions[promotion.id]
                    if current.active:
                        await self._apply(advance(current, self._observe(current)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop the other promotions; it is reported
                logger.exception("promotion %s: tick failed", promotion.id)
                self._host.record_event("promotion.check", f"promotion {promotion.id}: tick failed: {exc!r}",
                                        pool=promotion.candidate.id, route=promotion.class_name)

    async def resolve_interrupted(self) -> None:
        """Complete or roll back the promotions that were active in the store when this controller started."""
        async with self._lock:
            while self._interrupted:
                promotion = self._promotions.get(self._interrupted.pop())
                if promotion is not None and promotion.active:
                    await self._apply(after_restart(promotion, self._observe(promotion, judge=False)))

    # --- internals -------------------------------------------------------------------------------------------

    def _observe(self, p: Promotion, *, judge: bool = True) -> Observation:
        now_s = self._wall_clock()
        pools = p.pools
        ready = {pool_id: self._host.ready_replicas(pool_id) for pool_id in pools}
        failures = {pool_id: reason for pool_id in pools if (reason := self._host.pool_failure(pool_id))}
        verdict = None
        if judge and p.window_opened_s is not None and p.id in self._windows:
            last = self._checked_at.get(p.id, 0.0)
            if now_s - last >= p.policy.check_period_s:
                self._checked_at[p.id] = now_s
                verdict = self._verdict(p)
        return Observation(now_s=now_s, free_gpus=self._host.free_gpus(), ready=ready, failures=failures,
                           verdict=verdict)

    def _verdict(self, p: Promotion) -> Verdict:
        start, end = paired(self._windows[p.id], self._reports.snapshot())
        scale = p.candidate.engine.time_scale if p.candidate.engine.engine == "sim" else 1.0
        candidate = pool_window(start, end, class_name=p.class_name, pools={p.candidate.id}, time_scale=scale)
        baseline: PoolWindow | None = pool_window(start, end, class_name=p.class_name, pools=set(p.old_weights),
                                                  time_scale=scale)
        policy = p.policy
        if baseline is not None and baseline.requests < policy.min_requests:
            baseline = reference_baseline(p)
        limits = Limits(min_requests=policy.min_requests, max_5xx=policy.max_5xx,
                        error_rate_max=policy.error_rate_max, max_latency_ratio=policy.max_latency_ratio,
                        ttft_p99_s=policy.ttft_p99_s, tpot_p99_s=policy.tpot_p99_s)
        return judge(candidate, baseline, limits)

    async def _apply(self, transition: Transition) -> None:
        """Carry out a transition's actions in order; a refused action rolls the promotion back (whose own
        actions are carried out as far as they go). Then persist and record its events."""
        promotion = transition.promotion
        self._promotions[promotion.id] = promotion
        for kind, message in transition.events:
            self._host.record_event(kind, message, pool=promotion.candidate.id, route=promotion.class_name)
        for action in transition.actions:
            try:
                await self._act(promotion, action)
            except (StateError, RuntimeError) as exc:
                problem = f"{_describe(action)} was refused: {exc}"
                if promotion.active:
                    await self._apply(roll_back(promotion, self._wall_clock(), problem))
                    return
                self._host.record_event("promotion.rolled_back", f"promotion {promotion.id}: {problem}",
                                        pool=promotion.candidate.id, route=promotion.class_name)
                promotion = replace(promotion, reason=f"{promotion.reason}; {problem}")
                self._promotions[promotion.id] = promotion
        if not promotion.active:
            self._windows.pop(promotion.id, None)
            self._checked_at.pop(promotion.id, None)
        await self._save()

    async def _act(self, promotion: Promotion, action: Action) -> None:
        if isinstance(action, SetPool):
            await self._host.set_pool(action.pool)
        elif isinstance(action, SetWeights):
            await self._host.set_weights(promotion.class_name, action.weights)
        elif isinstance(action, RemovePool):
            if action.pool_id in self._host.desired_state().pools:
                await self._host.remove_pool(action.pool_id)
        elif isinstance(action, OpenWindow):
            self._windows[promotion.id] = self._reports.snapshot()
            self._checked_at[promotion.id] = self._wall_clock()

    async def _save(self) -> None:
        finished = [p for p in self.all() if not p.active]
        for old in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._promotions[old.id]
        await self._host.save_records(RECORD_SECTION, {p.id: promotion_to_dict(p) for p in self.all()})


def reference_baseline(p: Promotion) -> PoolWindow | None:
    """The old pools' window to judge a step by when they served too few requests in its own (once the candidate
    has all the traffic): the one from the passed check where they carried the largest share of the class, the
    nearest to how they served before the promotion. The last check's window, at an even split, would judge the
    candidate at the full load against the old pools at part of it."""
    judged = [(record.weight, record.figures["baseline"]) for record in p.history
              if record.verdict == "pass" and record.figures.get("baseline")]
    if judged:
        return PoolWindow.from_dict(min(judged, key=lambda item: item[0])[1])
    if p.last_verdict and p.last_verdict.get("baseline"):
        return PoolWindow.from_dict(p.last_verdict["baseline"])
    return None


def _describe(action: Action) -> str:
    if isinstance(action, SetPool):
        return f"setting pool {action.pool.id} to {action.pool.replicas} x tp{action.pool.tp}"
    if isinstance(action, SetWeights):
        return "setting the route to " + ", ".join(f"{p} {w:.0%}" for p, w in action.weights.items())
    if isinstance(action, RemovePool):
        return f"removing pool {action.pool_id}"
    return "opening the window"
