"""A live profile as a load profile (``loadtests/profiles`` YAML), so a person can replay production-like load
with ``tpgate load``.

Pure. Token lengths are fitted to the histogram's quantiles (p10, p25, p50, p75, p90):

- **fixed** when every request fell in one histogram bucket: the value is the exact mean (sum / count), which
  the bucket's interpolated quantiles would blur;
- otherwise a **log-normal** (least squares of the quantiles' logarithms against the normal's z-scores: the
  intercept is the log of the median, the slope the spread ``sigma``) or a **uniform** (least squares of the
  quantiles against q), whichever reproduces the quantiles with the smaller relative error. Both are bounded by
  the range of the non-empty buckets (clipped), so a replay never sends lengths the class never saw.

Arrivals are replayed as an **open loop** at the observed rate (production traffic comes from many independent
clients, who do not wait for each other), with the users (the in-flight cap) at twice the observed peak
concurrency, at least one. The stream and API fields take the majority; the exact shares go into the
description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import yaml

from tuner.live_profile import LengthSummary, LiveProfile

FIT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
INFLIGHT_CAP_FACTOR = 2.0
MAX_USERS = 10_000  # the load profile's own limit
MAX_SIGMA = 3.0  # the load profile's own limit on a log-normal's spread


class ProfileFitError(ValueError):
    """The live profile holds too little to write a load profile (no arrivals, no measured lengths)."""


@dataclass(frozen=True)
class LengthFit:
    """A fitted distribution as load-profile data (``{kind: ..., ...}``) and its relative error (RMS over the
    quantiles; 0 for a fixed value)."""

    kind: Literal["fixed", "uniform", "lognormal"]
    data: dict[str, Any]
    error: float


def fit_lengths(summary: LengthSummary, *, what: str) -> LengthFit:
    """The distribution that reproduces ``summary`` best (see the module's description)."""
    if summary.count <= 0 or summary.mean is None:
        raise ProfileFitError(f"no {what} lengths were measured in the window (no successful request)")
    if summary.single_bucket or len(_points(summary)) < 2:
        return LengthFit("fixed", {"kind": "fixed", "value": max(1, round(summary.mean))}, 0.0)
    candidates = [fit for fit in (_lognormal(summary), _uniform(summary)) if fit is not None]
    if not candidates:
        return LengthFit("fixed", {"kind": "fixed", "value": max(1, round(summary.mean))}, 0.0)
    return min(candidates, key=lambda fit: fit.error)


def _points(summary: LengthSummary) -> list[tuple[float, float]]:
    return [(q, summary.quantiles[q]) for q in FIT_QUANTILES if summary.quantiles.get(q, 0) > 0]


def _bounds(summary: LengthSummary) -> tuple[float, float | None]:
    low = max(1.0, math.floor(summary.low))
    high = None if summary.high is None else float(math.ceil(summary.high))
    return low, high


def _lognormal(summary: LengthSummary) -> LengthFit | None:
    points = _points(summary)
    xs = [NormalDist().inv_cdf(q) for q, _ in points]
    ys = [math.log(value) for _, value in points]
    slope, intercept = _least_squares(xs, ys)
    if slope <= 0:
        return None
    sigma = min(MAX_SIGMA, slope)
    low, high = _bounds(summary)
    mean = math.exp(intercept + sigma**2 / 2)  # the arithmetic mean before the bounds apply
    mean = min(high if high is not None else mean, max(low, mean))
    predicted = [math.exp(intercept + sigma * x) for x in xs]
    data: dict[str, Any] = {"kind": "lognormal", "mean": round(mean, 1), "sigma": round(sigma, 3), "low": low}
    if high is not None:
        data["high"] = high
    return LengthFit("lognormal", data, _relative_error(predicted, [v for _, v in points]))


def _uniform(summary: LengthSummary) -> LengthFit | None:
    points = _points(summary)
    slope, intercept = _least_squares([q for q, _ in points], [v for _, v in points])
    low, high = intercept, intercept + slope
    if slope <= 0 or low < 1:
        return None
    predicted = [intercept + slope * q for q, _ in points]
    data = {"kind": "uniform", "low": float(math.floor(low)), "high": float(math.ceil(high))}
    return LengthFit("uniform", data, _relative_error(predicted, [v for _, v in points]))


def _least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return slope, mean_y - slope * mean_x


def _relative_error(predicted: list[float], observed: list[float]) -> float:
    return math.sqrt(sum((p / o - 1) ** 2 for p, o in zip(predicted, observed, strict=True)) / len(observed))


def load_profile_data(live: LiveProfile, *, name: str | None = None, duration_s: float | None = None,
                      model: str | None = None) -> dict[str, Any]:
    """The live profile as load-profile fields (``loadtests.profile.Profile``), ready for YAML.

    ``duration_s`` defaults to the observed window; the request cap allows one and a half times the arrivals
    the observed rate gives over it."""
    if live.arrivals <= 0:
        raise ProfileFitError(f"no request of class {live.class_name!r} arrived in the {live.window_s:g} s window")
    prompt = fit_lengths(live.prompt, what="prompt")
    output = fit_lengths(live.output, what="output")
    rate = live.arrival_rate_per_s
    peak = live.concurrency_peak if live.concurrency_peak is not None else live.concurrency_mean or 1.0
    users = min(MAX_USERS, max(1, math.ceil(peak * INFLIGHT_CAP_FACTOR)))
    duration = duration_s if duration_s is not None else live.window_s
    streaming = live.streaming_share or 0.0
    chat = live.chat_share if live.chat_share is not None else 1.0
    data: dict[str, Any] = {
        "name": name or f"{live.class_name}-live",
        "description": describe(live),
        "users": users,
        "arrival": {"kind": "open", "rate_per_s": round(rate, 4)},
        "prompt_tokens": prompt.data,
        "output_tokens": output.data,
        "stream": streaming >= 0.5,
        "api": "chat" if chat >= 0.5 else "completions",
        "workload_class": {"name": live.class_name, "via": "header"},
        "duration_s": round(duration, 3),
        "warmup_s": 0,
        "max_requests": max(1, math.ceil(rate * duration * 1.5) + users),
    }
    if model is not None:
        data["model"] = model
    return data


def describe(live: LiveProfile) -> str:
    """One line with the figures the profile was made from."""
    parts = [f"live traffic of class {live.class_name} over {live.window_s:.0f} s: {live.arrival_rate_per_s:.3g} "
             "requests/s"]
    if live.concurrency_mean is not None:
        parts.append(f"{live.concurrency_mean:.3g} in flight on average"
                     + (f" ({live.concurrency_peak:.3g} at peak)" if live.concurrency_peak is not None else ""))
    for what, summary in (("prompt", live.prompt), ("output", live.output)):
        if summary.median is not None and summary.mean is not None:
            parts.append(f"{what} median {summary.median:,.0f} / mean {summary.mean:,.0f} tokens")
    if live.streaming_share is not None:
        parts.append(f"{live.streaming_share:.0%} streamed")
    if live.chat_share is not None:
        parts.append(f"{live.chat_share:.0%} chat")
    return ", ".join(parts)


def load_profile_yaml(live: LiveProfile, **options: Any) -> str:
    """:func:`load_profile_data` as YAML, with a comment saying where it came from."""
    data = load_profile_data(live, **options)
    header = (f"# Recorded from the gateway's metrics: {describe(live)}.\n"
              "# Replay it with: tpgate load --profile <this file> --host <gateway URL>\n")
    return header + yaml.safe_dump(data, sort_keys=False)
