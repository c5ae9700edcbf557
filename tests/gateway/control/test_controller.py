"""The controller against a recording deployer and a manual clock: one writer, level-triggered endpoints,
draining by versioned router reports, reconcile repairs, persistence and restart."""

import asyncio
import json
import threading
import time

import pytest

from gateway.control.controller import Controller, ControllerSettings, DeployError
from gateway.control.state import DesiredState, StateError
from tests.gateway.pools import make_pool


class RecordingDeployer:
    """Records what the controller asks of the cluster; can be slow, fail, or report applications."""

    def __init__(self):
        self.deployed = []
        self.deleted = []
        self.apps = {}  # pool id -> (status, message), as the cluster would report them
        self.fail_on = set()
        self.deploy_delay_s = 0.0
        self.lock = threading.Lock()

    def deploy(self, pool):
        time.sleep(self.deploy_delay_s)
        with self.lock:
            self.apps[pool.id] = ("DEPLOYING", "")  # created, even when it then fails (half done)
            if pool.id in self.fail_on:
                raise RuntimeError(f"cannot place {pool.id}")
            self.deployed.append((pool.id, pool.replicas))

    def delete(self, pool_id):
        with self.lock:
            self.apps.pop(pool_id, None)
            self.deleted.append(pool_id)

    def statuses(self):
        with self.lock:
            return dict(self.apps)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def settings_for(capacity, **overrides):
    values = dict(model_name="llama-3-8b", classes=("interactive", "batch"), default_class="interactive",
                  capacity=capacity, drain_deadline_s=30.0, lease_s=10.0, recovery_grace_s=5.0,
                  reconcile_period_s=3600.0, reconcile_grace_s=15.0)
    values.update(overrides)
    return ControllerSettings(**values)


@pytest.fixture
def deployer():
    return RecordingDeployer()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def controller(capacity, deployer, clock):
    return Controller(settings_for(capacity), deployer, clock=clock)


def two_pools():
    a, b = make_pool("a", tp=1, replicas=2), make_pool("b", tp=2)
    return DesiredState(pools={"a": a, "b": b}, routes={"interactive": {"a": 0.5, "b": 0.5}, "batch": {"a": 1.0}})


async def test_apply_deploys_pools_and_bumps_the_version(controller, deployer):
    version = await controller.apply(two_pools())
    assert version == 1
    assert sorted(deployer.deployed) == [("a", 2), ("b", 1)]
    table = controller.routing_table()
    assert table.routes["interactive"] == {"a": 0.5, "b": 0.5}
    assert table.pools["a"].endpoints == () and table.epoch == controller.epoch


async def test_with_an_engine_key_seed_each_pool_in_the_table_carries_its_own_key(capacity, deployer):
    from gateway.dataplane.auth import engine_key

    controller = Controller(settings_for(capacity, engine_key_seed="seed"), deployer)
    await controller.apply(two_pools())
    pools = controller.routing_table().pools
    assert pools["a"].api_key == engine_key("seed", "a") != pools["b"].api_key == engine_key("seed", "b")
    assert "seed" not in repr(controller._settings) and engine_key("seed", "a") not in repr(pools["a"])


async def test_endpoints_appear_in_the_table_and_wake_watchers(controller):
    await controller.apply(two_pools())
    table = controller.routing_table()
    watcher = asyncio.create_task(controller.watch(table.epoch, table.version, 5.0))
    await asyncio.sleep(0.01)
    controller.register_endpoint("a", "r1", "http://127.0.0.1:9001")
    table = await asyncio.wait_for(watcher, 1.0)
    assert [e.url for e in table.pools["a"].endpoints] == ["http://127.0.0.1:9001"]
    controller.deregister_endpoint("a", "r1")
    assert controller.routing_table().pools["a"].endpoints == ()


async def test_watch_returns_none_after_its_timeout_without_changes(controller):
    await controller.apply(two_pools())
    assert await controller.watch(controller.epoch, 1, 0.05) is None
    assert (await controller.watch("another-epoch", 1, 0.05)).version == 1  # a router of an earlier controller


async def test_registration_is_idempotent_and_level_triggered(controller, clock):
    await controller.apply(two_pools())
    controller.register_endpoint("a", "r1", "http://127.0.0.1:9001")
    version = controller.routing_table().version
    for _ in range(5):  # every health check re-asserts: no version bump when nothing changed
        clock.now += 1
        controller.register_endpoint("a", "r1", "http://127.0.0.1:9001")
    assert controller.routing_table().version == version
    controller.deregister_endpoint("a", "r1")  # one failed check, or a missed probe
    assert controller.routing_table().pools["a"].endpoints == ()
    controller.register_endpoint("a", "r1", "http://127.0.0.1:9001")  # the next healthy check brings it back
    assert [e.replica_id for e in controller.routing_table().pools["a"].endpoints] == ["r1"]
    controller.register_endpoint("a", "r1", "http://127.0.0.1:9002")  # a new engine port is a change
    assert controller.routing_table().pools["a"].endpoints[0].url == "http://127.0.0.1:9002"


async def test_endpoints_whose_lease_runs_out_leave_routing(capacity, deployer, clock):
    controller = Controller(settings_for(capacity, reconcile_period_s=0.05, lease_s=10.0), deployer, clock=clock)
    await controller.apply(two_pools())
    controller.register_endpoint("a", "r1", "http://127.0.0.1:9001")
    controller.register_endpoint("a", "r2", "http://127.0.0.1:9002")
    clock.now += 8
    controller.register_endpoint("a", "r2", "http://127.0.0.1:9002")  # r1 was killed and renews nothing
    clock.now += 4
    await asyncio.sleep(0.2)
    assert [e.replica_id for e in controller.routing_table().pools["a"].endpoints] == ["r2"]
    assert any(e["kind"] == "replica.gone" and "r1" in e["message"] for e in controller.status()["events"])


async def test_invalid_changes_are_refused_and_leave_the_state_alone(controller, deployer):
    await controller.apply(two_pools())
    with pytest.raises(StateError, match="weights sum to 0.9"):
        await controller.set_route("batch", {"a": 0.9})
    with pytest.raises(StateError, match="more than the budget of 4"):
        await controller.add_pool(make_pool("c", tp=2))
    with pytest.raises(StateError, match="neither a workload class nor a trial route"):
        await controller.set_route("nightly", {"a": 1.0})
    with pytest.raises(StateError, match="exists with another engine configuration"):
        await controller.add_pool(make_pool("a", tp=1, replicas=2, max_batch_size=8))
    with pytest.raises(StateError, match="needs the class it measures for"):
        await controller.set_route("trial-x", {"b": 1.0})
    assert controller.routing_table().version == 1
    assert len(deployer.deployed) == 2
    rejected = [e for e in controller.status()["events"] if e["kind"] == "state.rejected"]
    assert len(rejected) == 5 and "weights sum to 0.9" in rejected[0]["message"]


async def test_concurrent_writers_cannot_both_pass_the_budget_check(controller, deployer):
    await controller.apply(DesiredState(pools={"a": make_pool("a", tp=1, replicas=2)},
                                        routes={"interactive": {"a": 1.0}, "batch": {"a": 1.0}}))
    deployer.deploy_delay_s = 0.2  # a deploy takes a while: the window where two writers raced
    results = await asyncio.gather(controller.add_pool(make_pool("b", tp=2)), controller.add_pool(make_pool("c", tp=2)),
                                   return_exceptions=True)
    assert sum(isinstance(r, StateError) for r in results) == 1
    assert controller.desired_state().gpus_used == 4
    assert len(controller.desired_state().pools) == 2


async def test_concurrent_route_updates_are_not_lost(controller, deployer):
    await controller.apply(two_pools())
    deployer.deploy_delay_s = 0.1
    await asyncio.gather(controller.set_route("trial-1", {"b": 1.0}, trial_class="batch"),
                         controller.add_pool(make_pool("a", tp=1, replicas=1)),  # a resize, deploying slowly
                         controller.set_route("trial-2", {"a": 1.0}, trial_class="interactive"))
    routes = controller.desired_state().routes
    assert {"trial-1", "trial-2"} <= set(routes)
    assert controller.desired_state().pools["a"].replicas == 1


async def test_a_deploy_that_fails_halfway_leaves_nothing_behind(controller, deployer):
    await controller.apply(two_pools())
    before = controller.desired_state()
    deployer.fail_on = {"d"}
    state = DesiredState(pools={**before.pools, "c": make_pool("c", tp=1), "d": make_pool("d", tp=1)},
                         routes={**before.routes})
    state = DesiredState(pools={"a": before.pools["a"], "c": make_pool("c", tp=1), "d": make_pool("d", tp=1)},
                         routes={"interactive": {"a": 1.0}, "batch": {"c": 0.5, "d": 0.5}})
    with pytest.raises(DeployError, match="cannot place d"):
        await controller.apply(state)
    assert controller.desired_state() == before
    assert set(deployer.apps) == {"a", "b"}  # c (deployed by this apply) and the half-made d were deleted
    assert sorted(deployer.deleted) == ["c", "d"]
    assert any(e["kind"] == "pool.deploy_failed" for e in controller.status()["events"])


async def test_draining_waits_for_every_router_to_report_zero_under_the_new_version(controller, deployer, clock):
    await controller.apply(two_pools())
    old = controller.routing_table()
    controller.report_inflight("router-1", old.epoch, old.version, {"a": 0, "b": 3})
    controller.report_inflight("router-2", old.epoch, old.version, {"a": 0, "b": 0})
    version = await controller.remove_pool("b")
    assert "b" not in controller.routing_table().routes["interactive"]  # out of every route at once
    assert controller.status()["draining"]["b"]["inflight"] == 3
    clock.now += 0.5
    controller.report_inflight("router-1", old.epoch, version, {"a": 0, "b": 1})  # still busy
    controller.report_inflight("router-2", old.epoch, old.version, {"a": 0, "b": 0})  # zero, but an old table
    await asyncio.sleep(0.5)
    assert deployer.deleted == []
    clock.now += 0.5
    controller.report_inflight("router-1", old.epoch, version, {"a": 1, "b": 0})
    await asyncio.sleep(0.5)
    assert deployer.deleted == []  # router-2 has not yet seen the version where b left the routes
    controller.report_inflight("router-2", old.epoch, version, {"a": 0})
    await asyncio.sleep(0.5)
    assert deployer.deleted == ["b"]
    status = controller.status()
    assert "b" not in status["pools"] and status["draining"] == {}
    assert any(e["kind"] == "drain.finished" for e in status["events"])


async def test_draining_gives_up_at_the_configured_deadline(capacity, deployer, clock):
    controller = Controller(settings_for(capacity, drain_deadline_s=5.0), deployer, clock=clock)
    await controller.apply(two_pools())
    await controller.remove_pool("b")
    table = controller.routing_table()
    for _ in range(8):
        clock.now += 1.0
        controller.report_inflight("router-1", table.epoch, table.version, {"b": 1})
        await asyncio.sleep(0.25)
    assert deployer.deleted == ["b"]
    assert any(e["kind"] == "drain.deadline" and "1 requests still reported" in e["message"]
               for e in controller.status()["events"])


async def test_a_pool_re_added_while_it_drains_is_not_deleted(controller, deployer, clock):
    await controller.apply(two_pools())
    table = controller.routing_table()
    controller.report_inflight("router-1", table.epoch, table.version, {"b": 2})
    version = await controller.remove_pool("b")
    await controller.add_pool(make_pool("b", tp=2))
    await controller.set_route("interactive", {"a": 0.5, "b": 0.5})
    clock.now += 0.5
    controller.report_inflight("router-1", table.epoch, version + 2, {"b": 0})
    await asyncio.sleep(0.6)
    assert deployer.deleted == []
    assert "b" in controller.status()["pools"] and controller.status()["draining"] == {}


async def test_removing_the_only_pool_of_a_class_route_is_refused(controller):
    await controller.apply(two_pools())
    with pytest.raises(StateError, match="only pool of route 'batch'"):
        await controller.remove_pool("a")


async def test_trial_routes_carry_their_class_slo_and_can_be_removed(capacity, deployer):
    from gateway.dataplane.routing import RouteSlo

    slo = RouteSlo(ttft_s=0.5, tpot_s=0.04)
    controller = Controller(settings_for(capacity, slos={"interactive": slo}), deployer)
    await controller.apply(two_pools())
    await controller.set_route("trial-1", {"b": 1.0}, trial_class="interactive")
    table = controller.routing_table()
    assert table.routes["trial-1"] == {"b": 1.0} and table.slos["trial-1"] == slo
    assert table.production_routes().keys() == {"interactive", "batch"}
    await controller.remove_route("trial-1")
    assert "trial-1" not in controller.routing_table().routes
    with pytest.raises(StateError, match="belongs to a workload class"):
        await controller.remove_route("batch")


async def test_reconcile_repairs_missing_and_orphan_applications(controller, deployer, clock):
    await controller.apply(two_pools())
    clock.now += 60  # long after the deploys
    deployer.apps.pop("b")  # deleted behind the controller's back
    deployer.apps["zombie"] = ("RUNNING", "")  # left by a failed delete
    await controller.reconcile()
    assert ("b", 1) in deployer.deployed[2:]
    assert "zombie" in deployer.deleted
    kinds = [(e["kind"], e["pool"]) for e in controller.status()["events"]]
    assert ("reconcile.repair", "b") in kinds and ("reconcile.repair", "zombie") in kinds


async def test_reconcile_leaves_just_deployed_and_draining_pools_alone(controller, deployer, clock):
    await controller.apply(two_pools())
    deployer.apps.pop("a")  # not in the cluster's status yet: it was deployed a moment ago
    table = controller.routing_table()
    controller.report_inflight("router-1", table.epoch, table.version, {"b": 1})
    await controller.remove_pool("b")  # draining: its app stays until drained
    await controller.reconcile()
    assert deployer.deleted == [] and len(deployer.deployed) == 2


async def test_state_persists_and_a_restarted_controller_reloads_it_under_a_new_epoch(capacity, tmp_path, clock):
    store = tmp_path / "state.json"
    first = Controller(settings_for(capacity, store_path=str(store)), RecordingDeployer(), clock=clock)
    await first.apply(two_pools())
    await first.set_route("trial-1", {"b": 1.0}, trial_class="batch")
    assert json.loads(store.read_text())["version"] == 2
    assert store.stat().st_mode & 0o777 == 0o600

    again = Controller(settings_for(capacity, store_path=str(store)), RecordingDeployer(), clock=clock)
    assert again.restored and again.epoch != first.epoch
    assert again.desired_state() == first.desired_state()
    # routers keep their last table until the replicas re-asserted their endpoints (or the grace passed)
    assert await again.watch(first.epoch, 2, 0.05) is None
    again.register_endpoint("a", "r1", "http://127.0.0.1:9001")
    again.register_endpoint("a", "r2", "http://127.0.0.1:9002")
    again.register_endpoint("b", "r3", "http://127.0.0.1:9003")
    table = await again.watch(first.epoch, 2, 1.0)
    assert table is not None and table.epoch == again.epoch and table.version >= 2
    assert len(table.pools["a"].endpoints) == 2


async def test_a_restored_controller_publishes_after_its_grace_without_every_replica(capacity, tmp_path, clock):
    store = tmp_path / "state.json"
    await Controller(settings_for(capacity, store_path=str(store)), RecordingDeployer(), clock=clock).apply(two_pools())
    again = Controller(settings_for(capacity, store_path=str(store), recovery_grace_s=5.0), RecordingDeployer(),
                       clock=clock)
    again.register_endpoint("a", "r1", "http://127.0.0.1:9001")
    assert await again.watch("", 0, 0.05) is None
    clock.now += 6
    again.register_endpoint("a", "r2", "http://127.0.0.1:9002")
    assert (await again.watch("", 0, 0.5)) is not None


async def test_a_corrupt_store_is_reported_and_left_alone(capacity, tmp_path):
    store = tmp_path / "state.json"
    store.write_text("{not json")
    controller = Controller(settings_for(capacity, store_path=str(store)), RecordingDeployer())
    assert "state store is corrupt" in controller.describe()["store_error"]
    await controller.apply(two_pools())
    assert store.read_text() == "{not json"  # never overwritten


async def test_a_stored_state_that_no_longer_fits_is_reported(capacity, tmp_path):
    store = tmp_path / "state.json"
    await Controller(settings_for(capacity, store_path=str(store)), RecordingDeployer()).apply(two_pools())
    smaller = type(capacity)(model=capacity.model, gpu=capacity.gpu, gpus=2, gpus_per_node=2)
    controller = Controller(settings_for(smaller, store_path=str(store)), RecordingDeployer())
    assert "does not fit this configuration" in controller.describe()["store_error"]


async def test_status_reports_progress_and_structured_events(controller):
    await controller.apply(two_pools())
    controller.register_endpoint("a", "r1", "http://127.0.0.1:9001")
    status = controller.status()
    assert status["pools"]["a"]["ready_replicas"] == 1 and status["pools"]["a"]["replicas"] == 2
    assert status["pools"]["a"]["phase"] == "deploying"
    assert status["gpus"] == {"budget": 4, "used": 4, "free": 0}
    ready = [e for e in status["events"] if e["kind"] == "replica.ready"]
    assert ready[0]["pool"] == "a" and "r1" in ready[0]["message"] and ready[0]["at_s"] > 1e9


async def test_a_slow_delete_does_not_hold_up_other_writers(controller, deployer, clock):
    await controller.apply(two_pools())
    slow_delete = threading.Event()
    original = deployer.delete

    def delete(pool_id):
        slow_delete.wait(5)
        original(pool_id)

    deployer.delete = delete
    await controller.remove_pool("b")  # no router ever reported: drained after one report period
    clock.now += 5
    await asyncio.sleep(0.5)  # the delete has started and blocks in its thread
    await asyncio.wait_for(controller.set_route("trial-1", {"a": 1.0}, trial_class="batch"), 1.0)
    readd = asyncio.create_task(controller.add_pool(make_pool("b", tp=2)))
    await asyncio.sleep(0.2)
    assert not readd.done()  # a re-add waits for the old application to go, then deploys it anew
    slow_delete.set()
    await asyncio.wait_for(readd, 5)
    assert deployer.deleted == ["b"] and deployer.deployed[-1] == ("b", 1) and "b" in deployer.apps


async def test_a_stop_phase_reaches_the_routers_in_a_new_table(controller):
    await controller.apply(two_pools())
    before = controller.routing_table()
    assert before.stop_phase == ""
    version = controller.set_stop_phase("draining")
    table = await controller.watch(before.epoch, before.version, timeout_s=1)
    assert (table.stop_phase, table.version) == ("draining", version)
    assert version > before.version
    assert controller.set_stop_phase("draining") == version  # said again: nothing changes
    assert controller.routing_table().version == version
    assert controller.set_stop_phase("ending") > version
    assert controller.set_stop_phase("") and controller.routing_table().stop_phase == ""  # a reused controller
    assert any(e["kind"] == "gateway.stopping" for e in controller.status()["events"])
    with pytest.raises(StateError, match="unknown stop phase 'later'"):
        controller.set_stop_phase("later")


async def test_inflight_counts_are_current_once_every_live_router_counted_under_the_stop_table(controller, clock):
    await controller.apply(two_pools())
    old = controller.routing_table()
    assert controller.inflight() == {"requests": 0, "routers": 0, "current": True}  # no router: nothing in flight
    controller.report_inflight("router-1", old.epoch, old.version, {"a": 2, "b": 1})
    controller.report_inflight("router-2", old.epoch, old.version, {"a": 0})
    version = controller.set_stop_phase("draining")
    assert controller.inflight() == {"requests": 3, "routers": 2, "current": False}
    clock.now += 0.5
    controller.report_inflight("router-1", old.epoch, version, {"a": 1, "b": 0})
    assert controller.inflight() == {"requests": 1, "routers": 2, "current": False}  # router-2: an old table
    controller.report_inflight("router-2", old.epoch, version, {"a": 0})
    assert controller.inflight() == {"requests": 1, "routers": 2, "current": True}
    clock.now += 10.0  # both fall silent (gone): they no longer count
    assert controller.inflight() == {"requests": 0, "routers": 0, "current": True}


def test_a_deploy_error_reaches_the_caller_through_pickling_with_its_reason():
    import pickle

    error = pickle.loads(pickle.dumps(DeployError("t-abc-tp2x1", "replica died")))
    assert (error.pool_id, error.reason) == ("t-abc-tp2x1", "replica died")
    assert str(error) == "pool 't-abc-tp2x1': deploy failed: replica died"
