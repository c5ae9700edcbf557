"""The promotion state machine with plain values: steps, dwell, verdicts, rollback, making room, restarts."""

from dataclasses import replace

import pytest

from gateway.control.promotion import (
    Observation,
    OpenWindow,
    PromotionConflict,
    PromotionPolicy,
    RemovePool,
    SetPool,
    SetWeights,
    StepRecord,
    advance,
    after_restart,
    begin,
    promotion_from_dict,
    promotion_to_dict,
    roll_back,
)
from gateway.control.promotion_analysis import PoolWindow, Verdict
from gateway.control.promotion_driver import reference_baseline
from tests.gateway.pools import make_pool

POLICY = PromotionPolicy(steps=(0.1, 0.5, 1.0), dwell_s=10.0, min_requests=20, max_inconclusive_s=30.0,
                         ready_timeout_s=60.0)
GOOD = PoolWindow(requests=50, errors=0, errors_5xx=0, ttft_p99_s=0.2, tpot_p99_s=0.02)


def verdict(kind="pass", reason="fine"):
    return Verdict(kind, reason, GOOD)


def start(*, old_replicas=2, old_tp=1, candidate_replicas=1, candidate_tp=2, free=4, policy=POLICY, routes=None):
    old = make_pool("old", tp=old_tp, replicas=old_replicas)
    pools = {"old": old}
    routes = routes or {"batch": {"old": 1.0}}
    for weights in routes.values():
        for pool_id in weights:
            pools.setdefault(pool_id, make_pool(pool_id))
    candidate = make_pool("new", tp=candidate_tp, replicas=candidate_replicas)
    return begin(promotion_id="p1", class_name="batch", candidate=candidate, routes=routes, pools=pools,
                 free_gpus=free, policy=policy, source="study s1", now_s=1000.0)


def weights_of(transition):
    return [a.weights for a in transition.actions if isinstance(a, SetWeights)]


def run_to_window(transition, *, now_s, free=0):
    """Make the candidate's replicas ready and open the step's window."""
    p = transition.promotion
    t = advance(p, Observation(now_s=now_s, free_gpus=free, ready={"new": p.candidate_replicas, "old": 2}))
    return t


def test_a_promotion_walks_its_steps_and_finishes():
    t = start()
    assert t.promotion.phase == "starting" and t.actions == (SetPool(make_pool("new", tp=2, replicas=1)),)
    assert t.events[0][0] == "promotion.started"
    # ready: step 1 (10 %) begins, and once the (already full) candidate is ready, its window opens
    t = advance(t.promotion, Observation(now_s=1005.0, free_gpus=2, ready={"new": 1, "old": 2}))
    assert weights_of(t) == [{"old": pytest.approx(0.9), "new": 0.1}]
    assert t.promotion.phase == "shifting" and t.promotion.step == 0
    t = advance(t.promotion, Observation(now_s=1006.0, free_gpus=2, ready={"new": 1, "old": 2}))
    assert t.actions == (OpenWindow(),) and t.promotion.window_opened_s == 1006.0
    # inside the dwell time a passing check holds the step
    t = advance(t.promotion, Observation(now_s=1010.0, free_gpus=2, ready={"new": 1}, verdict=verdict()))
    assert t.actions == () and t.promotion.step == 0 and t.promotion.last_verdict["kind"] == "pass"
    # after it, the step passes and the next one begins
    t = advance(t.promotion, Observation(now_s=1016.0, free_gpus=2, ready={"new": 1}, verdict=verdict()))
    assert weights_of(t) == [{"old": 0.5, "new": 0.5}] and t.promotion.step == 1
    assert [kind for kind, _ in t.events][:2] == ["promotion.check", "promotion.step"]
    t = advance(t.promotion, Observation(now_s=1017.0, free_gpus=2, ready={"new": 1}))
    t = advance(t.promotion, Observation(now_s=1028.0, free_gpus=2, ready={"new": 1}, verdict=verdict()))
    assert weights_of(t) == [{"new": 1.0}] and t.promotion.step == 2
    t = advance(t.promotion, Observation(now_s=1029.0, free_gpus=2, ready={"new": 1}))
    t = advance(t.promotion, Observation(now_s=1040.0, free_gpus=2, ready={"new": 1}, verdict=verdict()))
    assert t.promotion.phase == "finishing"
    assert RemovePool("old") in t.actions and weights_of(t) == [{"new": 1.0}]
    t = advance(t.promotion, Observation(now_s=1041.0, free_gpus=4, ready={"new": 1}))
    assert t.promotion.phase == "succeeded" and not t.promotion.active
    assert [r.verdict for r in t.promotion.history] == ["pass", "pass", "pass"]
    assert t.events[0][0] == "promotion.succeeded"


def opened_first_step(**kwargs):
    t = start(**kwargs)
    p = t.promotion
    t = advance(p, Observation(now_s=1001.0, free_gpus=0, ready={"new": p.candidate_replicas, "old": 2}))
    return advance(t.promotion, Observation(now_s=1002.0, free_gpus=0, ready={"new": t.promotion.candidate_replicas}))


def test_a_failed_check_rolls_back_at_once_even_inside_the_dwell_time():
    t = opened_first_step()
    t = advance(t.promotion, Observation(now_s=1003.0, free_gpus=0, ready={"new": 1},
                                         verdict=verdict("fail", "7 5xx answers")))
    p = t.promotion
    assert p.phase == "rolled_back" and "step 1 (10%) failed: 7 5xx answers" in p.reason
    assert t.actions == (SetWeights({"old": 1.0}), RemovePool("new"))  # old weights first, then the drain
    assert p.history[-1].verdict == "fail"
    assert t.events[0][0] == "promotion.rolled_back"


def test_too_few_requests_hold_the_step_then_roll_back():
    t = opened_first_step()
    t = advance(t.promotion, Observation(now_s=1020.0, free_gpus=0, ready={"new": 1},
                                         verdict=verdict("inconclusive", "3 of the 20 requests")))
    assert t.promotion.phase == "shifting" and t.actions == ()
    t = advance(t.promotion, Observation(now_s=1033.0, free_gpus=0, ready={"new": 1},
                                         verdict=verdict("inconclusive", "3 of the 20 requests")))
    assert t.promotion.phase == "rolled_back"
    assert "inconclusive after 31 s (promotion.max_inconclusive_s 30): 3 of the 20 requests" in t.promotion.reason


def test_a_candidate_not_ready_in_time_or_failing_rolls_back():
    t = start()
    late = advance(t.promotion, Observation(now_s=1061.0, free_gpus=2, ready={"new": 0}))
    assert late.promotion.phase == "rolled_back" and "0/1 replicas ready after 61 s" in late.promotion.reason
    failed = advance(t.promotion, Observation(now_s=1001.0, free_gpus=2, ready={}, failures={"new": "no GPUs"}))
    assert failed.promotion.reason == "the new pool failed: no GPUs"
    gone = opened_first_step()
    gone = advance(gone.promotion, Observation(now_s=1003.0, free_gpus=0, ready={"new": 0}, verdict=verdict()))
    assert gone.promotion.reason == "the new pool has no ready replica left"


def test_making_room_shrinks_the_old_pool_as_the_candidate_grows():
    # the old pool 4 x tp1 holds every GPU; the candidate 2 x tp1 has none free
    policy = PromotionPolicy(steps=(0.25, 0.5, 1.0), dwell_s=1.0, min_requests=1)
    t = start(old_replicas=4, old_tp=1, candidate_replicas=2, candidate_tp=1, free=0, policy=policy)
    # for the first step (25 %) the old pool keeps ceil(0.75 x 4) = 3 replicas: one goes, one candidate comes
    assert t.actions == (SetPool(make_pool("old", tp=1, replicas=3)), SetPool(make_pool("new", tp=1, replicas=1)))
    assert "(2 x tp1, starting with 1 replicas)" in t.events[0][1]
    assert t.events[0][1].endswith("(study s1); old down to 3 replicas to make room")
    t = advance(t.promotion, Observation(now_s=1001.0, free_gpus=0, ready={"new": 1}))
    assert t.actions == (SetWeights({"old": 0.75, "new": 0.25}),)  # nothing more can move yet
    t = advance(t.promotion, Observation(now_s=1002.0, free_gpus=0, ready={"new": 1}))
    t = advance(t.promotion, Observation(now_s=1004.0, free_gpus=0, ready={"new": 1}, verdict=verdict()))
    # 50 %: traffic first, then the old pool down to 2, and the candidate up to 2 with the GPU it frees
    assert t.actions == (SetWeights({"old": 0.5, "new": 0.5}), SetPool(make_pool("old", tp=1, replicas=2)),
                         SetPool(make_pool("new", tp=1, replicas=2)))
    assert t.promotion.current_old_replicas == {"old": 2} and t.promotion.candidate_replicas == 2
    held = advance(t.promotion, Observation(now_s=1005.0, free_gpus=0, ready={"new": 1}))
    assert held.actions == () and held.promotion.window_opened_s is None  # the window opens once both are ready
    # a failure now restores the old pool's size after taking the traffic back and removing the candidate
    t = advance(t.promotion, Observation(now_s=1006.0, free_gpus=0, ready={"new": 2}))
    failed = advance(t.promotion, Observation(now_s=1007.0, free_gpus=0, ready={"new": 2},
                                              verdict=verdict("fail", "TTFT p99 over the SLO")))
    assert failed.actions == (SetWeights({"old": 1.0}), RemovePool("new"), SetPool(make_pool("old", tp=1, replicas=4)))
    # or it passes, and the last step needs no more room: the old pool is removed at the end
    t = advance(t.promotion, Observation(now_s=1008.0, free_gpus=0, ready={"new": 2}, verdict=verdict()))
    assert t.actions == (SetWeights({"new": 1.0}),)
    t = advance(t.promotion, Observation(now_s=1009.0, free_gpus=0, ready={"new": 2}))
    t = advance(t.promotion, Observation(now_s=1011.0, free_gpus=0, ready={"new": 2}, verdict=verdict()))
    assert t.promotion.phase == "finishing" and t.actions == (SetWeights({"new": 1.0}), RemovePool("old"))


def test_the_last_step_keeps_one_old_replica_until_it_passes():
    # the old pool 2 x tp2 holds every GPU; the candidate is 2 x tp2 as well
    policy = PromotionPolicy(steps=(0.5, 1.0), dwell_s=1.0, min_requests=1)
    t = start(old_replicas=2, old_tp=2, candidate_replicas=2, candidate_tp=2, free=0, policy=policy)
    assert t.actions == (SetPool(make_pool("old", tp=2, replicas=1)), SetPool(make_pool("new", tp=2, replicas=1)))
    t = advance(t.promotion, Observation(now_s=1001.0, free_gpus=0, ready={"new": 1}))
    t = advance(t.promotion, Observation(now_s=1002.0, free_gpus=0, ready={"new": 1}))
    t = advance(t.promotion, Observation(now_s=1004.0, free_gpus=0, ready={"new": 1}, verdict=verdict()))
    assert t.actions == (SetWeights({"new": 1.0}),)  # the old pool stays at one replica for a rollback
    t = advance(t.promotion, Observation(now_s=1005.0, free_gpus=0, ready={"new": 1}))
    t = advance(t.promotion, Observation(now_s=1007.0, free_gpus=0, ready={"new": 1}, verdict=verdict()))
    assert t.actions == (SetWeights({"new": 1.0}), RemovePool("old"), SetPool(make_pool("new", tp=2, replicas=2)))
    t = advance(t.promotion, Observation(now_s=1008.0, free_gpus=0, ready={"new": 1}))
    assert t.promotion.phase == "finishing"
    t = advance(t.promotion, Observation(now_s=1009.0, free_gpus=0, ready={"new": 2}))
    assert t.promotion.phase == "succeeded" and t.promotion.reason is None


def test_making_room_refuses_when_not_one_replica_fits():
    with pytest.raises(PromotionConflict) as info:
        start(old_replicas=1, old_tp=2, candidate_replicas=1, candidate_tp=2, free=1)
    message = str(info.value)
    assert "one replica needs 2 GPUs, 1 are free, and the old pools (old 1 x tp2) can give up 0" in message


def test_a_pool_shared_with_another_class_is_neither_shrunk_nor_removed():
    routes = {"batch": {"old": 1.0}, "interactive": {"old": 0.5, "other": 0.5}}
    with pytest.raises(PromotionConflict, match=r"old 2 x tp1 \(shared\)"):
        start(routes=routes, free=0, candidate_tp=1, old_replicas=2)
    t = start(routes=routes, free=1, candidate_tp=1)
    assert t.promotion.shared == frozenset({"old"})
    final = t.promotion.__class__(**{**t.promotion.__dict__, "phase": "shifting", "step": 2,
                                     "window_opened_s": 1000.0, "waiting_since_s": None})
    done = advance(final, Observation(now_s=1100.0, free_gpus=0, ready={"new": 1}, verdict=verdict()))
    assert done.promotion.phase == "finishing" and not [a for a in done.actions if isinstance(a, RemovePool)]


def test_an_operators_rollback_moves_in_one_step_without_analysis():
    policy = PromotionPolicy(steps=(1.0,), judge=False, check_period_s=2.0)
    t = start(policy=policy)
    t = advance(t.promotion, Observation(now_s=1001.0, free_gpus=2, ready={"new": 1}))
    assert weights_of(t) == [{"new": 1.0}]
    t = advance(t.promotion, Observation(now_s=1002.0, free_gpus=2, ready={"new": 1}))
    t = advance(t.promotion, Observation(now_s=1003.0, free_gpus=2, ready={"new": 1}))
    assert t.promotion.phase == "shifting"
    t = advance(t.promotion, Observation(now_s=1004.5, free_gpus=2, ready={"new": 1}))
    assert t.promotion.phase == "finishing" and RemovePool("old") in t.actions


def test_after_a_restart_a_promotion_completes_or_rolls_back():
    shifting = opened_first_step().promotion
    t = after_restart(shifting, Observation(now_s=2000.0, free_gpus=0, ready={}))
    assert t.promotion.phase == "rolled_back" and "interrupted by a restart during shifting" in t.promotion.reason
    finishing = shifting.__class__(**{**shifting.__dict__, "phase": "finishing", "waiting_since_s": 1500.0})
    t = after_restart(finishing, Observation(now_s=2000.0, free_gpus=0, ready={}))
    assert t.promotion.phase == "finishing" and RemovePool("old") in t.actions
    assert after_restart(t.promotion.__class__(**{**t.promotion.__dict__, "phase": "succeeded"}),
                         Observation(now_s=2001.0, free_gpus=0, ready={})).actions == ()


def test_roll_back_is_idempotent_and_a_record_survives_json():
    t = opened_first_step()
    done = roll_back(t.promotion, 1005.0, "aborted by the operator")
    assert roll_back(done.promotion, 1006.0, "again").actions == ()
    record = promotion_to_dict(done.promotion)
    assert promotion_from_dict(record) == done.promotion
    assert record["phase"] == "rolled_back" and record["weight"] == 0.0


def test_policy_steps_are_checked():
    with pytest.raises(ValueError, match="steps must increase"):
        PromotionPolicy(steps=(0.5, 0.2, 1.0))


def test_the_full_step_is_judged_against_the_old_pools_when_they_carried_the_most_traffic():
    busy_old = PoolWindow(requests=90, errors=0, errors_5xx=0, ttft_p99_s=0.40, tpot_p99_s=0.03)
    idle_old = PoolWindow(requests=50, errors=0, errors_5xx=0, ttft_p99_s=0.15, tpot_p99_s=0.02)
    p = start().promotion
    assert reference_baseline(p) is None
    history = (StepRecord(0, 0.1, "pass", "fine", 1010.0, Verdict("pass", "fine", GOOD, busy_old).as_dict()),
               StepRecord(1, 0.5, "pass", "fine", 1020.0, Verdict("pass", "fine", GOOD, idle_old).as_dict()))
    # at 100 % the candidate serves the whole load: the 90 % window of the old pools is the fair comparison
    assert reference_baseline(replace(p, history=history)) == busy_old
    assert reference_baseline(replace(p, history=history[1:])) == idle_old
    failed = (StepRecord(0, 0.1, "fail", "slow", 1010.0, Verdict("fail", "slow", GOOD, busy_old).as_dict()),)
    assert reference_baseline(replace(p, history=failed, last_verdict=Verdict("pass", "x", GOOD, idle_old).as_dict())) \
        == idle_old
