import pytest

from gateway.planner import EngineKnobs
from tests.tuner.conftest import config_with
from tuner.feasibility import Deployment, FeasibilityModel
from tuner.space import Candidate, build_space


def knobs(mbs: int, kv: float = 0.9) -> EngineKnobs:
    return EngineKnobs.of({"max_batch_size": mbs, "cache_max_entry_count": kv, "quant_policy": 0,
                           "max_prefill_token_num": 8192})


@pytest.fixture
def space():
    config = config_with(gpus=8, tuning={"knobs": {"max_batch_size": [64, 128, 256], "cache_max_entry_count": [0.9],
                                                   "quant_policy": [0], "max_prefill_token_num": [8192]}})
    return build_space(config, "batch")


def test_without_a_failure_nothing_is_expected_to_fail(space):
    model = FeasibilityModel(space, [Deployment(0, Candidate(2, 1, knobs(128)), failed=False)])
    assert model.failures == 0
    assert model.estimate(Candidate(2, 1, knobs(256))).probability == 0.0


def test_a_failure_makes_its_neighbours_likely_to_fail_and_far_ones_less(space):
    model = FeasibilityModel(space)
    model.add(Deployment(4, Candidate(2, 1, knobs(256)), failed=True))
    one_step = model.estimate(Candidate(2, 1, knobs(128)))
    two_steps = model.estimate(Candidate(2, 1, knobs(64)))
    assert one_step.probability == pytest.approx(0.5)
    assert two_steps.probability == pytest.approx(0.25 / 0.75)
    assert one_step.failed_neighbours == (4,)
    assert one_step.explain() == "predicted to fail (p 0.50: near failed trial #4)"


def test_a_configuration_that_ran_beside_a_failure_lowers_the_estimate(space):
    failed = Deployment(1, Candidate(2, 1, knobs(256)), failed=True)
    alone = FeasibilityModel(space, [failed]).estimate(Candidate(2, 1, knobs(128))).probability
    ran = Deployment(2, Candidate(2, 1, knobs(64)), failed=False)
    with_success = FeasibilityModel(space, [failed, ran]).estimate(Candidate(2, 1, knobs(128))).probability
    two_failures = FeasibilityModel(space, [failed, Deployment(3, Candidate(2, 1, knobs(64)), failed=True)])
    assert with_success == pytest.approx(1 / 3) and with_success < alone
    assert two_failures.estimate(Candidate(2, 1, knobs(128))).probability == pytest.approx(2 / 3)


def test_replicas_weigh_half_a_step(space):
    model = FeasibilityModel(space)
    a, b = Candidate(2, 1, knobs(128)), Candidate(2, 3, knobs(128))
    assert model.distance(a, b) == pytest.approx(1.0)
    assert model.distance(a, Candidate(4, 1, knobs(64))) == pytest.approx(2.0)
