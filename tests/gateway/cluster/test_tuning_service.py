"""The tuning service's bookkeeping: the GPUs a study may use, overrides, references that survive a restart."""

import pytest

from gateway.cluster.tuning_service import (
    TRIAL_POOL_PREFIX,
    StudyRejected,
    StudyRequest,
    TuningService,
    _pool_id,
    allotment,
)
from gateway.config import load_config
from gateway.control.client import GatewayStatus, PoolStatus
from gateway.planner import EngineKnobs
from tuner.runner import trial_pool_id
from tuner.space import Candidate


def status(pools, budget=8):
    return GatewayStatus(version=1, epoch="e", routes={}, gpus_budget=budget, gpus_used=0, gpus_free=0, pools={
        pool_id: PoolStatus(id=pool_id, tp=tp, replicas=replicas, ready_replicas=replicas, gpus=tp * replicas,
                            phase="running", message="", endpoints={}, knobs=EngineKnobs(), engine="sim",
                            time_scale=1.0)
        for pool_id, (tp, replicas) in pools.items()})


def test_a_study_gets_what_production_and_other_studies_leave():
    gateway = status({"interactive-tp4": (4, 1), "batch-tp1": (1, 2), "t-abc123-tp1x1": (1, 1)})
    assert allotment(gateway, held_by_studies=0, max_gpus=None)[0] == 2  # the trial pool is not production
    assert allotment(gateway, held_by_studies=1, max_gpus=None)[0] == 1
    gpus, counted = allotment(gateway, held_by_studies=0, max_gpus=1)
    assert gpus == 1 and counted == ("the budget is 8 GPUs, production pools use 6 (batch-tp1 2 x tp1, "
                                     "interactive-tp4 1 x tp4), running studies hold 0, tuning.max_gpus is 1: "
                                     "1 for a study")
    assert allotment(gateway, held_by_studies=5, max_gpus=None)[0] == 0


def test_the_trial_pool_prefix_is_the_tuners():
    assert trial_pool_id("batch-1", Candidate(2, 1, EngineKnobs())).startswith(TRIAL_POOL_PREFIX)


def test_overrides_are_validated_as_the_configuration_is():
    base = load_config().tuning
    request = StudyRequest.model_validate({"class": "batch", "window_s": 5, "knobs": {"max_batch_size": [64]}})
    tuning = request.tuning(base)
    assert tuning.window_s == 5 and tuning.knobs.max_batch_size == [64] and tuning.knobs.quant_policy == [0]
    with pytest.raises(StudyRejected, match="knobs.max_batch_size lists a value twice"):
        StudyRequest.model_validate({"class": "batch", "knobs": {"max_batch_size": [64, 64]}}).tuning(base)


def test_a_promoted_pool_gets_a_valid_id_that_is_not_a_trial_pools():
    assert _pool_id("batch", {"tp": 2, "replicas": 2, "max_batch_size": 256}, "batch-1a2b3c").startswith("batch-tp2x2-")
    odd = _pool_id("t" * 47, {"tp": 2, "replicas": 2}, "x")
    assert odd.startswith("p-") and not odd.startswith(TRIAL_POOL_PREFIX)


class Records:
    """The controller's record sections, as the control client reads and writes them."""

    def __init__(self, sections):
        self.sections = sections

    async def records(self, section):
        return self.sections.get(section)

    async def put_records(self, section, value):
        self.sections[section] = value


async def test_a_study_left_running_by_a_stopped_gateway_is_interrupted():
    stored = {"studies": {"batch-1": {"id": "batch-1", "class": "batch", "state": "running", "trials": 4,
                                      "measured_trials": 2, "gpus": 2, "study_name": "online-batch-1",
                                      "storage": "sqlite:///x.db"}}}
    control = Records(stored)
    service = TuningService(load_config(), control=control, admin_token="t", storage="sqlite:///x.db")
    (study,) = await service.studies()
    assert study["state"] == "interrupted" and "trials are kept in the storage" in study["reason"]
    assert control.sections["studies"]["batch-1"]["state"] == "interrupted"  # and that is persisted


def test_a_request_names_configurations_to_measure_first():
    request = StudyRequest.model_validate({"class": "batch", "first": [{"tp": 2, "replicas": 1, "max_batch_size": 8}]})
    assert request.first == [{"tp": 2, "replicas": 1, "max_batch_size": 8}]
    assert StudyRequest.model_validate({"class": "batch"}).first is None
