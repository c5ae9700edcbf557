import asyncio

import pytest

from gateway.planner import EngineKnobs
from loadtests import LoadRunError
from tests.tuner.conftest import config_with
from tests.tuner.fakes import (
    ControllerUnavailable,
    FakeClocks,
    FakeControl,
    FakeLoad,
    FakeSource,
    PoolFailed,
    until,
)
from tuner.runner import TrialRunner, trial_pool_id, trial_route
from tuner.space import Candidate

KNOBS = EngineKnobs.of(max_batch_size=256, cache_max_entry_count=0.9, max_prefill_token_num=8192)
TP2X2 = Candidate(2, 2, KNOBS)
TOKEN = "admin-token-for-trials"


def config(**tuning):
    return config_with(gpus=8, engine={"time_scale": 10},
                       tuning={"warmup_s": 0.05, "window_s": 0.3, "trial_timeout_s": 5, **tuning})


def runner(control, *, load=None, source=None, clocks=None, keep_pools=False, **tuning):
    return TrialRunner(control=control, config=config(**tuning), class_name="interactive", study_name="s1",
                       source=source or FakeSource(), admin_token=TOKEN, load_driver=load or FakeLoad(),
                       clock_reader=clocks or FakeClocks(9.4), keep_pools=keep_pools, poll_s=0.01,
                       tail_s=0.05)


async def test_a_trial_deploys_its_own_pool_on_a_trial_route_and_cleans_up():
    control, load, source = FakeControl(), FakeLoad(), FakeSource()
    measurement = await runner(control, load=load, source=source).run(TP2X2, number=7)
    pool_id, route = trial_pool_id("s1", TP2X2), trial_route("s1", 7)
    assert pool_id.startswith("t-") and pool_id.endswith("-tp2x2-mbs256-kv9-q0-pf8192")
    assert route.startswith("trial-") and route.endswith("-7")
    assert [c for c in control.calls if c[0] in ("add_pool", "set_route")] == [("add_pool", pool_id),
                                                                              ("set_route", route)]
    assert control.pools == {} and control.routes == {}  # route and pool removed
    (profile, host, api_key), = load.runs
    assert (host, api_key) == ("http://127.0.0.1:18000", TOKEN)
    assert profile.workload_class.name == route and profile.workload_class.via == "header"
    assert profile.arrival.think_time_s.high == pytest.approx(0.2)  # 2 s of think time at time scale 10
    assert (profile.warmup_s, profile.duration_s) == (0.05, pytest.approx(0.35))
    assert source.watched == [("http://127.0.0.1:18000",
                               {pool_id: {f"{pool_id}-r0": "http://127.0.0.1:19000",
                                          f"{pool_id}-r1": "http://127.0.0.1:19001"}})]
    ((window_route, window_pool, window_s),) = source.windows
    assert (window_route, window_pool) == (route, pool_id) and window_s == pytest.approx(0.3, abs=0.05)
    assert measurement.failure is None and measurement.invalid is None
    assert measurement.wall.requests == 100 and measurement.wall.window_s == pytest.approx(0.3, abs=0.05)
    assert measurement.clock.valid and measurement.clock.effective_scale == pytest.approx(9.4, rel=0.02)
    assert set(measurement.timings) >= {"deploy_s", "ready_s", "warmup_s", "window_s", "total_s"}


async def test_a_pool_running_with_the_same_spec_is_reused():
    control = FakeControl()
    first = runner(control, keep_pools=True)
    await first.run(TP2X2, number=1)
    pool_id = trial_pool_id("s1", TP2X2)
    assert pool_id in control.pools and control.routes == {}  # kept for reuse, out of every route
    await first.run(TP2X2, number=2)
    assert [c for c in control.calls if c[0] == "add_pool"] == [("add_pool", pool_id)]
    await first.close()
    assert control.pools == {}


async def test_a_configuration_measured_again_waits_until_its_removed_pool_is_gone():
    control = FakeControl(drain_reads=3)
    trials = runner(control)
    await trials.run(TP2X2, number=1)
    pool_id = trial_pool_id("s1", TP2X2)
    assert control.draining == {pool_id: 3}
    measurement = await trials.run(TP2X2, number=2, run=1)
    assert measurement.failure is None and measurement.invalid is None
    assert [c for c in control.calls if c[0] in ("add_pool", "re-added while draining")] == [
        ("add_pool", pool_id), ("add_pool", pool_id)]


async def test_kept_pools_are_evicted_when_the_budget_needs_their_gpus():
    control = FakeControl(budget=4)
    keeping = runner(control, keep_pools=True)
    await keeping.run(TP2X2, number=1)
    bigger = Candidate(4, 1, KNOBS)
    measurement = await keeping.run(bigger, number=2)
    assert measurement.failure is None
    assert set(control.pools) == {trial_pool_id("s1", bigger)}


async def test_a_refused_pool_fails_the_trial_with_the_reason():
    measurement = await runner(FakeControl(budget=2)).run(TP2X2, number=1)
    assert measurement.failure == "the gateway refused the pool: pools need 4 GPUs, more than the budget of 2"
    assert measurement.wall is None


async def test_a_pool_that_cannot_be_placed_fails_the_trial_and_is_removed():
    def fail(pool_id):
        raise PoolFailed(pool_id, "engine exited with status 1: CUDA out of memory")

    control = FakeControl(on_ready=fail)
    measurement = await runner(control).run(TP2X2, number=1)
    assert measurement.failure == ("pool failed while waiting for the pool to be ready: engine exited with status 1:"
                                   " CUDA out of memory")
    assert control.pools == {} and ("remove_pool", trial_pool_id("s1", TP2X2)) in control.calls


async def test_a_pool_not_ready_in_time_fails_the_trial():
    def slow(pool_id):
        raise TimeoutError

    measurement = await runner(FakeControl(on_ready=slow)).run(TP2X2, number=1)
    assert measurement.failure == "not ready after the trial timeout of 5 s"


async def test_an_unavailable_controller_ends_the_study_not_the_trial():
    def down(pool_id):
        raise ControllerUnavailable("controller actor is gone")

    with pytest.raises(ControllerUnavailable):
        await runner(FakeControl(on_ready=down)).run(TP2X2, number=1)


async def test_a_load_that_fails_before_the_window_fails_the_trial():
    load = FakeLoad(fail=LoadRunError("locust exited with status 1 before sending a request:\ntraceback"))
    control = FakeControl()
    measurement = await runner(control, load=load).run(TP2X2, number=1)
    assert measurement.failure == ("the load ended before its warm-up did: locust exited with status 1 before "
                                   "sending a request:")
    assert control.pools == {} and control.routes == {}


async def test_engine_clocks_lagging_beyond_tolerance_make_the_trial_invalid():
    port = "19001"  # the second replica lags 30 %
    measurement = await runner(FakeControl(), clocks=FakeClocks(9.5, **{port: 7.0})).run(TP2X2, number=1)
    assert measurement.failure is None and measurement.invalid is not None
    assert "instead of 10x" in measurement.invalid and not measurement.clock.valid
    assert measurement.clock.per_replica[trial_pool_id("s1", TP2X2) + "-r1"] == pytest.approx(7.0, rel=0.05)


async def test_cancelling_a_trial_stops_the_load_and_removes_route_and_pool():
    control, load = FakeControl(), FakeLoad()
    trial = asyncio.ensure_future(runner(control, load=load, window_s=30).run(TP2X2, number=1))
    await until(lambda: bool(load.runs) and ("set_route", trial_route("s1", 1)) in control.calls)
    await asyncio.sleep(0.2)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert load.cancelled.wait(timeout=5)  # its next progress line raised inside the load thread
    assert control.pools == {} and control.routes == {}
