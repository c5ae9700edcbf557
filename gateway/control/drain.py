"""When a pool that left every route may be deleted without cutting a request.

Routers report, every half second, how many requests each pool has in flight or waiting at its gate, together
with the controller epoch and the state version they counted under. A draining pool may go once every live
router has reported zero for it under a version where the pool was already out of every route (a router that
had not yet seen that version could still send it new requests), or at a deadline derived from the configured
request timeout. A router is live while its reports are fresh; with no live router at all, nothing can be in
flight through one, once a full report period has passed.

Pure: times are passed in (seconds on a monotonic clock).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["wait", "drained", "deadline"]


@dataclass(frozen=True)
class RouterReport:
    """What one router counted: requests in flight or waiting, per pool, under (epoch, version)."""

    router_id: str
    epoch: str
    version: int
    inflight_by_pool: Mapping[str, int]
    at_s: float


@dataclass(frozen=True)
class _Drain:
    out_of_routes_version: int
    started_at_s: float
    deadline_s: float


class DrainTracker:
    """Router reports, and the pools being drained."""

    def __init__(self, *, report_stale_s: float) -> None:
        self.report_stale_s = report_stale_s
        self._reports: dict[str, RouterReport] = {}
        self._drains: dict[str, _Drain] = {}

    def report(self, report: RouterReport) -> None:
        self._reports[report.router_id] = report

    def start(self, pool_id: str, *, out_of_routes_version: int, now_s: float, deadline_s: float) -> None:
        self._drains[pool_id] = _Drain(out_of_routes_version, now_s, deadline_s)

    def stop(self, pool_id: str) -> None:
        self._drains.pop(pool_id, None)

    def draining(self) -> set[str]:
        return set(self._drains)

    def live_reports(self, *, now_s: float) -> list[RouterReport]:
        return [r for r in self._reports.values() if now_s - r.at_s <= self.report_stale_s]

    def verdict(self, pool_id: str, *, epoch: str, now_s: float) -> Verdict:
        drain = self._drains[pool_id]
        if now_s - drain.started_at_s >= drain.deadline_s:
            return "deadline"
        live = self.live_reports(now_s=now_s)
        if not live:
            return "drained" if now_s - drain.started_at_s >= self.report_stale_s else "wait"
        for report in live:
            seen_removal = report.epoch == epoch and report.version >= drain.out_of_routes_version
            if not seen_removal or report.inflight_by_pool.get(pool_id, 0) > 0:
                return "wait"
        return "drained"

    def inflight(self, pool_id: str, *, now_s: float) -> int:
        """Requests the live routers last reported for a pool."""
        return sum(r.inflight_by_pool.get(pool_id, 0) for r in self.live_reports(now_s=now_s))

    def started_at(self, pool_id: str) -> float:
        return self._drains[pool_id].started_at_s
