"""One engine's ``/metrics`` scrape, parsed into plain values.

Pure: text in, :class:`EngineStats` out; the HTTP scrape lives elsewhere, so this is tested without a network.
It reads LMDeploy 0.18's ``lmdeploy:`` metrics (:mod:`gateway.engines.metric_names`), which the simulated
engine exports too, and ignores every other metric in the scrape (process, Python, speculative decoding...).

Series that differ only in labels (LMDeploy's ``engine`` label is the data-parallel rank) are summed, except
the KV-cache usage ratio, which is averaged: one engine process is one unit of capacity to the router and the
tuner.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from prometheus_client.parser import text_string_to_metric_families

from gateway.engines import metric_names as names

_GAUGES = (names.NUM_REQUESTS_RUNNING, names.NUM_REQUESTS_WAITING, names.GPU_CACHE_USAGE_PERC)
_COUNTERS = (names.PROMPT_TOKENS_TOTAL, names.GENERATION_TOKENS_TOTAL, names.REQUEST_SUCCESS_TOTAL)
_HISTOGRAMS = (
    names.TIME_TO_FIRST_TOKEN_SECONDS,
    names.TIME_PER_OUTPUT_TOKEN_SECONDS,
    names.E2E_REQUEST_LATENCY_SECONDS,
    names.REQUEST_QUEUE_TIME_SECONDS,
)
EXPECTED_METRICS = frozenset(_GAUGES + _COUNTERS + _HISTOGRAMS)


@dataclass(frozen=True)
class HistogramTotals:
    """The running totals of one histogram of durations: observations, their sum, and cumulative buckets."""

    count: int = 0
    sum_s: float = 0.0
    buckets: tuple[tuple[float, int], ...] = ()  # (upper bound in seconds, observations <= it), ascending

    @property
    def mean_s(self) -> float | None:
        """Mean observation in seconds; None before the first one."""
        return self.sum_s / self.count if self.count else None


@dataclass(frozen=True)
class EngineStats:
    """What one engine reports about its load and its latency so far (counters and histograms are totals
    since the engine started; subtract two scrapes for a window).

    LMDeploy refreshes the scheduler gauges (running, waiting, cache usage) only every 10 s.
    """

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    gpu_cache_usage_ratio: float = 0.0  # lmdeploy:gpu_cache_usage_perc: 1.0 means the KV cache is full
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    # by LMDeploy's finished_reason label, e.g. "ResponseType.FINISH", "ResponseType.CANCEL"
    requests_finished_by_reason: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    time_to_first_token: HistogramTotals = HistogramTotals()
    time_per_output_token: HistogramTotals = HistogramTotals()
    e2e_request_latency: HistogramTotals = HistogramTotals()
    request_queue_time: HistogramTotals = HistogramTotals()
    missing_metrics: frozenset[str] = frozenset()  # expected lmdeploy: names absent from the scrape

    @property
    def requests_finished_total(self) -> int:
        """Requests finished for any reason (LMDeploy counts errors and cancellations in the same counter)."""
        return sum(self.requests_finished_by_reason.values())

    @classmethod
    def from_scrape(cls, text: str) -> EngineStats:
        """Parse a Prometheus text exposition (``GET /metrics`` of LMDeploy or the simulator).

        Raises ValueError when the text is not valid Prometheus exposition. Metrics absent from the scrape
        count as zero and are listed in ``missing_metrics``.
        """
        values: dict[str, float] = defaultdict(float)
        series_count: dict[str, int] = defaultdict(int)
        finished_by_reason: dict[str, float] = defaultdict(float)
        histogram_parts: dict[str, _HistogramParts] = defaultdict(_HistogramParts)
        seen: set[str] = set()

        for sample_name, labels, value in _samples(text):
            if sample_name in _GAUGES or sample_name in _COUNTERS:
                seen.add(sample_name)
                if sample_name == names.REQUEST_SUCCESS_TOTAL:
                    finished_by_reason[labels.get(names.FINISHED_REASON_LABEL, "")] += value
                else:
                    values[sample_name] += value
                    series_count[sample_name] += 1
                continue
            base, _, suffix = sample_name.rpartition("_")
            if base in _HISTOGRAMS and suffix in ("count", "sum", "bucket"):
                seen.add(base)
                histogram_parts[base].add(suffix, labels, value)

        return cls(
            num_requests_running=round(values[names.NUM_REQUESTS_RUNNING]),
            num_requests_waiting=round(values[names.NUM_REQUESTS_WAITING]),
            gpu_cache_usage_ratio=values[names.GPU_CACHE_USAGE_PERC] / max(series_count[names.GPU_CACHE_USAGE_PERC], 1),
            prompt_tokens_total=round(values[names.PROMPT_TOKENS_TOTAL]),
            generation_tokens_total=round(values[names.GENERATION_TOKENS_TOTAL]),
            requests_finished_by_reason=MappingProxyType(
                {reason: round(count) for reason, count in sorted(finished_by_reason.items())}
            ),
            time_to_first_token=histogram_parts[names.TIME_TO_FIRST_TOKEN_SECONDS].totals(),
            time_per_output_token=histogram_parts[names.TIME_PER_OUTPUT_TOKEN_SECONDS].totals(),
            e2e_request_latency=histogram_parts[names.E2E_REQUEST_LATENCY_SECONDS].totals(),
            request_queue_time=histogram_parts[names.REQUEST_QUEUE_TIME_SECONDS].totals(),
            missing_metrics=EXPECTED_METRICS - seen,
        )


@dataclass
class _HistogramParts:
    count: float = 0.0
    sum_s: float = 0.0
    buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, suffix: str, labels: Mapping[str, str], value: float) -> None:
        if suffix == "count":
            self.count += value
        elif suffix == "sum":
            self.sum_s += value
        else:
            self.buckets[float(labels["le"])] += value

    def totals(self) -> HistogramTotals:
        buckets = tuple((bound, round(count)) for bound, count in sorted(self.buckets.items()))
        return HistogramTotals(count=round(self.count), sum_s=self.sum_s, buckets=buckets)


def _samples(text: str) -> Iterable[tuple[str, Mapping[str, str], float]]:
    # Keyed on sample names, not family names: the parser names a counter's family without "_total" when
    # the TYPE line does, and with it otherwise, depending on the exporter's prometheus_client version.
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(names.PREFIX):
                    yield sample.name, sample.labels, float(sample.value)
    except ValueError as exc:
        raise ValueError(f"not a Prometheus text exposition: {exc}") from exc
