import random
from collections import Counter

import pytest

from gateway.dataplane.routing import (
    Endpoint,
    PoolView,
    RoutingTable,
    choose_pool,
    choose_replica,
    classify,
    served_models,
)
from gateway.errors import ApiError


def endpoints(*ids):
    return tuple(Endpoint(i, f"http://127.0.0.1:{9000 + n}") for n, i in enumerate(ids))


TABLE = RoutingTable(
    version=3,
    model="llama-3-8b",
    classes=("interactive", "batch"),
    default_class="interactive",
    routes={"interactive": {"a": 0.2, "b": 0.8}, "batch": {"b": 1.0}, "trial-7": {"c": 1.0}},
    pools={"a": PoolView("a", 1, 2, endpoints("a1", "a2")), "b": PoolView("b", 2, 1, endpoints("b1")),
           "c": PoolView("c", 4, 1, endpoints("c1"))},
)


@pytest.mark.parametrize(("model", "header", "key_class", "route", "upstream", "rewritten"), [
    ("llama-3-8b", "batch", "interactive", "batch", "llama-3-8b", False),  # header wins
    ("llama-3-8b:batch", None, "interactive", "batch", "llama-3-8b", True),  # then the alias
    ("llama-3-8b", None, "batch", "batch", "llama-3-8b", False),  # then the key's class
    ("llama-3-8b", None, None, "interactive", "llama-3-8b", False),  # then the default
    ("llama-3-8b:interactive", "trial-7", None, "trial-7", "llama-3-8b", True),  # trial routes: admin only
])
def test_classification_order(model, header, key_class, route, upstream, rewritten):
    result = classify(TABLE, model=model, header_class=header, key_class=key_class, trial_allowed=True)
    assert (result.route, result.upstream_model, result.rewritten) == (route, upstream, rewritten)


@pytest.mark.parametrize(("model", "header", "status", "message"), [
    ("gpt-4", None, 404, "The model 'gpt-4' does not exist"),
    ("llama-3-8b:nightly", None, 404, "The model 'llama-3-8b:nightly' does not exist"),
    (None, None, 400, "'model' is required"),
    (42, None, 400, "'model' is required and must be a string"),
    ("llama-3-8b", "realtime", 400, "unknown workload class 'realtime' in x-workload-class"),
])
def test_classification_errors(model, header, status, message):
    with pytest.raises(ApiError) as info:
        classify(TABLE, model=model, header_class=header, key_class=None)
    assert info.value.status == status
    assert message in info.value.message


def test_models_lists_the_model_and_one_alias_per_class():
    assert [m for m, _ in served_models(TABLE)] == ["llama-3-8b", "llama-3-8b:interactive", "llama-3-8b:batch"]


def test_weighted_pool_choice_follows_the_weights():
    rng = random.Random(7)
    picks = Counter(choose_pool(TABLE.routes["interactive"], TABLE.pools, rng).id for _ in range(10_000))
    assert picks["a"] / 10_000 == pytest.approx(0.2, abs=0.02)


def test_pools_without_endpoints_are_skipped_and_none_when_nothing_is_up():
    pools = {**TABLE.pools, "b": PoolView("b", 2, 1, ())}
    rng = random.Random(1)
    assert {choose_pool(TABLE.routes["interactive"], pools, rng).id for _ in range(50)} == {"a"}
    assert choose_pool(TABLE.routes["batch"], pools, rng) is None
    assert choose_pool(TABLE.routes["interactive"], TABLE.pools, rng, exclude={"a", "b"}) is None


def test_power_of_two_choices_prefers_the_less_loaded_replica():
    eps = endpoints("r1", "r2")
    rng = random.Random(3)
    assert {choose_replica(eps, {"r1": 5, "r2": 1}, rng).replica_id for _ in range(20)} == {"r2"}


def test_replica_choice_spreads_load_and_honours_exclusions():
    eps = endpoints("r1", "r2", "r3", "r4")
    rng = random.Random(5)
    assert len({choose_replica(eps, {}, rng).replica_id for _ in range(200)}) == 4
    assert choose_replica(eps, {}, rng, exclude={"r1", "r2", "r3"}).replica_id == "r4"
    assert choose_replica(eps, {}, rng, exclude={"r1", "r2", "r3", "r4"}) is None


@pytest.mark.parametrize("header", ["trial-7", "trial-never-existed"])
def test_a_trial_route_needs_the_admin_token_and_does_not_say_whether_it_exists(header):
    with pytest.raises(ApiError) as info:
        classify(TABLE, model="llama-3-8b", header_class=header, key_class="batch")
    assert (info.value.status, info.value.code) == (403, "trial_route_forbidden")
    assert classify(TABLE, model="llama-3-8b", header_class="trial-7", key_class=None,
                    trial_allowed=True).route == "trial-7"


def test_an_unknown_class_lists_only_workload_classes_to_a_client():
    with pytest.raises(ApiError) as info:
        classify(TABLE, model="llama-3-8b", header_class="realtime", key_class=None)
    assert "(known: batch, interactive)" in info.value.message
