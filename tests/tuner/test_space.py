import pytest

from gateway.control.state import POOL_ID_PATTERN
from gateway.errors import UserError
from gateway.planner import EngineKnobs
from tests.tuner.conftest import config_with
from tuner.space import KNOB_NAMES, Candidate, build_space


def test_never_tp_3_or_6_for_40_heads(internvl_8):
    space = build_space(internvl_8, "interactive")
    assert space.tp_sizes == (2, 4, 8)  # TP 1: the KV cache cannot hold one session next to 71.5 GiB of weights
    assert "40 attention heads are not divisible by 3" in space.excluded_tp[3]
    assert "not divisible by 6" in space.excluded_tp[6]
    assert {c.tp for c in space.candidates()} == {2, 4, 8}
    candidate = Candidate(3, 1, EngineKnobs.of(max_batch_size=128, max_prefill_token_num=4096))
    assert "40 attention heads are not divisible by 3" in space.check(candidate)


def test_every_candidate_fits_the_class_budget():
    config = config_with(gpus=8)  # two classes, 4 GPUs each
    space = build_space(config, "batch")
    assert space.gpus == 4
    candidates = space.candidates()
    assert candidates and max(c.gpus for c in candidates) == 4
    assert {c.shape for c in candidates} == {(2, 1), (2, 2), (4, 1)}
    over = Candidate(4, 2, candidates[0].knobs)
    assert space.check(over) == "2 x tp4 needs 8 GPUs, more than the 4 the study may use"


def test_gpus_free_and_max_gpus_cap_the_budget(internvl_8):
    assert build_space(internvl_8, "batch", gpus_free=4).gpus == 4
    capped = internvl_8.model_copy(update={"tuning": internvl_8.tuning.model_copy(update={"max_gpus": 2})})
    space = build_space(capped, "batch")
    assert (space.gpus, space.tp_sizes, space.max_replicas) == (2, (2,), 1)
    with pytest.raises(UserError, match="no GPU is free"):
        build_space(internvl_8, "batch", gpus_free=0)


def test_knobs_the_planner_rejects_carry_its_reason():
    config = config_with(gpus=8, tuning={"knobs": {"cache_max_entry_count": [0.05, 0.9]}})
    space = build_space(config, "batch")
    small_cache = Candidate(2, 1, EngineKnobs.of(max_batch_size=128, cache_max_entry_count=0.05,
                                                 max_prefill_token_num=4096))
    reason = space.check(small_cache)
    assert reason is not None and "KV cache holds" in reason and "less than one 32,768-token session" in reason
    assert small_cache not in space.candidates()
    assert all(c.knobs.cache_max_entry_count == 0.9 for c in space.candidates() if c.tp == 2)


def test_values_outside_the_box_are_refused_by_name():
    space = build_space(config_with(gpus=8), "batch")
    knobs = EngineKnobs.of(max_batch_size=100, max_prefill_token_num=4096)
    assert space.check(Candidate(2, 1, knobs)) == "max_batch_size=100 is not one of [128, 256, 512, 1024]"
    assert space.check(Candidate(2, 3, knobs)).startswith("3 replicas: outside 1-2")


def test_replica_range_and_knob_choices_come_from_the_configuration():
    config = config_with(gpus=8, tuning={"min_replicas": 2, "knobs": {"max_batch_size": [64],
                                                                      "quant_policy": [0, 8]}})
    space = build_space(config, "batch")
    assert space.knob_choices["quant_policy"] == (0, 8) and space.knob_choices["max_batch_size"] == (64,)
    # an int8 KV cache fits a session next to the weights on one GPU, so TP 1 joins the box (with 4 replicas)
    assert space.tp_sizes == (1, 2, 4) and (space.min_replicas, space.max_replicas) == (2, 4)
    candidates = space.candidates()
    assert {c.shape for c in candidates} == {(1, 2), (1, 3), (1, 4), (2, 2)}
    assert {c.knobs.quant_policy for c in candidates if c.tp == 1} == {8}


def test_unknown_class_is_a_user_error():
    with pytest.raises(UserError, match="unknown class 'realtime'"):
        build_space(config_with(), "realtime")


def test_candidate_params_round_trip_and_make_valid_pool_ids(internvl_8):
    for candidate in build_space(internvl_8, "batch").candidates():
        params = candidate.params()
        assert set(params) == {"tp", "replicas", *KNOB_NAMES}
        assert Candidate.from_params(params) == candidate
        assert POOL_ID_PATTERN.match("t-abcdef-" + candidate.slug())
    assert Candidate(2, 2, EngineKnobs.of(max_batch_size=256, cache_max_entry_count=0.85,
                                          max_prefill_token_num=8192)).slug() == "tp2x2-mbs256-kv85-q0-pf8192"


def test_fingerprint_follows_the_space(internvl_8):
    space = build_space(internvl_8, "batch")
    other = internvl_8.model_copy(update={"tuning": internvl_8.tuning.model_copy(
        update={"knobs": internvl_8.tuning.knobs.model_copy(update={"quant_policy": [0, 8]})})})
    assert space.fingerprint() == build_space(internvl_8, "batch").fingerprint()
    assert space.fingerprint() != build_space(other, "batch").fingerprint()
