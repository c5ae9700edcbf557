"""PromQL for a trial window: one instant query per raw value of :data:`tuner.window.WindowValues`.

Pure. Every query covers the window exactly: ``increase(...[R])`` with the range ``R`` the window's length,
evaluated at the window's end (``/api/v1/query?query=...&time=<end>``). Quantiles are
``histogram_quantile(q, sum by (le) (increase(<histogram>_bucket{...}[R])))``: the window's observations, pooled
over every router replica and engine replica that served the pool. Prometheus extrapolates ``increase`` to the
window's edges from the samples inside it, so with a 1 s scrape interval its counts differ from exact deltas by
about one scrape interval's worth of traffic at each edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuner.window import COUNTERS, HISTOGRAMS, NO_POOL, QUANTILES


@dataclass(frozen=True)
class Window:
    """A measured window in Unix seconds (the clock Prometheus and the load records use)."""

    start_s: float
    end_s: float

    def __post_init__(self) -> None:
        if not self.end_s > self.start_s:
            raise ValueError(f"a window must end after it starts ({self.start_s} .. {self.end_s})")

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s


def range_selector(window: Window) -> str:
    """The range of a window, whole milliseconds (``[20500ms]``): PromQL durations take no fractions."""
    return f"[{max(1, round(window.length_s * 1000))}ms]"


def label_matchers(route: str, pool: str, which: str) -> str:
    """``{class="route",pool="pool"}``; ``which`` = "all" adds requests refused before a pool was chosen,
    "ok" keeps 2xx statuses only."""
    route_q, pool_q = _quote(route), _quote(pool)
    if which == "all":
        return f'{{class={route_q},pool=~{_quote(_regex_escape(pool) + "|" + NO_POOL)}}}'
    if which == "ok":
        return f'{{class={route_q},pool={pool_q},status=~"2.."}}'
    return f"{{class={route_q},pool={pool_q}}}"


def window_queries(route: str, pool: str, window: Window) -> dict[str, str]:
    """Value name -> PromQL expression, for the window's traffic of ``route`` served by ``pool``."""
    selector = range_selector(window)
    queries = {
        name: f"sum(increase({metric}{label_matchers(route, pool, which)}{selector}))"
        for name, (metric, which) in COUNTERS.items()
    }
    matchers = label_matchers(route, pool, "pool")
    for short, metric in HISTOGRAMS.items():
        queries[f"{short}_count"] = f"sum(increase({metric}_count{matchers}{selector}))"
        queries[f"{short}_sum"] = f"sum(increase({metric}_sum{matchers}{selector}))"
        buckets = f"sum by (le) (increase({metric}_bucket{matchers}{selector}))"
        for label, q in QUANTILES.items():
            queries[f"{short}_{label}"] = f"histogram_quantile({q:g}, {buckets})"
    return queries


def latest_sample_query(route: str) -> str:
    """The time of the newest sample Prometheus holds for the route (to wait until it scraped past a window)."""
    return f"max(timestamp({COUNTERS['requests'][0]}{{class={_quote(route)}}}))"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _regex_escape(value: str) -> str:
    """Escape RE2 metacharacters (pool ids are [a-z0-9-], so this is belt and braces)."""
    return "".join("\\" + ch if ch in r".^$*+?()[]{}|\\" else ch for ch in value)
