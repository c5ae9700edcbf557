"""The simulated engine's metrics: LMDeploy's names untouched, the clock rate under tpgate_sim_ names."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gateway.engines import metric_names as names
from gateway.engines.sim.clock import ClockRates
from gateway.engines.sim.metrics import SIM_CLOCK_RATE_RATIO, SIM_TIME_SECONDS_TOTAL, EngineMetrics
from gateway.engines.sim.scheduler import SchedulerStats

LMDEPLOY_FAMILIES = {
    names.NUM_REQUESTS_RUNNING, names.NUM_REQUESTS_WAITING, names.GPU_CACHE_USAGE_PERC,
    names.PROMPT_TOKENS_TOTAL.removesuffix("_total"), names.GENERATION_TOKENS_TOTAL.removesuffix("_total"),
    names.REQUEST_SUCCESS_TOTAL.removesuffix("_total"), names.TIME_TO_FIRST_TOKEN_SECONDS,
    names.TIME_PER_OUTPUT_TOKEN_SECONDS, names.E2E_REQUEST_LATENCY_SECONDS, names.REQUEST_QUEUE_TIME_SECONDS,
    "lmdeploy:backend_config_info",
}


def stats(*, simulated_s: float, life: float, recent: float) -> SchedulerStats:
    return SchedulerStats(
        running=3, waiting=2, queued=7, cache_usage_ratio=0.5, total_blocks=100, free_blocks=50, steps=10,
        mean_running=3.0, preemptions=1, evicted_blocks=2, now_s=simulated_s, busy_s=simulated_s / 2,
        clock=ClockRates(simulated_s=simulated_s, wall_s=simulated_s / life, life_ratio=life, recent_ratio=recent,
                         recent_window_s=10.0),
    )


def samples(metrics: EngineMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k in ("window",)))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_clock_rate_and_simulated_time_are_exported_under_tpgate_sim_names():
    metrics = EngineMetrics(model_name="m", backend_info={})
    metrics.refresh(stats(simulated_s=50.0, life=9.5, recent=7.25))
    values = samples(metrics)
    assert values[(SIM_TIME_SECONDS_TOTAL, ())] == 50.0
    assert values[(SIM_CLOCK_RATE_RATIO, (("window", "life"),))] == 9.5
    assert values[(SIM_CLOCK_RATE_RATIO, (("window", "recent"),))] == 7.25
    # The counter only grows by what the clock advanced, so rate() over any window is the clock's rate.
    metrics.refresh(stats(simulated_s=80.0, life=9.0, recent=6.0))
    metrics.refresh(stats(simulated_s=80.0, life=9.0, recent=6.0))
    assert samples(metrics)[(SIM_TIME_SECONDS_TOTAL, ())] == 80.0


def test_lmdeploy_metrics_stay_exactly_lmdeploys():
    metrics = EngineMetrics(model_name="m", backend_info={})
    metrics.refresh(stats(simulated_s=1.0, life=1.0, recent=1.0))
    families = {family.name for family in text_string_to_metric_families(metrics.render().decode())
                if not family.name.endswith("_created")}  # the engine's CLI turns *_created off, as LMDeploy
    assert {name for name in families if name.startswith("lmdeploy:")} == LMDEPLOY_FAMILIES
    assert {name for name in families if not name.startswith("lmdeploy:")} == {
        SIM_TIME_SECONDS_TOTAL.removesuffix("_total"), SIM_CLOCK_RATE_RATIO}
    values = samples(metrics)
    assert values[(names.NUM_REQUESTS_RUNNING, ())] == 3
    assert values[(names.NUM_REQUESTS_WAITING, ())] == 2  # in the batch but not running, as LMDeploy counts
