"""The controller's structured events: what it decided and what it saw, as records rather than free text.

Every event has a wall-clock time, a kind from a small fixed set (:data:`KINDS`), the pool and route it concerns
(when one does) and a message for people. The log keeps the most recent ones for ``status`` and the admin API,
and each event is also logged.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger("tpgate.controller")

KINDS = frozenset({
    "controller.started",  # a controller came up (first start or restart), with its epoch
    "state.changed",  # the desired state changed (apply, pool added or resized, route set or removed)
    "state.rejected",  # a change was refused; the message is the reason
    "pool.deploying",  # a pool's Serve application was created or updated
    "pool.deploy_failed",  # creating it failed; nothing was left behind
    "pool.phase",  # the cluster reported a new phase for a pool (running, deploy_failed, unhealthy...)
    "replica.ready",  # a replica's engine is healthy and routable
    "replica.gone",  # a replica left routing (deregistered, unreachable, or its lease expired)
    "drain.started",  # a pool left every route and waits for its in-flight requests
    "drain.finished",  # ... and was deleted
    "drain.deadline",  # ... and was deleted at its deadline with requests still reported
    "reconcile.repair",  # the reconcile loop found a difference between desired and running, and fixed it
    "reconcile.failed",  # ... and could not fix it this round
    "promotion.started",  # a class began moving to a new pool
    "promotion.step",  # its traffic moved to the next step (or a step's window opened)
    "promotion.room",  # an old pool gave up a replica, or the new one grew, to make room in the GPU budget
    "promotion.check",  # a step was judged and passed (the message has the figures)
    "promotion.succeeded",  # the class runs on the new pool; the old pools are drained and removed
    "promotion.rolled_back",  # the class went back to its old pools (the message is the reason)
    "drift.detected",  # the drift monitor found a class's live traffic far from what it was tuned for (the numbers)
    "drift.cleared",  # ... and that it no longer is
    "retune.promoted",  # a drifted class's re-tune ended: its winner was promoted
    "retune.kept",  # ... nothing clearly better was found; the class keeps its configuration
    "retune.rolled_back",  # ... the winner's promotion rolled back
    "retune.failed",  # ... the re-tune's study failed
    "gateway.stopping",  # the gateway is stopping: routers refuse new requests, or also end those in flight
})


@dataclass(frozen=True)
class Event:
    """One thing the controller did or saw. ``at_s`` is Unix time in seconds."""

    at_s: float
    kind: str
    message: str
    pool: str | None = None
    route: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    """The last ``size`` events, oldest first."""

    def __init__(self, *, size: int = 500, wall_clock: Callable[[], float] = time.time) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        self._wall_clock = wall_clock

    def add(self, kind: str, message: str, *, pool: str | None = None, route: str | None = None) -> Event:
        assert kind in KINDS, f"unknown event kind {kind!r}"
        event = Event(self._wall_clock(), kind, message, pool=pool, route=route)
        self._events.append(event)
        logger.info("%s: %s", kind, message)
        return event

    def recent(self, limit: int = 100) -> list[Event]:
        return list(self._events)[-limit:]
