"""The drift monitor over synthetic intervals: references, verdicts, rails, and what it reports."""

import asyncio
import json

import pytest
from aiohttp import web

from gateway.config import load_config
from gateway.control.drift_board import DriftBoard
from tests.tuner.profile_traffic import ClassTraffic
from tests.tuner.test_drift import interval
from tests.tuner.test_retune import CURRENT, WIDER, Backend, trial
from tuner.drift import ReferenceProfile
from tuner.drift_monitor import DriftMonitor, GatewayFacts, PromqlIntervals, ScrapeIntervals, facts_from_status
from tuner.drift_store import ControllerDriftStore, DriftRecords, FileDriftStore
from tuner.live_profile import promql_queries
from tuner.retune import Retuner
from tuner.sources import MetricsUnavailable


class Intervals:
    """Hands the monitor one prepared interval per read (None first, as a scrape reader does)."""

    description = "prepared intervals"

    def __init__(self, figures):
        self._figures = list(figures)
        self._reads = 0

    async def read(self, class_names):
        self._reads += 1
        if self._reads == 1:
            return None
        figures = self._figures[self._reads - 2]
        return {name: interval(30.0 * (self._reads - 1), **figures) for name in class_names}

    async def aclose(self):
        pass


class Facts:
    def __init__(self, free_gpus=4, in_progress=None, fail=False, current=None):
        self.free_gpus, self.in_progress, self.fail, self.current = free_gpus, in_progress or {}, fail, current or {}

    async def facts(self):
        if self.fail:
            raise MetricsUnavailable("connection refused")
        return GatewayFacts(self.free_gpus, self.in_progress, self.current)


class Gateway:
    """The admin API's PUT /admin/drift/{class}, over the controller's own board: the reports as sent, and the
    events the gateway makes of them."""

    def __init__(self):
        self.board, self.reports, self.events = DriftBoard(), [], []

    async def report_drift(self, class_name, report):
        json.dumps(report, allow_nan=False)  # what the admin API can take
        self.reports.append((class_name, report))
        self.events += [(e.kind, class_name, e.message) for e in self.board.report(class_name, report, now_s=0.0)]


def configured(tmp_path, mode="advisory", profile="batch"):
    path = tmp_path / "tpgate.yaml"
    path.write_text(f"classes:\n  batch: {{profile: {profile}}}\n  interactive: {{}}\ndefault_class: batch\n"
                    f"drift:\n  interval_s: 30\n  classes:\n    batch: {{mode: {mode}, window_s: 300, max_gpus: 4}}\n"
                    "    interactive: {mode: 'off'}\n")
    return load_config(path)


async def run_monitor(monitor, steps):
    await monitor.start()
    reports = []
    for _ in range(steps):
        reports.append(await monitor.step())
    return reports


async def test_a_sustained_shift_is_reported_everywhere_once(tmp_path):
    lines, events = [], Gateway()
    store = FileDriftStore(tmp_path / "drift.json")
    # the batch profile: 256 users, ~956-token median prompts; the traffic: 16 users, 4,000-token prompts
    monitor = DriftMonitor(configured(tmp_path), reader=Intervals([{"concurrency": 16.0, "prompt": 4000.0}] * 12),
                           store=store, min_pool_gpus=2, facts=Facts(free_gpus=6), gateway=events, say=lines.append)
    assert monitor.classes == ["batch"]
    reports = await run_monitor(monitor, 13)
    assert reports[0] == []  # the first read has no interval yet
    drifted = [r[0].verdict.drifted for r in reports[1:]]
    assert drifted == [False] * 9 + [True] * 3
    decision = reports[10][0].decision
    assert (decision.action, decision.gpus) == ("advise", 4)  # 6 free, at most 4 for a re-tune
    assert decision.reason.startswith("would re-tune on 4 GPUs: drifted: concurrency 16 vs 256")
    assert events.events == [("drift.detected", "batch", f"class batch: {reports[10][0].verdict.reason}")]
    assert len(events.reports) == 12  # the whole verdict every interval, for the gateway's state and gauge
    name, last = events.reports[-1]
    assert name == "batch" and last["drifted"] and last["decision"] == "advise" and last["valid_for_s"] == 90
    assert last["distances"]["concurrency"] == 16 / 256 and last["live"]["concurrency_mean"] == 16
    assert last["reference"]["concurrency"] == 256 and last["retune"] is None
    assert lines[0].startswith("class batch: reference from load profile batch: concurrency 256")
    assert sum("would re-tune" in line for line in lines) == 1  # said when it changed, not every interval
    m = monitor.metrics.registry
    assert m.get_sample_value("tpgate_class_drifted", {"class": "batch"}) == 1
    assert m.get_sample_value("tpgate_class_retune_advised", {"class": "batch"}) == 1
    assert m.get_sample_value("tpgate_class_drift_ratio", {"class": "batch", "distance": "concurrency"}) == 16 / 256
    stored = json.loads((tmp_path / "drift.json").read_text())
    assert stored["references"]["batch"]["concurrency"] == 256
    assert stored["verdicts"]["batch"]["drifted"] is True and stored["verdicts"]["batch"]["decision"] == "advise"


async def test_auto_mode_only_advises_without_the_admin_api(tmp_path):
    monitor = DriftMonitor(configured(tmp_path, mode="auto"), reader=Intervals([{"concurrency": 16.0}] * 10),
                           store=FileDriftStore(tmp_path / "d.json"), min_pool_gpus=2, facts=Facts(), say=print)
    decision = (await run_monitor(monitor, 11))[-1][0].decision
    assert decision.action == "advise" and decision.reason.endswith("(mode auto: re-tuning needs the gateway's "
                                                                    "admin token)")


async def test_auto_mode_re_tunes_once_promotes_and_takes_the_live_profile_as_the_new_reference(tmp_path):
    # the class's objective is the default min_e2e_p99: the winner's p99 is half the current one's
    backend = Backend([trial(0, CURRENT, value=2.0), trial(1, WIDER, value=1.0)])
    config = configured(tmp_path, mode="auto")
    lines, events, now = [], Gateway(), [1000.0]
    monitor = DriftMonitor(config, reader=Intervals([{"concurrency": 16.0, "prompt": 300.0}] * 14),
                           store=FileDriftStore(tmp_path / "d.json"), min_pool_gpus=2,
                           facts=Facts(current={"batch": CURRENT}), gateway=events,
                           retuner=Retuner(config, backend, poll_s=0.01), say=lines.append, clock=lambda: now[0])
    reports = await run_monitor(monitor, 11)
    assert reports[-1][0].decision.action == "retune"
    holding = await monitor.step()  # the re-tune runs: the rails hold the class
    assert "a re-tune of class batch is in progress" in holding[0].decision.reason
    for _ in range(100):
        if monitor.outcomes:
            break
        await asyncio.sleep(0.01)
    [(name, outcome)] = monitor.outcomes
    assert (name, outcome.result, backend.promoted) == ("batch", "promoted", [("batch-abc123", 1)])
    assert len(backend.requests) == 1
    stored = json.loads((tmp_path / "d.json").read_text())
    assert stored["last_retune_s"]["batch"] == 1000.0
    assert stored["references"]["batch"]["source"] == f"re-tune study batch-abc123 promoted {WIDER.label()}"
    assert stored["references"]["batch"]["prompt_median"] == 300
    assert events.events[-1][:2] == ("retune.promoted", "batch")  # told as soon as it ended
    assert events.reports[-1][1]["retune"]["result"] == "promoted"
    after = await monitor.step()  # measured against the new reference: no drift, no second re-tune
    assert not after[0].verdict.drifted and after[0].decision.action == "hold"
    assert any(line.startswith("class batch: re-tune promoted") for line in lines)
    await monitor.aclose()


@pytest.mark.parametrize(("facts", "reason"), [
    (Facts(fail=True), "the gateway's status is unavailable"),
    (Facts(in_progress={"batch": "a study of class batch"}), "a study of class batch is in progress"),
    (Facts(free_gpus=1), "too few for the smallest pool"),
    (None, "the gateway's status is not read"),
])
async def test_the_rails_hold_a_drifted_class(tmp_path, facts, reason):
    monitor = DriftMonitor(configured(tmp_path), reader=Intervals([{"concurrency": 16.0}] * 10),
                           store=FileDriftStore(tmp_path / "d.json"), min_pool_gpus=2, facts=facts, say=print)
    report = (await run_monitor(monitor, 11))[-1][0]
    assert report.verdict.drifted and report.decision.action == "hold" and reason in report.decision.reason
    assert monitor.metrics.registry.get_sample_value("tpgate_class_retune_advised", {"class": "batch"}) == 0


async def test_a_recent_re_tune_holds_the_next_one(tmp_path):
    store = FileDriftStore(tmp_path / "d.json")
    await store.save(DriftRecords(last_retune_s={"batch": 1000.0}))
    monitor = DriftMonitor(configured(tmp_path), reader=Intervals([{"concurrency": 16.0}] * 10), store=store,
                           min_pool_gpus=2, facts=Facts(), say=print, clock=lambda: 1000.0 + 600)
    decision = (await run_monitor(monitor, 11))[-1][0].decision
    assert decision.action == "hold" and decision.reason.startswith("re-tuned 10 min ago")


async def test_a_stored_reference_wins_over_the_configured_profile(tmp_path):
    store = FileDriftStore(tmp_path / "d.json")
    stored = ReferenceProfile(class_name="batch", source="promotion", set_at_s=5.0, concurrency=16.0,
                              prompt_median=4000.0, output_median=200.0)
    await store.save(DriftRecords(references={"batch": stored}))
    monitor = DriftMonitor(configured(tmp_path), reader=Intervals([{"concurrency": 16.0, "prompt": 4000.0}] * 10),
                           store=store, min_pool_gpus=2, facts=Facts(), say=print)
    assert not any(r[0].verdict.drifted for r in (await run_monitor(monitor, 11))[1:])


async def test_a_class_without_a_profile_takes_its_first_busy_interval_as_reference(tmp_path):
    lines = []
    monitor = DriftMonitor(configured(tmp_path, profile="null"),
                           reader=Intervals([{"rate": 0.0}] + [{"concurrency": 3.0}] * 10),
                           store=FileDriftStore(tmp_path / "d.json"), min_pool_gpus=2, facts=Facts(),
                           say=lines.append)
    reports = await run_monitor(monitor, 3)
    assert reports[1] == []  # no traffic: nothing to take as a reference yet
    assert reports[2][0].verdict.reference.source == "first interval observed"
    assert reports[2][0].verdict.reference.concurrency == 3
    assert "no reference yet" in lines[0]
    stored = await FileDriftStore(tmp_path / "d.json").load()
    assert stored.references["batch"].concurrency == 3


class Sections:
    """The controller's record sections, as the control client exposes them."""

    def __init__(self):
        self.sections = {}

    async def records(self, section):
        return self.sections.get(section)

    async def put_records(self, section, value):
        self.sections[section] = json.loads(json.dumps(value))  # what crosses to the actor is plain JSON


async def test_drift_records_round_trip_through_the_controller_section_and_a_file(tmp_path):
    records = DriftRecords(
        references={"batch": ReferenceProfile(class_name="batch", source="x", set_at_s=1.0, concurrency=4.0)},
        last_retune_s={"batch": 7.5}, verdicts={"batch": {"drifted": False}})
    sections = Sections()
    controller = ControllerDriftStore(sections)
    assert await controller.load() == DriftRecords()
    await controller.save(records)
    assert set(sections.sections) == {"drift"}
    assert await controller.load() == records
    file = FileDriftStore(tmp_path / "sub" / "drift.json")
    await file.save(records)
    assert await file.load() == records
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a drift record file"):
        await FileDriftStore(tmp_path / "bad.json").load()


def status_with(routes, trial_classes=None):
    """The controller's status as ``/admin/status`` returns it: two pools, GPUs 6 of 8 used."""
    def pool(tp, replicas):
        return {"tp": tp, "replicas": replicas, "ready_replicas": replicas, "gpus": tp * replicas, "phase": "running",
                "message": "", "endpoints": {}, "engine": {"engine": "sim", "time_scale": 1.0,
                                                           "knobs": {"max_batch_size": 256}}}

    return {"version": 3, "epoch": "e", "pools": {"big": pool(4, 1), "small": pool(1, 2)}, "routes": routes,
            "gpus": {"budget": 8, "used": 6, "free": 2}, "trial_classes": trial_classes or {}}


def test_facts_from_the_controllers_status():
    facts = facts_from_status(status_with({"batch": {"small": 0.8, "big": 0.2}, "interactive": {"big": 1.0}},
                                          {"trial-s-1": "batch"}))
    assert facts.free_gpus == 2 and facts.in_progress == {"batch": "a study of class batch (trial route trial-s-1)"}
    assert facts.current["batch"].shape == (1, 2) and facts.current["interactive"].shape == (4, 1)
    assert facts.current["batch"].knobs.max_batch_size == 256


async def test_an_advice_says_what_the_performance_model_predicts(tmp_path):
    current = facts_from_status(status_with({"batch": {"big": 1.0}})).current
    monitor = DriftMonitor(configured(tmp_path), reader=Intervals([{"concurrency": 16.0, "prompt": 4000.0}] * 12),
                           store=FileDriftStore(tmp_path / "d.json"), min_pool_gpus=2,
                           facts=Facts(free_gpus=8, current=current), say=print)
    reports = await run_monitor(monitor, 13)
    advice = [r[0].decision.reason for r in reports[1:] if r[0].decision.action == "advise"]
    assert len(advice) == 3 and len(set(advice)) == 1  # worked out once, said the same while it lasts
    assert "the performance model predicts " in advice[0] and "for the current tp4x1" in advice[0]


async def test_a_distance_that_joins_a_drift_is_said(tmp_path):
    lines = []
    figures = [{"concurrency": 16.0}] * 10 + [{"concurrency": 16.0, "output": 800.0}] * 10
    monitor = DriftMonitor(configured(tmp_path), reader=Intervals(figures), store=FileDriftStore(tmp_path / "d.json"),
                           min_pool_gpus=2, facts=Facts(), say=lines.append)
    await run_monitor(monitor, 21)
    drift_lines = [line for line in lines if "class batch: drifted" in line]
    assert len(drift_lines) == 2
    assert "output median" not in drift_lines[0] and "output median 800 vs" in drift_lines[1]
    stored = json.loads((tmp_path / "d.json").read_text())["verdicts"]["batch"]
    assert "output median 800" in stored["reason"]  # the record follows what it says


async def test_scrape_intervals_read_the_gateways_metrics_between_two_reads():
    traffic = ClassTraffic()

    async def metrics(request):
        return web.Response(body=traffic.metrics.exposition(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    reader = ScrapeIntervals(url)
    try:
        await reader.sample()  # before the first read: no interval yet, nothing to sample
        traffic.set_inflight("batch", 6)
        assert await reader.read(["batch"]) is None
        for _ in range(5):
            traffic.request("batch", prompt=700, output=70)
        traffic.set_inflight("batch", 9)
        await reader.sample()  # a peak only a sample inside the interval sees
        traffic.set_inflight("batch", 6)
        intervals = await reader.read(["batch", "interactive"])
        traffic.set_inflight("batch", 2)
        following = await reader.read(["batch"])
    finally:
        await reader.aclose()
        await runner.cleanup()
    assert intervals["batch"].arrivals == 5 and intervals["batch"].prompt.mean == 700
    assert intervals["batch"].concurrency_peak == 9 and 6 < intervals["batch"].concurrency_mean < 9
    assert intervals["interactive"].arrivals == 0
    assert following["batch"].arrivals == 0 and following["batch"].concurrency_peak == 6  # from the last read on
    assert url in reader.description


async def test_run_steps_every_interval_and_samples_in_between(tmp_path):
    class Counting(Intervals):
        samples = 0

        async def sample(self):
            self.samples += 1

    path = tmp_path / "tpgate.yaml"
    path.write_text("drift:\n  interval_s: 0.2\n  sample_s: 0.05\n  classes: {batch: {window_s: 1}}\n")
    reader = Counting([{}] * 100)
    monitor = DriftMonitor(load_config(path), reader=reader, store=FileDriftStore(tmp_path / "d.json"),
                           min_pool_gpus=2, say=print)
    await monitor.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.7, stop.set)
    await asyncio.wait_for(monitor.run(stop), 5)
    assert 3 <= reader._reads <= 5 and reader.samples >= 4


async def test_promql_intervals_ask_prometheus_for_the_last_interval_of_each_class():
    asked = []

    async def query(request):
        expr = request.query["query"]
        asked.append((expr, float(request.query["time"])))
        if "by (le)" in expr:  # no length observed in this interval
            result = []
        else:
            counted = ("tpgate_arrivals_total" in expr or "tpgate_requests_total" in expr) and 'class="batch"' in expr
            labels = {"api": "chat", "stream": "false"} if "by (api, stream)" in expr else (
                {"status": "200"} if "by (status)" in expr else {})
            result = [{"metric": labels, "value": [0, "30" if counted else "0"]}]
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    reader = PromqlIntervals(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", 15.0)
    try:
        await reader.sample()  # Prometheus samples by itself: nothing to do
        assert not asked
        intervals = await reader.read(["batch", "interactive"])
    finally:
        await reader.aclose()
        await runner.cleanup()
    assert set(intervals) == {"batch", "interactive"}
    assert intervals["batch"].arrival_rate_per_s == 2.0 and intervals["interactive"].arrivals == 0
    assert intervals["batch"].window_s == 15.0 and intervals["batch"].ok_requests == 30
    assert intervals["batch"].prompt.count == 0
    expressions = {expr for expr, _ in asked}
    assert expressions == {*promql_queries("batch", 15.0).values(), *promql_queries("interactive", 15.0).values()}
    batch_times = {at for expr, at in asked if 'class="batch"' in expr}
    assert len(batch_times) == 1  # every query of a class at one instant
