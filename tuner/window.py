"""A trial's measured window: the gateway metrics it reads, the raw values a metric source returns, and the
figures computed from them.

Pure. Both metric sources (PromQL against a Prometheus server, or two direct scrapes) return the same
:data:`WindowValues` for a (route, pool) and a window; :meth:`WindowFigures.from_values` turns them into rates,
percentiles and an error ratio. Figures are in the wall clock as measured; :func:`tuner.timescale.to_engine_clock`
converts them into a simulated engine's clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

# The gateway's metrics (gateway/dataplane/metrics.py), as exposed (counters with their _total suffix).
REQUESTS_TOTAL = "tpgate_requests_total"
OUTPUT_TOKENS_TOTAL = "tpgate_output_tokens_total"
PROMPT_TOKENS_TOTAL = "tpgate_prompt_tokens_total"
SLO_MET_REQUESTS_TOTAL = "tpgate_slo_met_requests_total"
HISTOGRAMS = {
    "ttft": "tpgate_time_to_first_token_seconds",
    "tpot": "tpgate_time_per_output_token_seconds",
    "e2e": "tpgate_request_duration_seconds",
}
NO_POOL = "none"  # the pool label of a request answered before a pool was chosen
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}

# Counter values of a window (increases): name -> (metric, which requests)
COUNTERS: dict[str, tuple[str, Literal["all", "ok", "pool"]]] = {
    "requests": (REQUESTS_TOTAL, "all"),  # every status, pool errors before a pool was chosen included
    "ok_requests": (REQUESTS_TOTAL, "ok"),  # 2xx
    "output_tokens": (OUTPUT_TOKENS_TOTAL, "pool"),
    "prompt_tokens": (PROMPT_TOKENS_TOTAL, "pool"),
    "slo_met_requests": (SLO_MET_REQUESTS_TOTAL, "pool"),
}

WindowValues = Mapping[str, float | None]
"""Raw values of one window: each :data:`COUNTERS` name (its increase), and per histogram ``h`` of
:data:`HISTOGRAMS` ``h_count``, ``h_sum`` (increases) and ``h_p50``/``h_p90``/``h_p99`` (quantiles of the
window's observations, seconds). None: the series does not exist (or holds no observation)."""


def value_names() -> list[str]:
    """Every name a :data:`WindowValues` carries."""
    names = list(COUNTERS)
    for short in HISTOGRAMS:
        names += [f"{short}_count", f"{short}_sum", *(f"{short}_{q}" for q in QUANTILES)]
    return names


@dataclass(frozen=True)
class WindowFigures:
    """What one trial measured over its window. Seconds and per-second rates in the clock named by ``clock``;
    counts are numbers of requests or tokens (Prometheus's extrapolated increases are not whole)."""

    clock: Literal["wall", "engine"]
    window_s: float
    requests: float  # finished in the window, any status
    errors: float  # of them, not 2xx (429, 5xx, 499 client gone...)
    error_rate: float
    requests_per_s: float  # successful requests
    output_tokens_per_s: float
    prompt_tokens_per_s: float
    goodput_requests_per_s: float | None  # successful requests that met every SLO; None: not reported
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    ttft_mean_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    tpot_p99_s: float | None
    tpot_mean_s: float | None
    e2e_p50_s: float | None
    e2e_p90_s: float | None
    e2e_p99_s: float | None
    e2e_mean_s: float | None

    @classmethod
    def from_values(cls, values: WindowValues, *, window_s: float) -> WindowFigures:
        """Figures of a wall-clock window of ``window_s`` seconds from its raw values."""
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        requests = _count(values.get("requests"))
        ok = min(_count(values.get("ok_requests")), requests)
        latencies: dict[str, float | None] = {}
        for short in HISTOGRAMS:
            for q in QUANTILES:
                latencies[f"{short}_{q}_s"] = _finite(values.get(f"{short}_{q}"))
            count, total = values.get(f"{short}_count"), values.get(f"{short}_sum")
            latencies[f"{short}_mean_s"] = total / count if count and total is not None else None
        slo_met = values.get("slo_met_requests")
        return cls(
            clock="wall",
            window_s=window_s,
            requests=requests,
            errors=requests - ok,
            error_rate=(requests - ok) / requests if requests else 0.0,
            requests_per_s=ok / window_s,
            output_tokens_per_s=_count(values.get("output_tokens")) / window_s,
            prompt_tokens_per_s=_count(values.get("prompt_tokens")) / window_s,
            goodput_requests_per_s=None if slo_met is None else max(0.0, slo_met) / window_s,
            **latencies,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> WindowFigures:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]

    def scaled(self, scale: float) -> WindowFigures:
        """The same window seen by a clock running ``scale`` times as fast as this one: durations x scale,
        rates / scale, counts and ratios unchanged."""
        changes: dict[str, float | None] = {"window_s": self.window_s * scale}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name.endswith("_per_s"):
                changes[f.name] = value / scale
            elif f.name.endswith("_s") and f.name != "window_s":
                changes[f.name] = value * scale
        return replace(self, **changes)  # type: ignore[arg-type]


def _count(value: float | None) -> float:
    return max(0.0, value) if value is not None and math.isfinite(value) else 0.0


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
