import pytest

from gateway.control.state import DesiredState, StateError, validate_state
from tests.gateway.pools import make_pool


def state(*pools, **routes):
    return DesiredState(pools={p.id: p for p in pools}, routes=routes)


def test_valid_state(capacity):
    validate_state(state(make_pool("a", tp=1, replicas=2), make_pool("b", tp=2), interactive={"a": 0.25, "b": 0.75}),
                   capacity)


@pytest.mark.parametrize(("desired", "message"), [
    (lambda: state(make_pool("a"), interactive={"zzz": 1.0}), "route 'interactive' names unknown pool 'zzz'"),
    (lambda: state(make_pool("a"), make_pool("b"), x={"a": 0.5, "b": 0.4}), "route 'x': weights sum to 0.9, not 1"),
    (lambda: state(make_pool("a"), x={"a": 1.5}), "weight of 'a' must be in [0, 1], not 1.5"),
    (lambda: state(make_pool("a"), x={}), "route 'x' has no pools"),
    (lambda: state(make_pool("a", tp=2, replicas=2), make_pool("b", tp=1)),
     "pools need 5 GPUs (a=2x2, b=1x1), more than the budget of 4"),
    (lambda: state(make_pool("a", tp=3)), "pool 'a': tp=3: 32 attention heads are not divisible by 3"),
    (lambda: state(make_pool("a", tp=2, replicas=3)), "3 replicas at tp=2 exceed the 2 that fit 4 GPUs"),
    (lambda: state(make_pool("Bad_Id")), "pool id 'Bad_Id' must be 1-48 lowercase letters"),
    (lambda: state(make_pool("a", replicas=0)), "replicas must be at least 1, not 0"),
])
def test_invalid_states_name_the_reason(capacity, desired, message):
    with pytest.raises(StateError) as info:
        validate_state(desired(), capacity)
    assert message in str(info.value)


def test_without_pool_renormalises_and_drops_empty_routes():
    s = state(make_pool("a"), make_pool("b"), make_pool("c"), x={"a": 0.5, "b": 0.25, "c": 0.25}, y={"b": 1.0})
    after = s.without_pool("b")
    assert set(after.pools) == {"a", "c"}
    assert after.routes == {"x": {"a": pytest.approx(2 / 3), "c": pytest.approx(1 / 3)}}


def test_gpus_used_counts_tp_times_replicas():
    assert state(make_pool("a", tp=2, replicas=2), make_pool("b")).gpus_used == 5
