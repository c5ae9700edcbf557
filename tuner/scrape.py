"""Window arithmetic from direct scrapes: the same :data:`tuner.window.WindowValues` as the PromQL queries, from
the gateway's ``/metrics`` text at the window's start and at its end.

Pure. The exposition arithmetic (parsing, counter increases with resets, Prometheus's ``histogram_quantile``) is
the gateway's own (:mod:`gateway.exposition`), shared with the promotion analysis; this module picks the series
of one (route, pool) and names the values as a trial window does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from gateway.exposition import Samples, parse_exposition, summed_increase, window_quantile
from tuner.window import COUNTERS, HISTOGRAMS, NO_POOL, QUANTILES, WindowValues

__all__ = ["Samples", "parse_exposition", "window_values"]


def window_values(
    start: Sequence[Samples], end: Sequence[Samples], *, route: str, pool: str
) -> WindowValues:
    """The window's raw values for ``route`` served by ``pool``, from each router replica's scrape at the
    window's start and at its end (``start[i]`` and ``end[i]`` come from the same router)."""
    if len(start) != len(end):
        raise ValueError(f"{len(start)} scrapes at the window's start but {len(end)} at its end")
    values: dict[str, float | None] = {}
    for name, (metric, which) in COUNTERS.items():
        values[name] = summed_increase(start, end, metric, _matcher(route, pool, which))
    matches = _matcher(route, pool, "pool")
    for short, metric in HISTOGRAMS.items():
        values[f"{short}_count"] = summed_increase(start, end, f"{metric}_count", matches)
        values[f"{short}_sum"] = summed_increase(start, end, f"{metric}_sum", matches)
        for label, q in QUANTILES.items():
            values[f"{short}_{label}"] = window_quantile(q, start, end, metric, matches)
    return values


def _matcher(route: str, pool: str, which: str) -> Callable[[Mapping[str, str]], bool]:
    def matches(labels: Mapping[str, str]) -> bool:
        if labels.get("class") != route:
            return False
        if which == "all":
            return labels.get("pool") in (pool, NO_POOL)
        if which == "ok":
            return labels.get("pool") == pool and labels.get("status", "").startswith("2")
        return labels.get("pool") == pool

    return matches
