"""A router's reports to the controller: only the classes under promotion; the promotion step and drift gauges."""

from gateway.admin.reporter import MetricsReporter, collect
from gateway.control.controller import Controller
from gateway.control.promotion import PromotionPolicy
from gateway.control.state import DesiredState
from gateway.dataplane.metrics import GatewayMetrics
from tests.gateway.admin.local import LocalControl
from tests.gateway.control.test_controller import RecordingDeployer, settings_for
from tests.gateway.pools import make_pool


def record(metrics, route, pool, n=1):
    series = metrics.series(route, pool)
    for _ in range(n):
        series.requests("200").inc()
        series.time_to_first_token.observe(0.1)
        series.request_duration.observe(0.5)


def test_collect_takes_the_series_a_window_reads_of_the_wanted_classes_only():
    metrics = GatewayMetrics()
    record(metrics, "batch", "a", 3)
    record(metrics, "interactive", "b", 2)
    assert collect(metrics, set()) == {}
    samples = collect(metrics, {"batch"})
    names = {name for name, _ in samples}
    assert names == {"tpgate_requests_total", "tpgate_time_to_first_token_seconds_bucket",
                     "tpgate_time_per_output_token_seconds_bucket"}
    assert all(dict(labels)["class"] == "batch" for _, labels in samples)
    total = next(v for (name, labels), v in samples.items() if name == "tpgate_requests_total")
    assert total == 3


async def test_a_router_reports_what_the_controller_asks_for_and_shows_the_step(capacity):
    settings = settings_for(capacity, promotion_policies={"batch": PromotionPolicy(steps=(0.5, 1.0))})
    controller = Controller(settings, RecordingDeployer())
    await controller.apply(DesiredState(pools={"old": make_pool("old"), "other": make_pool("other")},
                                        routes={"batch": {"old": 1.0}, "interactive": {"other": 1.0}}))
    metrics = GatewayMetrics()
    record(metrics, "batch", "old", 4)
    reporter = MetricsReporter(metrics, LocalControl(controller))
    await reporter.report_once()
    assert controller._reports.snapshot() == {reporter.router_id: {}}  # nothing asked for, nothing sent
    assert b"tpgate_promotion_step{" not in metrics.exposition()
    await controller.start_promotion("batch", make_pool("new"), source="api")
    await reporter.report_once()  # learns the class
    await reporter.report_once()  # sends it
    (sent,) = controller._reports.snapshot().values()
    assert {dict(labels)["pool"] for _, labels in sent} == {"old"}
    assert b'tpgate_promotion_step{class="batch"} 0.0' in metrics.exposition()  # the new pool is coming up
    controller.register_endpoint("new", "r1", "http://127.0.0.1:9")
    await controller._promotions.tick()
    await reporter.report_once()
    exposition = metrics.exposition()
    assert b'tpgate_promotion_step{class="batch"} 1.0' in exposition
    assert b'tpgate_promotion_weight_ratio{class="batch"} 0.5' in exposition


async def test_a_router_shows_the_drift_monitors_current_verdicts_as_gauges(capacity):
    controller = Controller(settings_for(capacity), RecordingDeployer())
    await controller.apply(DesiredState(pools={"old": make_pool("old")}, routes={"batch": {"old": 1.0}}))
    metrics = GatewayMetrics()
    reporter = MetricsReporter(metrics, LocalControl(controller))
    await reporter.report_once()
    assert b"tpgate_class_drifted{" not in metrics.exposition()  # no verdict, no series
    controller.report_drift("batch", {"drifted": True, "reason": "drifted: concurrency 64 vs 16",
                                      "decision": "advise", "decision_reason": "", "valid_for_s": 90.0})
    await reporter.report_once()
    assert b'tpgate_class_drifted{class="batch"} 1.0' in metrics.exposition()
    controller.report_drift("batch", {"drifted": False, "reason": "within bounds", "decision": "hold",
                                      "decision_reason": "", "valid_for_s": 90.0})
    await reporter.report_once()
    assert b'tpgate_class_drifted{class="batch"} 0.0' in metrics.exposition()
