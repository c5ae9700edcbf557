"""Prometheus text-exposition arithmetic: parse a scrape, and compute a window's counter increases and histogram
quantiles from two scrapes of each router replica.

Pure. Both the tuner (trial windows, when no Prometheus server runs) and the promotion analysis (windows of a
class's candidate and old pools, from every router replica's reported series) use it. Counters: the increase of
each series between the two scrapes, summed over series and over router replicas (each router keeps its own
registry); a series whose value fell was reset (its router restarted) and counts from zero, as Prometheus's
``increase`` does, and a series born during the window counts from zero too. Quantiles: Prometheus's
``histogram_quantile`` over the summed bucket increases, with its exact interpolation.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]
"""One scrape: (metric name, label set) -> value."""

LabelFilter = Callable[[Mapping[str, str]], bool]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_exposition(text: str) -> Samples:
    """Samples of a Prometheus text exposition (format 0.0.4): (name, labels) -> value.

    Raises ValueError naming the line when a sample line cannot be read.
    """
    samples: Samples = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"line {number}: not a Prometheus sample: {line[:120]!r}")
        name, label_text, value = match.group(1), match.group(2), match.group(3)
        samples[(name, _parse_labels(label_text or "", number))] = _parse_value(value, number)
    return samples


def _parse_labels(text: str, number: int) -> Labels:
    inner = text[1:-1] if text else ""
    labels, position = [], 0
    while position < len(inner):
        match = _LABEL.match(inner, position)
        if match is None:
            raise ValueError(f"line {number}: malformed labels {text[:120]!r}")
        value = re.sub(r"\\[\\\"n]", lambda m: _ESCAPES[m.group(0)], match.group(2))
        labels.append((match.group(1), value))
        position = match.end()
    return frozenset(labels)


def _parse_value(text: str, number: int) -> float:
    try:
        return float(text)  # Python reads NaN, +Inf and -Inf as Prometheus writes them
    except ValueError:
        raise ValueError(f"line {number}: not a sample value: {text!r}") from None


def counter_increase(start: float | None, end: float | None) -> float:
    """Increase of one counter series between two samples; a drop means the counter was reset in between
    (it then counts from zero). None at the start: the series was born in the window."""
    if end is None:
        return 0.0
    if start is None or end < start:
        return end
    return end - start


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus's ``histogram_quantile`` of cumulative ``(upper bound, count)`` buckets, exactly.

    Linear interpolation inside the bucket holding rank ``q * count``, from 0 for the lowest bucket when its
    bound is positive; in the ``+Inf`` bucket, the second-highest bound. NaN with no observations, with fewer
    than two buckets, or without a ``+Inf`` bucket; -Inf/+Inf for ``q`` below 0/above 1. Buckets with the same
    bound are merged and counts are made non-decreasing, as Prometheus does.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    if not buckets:
        return math.nan
    merged: list[list[float]] = []
    for bound, count in sorted(buckets, key=lambda b: b[0]):
        if merged and merged[-1][0] == bound:
            merged[-1][1] += count
        else:
            merged.append([bound, count])
    if not math.isinf(merged[-1][0]) or merged[-1][0] < 0:
        return math.nan
    highest = merged[0][1]
    for bucket in merged[1:]:  # the envelope: a count never falls as the bound grows
        highest = bucket[1] = max(bucket[1], highest)
    if len(merged) < 2:
        return math.nan
    observations = merged[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    index = next((i for i, (_, count) in enumerate(merged[:-1]) if count >= rank), len(merged) - 1)
    if index == len(merged) - 1:
        return merged[-2][0]
    if index == 0 and merged[0][0] <= 0:
        return merged[0][0]
    lower, below = (merged[index - 1][0], merged[index - 1][1]) if index > 0 else (0.0, 0.0)
    upper, count = merged[index]
    if count == below:  # q = 0 over an empty lowest bucket: 0/0 in Prometheus
        return math.nan
    return lower + (upper - lower) * (rank - below) / (count - below)


def series_increases(
    start: Sequence[Samples], end: Sequence[Samples], metric: str, matches: LabelFilter
) -> dict[Labels, float]:
    """Per label set of ``metric`` that ``matches``, the increase between each router's start and end scrape,
    summed over routers (``start[i]`` and ``end[i]`` come from the same router)."""
    if len(start) != len(end):
        raise ValueError(f"{len(start)} scrapes at the window's start but {len(end)} at its end")
    totals: dict[Labels, float] = defaultdict(float)
    for before, after in zip(start, end, strict=True):
        for (name, labels), value in after.items():
            if name == metric and matches(dict(labels)):
                totals[labels] += counter_increase(before.get((name, labels)), value)
    return totals


def summed_increase(
    start: Sequence[Samples], end: Sequence[Samples], metric: str, matches: LabelFilter
) -> float | None:
    """The increase of every matching series, summed; None when no router exposes one (as PromQL returns
    nothing)."""
    increases = series_increases(start, end, metric, matches)
    return sum(increases.values()) if increases else None


def window_quantile(
    q: float, start: Sequence[Samples], end: Sequence[Samples], histogram: str, matches: LabelFilter
) -> float | None:
    """The ``q`` quantile of the observations a histogram (its base name, without ``_bucket``) made in the
    window, over every matching series; None when it made none."""
    by_bound: dict[float, float] = defaultdict(float)
    for labels, increase in series_increases(start, end, f"{histogram}_bucket", matches).items():
        by_bound[float(dict(labels)["le"])] += increase
    quantile = histogram_quantile(q, list(by_bound.items()))
    return None if math.isnan(quantile) else quantile
