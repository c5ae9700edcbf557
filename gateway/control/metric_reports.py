"""The routers' series of the classes under promotion, as each router last reported them.

Every router replica keeps its own metrics registry, and a request may land on any replica, so a promotion's
window must add up every router's counts. Routers have no address of their own in Serve's standard proxy mode
(and an internal one in its direct-ingress mode), so instead of being scraped they report: about once a second
each router sends the controller its ``tpgate_`` series of the classes the controller asks for (those under
promotion), and gets back which classes to send next time. A window is the difference between two snapshots of
these reports (:mod:`gateway.exposition`); a router that stopped reporting keeps its last counts, and one that
appeared during the window counts from zero.

Pure: times are passed in (seconds on a monotonic clock).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from gateway.exposition import Samples

FORGET_AFTER_S = 900.0  # a router silent this long is gone for good (its counts no longer matter to any window)
# The series a promotion window reads (as exposed: counters with _total, histograms by bucket).
REPORTED_METRICS = frozenset({
    "tpgate_requests_total",
    "tpgate_time_to_first_token_seconds_bucket",
    "tpgate_time_per_output_token_seconds_bucket",
})


@dataclass(frozen=True)
class _Report:
    samples: Samples
    at_s: float


class MetricReports:
    """Router id -> its latest series."""

    def __init__(self, *, forget_after_s: float = FORGET_AFTER_S) -> None:
        self._reports: dict[str, _Report] = {}
        self._forget_after_s = forget_after_s

    def report(self, router_id: str, samples: Samples, *, now_s: float) -> None:
        self._reports[router_id] = _Report(dict(samples), now_s)
        for other, report in list(self._reports.items()):
            if now_s - report.at_s > self._forget_after_s:
                del self._reports[other]

    def snapshot(self) -> dict[str, Samples]:
        """Every router's latest series."""
        return {router_id: report.samples for router_id, report in self._reports.items()}

    def routers(self) -> int:
        return len(self._reports)


def paired(start: Mapping[str, Samples], end: Mapping[str, Samples]) -> tuple[list[Samples], list[Samples]]:
    """Start and end series per router, in the same order: a router missing at the end keeps its start counts
    (it stopped reporting: nothing more came from it); one missing at the start counts from zero."""
    routers = sorted(set(start) | set(end))
    return ([start.get(r, {}) for r in routers], [end.get(r, start.get(r, {})) for r in routers])


def select(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], classes: Collection[str]) -> Samples:
    """The series a promotion window reads, of ``classes`` only."""
    wanted = set(classes)
    return {(name, labels): value for (name, labels), value in samples.items()
            if name in REPORTED_METRICS and dict(labels).get("class") in wanted}
