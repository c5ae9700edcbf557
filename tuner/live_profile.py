"""The live workload profile of a class: what the gateway saw of its traffic over a window.

Pure. A :class:`LiveProfile` holds the arrival rate, the requests in flight (time-weighted mean and peak), the
prompt and output token counts of successful requests as distributions (count, exact mean, quantiles, and the
histogram's non-empty range), the streaming and chat shares, and the SLO attainment (successful requests that met
every per-request SLO of the class). It comes from the gateway's metrics (``gateway/dataplane/metrics.py``) in
one of two ways, with the same arithmetic:

- direct scrapes of each router replica's ``/metrics`` taken during the window (:func:`from_scrapes`): counters
  and histograms from the first and last scrape (increases, resets counted from zero as Prometheus does), the
  in-flight gauge from every scrape (so sample it often: once a second);
- PromQL over the window (:func:`promql_queries` and :func:`from_promql`): ``increase`` of the counters and
  buckets, ``avg_over_time`` and a ``max_over_time`` subquery of the in-flight gauge.

Token counts are whole tokens; times in seconds; rates per second.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.exposition import Samples, counter_increase, histogram_quantile
from tuner.window import REQUESTS_TOTAL, SLO_MET_REQUESTS_TOTAL

# The gateway's live-profile metrics, as exposed (counters with their _total suffix).
ARRIVALS_TOTAL = "tpgate_arrivals_total"
CLASS_INFLIGHT = "tpgate_class_inflight_requests"
PROMPT_LENGTH = "tpgate_request_prompt_tokens"
OUTPUT_LENGTH = "tpgate_request_output_tokens"
LENGTH_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
PEAK_RESOLUTION_S = 5.0  # the PromQL subquery step of the in-flight peak


@dataclass(frozen=True)
class LengthSummary:
    """Token counts of the window's successful requests: ``count`` requests, their exact ``mean`` (from the
    histogram's sum), quantiles read from the histogram (``quantiles[q]``, Prometheus's interpolation), and the
    range of the non-empty buckets (``low``, ``high``; ``high`` is None when some fell in the ``+Inf`` bucket).
    ``single_bucket``: every observation fell in one bucket, so the mean is the best value of them all."""

    count: float
    mean: float | None
    quantiles: Mapping[float, float] = field(default_factory=dict)
    low: float = 0.0
    high: float | None = None
    single_bucket: bool = False

    @property
    def median(self) -> float | None:
        return self.quantiles.get(0.5)

    @classmethod
    def from_buckets(cls, buckets: Iterable[tuple[float, float]], *, total: float | None,
                     count: float | None) -> LengthSummary:
        """From cumulative ``(upper bound, count)`` buckets (``+Inf`` included) and the histogram's sum and
        count over the window."""
        ordered = sorted(buckets)
        observations = count if count is not None else (ordered[-1][1] if ordered else 0.0)
        if not ordered or observations <= 0:
            return cls(count=0.0, mean=None)
        quantiles = {}
        for q in LENGTH_QUANTILES:
            value = histogram_quantile(q, ordered)
            if not math.isnan(value):
                quantiles[q] = value
        non_empty, below = [], 0.0
        lower = 0.0
        for bound, cumulative in ordered:
            if cumulative > below:
                non_empty.append((lower, bound))
            below = max(below, cumulative)
            lower = bound
        low = non_empty[0][0] if non_empty else 0.0
        high = non_empty[-1][1] if non_empty else None
        mean = total / observations if total is not None else None
        return cls(count=observations, mean=mean, quantiles=quantiles, low=low,
                   high=None if high is None or math.isinf(high) else high, single_bucket=len(non_empty) == 1)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quantiles"] = {f"{q:g}": value for q, value in self.quantiles.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LengthSummary:
        return cls(count=float(data["count"]), mean=data.get("mean"),
                   quantiles={float(q): float(v) for q, v in data.get("quantiles", {}).items()},
                   low=float(data.get("low", 0.0)), high=data.get("high"),
                   single_bucket=bool(data.get("single_bucket", False)))


@dataclass(frozen=True)
class LiveProfile:
    """One class's traffic over ``window_s`` seconds ending at ``end_s`` (Unix seconds)."""

    class_name: str
    window_s: float
    end_s: float
    arrivals: float  # requests classified into the class
    streamed: float  # ... of which asked for a stream
    chat: float  # ... of which came to /v1/chat/completions
    requests: float  # requests finished, any status
    ok_requests: float  # ... with a 2xx status
    slo_met_requests: float | None  # ... that met every SLO of the class (None: the class has no SLO series)
    concurrency_mean: float | None  # time-weighted mean of the requests in flight
    concurrency_peak: float | None
    prompt: LengthSummary
    output: LengthSummary

    @property
    def arrival_rate_per_s(self) -> float:
        return self.arrivals / self.window_s

    @property
    def streaming_share(self) -> float | None:
        return self.streamed / self.arrivals if self.arrivals > 0 else None

    @property
    def chat_share(self) -> float | None:
        return self.chat / self.arrivals if self.arrivals > 0 else None

    @property
    def slo_attainment(self) -> float | None:
        """Share of successful requests that met every per-request SLO (None without either)."""
        if self.slo_met_requests is None or self.ok_requests <= 0:
            return None
        return min(1.0, self.slo_met_requests / self.ok_requests)

    @property
    def error_share(self) -> float | None:
        return (self.requests - self.ok_requests) / self.requests if self.requests > 0 else None

    def figures(self) -> dict[str, Any]:
        """The headline figures (what ``GET /admin/state`` shows); None where the interval cannot tell."""
        figures = {
            "window_s": self.window_s, "end_unix_s": self.end_s, "arrival_rate_per_s": self.arrival_rate_per_s,
            "concurrency_mean": self.concurrency_mean, "concurrency_peak": self.concurrency_peak,
            "prompt_median": self.prompt.median, "output_median": self.output.median,
            "streaming_share": self.streaming_share, "chat_share": self.chat_share,
            "slo_attainment": self.slo_attainment, "error_share": self.error_share,
        }
        return {k: v if v is None or math.isfinite(v) else None for k, v in figures.items()}

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompt"] = self.prompt.as_dict()
        data["output"] = self.output.as_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LiveProfile:
        values = dict(data)
        values["prompt"] = LengthSummary.from_dict(data["prompt"])
        values["output"] = LengthSummary.from_dict(data["output"])
        return cls(**values)


# --- direct scrapes ------------------------------------------------------------------------------------------


def from_scrapes(class_name: str, scrapes: Sequence[tuple[float, Sequence[Samples]]]) -> LiveProfile:
    """The profile between the first and the last of ``scrapes``: ``(Unix time, one Samples per router
    replica)``, in time order, the routers in the same order each time. Raises ValueError with fewer than two
    scrapes, times that do not increase, or a router count that changes."""
    if len(scrapes) < 2:
        raise ValueError(f"a live profile needs at least two scrapes, not {len(scrapes)}")
    routers = {len(samples) for _, samples in scrapes}
    if len(routers) != 1:
        raise ValueError(f"the router replicas scraped changed during the window ({sorted(routers)})")
    times = [at_s for at_s, _ in scrapes]
    if any(later <= earlier for earlier, later in itertools.pairwise(times)):
        raise ValueError("scrapes must be in increasing time order")
    (start_s, first), (end_s, last) = scrapes[0], scrapes[-1]

    def of_class(labels: Mapping[str, str]) -> bool:
        return labels.get("class") == class_name

    arrivals = _increases(first, last, ARRIVALS_TOTAL, of_class, by=("api", "stream"))
    statuses = _increases(first, last, REQUESTS_TOTAL, of_class, by=("status",))
    slo_met = _increases(first, last, SLO_MET_REQUESTS_TOTAL, of_class, by=())
    inflight = [(at_s, sum(value for samples in per_router for (name, labels), value in samples.items()
                           if name == CLASS_INFLIGHT and of_class(dict(labels))))
                for at_s, per_router in scrapes]
    return _profile(
        class_name, start_s=start_s, end_s=end_s, arrivals=arrivals, statuses=statuses,
        slo_met=slo_met.get((), None) if slo_met else None,
        concurrency_mean=_time_weighted_mean(inflight), concurrency_peak=max(value for _, value in inflight),
        prompt=_length_from_scrapes(first, last, PROMPT_LENGTH, of_class),
        output=_length_from_scrapes(first, last, OUTPUT_LENGTH, of_class),
    )


def _increases(start: Sequence[Samples], end: Sequence[Samples], metric: str, matches: Any,
               *, by: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """Counter increases summed over router replicas and every label not in ``by``; empty when no series."""
    totals: dict[tuple[str, ...], float] = defaultdict(float)
    for before, after in zip(start, end, strict=True):
        for (name, labels), value in after.items():
            label_map = dict(labels)
            if name == metric and matches(label_map):
                key = tuple(label_map.get(label, "") for label in by)
                totals[key] += counter_increase(before.get((name, labels)), value)
    return dict(totals)


def _length_from_scrapes(start: Sequence[Samples], end: Sequence[Samples], metric: str,
                         matches: Any) -> LengthSummary:
    buckets = _increases(start, end, f"{metric}_bucket", matches, by=("le",))
    total = _increases(start, end, f"{metric}_sum", matches, by=())
    count = _increases(start, end, f"{metric}_count", matches, by=())
    return LengthSummary.from_buckets(((float(le), n) for (le,), n in buckets.items()),
                                      total=total.get(()), count=count.get(()))


def _time_weighted_mean(points: Sequence[tuple[float, float]]) -> float:
    """Trapezoid mean of a sampled gauge over its first to last sample."""
    area = sum((t1 - t0) * (v0 + v1) / 2 for (t0, v0), (t1, v1) in itertools.pairwise(points))
    return area / (points[-1][0] - points[0][0])


# --- PromQL --------------------------------------------------------------------------------------------------


def promql_queries(class_name: str, window_s: float, *,
                   peak_resolution_s: float = PEAK_RESOLUTION_S) -> dict[str, str]:
    """Name -> PromQL expression for the class's window of ``window_s`` seconds ending at the evaluation time.

    ``arrivals`` (by api, stream), ``statuses`` (by status) and the two ``*_buckets`` (by le) are vectors;
    the others are single values."""
    matcher = "{class=" + _quote(class_name) + "}"
    selector = f"[{max(1, round(window_s * 1000))}ms]"
    queries = {
        "arrivals": f"sum by (api, stream) (increase({ARRIVALS_TOTAL}{matcher}{selector}))",
        "statuses": f"sum by (status) (increase({REQUESTS_TOTAL}{matcher}{selector}))",
        "slo_met": f"sum(increase({SLO_MET_REQUESTS_TOTAL}{matcher}{selector}))",
        "concurrency_mean": f"sum(avg_over_time({CLASS_INFLIGHT}{matcher}{selector}))",
        "concurrency_peak": f"max_over_time(sum({CLASS_INFLIGHT}{matcher})"
                            f"[{max(1, round(window_s))}s:{max(1, round(peak_resolution_s))}s])",
    }
    for short, metric in (("prompt", PROMPT_LENGTH), ("output", OUTPUT_LENGTH)):
        queries[f"{short}_buckets"] = f"sum by (le) (increase({metric}_bucket{matcher}{selector}))"
        queries[f"{short}_sum"] = f"sum(increase({metric}_sum{matcher}{selector}))"
        queries[f"{short}_count"] = f"sum(increase({metric}_count{matcher}{selector}))"
    return queries


def from_promql(class_name: str, window_s: float, end_s: float,
                results: Mapping[str, Sequence[Mapping[str, Any]]]) -> LiveProfile:
    """The profile from the result vectors of :func:`promql_queries` (Prometheus's ``data.result``)."""

    def grouped(name: str, *labels: str) -> dict[tuple[str, ...], float]:
        out = {}
        for item in results.get(name, ()):
            value = float(item["value"][1])
            if not math.isnan(value):
                out[tuple(item["metric"].get(label, "") for label in labels)] = value
        return out

    def single(name: str) -> float | None:
        return grouped(name).get(())

    def length(short: str) -> LengthSummary:
        buckets = grouped(f"{short}_buckets", "le")
        return LengthSummary.from_buckets(((float(le), n) for (le,), n in buckets.items()),
                                          total=single(f"{short}_sum"), count=single(f"{short}_count"))

    return _profile(
        class_name, start_s=end_s - window_s, end_s=end_s, arrivals=grouped("arrivals", "api", "stream"),
        statuses=grouped("statuses", "status"), slo_met=single("slo_met"),
        concurrency_mean=single("concurrency_mean"), concurrency_peak=single("concurrency_peak"),
        prompt=length("prompt"), output=length("output"),
    )


def _profile(class_name: str, *, start_s: float, end_s: float, arrivals: Mapping[tuple[str, ...], float],
             statuses: Mapping[tuple[str, ...], float], slo_met: float | None, concurrency_mean: float | None,
             concurrency_peak: float | None, prompt: LengthSummary, output: LengthSummary) -> LiveProfile:
    return LiveProfile(
        class_name=class_name, window_s=end_s - start_s, end_s=end_s,
        arrivals=sum(arrivals.values()),
        streamed=sum(n for (_, stream), n in arrivals.items() if stream == "true"),
        chat=sum(n for (api, _), n in arrivals.items() if api == "chat"),
        requests=sum(statuses.values()),
        ok_requests=sum(n for (status,), n in statuses.items() if status.startswith("2")),
        slo_met_requests=slo_met, concurrency_mean=concurrency_mean, concurrency_peak=concurrency_peak,
        prompt=prompt, output=output,
    )


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
