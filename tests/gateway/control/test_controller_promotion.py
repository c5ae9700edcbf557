"""Promotions in the controller, against a recording deployer, manual clocks and routers' reported series:
a promotion walks its steps, a bad candidate is rolled back with the reason, the guard keeps others off its
pools, and a restart resolves a promotion left half-way."""

import pytest

from gateway.control.controller import Controller
from gateway.control.promotion import PromotionPolicy
from gateway.control.state import DesiredState, StateError
from gateway.exposition import parse_exposition
from tests.gateway.control.test_controller import Clock, RecordingDeployer, settings_for
from tests.gateway.pools import make_pool
from tests.tuner.traffic import GatewayTraffic

POLICY = PromotionPolicy(steps=(0.5, 1.0), dwell_s=5.0, min_requests=5, check_period_s=1.0, ttft_p99_s=0.5,
                         max_5xx=3)


class WallClock(Clock):
    def __init__(self):
        self.now = 1_700_000_000.0


@pytest.fixture
def clocks():
    return Clock(), WallClock()


def make_controller(capacity, deployer, clocks, store_path=None):
    clock, wall = clocks
    settings = settings_for(capacity, promotion_policies={"batch": POLICY}, store_path=store_path)
    return Controller(settings, deployer, clock=clock, wall_clock=wall)


def production():
    old, other = make_pool("old", tp=1, replicas=2), make_pool("other", tp=1)
    return DesiredState(pools={"old": old, "other": other},
                        routes={"batch": {"old": 1.0}, "interactive": {"other": 1.0}})


class Router:
    """One router's series, reported to the controller as a router replica does."""

    def __init__(self, controller, router_id="router-a"):
        self.controller, self.router_id = controller, router_id
        self.traffic = GatewayTraffic()

    def serve(self, pool, n, *, ttft_s=0.05, status="200"):
        for _ in range(n):
            self.traffic.request("batch", pool, e2e_s=0.5, ttft_s=ttft_s, tpot_s=0.01, status=status)

    def report(self):
        return self.controller.report_metrics(self.router_id, parse_exposition(self.traffic.exposition()))


async def ticks(controller, wall, seconds, router=None):
    """Let ``seconds`` of wall time pass in one-second ticks, the router reporting before each."""
    for _ in range(int(seconds)):
        wall.now += 1.0
        if router is not None:
            router.report()
        await controller._promotions.tick()


async def started(controller, clocks):
    await controller.apply(production())
    for replica in ("r1", "r2"):
        controller.register_endpoint("old", replica, f"http://127.0.0.1:90{replica[-1]}")
    promotion = await controller.start_promotion("batch", make_pool("new", tp=2), source="study s1")
    controller.register_endpoint("new", "n1", "http://127.0.0.1:9101")
    return promotion


async def test_a_good_candidate_is_promoted_step_by_step(capacity, clocks):
    deployer = RecordingDeployer()
    controller = make_controller(capacity, deployer, clocks)
    promotion = await started(controller, clocks)
    # 3 of the 4 GPUs are used: the old pool gives up one of its two replicas (it keeps one for its 50 % at the
    # first step) so that the candidate's 2 GPUs fit
    assert promotion["phase"] == "starting" and deployer.deployed[-2:] == [("old", 1), ("new", 1)]
    router = Router(controller)
    assert router.report()["classes"] == ["batch"]  # routers are asked for the class's series
    _, wall = clocks
    await ticks(controller, wall, 2, router)
    assert controller.desired_state().routes["batch"] == {"old": 0.5, "new": 0.5}
    assert controller.report_metrics("router-a", {})["steps"] == {"batch": {"step": 1, "weight": 0.5}}
    for _ in range(6):
        router.serve("new", 2)
        router.serve("old", 2, ttft_s=0.06)
        await ticks(controller, wall, 1, router)
    assert controller.desired_state().routes["batch"] == {"new": 1.0}
    for _ in range(7):
        router.serve("new", 2)
        await ticks(controller, wall, 1, router)
    record = controller.promotion(promotion["id"])
    assert record["phase"] == "succeeded", record
    assert [step["verdict"] for step in record["history"]] == ["pass", "pass"]
    assert "within the SLOs and the old pools" in record["history"][1]["reason"]  # compared with step 1's old pools
    assert "old" not in controller.desired_state().pools and "old" in controller.status()["draining"]
    kinds = [e["kind"] for e in controller.status()["events"] if e["kind"].startswith("promotion.")]
    assert kinds[0] == "promotion.started" and kinds[-1] == "promotion.succeeded"


async def test_a_slow_candidate_is_rolled_back_with_the_reason_in_the_state(capacity, clocks):
    deployer = RecordingDeployer()
    controller = make_controller(capacity, deployer, clocks)
    promotion = await started(controller, clocks)
    router = Router(controller)
    _, wall = clocks
    await ticks(controller, wall, 2, router)
    for _ in range(3):
        router.serve("new", 3, ttft_s=2.0)
        router.serve("old", 3)
        await ticks(controller, wall, 1, router)
    record = controller.promotion(promotion["id"])
    assert record["phase"] == "rolled_back"
    assert "step 1 (50%) failed: TTFT p99" in record["reason"] and "over the class's SLO of 500 ms" in record["reason"]
    assert controller.desired_state().routes["batch"] == {"old": 1.0}  # at once
    assert "new" not in controller.desired_state().pools and "new" in controller.status()["draining"]
    assert deployer.deployed[-1] == ("old", 2)  # the replica it gave up comes back
    assert controller.status()["promotions"][-1]["reason"] == record["reason"]


async def test_a_5xx_burst_fails_the_step_before_the_dwell_time(capacity, clocks):
    controller = make_controller(capacity, RecordingDeployer(), clocks)
    promotion = await started(controller, clocks)
    router = Router(controller)
    _, wall = clocks
    await ticks(controller, wall, 2, router)
    router.serve("new", 3, status="502")
    await ticks(controller, wall, 1, router)
    assert "3 5xx answers from the new pool" in controller.promotion(promotion["id"])["reason"]


async def test_a_promotions_pools_and_route_are_its_own(capacity, clocks):
    controller = make_controller(capacity, RecordingDeployer(), clocks)
    promotion = await started(controller, clocks)
    with pytest.raises(StateError, match=f"route 'batch' belongs to promotion {promotion['id']}"):
        await controller.set_route("batch", {"old": 1.0})
    with pytest.raises(StateError, match="pool 'old' belongs to promotion"):
        await controller.remove_pool("old")
    with pytest.raises(StateError, match="pool 'new' belongs to promotion"):
        await controller.add_pool(make_pool("new", tp=2, replicas=2))
    with pytest.raises(StateError, match="is being promoted already"):
        await controller.start_promotion("batch", make_pool("newer", tp=1), source="api")
    with pytest.raises(StateError, match="exceed the 2 that fit"):  # the planner's word on the candidate
        await controller.start_promotion("interactive", make_pool("huge", tp=2, replicas=3), source="api")
    await controller.set_route("interactive", {"other": 1.0})  # other classes are free
    aborted = await controller.abort_promotion(promotion["id"])
    assert aborted["phase"] == "rolled_back" and aborted["reason"] == "aborted by the operator"
    await controller.set_route("batch", {"old": 1.0})


async def test_no_room_is_refused_with_the_numbers(capacity, clocks):
    controller = make_controller(capacity, RecordingDeployer(), clocks)
    await controller.apply(production())  # 3 of 4 GPUs used; the old pool keeps 1 of 2 replicas at 50 %
    with pytest.raises(StateError, match="one replica needs 4 GPUs, 1 are free, and the old pools"):
        await controller.start_promotion("batch", make_pool("big", tp=4), source="api")


async def test_a_restart_rolls_back_a_promotion_left_half_way(capacity, clocks, tmp_path):
    store = str(tmp_path / "state.json")
    first = make_controller(capacity, RecordingDeployer(), clocks, store_path=store)
    promotion = await started(first, clocks)
    _, wall = clocks
    await ticks(first, wall, 2, Router(first))
    assert first.desired_state().routes["batch"] == {"old": 0.5, "new": 0.5}
    again = make_controller(capacity, RecordingDeployer(), clocks, store_path=store)
    assert again.promotion(promotion["id"])["phase"] == "shifting"  # as stored
    await again._promotions.resolve_interrupted()
    record = again.promotion(promotion["id"])
    assert record["phase"] == "rolled_back" and "interrupted by a restart during shifting" in record["reason"]
    assert again.desired_state().routes["batch"] == {"old": 1.0} and "new" not in again.desired_state().pools
    third = make_controller(capacity, RecordingDeployer(), clocks, store_path=store)  # and that is what persists
    assert third.promotion(promotion["id"])["phase"] == "rolled_back"
    assert third.desired_state().routes["batch"] == {"old": 1.0}


async def served_until_done(controller, clocks):
    """Both pools serve well for 16 s of ticks, every step judged on it: the promotion of ``started`` succeeds."""
    router = Router(controller)
    _, wall = clocks
    await ticks(controller, wall, 2, router)
    for _ in range(14):
        router.serve("new", 2)
        router.serve("old", 2)
        await ticks(controller, wall, 1, router)
    return router


async def test_rolling_back_a_finished_promotion_brings_the_old_pool_back(capacity, clocks):
    controller = make_controller(capacity, RecordingDeployer(), clocks)
    promotion = await started(controller, clocks)
    router = await served_until_done(controller, clocks)
    assert controller.promotion(promotion["id"])["phase"] == "succeeded"
    back = await controller.rollback_class("batch")
    assert back["source"] == f"rollback of {promotion['id']}" and back["policy"]["judge"] is False
    assert back["candidate"]["id"] == "old" and back["candidate"]["replicas"] == 2
    controller.register_endpoint("old", "r9", "http://127.0.0.1:9109")
    controller.register_endpoint("old", "r8", "http://127.0.0.1:9108")
    await ticks(controller, clocks[1], 5, router)
    assert controller.promotion(back["id"])["phase"] == "succeeded"
    assert controller.desired_state().routes["batch"] == {"old": 1.0} and "new" not in controller.desired_state().pools
    with pytest.raises(StateError, match="no promotion to roll back"):
        await controller.rollback_class("interactive")


async def test_rolling_back_onto_a_pool_another_class_kept_routes_straight_back_and_drops_the_promoted_one(
        capacity, clocks):
    deployer = RecordingDeployer()
    controller = make_controller(capacity, deployer, clocks)
    old, other = make_pool("old", tp=1, replicas=2), make_pool("other", tp=1)
    await controller.apply(DesiredState(pools={"old": old, "other": other},
                                        routes={"batch": {"old": 1.0}, "interactive": {"other": 0.5, "old": 0.5}}))
    for replica in ("r1", "r2"):
        controller.register_endpoint("old", replica, f"http://127.0.0.1:90{replica[-1]}")
    promotion = await controller.start_promotion("batch", make_pool("new", tp=1), source="study s1")
    controller.register_endpoint("new", "n1", "http://127.0.0.1:9101")
    await served_until_done(controller, clocks)
    assert controller.promotion(promotion["id"])["phase"] == "succeeded"
    assert "old" in controller.desired_state().pools  # interactive kept it
    deployed = list(deployer.deployed)
    back = await controller.rollback_class("batch")
    assert back["id"] == promotion["id"] and back["phase"] == "rolled_back"
    assert back["reason"] == "rolled back by the operator: class batch back on old, which still ran"
    state = controller.desired_state()
    assert state.routes["batch"] == {"old": 1.0} and "new" not in state.pools
    assert deployer.deployed == deployed  # no copy of the old pool: it never left
    events = [e["kind"] for e in controller.status()["events"]]
    assert events[-1] == "promotion.rolled_back"
