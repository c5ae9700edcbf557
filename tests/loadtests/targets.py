"""Targets for the load-test integration tests, and their own view of a load window.

A target is a running OpenAI-compatible server plus a way to read what it measured: the simulated LMDeploy
engine (``lmdeploy:`` metrics, in simulated seconds) or the tpgate gateway (``tpgate_`` metrics, in real
seconds) — the tests compare the load test's summary with :class:`TargetWindow` and do not care which.
"""

from __future__ import annotations

import bisect
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from gateway.engines import metric_names as names
from tests.processes import free_port

STARTUP_TIMEOUT_S = 30.0


def get(url: str, *, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read()


Sample = tuple[str, dict[str, str], float]


def scrape(url: str) -> list[Sample]:
    """Every sample of ``url``'s /metrics: (name, labels, value)."""
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(get(f"{url}/metrics").decode())
        for sample in family.samples
    ]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile``: ``buckets`` are (upper bound, cumulative count), sorted."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in buckets:
        if count >= rank:
            if math.isinf(upper_bound):
                return lower_bound
            return lower_bound + (upper_bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = upper_bound, count
    return lower_bound


@dataclass(frozen=True)
class MetricFamilies:
    """Where a target counts requests, tokens and latencies (successful requests only, in both vocabularies)."""

    requests: str  # counter of finished requests
    success_labels: dict[str, str] | None  # labels that select the successful ones; None: it counts only those
    status_label: str | None  # label carrying the HTTP status, when the target counts failures too
    prompt_tokens: str
    output_tokens: str
    e2e: str  # histogram (base name)
    ttft: str  # histogram (base name)
    tpot: str  # histogram (base name), one observation per request: its mean gap between tokens


LMDEPLOY = MetricFamilies(
    requests=names.REQUEST_SUCCESS_TOTAL, success_labels=None, status_label=None,
    prompt_tokens=names.PROMPT_TOKENS_TOTAL, output_tokens=names.GENERATION_TOKENS_TOTAL,
    e2e=names.E2E_REQUEST_LATENCY_SECONDS, ttft=names.TIME_TO_FIRST_TOKEN_SECONDS,
    tpot=names.TIME_PER_OUTPUT_TOKEN_SECONDS,
)
TPGATE = MetricFamilies(
    requests="tpgate_requests_total", success_labels={"status": "200"}, status_label="status",
    prompt_tokens="tpgate_prompt_tokens_total", output_tokens="tpgate_output_tokens_total",
    e2e="tpgate_request_duration_seconds", ttft="tpgate_time_to_first_token_seconds",
    tpot="tpgate_time_per_output_token_seconds",
)


@dataclass(frozen=True)
class Snapshot:
    """What the target had counted at one moment."""

    samples: list[Sample]

    def total(self, name: str, **labels: str) -> float:
        return sum(v for n, sample_labels, v in self.samples
                   if n == name and all(sample_labels.get(k) == want for k, want in labels.items()))

    def label_values(self, name: str, label: str) -> set[str]:
        return {sample_labels[label] for n, sample_labels, _ in self.samples if n == name and label in sample_labels}


class ClockTracker:
    """Samples a target's clock against the wall clock (Unix time) in a background thread, so that its seconds
    convert to wall seconds over exactly the stretch a load test was busy.

    The simulated engine's clock runs ``time_scale`` times faster than real time, and slower than that while it
    lags behind a busy CPU; a real target's clock is the wall clock. ``read_clock`` returns a (Unix time, target
    time) pair read at one instant: stamping a reading on this side instead would add the request's round trip,
    seconds on a busy machine, to the wall time of one end of the span.
    """

    def __init__(self, read_clock: Callable[[], tuple[float, float]], *, interval_s: float = 0.1) -> None:
        self._read_clock = read_clock
        self._interval_s = interval_s
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClockTracker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._samples.append(self._read_clock())
            self._stop.wait(self._interval_s)

    def rate(self, start_s: float, end_s: float) -> float:
        """Target seconds per wall second between two Unix times."""
        return (self._at(end_s) - self._at(start_s)) / (end_s - start_s)

    def _at(self, wall_s: float) -> float:
        samples = self._samples
        if not samples[0][0] <= wall_s <= samples[-1][0]:
            raise ValueError(f"{wall_s} is outside the tracked span {samples[0][0]} .. {samples[-1][0]}")
        right = bisect.bisect_left(samples, (wall_s, -math.inf))
        (w0, c0), (w1, c1) = samples[max(right - 1, 0)], samples[right]
        return c0 if w1 == w0 else c0 + (c1 - c0) * (wall_s - w0) / (w1 - w0)


@dataclass(frozen=True)
class TargetWindow:
    """The target's own measurements between two snapshots, latencies converted to wall-clock seconds."""

    successes: int
    by_status: dict[str, int] | None  # finished requests by HTTP status; None when the target counts only successes
    prompt_tokens: int
    output_tokens: int
    e2e_mean_s: float
    ttft_mean_s: float
    tpot_mean_s: float
    e2e_p50_s: float | None
    target_seconds_per_wall_second: float

    @classmethod
    def between(
        cls, before: Snapshot, after: Snapshot, *, families: MetricFamilies, target_seconds_per_wall_second: float
    ) -> TargetWindow:
        def delta(name: str, **labels: str) -> float:
            return after.total(name, **labels) - before.total(name, **labels)

        f, scale = families, target_seconds_per_wall_second
        by_status = None
        if f.status_label is not None:
            statuses = after.label_values(f.requests, f.status_label)
            by_status = {s: n for s in statuses if (n := round(delta(f.requests, **{f.status_label: s})))}
        count, ttft_count, tpot_count = delta(f"{f.e2e}_count"), delta(f"{f.ttft}_count"), delta(f"{f.tpot}_count")
        les = sorted(after.label_values(f"{f.e2e}_bucket", "le"), key=float)
        p50 = histogram_quantile(0.5, [(float(le), delta(f"{f.e2e}_bucket", le=le)) for le in les])
        return cls(
            successes=round(delta(f.requests, **(f.success_labels or {}))),
            by_status=by_status,
            prompt_tokens=round(delta(f.prompt_tokens)),
            output_tokens=round(delta(f.output_tokens)),
            e2e_mean_s=delta(f"{f.e2e}_sum") / count / scale if count else 0.0,
            ttft_mean_s=delta(f"{f.ttft}_sum") / ttft_count / scale if ttft_count else 0.0,
            tpot_mean_s=delta(f"{f.tpot}_sum") / tpot_count / scale if tpot_count else 0.0,
            e2e_p50_s=None if p50 is None else p50 / scale,
            target_seconds_per_wall_second=scale,
        )


class GatewayTarget:
    """A running tpgate gateway (the test session's ``gateway``): ``tpgate_`` metrics, in wall-clock seconds."""

    families = TPGATE

    def __init__(self, url: str, *, api_key: str) -> None:
        self.url = url
        self.api_key = api_key

    def snapshot(self) -> Snapshot:
        return Snapshot(samples=scrape(self.url))

    def clock(self) -> tuple[float, float]:
        now_s = time.time()
        return now_s, now_s

    def close(self) -> None:
        """The session owns the gateway."""


class SimEngineTarget:
    """``tpgate engine sim`` in a subprocess on a free loopback port; stopped by :meth:`close`."""

    families = LMDEPLOY
    api_key = None

    def __init__(self, *, model: str = "llama-2-7b", gpu: str = "a100-80gb", tp: int = 1, time_scale: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - the engine writes to it until close()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "engine", "sim", "--model", model, "--gpu", gpu, "--tp", str(tp),
             "--host", "127.0.0.1", "--port", str(self.port), "--time-scale", repr(time_scale)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"the simulated engine exited: {self._log.read().decode()[-2000:]}")
            try:
                get(f"{self.url}/health", timeout_s=1.0)
                return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError(f"the simulated engine did not become healthy in {STARTUP_TIMEOUT_S:g} s")

    def snapshot(self) -> Snapshot:
        return Snapshot(samples=scrape(self.url))

    def clock(self) -> tuple[float, float]:
        """The engine's simulated time, and the Unix time it was read at (the engine runs on this host)."""
        stats = json.loads(get(f"{self.url}/sim/stats", timeout_s=10.0))
        return float(stats["unix_time_s"]), float(stats["simulated_time_s"])

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
