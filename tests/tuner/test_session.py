"""Tuning sessions: which metric source a session uses, and (integration) a whole session through the tuner's
real I/O: locust load through a streaming proxy that records gateway metrics, a simulated engine at time scale
10, a Prometheus server, the trial runner and the study driver. Only the control plane is a fake (in memory).
The trial's record, in the engine's clock, is compared with the engine's own metrics over the same window."""

import shutil

import optuna
import pytest

from gateway.config import load_config
from tests.tuner.fakes import FakeControl
from tests.tuner.servers import mini_gateway
from tests.tuner.traffic import GatewayTraffic
from tuner import GatewayHandle, tune
from tuner.prometheus_server import PrometheusServer
from tuner.session import open_metric_source
from tuner.sources import PrometheusSource, scalar

PROFILE = """
description: six users back to back, fixed lengths
users: 6
arrival: {kind: closed, think_time_s: {kind: fixed, value: 0}}
prompt_tokens: {kind: fixed, value: 2000}
output_tokens: {kind: fixed, value: 128}
stream: true
api: chat
duration_s: 60
warmup_s: 5
max_requests: 100000
request_timeout_s: 120
drain_timeout_s: 20
"""

CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 2
engine: {{time_scale: 10}}
default_class: chat
classes:
  chat: {{objective: max_output_tokens_per_s, profile: {profile}, slo: {{error_rate_max: 0.01}}}}
tuning:
  knobs: {{max_batch_size: [128], cache_max_entry_count: [0.8], max_prefill_token_num: [8192]}}
  warmup_s: 3
  window_s: 8
  trial_timeout_s: 120
  guided_trials: 1
  max_clock_lag_ratio: 0.6  # this test checks the correction itself, on a CPU that may be busy
  prometheus_url: {prometheus}
"""


async def engine_mean(prometheus: PrometheusSource, metric: str, *, end_s: float, window_ms: int) -> float:
    total = scalar(await prometheus.query(f"sum(increase({metric}_sum[{window_ms}ms]))", at_s=end_s))
    count = scalar(await prometheus.query(f"sum(increase({metric}_count[{window_ms}ms]))", at_s=end_s))
    assert total is not None and count, f"{metric}: no observations in the window"
    return total / count


@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_a_trial_records_what_the_engine_measured(tmp_path, sim_engine):
    assert shutil.which("prometheus"), "Debian's prometheus is needed: apt-get install -y prometheus"
    (tmp_path / "chat.yaml").write_text(PROFILE)
    traffic = GatewayTraffic()
    control = FakeControl(budget=2, classes=("chat",), engine_url=sim_engine)

    def pool_of(route: str) -> str:
        return next(iter(control.routes.get(route, {"none": 1.0})))

    lines: list[str] = []
    async with mini_gateway(traffic, sim_engine, pool_of) as gateway_url, PrometheusServer() as prometheus:
        control.gateway_url = gateway_url
        await prometheus.watch({"router-0": gateway_url}, {"sim": {"r0": sim_engine}})
        config_path = tmp_path / "tpgate.yaml"
        config_path.write_text(CONFIG.format(profile=tmp_path / "chat.yaml", prometheus=prometheus.url))
        config = load_config(config_path)
        storage = f"sqlite:///{tmp_path / 'tune.db'}"
        result = await tune(config, "chat", gateway=GatewayHandle(control, "admin-token"), storage=storage,
                            n_trials=1, progress=lines.append)
        (record,) = result.records
        source = PrometheusSource(prometheus.url)
        try:
            end_s, window_ms = record.timings["window_end_unix_s"], round(record.timings["window_s"] * 1000)
            truth = {name: await engine_mean(source, f"lmdeploy:{name}_seconds", end_s=end_s, window_ms=window_ms)
                     for name in ("time_to_first_token", "time_per_output_token", "e2e_request_latency")}
            tokens = scalar(await source.query(f"sum(increase(lmdeploy:generation_tokens_total[{window_ms}ms]))",
                                               at_s=end_s))
        finally:
            await source.aclose()

    assert record.outcome == "feasible", record.reason
    assert record.source == "prometheus" and record.guided
    assert record.clock.valid and 4 <= record.clock.effective_scale <= 10.2
    measured = record.measured
    assert measured.clock == "engine" and measured.requests > 50
    print(f"\nengine clock {record.clock.effective_scale:.2f}x; recorded vs engine: "
          f"TTFT {measured.ttft_mean_s:.4f} vs {truth['time_to_first_token']:.4f} s, "
          f"TPOT {measured.tpot_mean_s:.5f} vs {truth['time_per_output_token']:.5f} s, "
          f"e2e {measured.e2e_mean_s:.3f} vs {truth['e2e_request_latency']:.3f} s, "
          f"output {measured.output_tokens_per_s:.0f} vs {tokens / measured.window_s:.0f} tok/s")
    # decode dominates throughput, TPOT and e2e, and that is where a busy CPU makes the clock lag: the effective
    # scale corrects them closely. A figure whose steps lagged less than the window's average (a long prefill
    # sleeps through most of its step) is corrected too far, by at most the lag ratio.
    # Latencies recorded at the client also hold the gateway's path (proxy hop, HTTP, the load generator's own
    # loop), which the engine's histograms do not: a few wall milliseconds that the clock's scale turns into tens
    # of engine ones, and more where the CPU is short enough for the clock to lag.
    bound = max(0.10, record.clock.lag_ratio) + 0.05
    assert measured.output_tokens_per_s == pytest.approx(tokens / measured.window_s, rel=0.10)
    assert measured.tpot_mean_s == pytest.approx(truth["time_per_output_token"], rel=bound)
    assert measured.e2e_mean_s == pytest.approx(truth["e2e_request_latency"], rel=bound)
    gateway_path_s = 0.005 * record.clock.effective_scale
    # the two errors add up: the scale's correction (relative) and the gateway's path (absolute)
    ttft_error_s = abs(measured.ttft_mean_s - truth["time_to_first_token"])
    assert ttft_error_s <= bound * truth["time_to_first_token"] + gateway_path_s, (measured.ttft_mean_s, truth)
    # the control plane saw a trial pool on a trial route, and nothing is left behind
    assert control.pools == {} and control.routes == {}
    assert [c[1] for c in control.calls if c[0] == "set_route"] == [record.route]
    assert any("metrics: Prometheus at" in line for line in lines)
    trials = optuna.load_study(study_name=result.study_name, storage=storage).trials
    assert len(trials) == 1 and trials[0].values == [pytest.approx(measured.output_tokens_per_s)]


async def test_without_prometheus_the_session_scrapes_and_says_so():
    lines = []
    async with open_metric_source(prometheus_url=None, binary="no-such-prometheus", progress=lines.append) as source:
        assert source.name == "scrape"
        await source.watch("http://127.0.0.1:18000", {})
        assert source.description == "direct scrapes of http://127.0.0.1:18000/metrics (no Prometheus)"
    assert lines == ["metrics: no 'no-such-prometheus' on PATH and no --prometheus-url: reading the gateway's "
                     "/metrics directly at each window's start and end (Debian: apt-get install -y prometheus)"]


async def test_a_given_prometheus_url_is_used_as_it_is():
    async with open_metric_source(prometheus_url="http://127.0.0.1:9090/") as source:
        assert (source.name, source.description) == ("prometheus", "Prometheus at http://127.0.0.1:9090")
