"""The simulated engine's Prometheus metrics: LMDeploy's names, types, labels and buckets, in simulated seconds.

Each engine owns its :class:`~prometheus_client.CollectorRegistry` (no global registry). Differences from
LMDeploy 0.18, all deliberate:

- the scheduler gauges are sampled at scrape time (LMDeploy refreshes them every 10 s), so a scrape always
  shows the current queue;
- ``time_per_output_token_seconds`` is observed once per request (its mean gap between tokens) rather than
  once per token, which keeps 256 streams cheap; quantiles over requests are what TPOT SLOs use;
- ``lmdeploy:backend_config_info`` carries ``simulated="true"`` and the simulated GPU, TP and time scale.

The simulator's own metrics are ``tpgate_sim_...`` and never reuse an ``lmdeploy:`` name:

- ``tpgate_sim_time_seconds_total`` (counter): simulated seconds elapsed, so ``rate(...[1m])`` is the clock's
  rate (simulated seconds per wall second) over any window;
- ``tpgate_sim_clock_rate_ratio{window="life"|"recent"}`` (gauge): that rate over the engine's life and over
  its last few seconds, as the engine measures it; below the time scale when the machine is too busy to keep
  up.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from gateway.engines import metric_names as names
from gateway.engines.sim.scheduler import SchedulerStats, Sequence

# LMDeploy's buckets (lmdeploy/metrics/loggers.py).
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)
TPOT_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)
ENGINE_LABEL = "0"  # LMDeploy labels its single data-parallel rank "0"

SIM_TIME_SECONDS_TOTAL = "tpgate_sim_time_seconds_total"
SIM_CLOCK_RATE_RATIO = "tpgate_sim_clock_rate_ratio"
CLOCK_WINDOW_LABEL = "window"


class EngineMetrics:
    """The engine's metrics; also the scheduler's observer."""

    def __init__(self, *, model_name: str, backend_info: dict[str, str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = dict(model_name=model_name, engine=ENGINE_LABEL)
        label_names = names.LABELS

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, label_names, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, label_names, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, label_names, registry=self.registry, buckets=buckets).labels(**labels)

        info = Info("lmdeploy:backend_config", "information of backend_config", registry=self.registry)
        info.info({"simulated": "true", **backend_info})
        self.running = gauge(names.NUM_REQUESTS_RUNNING, "Number of requests in model execution batches.")
        self.waiting = gauge(names.NUM_REQUESTS_WAITING, "Number of requests waiting to be processed.")
        self.cache_usage = gauge(names.GPU_CACHE_USAGE_PERC, "GPU KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = counter(names.PROMPT_TOKENS_TOTAL, "Number of prefill tokens processed.")
        self.generation_tokens = counter(names.GENERATION_TOKENS_TOTAL, "Number of generation tokens processed.")
        self._success = Counter(
            names.REQUEST_SUCCESS_TOTAL, "Count of successfully processed requests.",
            [*label_names, names.FINISHED_REASON_LABEL], registry=self.registry,
        )
        self._success_by_reason = {
            reason: self._success.labels(**labels, finished_reason=reason) for reason in ("stop", "length")
        }
        self.ttft = histogram(names.TIME_TO_FIRST_TOKEN_SECONDS, "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS_S)
        self.tpot = histogram(names.TIME_PER_OUTPUT_TOKEN_SECONDS, "Histogram of time per output token in seconds.",
                              TPOT_BUCKETS_S)
        self.e2e = histogram(names.E2E_REQUEST_LATENCY_SECONDS, "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS_S)
        self.queue = histogram(names.REQUEST_QUEUE_TIME_SECONDS,
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS_S)
        self.sim_time = counter(SIM_TIME_SECONDS_TOTAL, "Simulated seconds elapsed on the engine's clock.")
        self._sim_time_reported_s = 0.0
        clock_rate = Gauge(
            SIM_CLOCK_RATE_RATIO, "Simulated seconds per wall-clock second, over the engine's life or recently.",
            [*label_names, CLOCK_WINDOW_LABEL], registry=self.registry,
        )
        self.clock_rate_life = clock_rate.labels(**labels, window="life")
        self.clock_rate_recent = clock_rate.labels(**labels, window="recent")

    def refresh(self, stats: SchedulerStats) -> None:
        """Sample the scheduler gauges (called at scrape time)."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.cache_usage.set(stats.cache_usage_ratio)
        clock = stats.clock
        if clock.simulated_s > self._sim_time_reported_s:
            self.sim_time.inc(clock.simulated_s - self._sim_time_reported_s)
            self._sim_time_reported_s = clock.simulated_s
        self.clock_rate_life.set(clock.life_ratio)
        self.clock_rate_recent.set(clock.recent_ratio)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # SchedulerObserver
    def on_step(self, *, prompt_tokens: int, generation_tokens: int) -> None:
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens)

    def on_first_token(self, seq: Sequence) -> None:
        assert seq.first_token_s is not None and seq.admitted_s is not None
        self.ttft.observe(max(0.0, seq.first_token_s - seq.arrival_s))
        self.queue.observe(max(0.0, seq.admitted_s - seq.arrival_s))

    def on_finish(self, seq: Sequence) -> None:
        assert seq.finished_s is not None and seq.first_token_s is not None
        self.e2e.observe(max(0.0, seq.finished_s - seq.arrival_s))
        if seq.generated > 1:
            self.tpot.observe(max(0.0, (seq.finished_s - seq.first_token_s) / (seq.generated - 1)))
        counter = self._success_by_reason.get(seq.finish_reason)
        if counter is not None:
            counter.inc()
