"""Drift: a class's live traffic no longer looks like the traffic its configuration was tuned for.

Pure. Each class has a :class:`ReferenceProfile` — what it was tuned or promoted for: the class's configured load
profile until a live profile replaces it (after a re-tune, the profile it was tuned on). The monitor feeds a
:class:`DriftDetector` one :class:`~tuner.live_profile.LiveProfile` per interval; each interval is measured
against the reference by the distances the class's ``drift`` configuration turns on:

- ``concurrency``: mean requests in flight / the reference's, beyond ``concurrency_ratio`` either way;
- ``arrival_rate``: requests per second / the reference's, beyond ``arrival_rate_ratio`` either way;
- ``prompt_median`` and ``output_median``: median token counts / the reference's, beyond their ratios either way
  (measured only in intervals with at least ``min_requests`` successful requests);
- ``slo_attainment``: the share of successful requests that met every SLO, below ``slo_attainment_min`` (no
  reference needed; same minimum of requests).

A distance is **sustained** when the intervals seen cover the whole window (``window_s``) and it is breached in
at least ``sustained_share`` of the intervals that overlap the window (an interval where it cannot be measured
counts as not breached). A class becomes drifted when any distance is sustained, and stays drifted until every
distance has been within its bounds for the whole window (no interval breached beyond ``1 - sustained_share``):
a burst shorter than the window never marks a class, and a drifted class does not flap on one quiet interval.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import median
from typing import Any

from gateway.config import DriftClassConfig
from loadtests.profile import Fixed, LogNormal, OpenLoop, Profile, Uniform
from tuner.live_profile import LiveProfile

DISTANCES = ("concurrency", "arrival_rate", "prompt_median", "output_median", "slo_attainment")
COVERAGE_TOLERANCE_S = 1e-6


@dataclass(frozen=True)
class ReferenceProfile:
    """What a class's current configuration was tuned or promoted for. Figures that the source cannot tell are
    None (an open-loop load profile says its rate, not its concurrency); a distance against None is not measured.
    ``set_at_s``: Unix seconds."""

    class_name: str
    source: str
    set_at_s: float
    concurrency: float | None = None
    arrival_rate_per_s: float | None = None
    prompt_median: float | None = None
    output_median: float | None = None

    @classmethod
    def from_live(cls, live: LiveProfile, *, source: str) -> ReferenceProfile:
        return cls(class_name=live.class_name, source=source, set_at_s=live.end_s,
                   concurrency=live.concurrency_mean, arrival_rate_per_s=live.arrival_rate_per_s,
                   prompt_median=live.prompt.median, output_median=live.output.median)

    @classmethod
    def from_load_profile(cls, class_name: str, profile: Profile, *, set_at_s: float) -> ReferenceProfile:
        """From the load profile the class is tuned with: a closed loop's users are its concurrency (an upper
        bound when users think between requests), an open loop's rate its arrival rate."""
        open_loop = isinstance(profile.arrival, OpenLoop)
        return cls(
            class_name=class_name, source=f"load profile {profile.name}", set_at_s=set_at_s,
            concurrency=None if open_loop else float(profile.users),
            arrival_rate_per_s=profile.arrival.rate_per_s if isinstance(profile.arrival, OpenLoop) else None,
            prompt_median=distribution_median(profile.prompt_tokens),
            output_median=distribution_median(profile.output_tokens),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        def figure(name: str) -> float | None:
            value = data.get(name)
            return None if value is None else float(value)

        return cls(class_name=str(data["class_name"]), source=str(data.get("source", "")),
                   set_at_s=float(data.get("set_at_s", 0.0)), concurrency=figure("concurrency"),
                   arrival_rate_per_s=figure("arrival_rate_per_s"), prompt_median=figure("prompt_median"),
                   output_median=figure("output_median"))


def distribution_median(distribution: Fixed | Uniform | LogNormal) -> float:
    """The median of a load profile's token distribution (before rounding to whole tokens)."""
    if isinstance(distribution, Fixed):
        return distribution.value
    if isinstance(distribution, Uniform):
        return (distribution.low + distribution.high) / 2
    high = math.inf if distribution.high is None else distribution.high
    return min(high, max(distribution.low, math.exp(distribution.mu)))


@dataclass(frozen=True)
class Distance:
    """One distance in one interval. ``ratio``: observed / reference (for ``slo_attainment``, the attainment
    itself); ``limit``: the configured ratio or minimum; ``breached`` None when it could not be measured."""

    name: str
    observed: float | None
    reference: float | None
    ratio: float | None
    limit: float
    breached: bool | None


def measure(reference: ReferenceProfile, live: LiveProfile, config: DriftClassConfig) -> list[Distance]:
    """The distances ``config`` turns on, for one interval's live profile."""
    enough = live.ok_requests >= config.min_requests
    distances = []
    ratio_distances = (
        ("concurrency", config.concurrency_ratio, live.concurrency_mean, reference.concurrency, True),
        ("arrival_rate", config.arrival_rate_ratio, live.arrival_rate_per_s, reference.arrival_rate_per_s, True),
        ("prompt_median", config.prompt_median_ratio, live.prompt.median, reference.prompt_median,
         live.prompt.count >= config.min_requests),
        ("output_median", config.output_median_ratio, live.output.median, reference.output_median,
         live.output.count >= config.min_requests),
    )
    for name, limit, observed, against, measurable in ratio_distances:
        if limit is None:
            continue
        if observed is None or against is None or against <= 0 or not measurable:
            distances.append(Distance(name, observed, against, None, limit, None))
            continue
        ratio = observed / against
        distances.append(Distance(name, observed, against, ratio, limit, ratio >= limit or ratio <= 1 / limit))
    if config.slo_attainment_min is not None:
        attainment = live.slo_attainment if enough else None
        distances.append(Distance("slo_attainment", attainment, None, attainment, config.slo_attainment_min,
                                  None if attainment is None else attainment < config.slo_attainment_min))
    return distances


@dataclass(frozen=True)
class SustainedDistance:
    """A distance over the window: in how many of its ``intervals`` it was breached, and the median observed
    value and ratio of the intervals where it was measured."""

    name: str
    breached_intervals: int
    intervals: int
    observed: float | None
    reference: float | None
    ratio: float | None
    limit: float

    def describe(self) -> str:
        share = f"{self.breached_intervals}/{self.intervals} intervals"
        if self.name == "slo_attainment":
            return f"SLO attainment {_fmt(self.observed, '.1%')} < {self.limit:.1%} ({share})"
        return (f"{self.name.replace('_', ' ')} {_fmt(self.observed)} vs {_fmt(self.reference)} "
                f"(x{_fmt(self.ratio, '.2f')}, limit x{self.limit:g} either way; {share})")


@dataclass(frozen=True)
class DriftVerdict:
    """The class's state after an interval. ``sustained``: the distances that hold over the window (what
    triggered a drift, with the numbers); ``changed``: the state differs from the previous verdict;
    ``covered_s``: how much history the window had (a verdict before it covers ``window_s`` is never drifted)."""

    class_name: str
    at_s: float
    drifted: bool
    changed: bool
    window_s: float
    covered_s: float
    reference: ReferenceProfile
    sustained: tuple[SustainedDistance, ...] = ()
    latest: tuple[Distance, ...] = ()
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DriftDetector:
    """The drift state of one class, fed one live profile per interval (in time order)."""

    config: DriftClassConfig
    reference: ReferenceProfile
    drifted: bool = False
    _history: deque[tuple[LiveProfile, list[Distance]]] = field(default_factory=deque)

    def set_reference(self, reference: ReferenceProfile) -> None:
        """A new reference (the class was re-tuned or promoted): forget the history measured against the old."""
        self.reference = reference
        self.drifted = False
        self._history.clear()

    def observe(self, live: LiveProfile) -> DriftVerdict:
        if self._history and live.end_s <= self._history[-1][0].end_s:
            raise ValueError(f"interval ending at {live.end_s} is not after the last one")
        self._history.append((live, measure(self.reference, live, self.config)))
        window_s = self.config.window_s
        while len(self._history) > 1 and self._history[1][0].end_s - live.window_s <= live.end_s - window_s:
            self._history.popleft()  # the next interval alone already reaches back to the window's start
        in_window = [(p, d) for p, d in self._history if p.end_s > live.end_s - window_s]
        covered_s = live.end_s - min(p.end_s - p.window_s for p, _ in in_window)
        summaries = _summaries([d for _, d in in_window])
        covered = covered_s >= window_s - COVERAGE_TOLERANCE_S
        share = self.config.sustained_share
        sustained = tuple(s for s in summaries if covered and s.breached_intervals >= share * s.intervals)
        clear = covered and all(s.breached_intervals <= (1 - share) * s.intervals for s in summaries)
        previous = self.drifted
        self.drifted = bool(sustained) if not previous else not clear
        return DriftVerdict(
            class_name=self.reference.class_name, at_s=live.end_s, drifted=self.drifted,
            changed=self.drifted != previous, window_s=window_s, covered_s=covered_s, reference=self.reference,
            sustained=sustained, latest=tuple(self._history[-1][1]),
            reason=_reason(self.drifted, previous, covered, sustained, covered_s, window_s),
        )


def _summaries(per_interval: Sequence[list[Distance]]) -> list[SustainedDistance]:
    by_name: dict[str, list[Distance]] = {}
    for distances in per_interval:
        for distance in distances:
            by_name.setdefault(distance.name, []).append(distance)
    summaries = []
    for name, distances in by_name.items():
        measured = [d for d in distances if d.breached is not None]
        summaries.append(SustainedDistance(
            name=name, breached_intervals=sum(1 for d in measured if d.breached), intervals=len(distances),
            observed=_median(d.observed for d in measured), reference=distances[-1].reference,
            ratio=_median(d.ratio for d in measured), limit=distances[-1].limit,
        ))
    return summaries


def _median(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def _reason(drifted: bool, previous: bool, covered: bool, sustained: Sequence[SustainedDistance],
            covered_s: float, window_s: float) -> str:
    if not covered:
        return f"watching: {covered_s:.0f} s of the {window_s:.0f} s window seen so far"
    if drifted and sustained:
        return "drifted: " + "; ".join(s.describe() for s in sustained)
    if drifted:
        return "drifted: still outside the reference in part of the window"
    return "back within the reference over the whole window" if previous else "within the reference"


def _fmt(value: float | None, spec: str | None = None) -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if spec else figure(value)


def figure(value: float) -> str:
    """A figure for people: three significant digits, whole numbers with thousands separators from 1,000 up."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
