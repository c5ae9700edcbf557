import pytest

from gateway.errors import UserError
from gateway.planner import EngineKnobs, evaluate_tp, find_gpu, load_model, max_replicas, model_from_config, plan

H100 = find_gpu("h100-80gb")


def shape(heads, kv):
    return model_from_config(
        {"num_attention_heads": heads, "num_key_value_heads": kv, "hidden_size": heads * 128,
         "intermediate_size": 4 * heads * 128, "num_hidden_layers": 4, "vocab_size": 1000,
         "max_position_embeddings": 4096},
        name="toy",
    )


@pytest.fixture(scope="module")
def internvl_on_8_h100():
    return {v.tp: v for v in plan(load_model("internvl2_5-38b"), H100, gpus=8, gpus_per_node=8)}


def test_internvl_38b_feasible_tp_sizes(internvl_on_8_h100):
    assert [tp for tp, v in internvl_on_8_h100.items() if v.feasible] == [2, 4, 8]
    assert {tp: v.max_replicas for tp, v in internvl_on_8_h100.items() if v.feasible} == {2: 4, 4: 2, 8: 1}


@pytest.mark.parametrize(("tp", "reason"), [
    (3, "tp=3: 40 attention heads are not divisible by 3"),
    (5, "tp=5: 8 KV heads are not divisible by 5"),
    (6, "tp=6: 40 attention heads are not divisible by 6"),
    (7, "tp=7: 40 attention heads are not divisible by 7"),
])
def test_internvl_38b_divisibility_rejections(internvl_on_8_h100, tp, reason):
    assert not internvl_on_8_h100[tp].feasible
    assert internvl_on_8_h100[tp].reason == reason


def test_internvl_38b_tp1_has_no_room_for_a_session(internvl_on_8_h100):
    verdict = internvl_on_8_h100[1]
    assert not verdict.feasible
    assert "less than one 32,768-token session" in verdict.reason
    assert 0 < verdict.kv_cache_tokens_per_replica < 32768


def test_kv_heads_fewer_than_tp_must_divide_it():
    model = shape(heads=32, kv=4)
    assert evaluate_tp(model, H100, 8, gpus=8, gpus_per_node=8).feasible
    assert "KV heads are replicated 2x" in evaluate_tp(model, H100, 8, gpus=8, gpus_per_node=8).warnings[0]
    model = shape(heads=48, kv=4)
    assert evaluate_tp(model, H100, 6, gpus=8, gpus_per_node=8).reason == (
        "tp=6: 6 is not a multiple of the 4 KV heads (needed to replicate them evenly)")


def test_tp_must_stay_within_a_node():
    verdict = evaluate_tp(shape(32, 32), H100, 8, gpus=16, gpus_per_node=4)
    assert verdict.reason == "tp=8: exceeds the 4 GPUs per node (tensor parallelism stays within one node)"


def test_weights_must_fit():
    verdict = evaluate_tp(load_model("llama-2-70b"), find_gpu("rtx-4090"), 4, gpus=4, gpus_per_node=4)
    assert not verdict.feasible
    assert "weights need 32.1 GiB per GPU plus a 3.0 GiB runtime reserve" in verdict.reason


def test_non_power_of_two_is_only_a_warning():
    verdict = evaluate_tp(shape(heads=48, kv=48), H100, 6, gpus=8, gpus_per_node=8)
    assert verdict.feasible
    assert any("not a power of two" in w for w in verdict.warnings)


def test_kv_cache_arithmetic():
    model = load_model("llama-2-7b")
    gpu = find_gpu("a100-80gb")
    verdict = evaluate_tp(model, gpu, 1, gpus=1, gpus_per_node=1, knobs=EngineKnobs(cache_max_entry_count=0.5))
    free = gpu.memory_bytes - model.weight_bytes - 3 * 1024**3
    assert verdict.kv_cache_bytes_per_gpu == int(0.5 * free)
    assert verdict.kv_cache_tokens_per_replica == int(0.5 * free) // (2 * 32 * 32 * 128 * 2)
    assert verdict.max_sequences_per_replica == verdict.kv_cache_tokens_per_replica // 4096


def test_quantised_kv_cache_holds_nearly_two_and_four_times_the_tokens():
    model = load_model("llama-3-8b")  # head_dim 128: 256 bytes per head and token in fp16
    fp16 = evaluate_tp(model, H100, 1, gpus=1, gpus_per_node=1)
    int8 = evaluate_tp(model, H100, 1, gpus=1, gpus_per_node=1, knobs=EngineKnobs(quant_policy=8))
    int4 = evaluate_tp(model, H100, 1, gpus=1, gpus_per_node=1, knobs=EngineKnobs(quant_policy=4))
    # int8: 128 bytes of data plus a 4-byte scale and zero point; int4: 64 + 4 bytes.
    assert int8.kv_cache_tokens_per_replica == pytest.approx(256 / 132 * fp16.kv_cache_tokens_per_replica, rel=1e-4)
    assert int4.kv_cache_tokens_per_replica == pytest.approx(256 / 68 * fp16.kv_cache_tokens_per_replica, rel=1e-4)


def test_session_len_decides_kv_feasibility():
    model = load_model("internvl2_5-38b")
    assert evaluate_tp(model, H100, 1, gpus=8, gpus_per_node=8, knobs=EngineKnobs(session_len=8192)).feasible


@pytest.mark.parametrize(("tp", "gpus", "per_node", "replicas"), [
    (2, 8, 8, 4), (4, 8, 4, 2), (4, 6, 4, 1), (2, 6, 4, 3), (3, 8, 8, 2), (8, 8, 8, 1),
])
def test_max_replicas_respects_node_boundaries(tp, gpus, per_node, replicas):
    assert max_replicas(tp, gpus=gpus, gpus_per_node=per_node) == replicas


def test_budget_below_one():
    with pytest.raises(UserError, match="GPU budget must be at least 1, not 0"):
        plan(shape(32, 32), H100, gpus=0)


def test_tp_larger_than_budget():
    with pytest.raises(UserError, match="tp=16 is larger than the GPU budget of 8"):
        plan(shape(32, 32), H100, gpus=8, tp_sizes=[16])


@pytest.mark.parametrize(("knobs", "message"), [
    ({"cache_max_entry_count": 0}, "cache_max_entry_count must be greater than 0, not 0"),
    ({"backend": "vllm"}, "backend must be 'turbomind' or 'pytorch'"),
    ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
    ({"quant_policy": 3}, "quant_policy must be 0, 4 or 8"),
    ({"max_batch_sise": 8}, "max_batch_sise is not a known field"),
])
def test_bad_engine_knobs(knobs, message):
    with pytest.raises(UserError, match=message):
        EngineKnobs.of(knobs)
