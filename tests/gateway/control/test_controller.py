import asyncio

import pytest

from gateway.control.controller import Controller
from gateway.control.state import DesiredState, StateError
from tests.gateway.pools import make_pool


class RecordingDeployer:
    """Records what the controller asks of the cluster."""

    def __init__(self):
        self.deployed = []
        self.deleted = []

    def deploy(self, pool):
        self.deployed.append((pool.id, pool.replicas))

    def delete(self, pool_id):
        self.deleted.append(pool_id)

    def statuses(self):
        return {}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def deployer():
    return RecordingDeployer()


@pytest.fixture
def controller(capacity, deployer):
    return Controller(model_name="llama-3-8b", classes=("interactive", "batch"), default_class="interactive",
                      capacity=capacity, deployer=deployer)


def two_pools():
    a, b = make_pool("a", tp=1, replicas=2), make_pool("b", tp=2)
    return DesiredState(pools={"a": a, "b": b}, routes={"interactive": {"a": 0.5, "b": 0.5}, "batch": {"a": 1.0}})


async def test_apply_deploys_pools_and_bumps_the_version(controller, deployer):
    version = await controller.apply(two_pools())
    assert version == 1
    assert sorted(deployer.deployed) == [("a", 2), ("b", 1)]
    table = controller.routing_table()
    assert table.routes["interactive"] == {"a": 0.5, "b": 0.5}
    assert table.pools["a"].endpoints == ()


async def test_endpoints_appear_in_the_table_and_wake_watchers(controller):
    await controller.apply(two_pools())
    watcher = asyncio.create_task(controller.watch(controller.routing_table().version, 5.0))
    await asyncio.sleep(0.01)
    controller.register_endpoint("a", "r1", "http://127.0.0.1:9001")
    table = await asyncio.wait_for(watcher, 1.0)
    assert [e.url for e in table.pools["a"].endpoints] == ["http://127.0.0.1:9001"]
    controller.deregister_endpoint("a", "r1")
    assert controller.routing_table().pools["a"].endpoints == ()


async def test_watch_returns_after_its_timeout_without_changes(controller):
    await controller.apply(two_pools())
    table = await controller.watch(controller.routing_table().version, 0.05)
    assert table.version == 1


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
    assert controller.routing_table().version == 1
    assert len(deployer.deployed) == 2


async def test_trial_routes_are_allowed(controller):
    await controller.apply(two_pools())
    await controller.set_route("trial-1", {"b": 1.0})
    assert controller.routing_table().routes["trial-1"] == {"b": 1.0}


async def test_removing_the_only_pool_of_a_route_is_refused(controller):
    await controller.apply(two_pools())
    with pytest.raises(StateError, match="only pool of route 'batch'"):
        await controller.remove_pool("a")


async def test_draining_waits_for_routers_to_report_no_inflight_requests(capacity, deployer):
    clock = Clock()
    controller = Controller(model_name="m", classes=("interactive", "batch"), default_class="interactive",
                            capacity=capacity, deployer=deployer, clock=clock)
    await controller.apply(two_pools())
    controller.report_inflight("router-1", {"a": 0, "b": 3})
    await controller.remove_pool("b", deadline_s=30.0)
    assert "b" not in controller.routing_table().routes["interactive"]  # out of every route at once
    assert controller.status()["draining"] == {"b": "waiting for in-flight requests"}
    clock.now += 0.5
    controller.report_inflight("router-1", {"a": 0, "b": 2})  # still busy
    await asyncio.sleep(1.3)
    assert deployer.deleted == []
    clock.now += 0.5
    controller.report_inflight("router-1", {"a": 1, "b": 0})
    await asyncio.sleep(0.5)
    assert deployer.deleted == ["b"]
    assert "b" not in controller.status()["pools"] and controller.status()["draining"] == {}


async def test_draining_gives_up_at_the_deadline(capacity, deployer):
    clock = Clock()
    controller = Controller(model_name="m", classes=("interactive", "batch"), default_class="interactive",
                            capacity=capacity, deployer=deployer, clock=clock)
    await controller.apply(two_pools())
    controller.report_inflight("router-1", {"b": 1})
    await controller.remove_pool("b", deadline_s=5.0)
    for _ in range(8):
        clock.now += 1.0
        controller.report_inflight("router-1", {"b": 1})
        await asyncio.sleep(0.25)
    assert deployer.deleted == ["b"]
    assert any("drain deadline" in e["message"] for e in controller.status()["events"])


async def test_status_reports_progress(controller):
    await controller.apply(two_pools())
    controller.register_endpoint("a", "r1", "http://127.0.0.1:9001")
    status = controller.status()
    assert status["pools"]["a"]["ready_replicas"] == 1 and status["pools"]["a"]["replicas"] == 2
    assert status["pools"]["a"]["phase"] == "deploying"
    assert status["gpus"] == {"budget": 4, "desired": 4}
    assert any("replica r1 ready" in e["message"] for e in status["events"])
