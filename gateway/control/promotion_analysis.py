"""Judging a promotion step: the candidate pool's window of the class's traffic, against the class's SLOs and
against the pools it replaces.

Pure. A window is the difference between every router replica's series at the window's start and now
(:mod:`gateway.exposition`), for (class, pool) series of the gateway's own metrics: requests by status, and the
TTFT and TPOT histograms. Latencies are converted into the engine's clock with the pool's time scale (a simulated
engine may run faster than the wall clock), as the class's SLOs are stated in it.

The verdict, in this order:

1. **fail** — the candidate answered ``max_5xx`` or more 5xx in the window (a burst fails at once, however few
   requests it served);
2. **inconclusive** — fewer than ``min_requests`` candidate requests finished in the window;
3. **fail** — its error rate is over the limit; its TTFT or TPOT p99 is over the class's SLO (unless the old
   pools, measured in the same window, broke it too and the candidate is no worse: going back would not help);
   or its p99 is more than ``max_latency_ratio`` times the old pools' (their window, or the last one they had
   enough requests in, once the candidate has all the traffic);
4. **pass**.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gateway.exposition import Samples, summed_increase, window_quantile

REQUESTS_TOTAL = "tpgate_requests_total"
TTFT_SECONDS = "tpgate_time_to_first_token_seconds"
TPOT_SECONDS = "tpgate_time_per_output_token_seconds"
P99 = 0.99


@dataclass(frozen=True)
class PoolWindow:
    """What a set of pools served of one class in a window. Latencies are engine-clock seconds."""

    requests: float  # finished, any status
    errors: float  # not 2xx
    errors_5xx: float
    ttft_p99_s: float | None
    tpot_p99_s: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": self.error_rate}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolWindow:
        return cls(**{k: data[k] for k in ("requests", "errors", "errors_5xx", "ttft_p99_s", "tpot_p99_s")})


@dataclass(frozen=True)
class Limits:
    """What a candidate's window is held to (latencies in the engine's clock; None: no SLO on it)."""

    min_requests: int
    max_5xx: int
    error_rate_max: float
    max_latency_ratio: float
    ttft_p99_s: float | None = None
    tpot_p99_s: float | None = None


@dataclass(frozen=True)
class Verdict:
    kind: Literal["pass", "fail", "inconclusive"]
    reason: str
    candidate: PoolWindow
    baseline: PoolWindow | None = None  # the old pools' window, when they served enough requests in it

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "candidate": self.candidate.as_dict(),
                "baseline": None if self.baseline is None else self.baseline.as_dict()}


def pool_window(
    start: Sequence[Samples], end: Sequence[Samples], *, class_name: str, pools: Collection[str], time_scale: float
) -> PoolWindow:
    """The window of ``class_name``'s requests served by ``pools``, from each router's series at the start and
    end (``start[i]`` and ``end[i]`` from the same router)."""
    def served(labels: Mapping[str, str]) -> bool:
        return labels.get("class") == class_name and labels.get("pool") in pools

    def failed(labels: Mapping[str, str]) -> bool:
        return served(labels) and not labels.get("status", "").startswith("2")

    def failed_5xx(labels: Mapping[str, str]) -> bool:
        return served(labels) and labels.get("status", "").startswith("5")

    def scaled(value: float | None) -> float | None:
        return None if value is None else value * time_scale

    return PoolWindow(
        requests=summed_increase(start, end, REQUESTS_TOTAL, served) or 0.0,
        errors=summed_increase(start, end, REQUESTS_TOTAL, failed) or 0.0,
        errors_5xx=summed_increase(start, end, REQUESTS_TOTAL, failed_5xx) or 0.0,
        ttft_p99_s=scaled(window_quantile(P99, start, end, TTFT_SECONDS, served)),
        tpot_p99_s=scaled(window_quantile(P99, start, end, TPOT_SECONDS, served)),
    )


def judge(candidate: PoolWindow, baseline: PoolWindow | None, limits: Limits) -> Verdict:
    """The verdict on the candidate's window (see the module's docstring). ``baseline``: the old pools' window to
    compare with (None, or too few requests in it: compared with the SLOs only)."""
    if baseline is not None and baseline.requests < limits.min_requests:
        baseline = None
    if candidate.errors_5xx >= limits.max_5xx:
        return Verdict("fail", f"{candidate.errors_5xx:.0f} 5xx answers from the new pool (promotion.max_5xx "
                       f"{limits.max_5xx})", candidate, baseline)
    if candidate.requests < limits.min_requests:
        return Verdict("inconclusive", f"{candidate.requests:.0f} of the {limits.min_requests} requests needed "
                       "have reached the new pool", candidate, baseline)
    if candidate.error_rate > limits.error_rate_max:
        return Verdict("fail", f"error rate {candidate.error_rate:.2%} over {limits.error_rate_max:.2%} "
                       f"({candidate.errors:.0f} of {candidate.requests:.0f})", candidate, baseline)
    checks = (("TTFT p99", candidate.ttft_p99_s, limits.ttft_p99_s, None if baseline is None else baseline.ttft_p99_s),
              ("TPOT p99", candidate.tpot_p99_s, limits.tpot_p99_s, None if baseline is None else baseline.tpot_p99_s))
    for label, value, slo, old in checks:
        if value is None:
            continue
        if slo is not None and value > slo and not (old is not None and old > slo and value <= old):
            return Verdict("fail", f"{label} {_s(value)} over the class's SLO of {_s(slo)}"
                           + (f" (old pools {_s(old)})" if old is not None else ""), candidate, baseline)
        if old is not None and old > 0 and value > limits.max_latency_ratio * old:
            return Verdict("fail", f"{label} {_s(value)} is {value / old:.2f}x the old pools' {_s(old)} "
                           f"(promotion.max_latency_ratio {limits.max_latency_ratio:g})", candidate, baseline)
    against = "the SLOs and the old pools" if baseline is not None else "the SLOs"
    return Verdict("pass", f"{candidate.requests:.0f} requests, error rate {candidate.error_rate:.2%}, TTFT p99 "
                   f"{_s(candidate.ttft_p99_s)}, TPOT p99 {_s(candidate.tpot_p99_s)}: within {against}",
                   candidate, baseline)


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} s" if value >= 1 else f"{value * 1000:.3g} ms"
