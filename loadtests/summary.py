"""The summary of a load test, computed exactly from per-request records (pure: no locust, no I/O).

The measured window runs from the end of the warm-up (the ``measure`` phase) to the moment the run stopped
sending (the ``stop`` phase: the deadline, or the request cap once its last response came back). A request
belongs to the window it *finished* in, as a Prometheus counter sees it — so the summary and the target's own
metrics for the same window count the same requests:

- ``requests``: finished within the window, successfully or not; ``failures`` of them failed.
- ``warmup_requests`` finished before the window; ``drained_requests`` were in flight when the run stopped and
  finished after it (both are recorded, neither is measured).
- ``elapsed_s``: the window's length; ``requests_per_s`` and ``output_tokens_per_s`` count successful requests
  and their output tokens per second of it.
- Latency percentiles are over the window's successful requests, linearly interpolated between ranks (numpy's
  default): TTFT (time to first token), TPOT (time per output token after the first), e2e (whole request).
- ``client_cpu_p50_ratio``, ``client_lag_p50_s``: the load generator's own CPU (share of one core) and how late
  its scheduler woke, medians over the window's samples; ``client_bottleneck`` when either says the client was
  short of CPU (:data:`CLIENT_CPU_BUSY_RATIO`, :data:`CLIENT_LAG_LIMIT_S`): its latencies then include its own
  delays, and a target's metrics will show less.
- ``failure_causes`` counts the window's failures by cause (``connection refused``, ``timeout``, ``HTTP 503``,
  ... — see :mod:`loadtests.failures`); ``errors`` keeps the most frequent messages.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtests.failures import BAD_RESPONSE, CONNECTION_ERROR, http_cause
from loadtests.records import ClientLoad, Entry, Phase, RequestRecord, Sent

MAX_ERROR_KINDS = 5
# The client was the bottleneck when, over the window, its median CPU was this share of its one core (locust
# warns from 90 %) or its scheduler woke this late in the median (it then reads responses late too).
CLIENT_CPU_BUSY_RATIO = 0.9
CLIENT_LAG_LIMIT_S = 0.02


@dataclass(frozen=True)
class Summary:
    """What a load test measured. Seconds, tokens and ratios; latencies are None when nothing was measured."""

    profile: str
    host: str
    window_start_s: float  # Unix time the measured window began
    elapsed_s: float  # the window's length
    requests: int
    failures: int
    failure_ratio: float
    warmup_requests: int
    drained_requests: int
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    prompt_tokens: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    stopped_by: str | None = None  # "duration", "max_requests", "stopped"; None if the run did not say
    client_cpu_p50_ratio: float | None = None  # the load generator's CPU, share of one core (None: not sampled)
    client_lag_p50_s: float | None = None  # how late its scheduler woke
    client_bottleneck: bool = False  # the client was short of CPU: its latencies include its own delays
    errors: dict[str, int] = field(default_factory=dict)  # the most frequent failure messages, with counts
    failure_causes: dict[str, int] = field(default_factory=dict)  # every failure by cause, most frequent first

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, linear between ranks; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0 and 100 (got {q})")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(entries: Iterable[Entry], *, profile: str = "", host: str = "") -> Summary:
    """The summary of a run from its records (requests and phase changes, in any order).

    Without a ``measure`` phase the window starts at the first request; without a ``stop`` phase (a run still
    going, or one that was killed) it ends at the last response.
    """
    requests: list[RequestRecord] = []
    phases: dict[str, Phase] = {}
    loads: list[ClientLoad] = []
    for entry in entries:
        if isinstance(entry, RequestRecord):
            requests.append(entry)
        elif isinstance(entry, Phase):
            phases.setdefault(entry.phase, entry)
        elif isinstance(entry, ClientLoad):
            loads.append(entry)
    start_s = phases["measure"].at_s if "measure" in phases else min((r.start_s for r in requests), default=0.0)
    end_s = phases["stop"].at_s if "stop" in phases else max((r.end_s for r in requests), default=start_s)
    measured = [r for r in requests if start_s <= r.end_s <= end_s]
    ok = [r for r in measured if r.ok]
    elapsed_s = max(0.0, end_s - start_s)
    output_tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpots = [t for t in (r.tpot_s for r in ok) if t is not None]
    e2es = [r.e2e_s for r in ok]
    failed = [r for r in measured if not r.ok]
    errors = Counter(r.error or cause_of(r) for r in failed)
    causes = Counter(cause_of(r) for r in failed)
    stop = phases.get("stop")
    window_loads = [load for load in loads if start_s <= load.at_s <= end_s]
    cpu_p50 = percentile([load.cpu_ratio for load in window_loads], 50)
    lag_p50_s = percentile([load.lag_s for load in window_loads], 50)
    return Summary(
        profile=profile,
        host=host,
        window_start_s=start_s,
        elapsed_s=elapsed_s,
        requests=len(measured),
        failures=len(measured) - len(ok),
        failure_ratio=(len(measured) - len(ok)) / len(measured) if measured else 0.0,
        warmup_requests=sum(1 for r in requests if r.end_s < start_s),
        drained_requests=sum(1 for r in requests if r.end_s > end_s),
        requests_per_s=len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / elapsed_s if elapsed_s > 0 else 0.0,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_p50_s=percentile(tpots, 50),
        tpot_p99_s=percentile(tpots, 99),
        e2e_p50_s=percentile(e2es, 50),
        e2e_p99_s=percentile(e2es, 99),
        stopped_by=stop.reason if stop else None,
        client_cpu_p50_ratio=cpu_p50,
        client_lag_p50_s=lag_p50_s,
        client_bottleneck=client_bottleneck(cpu_p50, lag_p50_s),
        errors=dict(errors.most_common(MAX_ERROR_KINDS)),
        failure_causes=dict(causes.most_common()),
    )


def client_bottleneck(cpu_p50_ratio: float | None, lag_p50_s: float | None) -> bool:
    """Whether the client's own samples say it was short of CPU (False without samples)."""
    return ((cpu_p50_ratio is not None and cpu_p50_ratio >= CLIENT_CPU_BUSY_RATIO)
            or (lag_p50_s is not None and lag_p50_s >= CLIENT_LAG_LIMIT_S))


def cause_of(record: RequestRecord) -> str:
    """Why a failed request failed; records written without a cause get one from their status."""
    if record.cause is not None:
        return record.cause
    if record.status == 0:
        return CONNECTION_ERROR
    return BAD_RESPONSE if record.status == 200 else http_cause(record.status)


def format_table(summary: Summary) -> str:
    """A readable table of the summary (for people; machines read the JSON)."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:,.1f} ms"

    s = summary
    rows = [
        ("profile", summary.profile),
        ("host", summary.host),
        ("window", f"{s.elapsed_s:.1f} s ({s.warmup_requests:,} warm-up and {s.drained_requests:,} drained "
                   "requests not counted)"),
        ("stopped by", summary.stopped_by or "-"),
        ("requests", f"{summary.requests:,} ({summary.failures:,} failed, {summary.failure_ratio:.2%})"),
        ("requests/s", f"{summary.requests_per_s:,.2f}"),
        ("output tokens/s", f"{summary.output_tokens_per_s:,.1f} ({summary.output_tokens:,} tokens)"),
        ("TTFT p50 / p95 / p99", " / ".join(ms(v) for v in (s.ttft_p50_s, s.ttft_p95_s, s.ttft_p99_s))),
        ("TPOT p50 / p99", " / ".join(ms(v) for v in (s.tpot_p50_s, s.tpot_p99_s))),
        ("e2e p50 / p99", " / ".join(ms(v) for v in (s.e2e_p50_s, s.e2e_p99_s))),
    ]
    if s.client_cpu_p50_ratio is not None and s.client_lag_p50_s is not None:
        verdict = ("the CLIENT WAS THE BOTTLENECK: its latencies include its own delays, the target's metrics "
                   "show less" if s.client_bottleneck else "not a bottleneck")
        rows.append(("client (load generator)", f"CPU {s.client_cpu_p50_ratio:.0%} of a core, scheduler "
                     f"{s.client_lag_p50_s * 1000:,.1f} ms late (medians): {verdict}"))
    if summary.failure_causes:
        causes = ", ".join(f"{cause} x{count:,}" for cause, count in s.failure_causes.items())
        rows.append(("failures by cause", causes))
    rows += [(f"error x{count}", message) for message, count in summary.errors.items()]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def progress_line(entries: Iterable[Entry], *, elapsed_s: float) -> str:
    """One line of live progress: phase, requests so far, rates and TTFT over the measured window. During the
    warm-up, when few requests have finished yet, it counts those in flight (sent, not finished)."""
    entries = list(entries)
    summary = summarize(entries)
    phases = {e.phase for e in entries if isinstance(e, Phase)}
    if "measure" not in phases:
        finished = [e for e in entries if isinstance(e, RequestRecord)]
        sent = max((e.requests for e in entries if isinstance(e, Sent)), default=len(finished))
        failed = sum(1 for r in finished if not r.ok)
        return (
            f"[{elapsed_s:6.1f}s] warm-up    {max(sent - len(finished), 0):,} requests in flight, "
            f"{len(finished):,} finished ({failed:,} failed)"
        )
    ttft = "-" if summary.ttft_p50_s is None else f"{summary.ttft_p50_s * 1000:,.0f} ms"
    line = (
        f"[{elapsed_s:6.1f}s] {'draining ' if 'stop' in phases else 'measuring'}  {summary.requests:,} requests "
        f"({summary.failures:,} failed)  {summary.requests_per_s:,.1f} req/s  "
        f"{summary.output_tokens_per_s:,.0f} out tok/s  TTFT p50 {ttft}"
    )
    return line + (f"  ({summary.drained_requests:,} drained)" if "stop" in phases else "")
