"""The performance model: roofline step times, TP scaling, interconnects, KV limits, deviations."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from gateway.errors import UserError
from gateway.planner import EngineKnobs, find_gpu, load_model
from gateway.planner.gpus import GpuSpec
from gateway.planner.perf import (
    KERNEL_OVERLAP_EXPONENT,
    Deviation,
    StepBatch,
    StepCostModel,
    Workload,
    kv_cache_blocks,
    overlapped_s,
    predict,
)

A100 = find_gpu("a100-80gb")
H100 = find_gpu("h100-80gb")
LLAMA_7B = load_model("llama-2-7b")
LLAMA_70B = load_model("llama-2-70b")
INTERNVL_38B = load_model("internvl2_5-38b")
# The same GPU with a PCIe link instead of NVLink: only the interconnect differs.
H100_PCIE = dataclasses.replace(H100, name="h100-pcie", interconnect="pcie", interconnect_gb_per_s=64)


def decode_step(model: StepCostModel, batch: int, context: int = 512) -> float:
    return model.step_s(StepBatch(decode_sequences=batch, decode_context_tokens=batch * context))


def test_batch_one_decode_is_bound_by_reading_the_weights():
    cost = StepCostModel(LLAMA_7B, A100, 1).cost(StepBatch(decode_sequences=1, decode_context_tokens=1))
    # 13.2 GB of weights over an A100's 2,039 GB/s is 6.5 ms at full bandwidth; memory dominates the step.
    assert 6.5e-3 < cost.weights_s < 10e-3
    assert cost.weights_s > 100 * cost.gemm_math_s
    assert cost.gemm_s == pytest.approx(cost.weights_s, rel=0.01)  # the math hides entirely under the loads
    assert cost.allreduce_s == 0.0
    # About 100 tokens/s, LMDeploy's published batch-1 figure on this GPU.
    assert 1 / cost.total_s == pytest.approx(100, rel=0.05)


def test_memory_and_math_overlap_fully_far_from_the_ridge_and_partly_near_it():
    assert overlapped_s(1.0, 0.0) == 1.0
    assert overlapped_s(1.0, 0.01) == pytest.approx(1.0, rel=1e-3)  # all memory: the roofline's max
    assert overlapped_s(0.01, 1.0) == pytest.approx(1.0, rel=1e-3)  # all math
    both = overlapped_s(1.0, 1.0)
    assert 1.0 < both < 2.0  # near the ridge the two neither add up nor hide each other
    assert both == pytest.approx(2 ** (1 / KERNEL_OVERLAP_EXPONENT))


def test_a_large_decode_batch_is_bound_by_math_and_the_kv_cache_not_by_the_weights():
    # 256 sequences of 500 tokens: the GEMMs are math-bound and the KV cache (67 GB) outweighs the weights.
    cost = StepCostModel(LLAMA_7B, A100, 1).cost(StepBatch(decode_sequences=256, decode_context_tokens=256 * 500))
    assert cost.gemm_math_s > cost.weights_s
    assert cost.kv_s > 2 * cost.weights_s
    assert cost.gemm_s < cost.weights_s + cost.gemm_math_s  # the weights stream partly under the math


def test_larger_decode_batches_raise_throughput_with_diminishing_returns():
    model = StepCostModel(LLAMA_7B, A100, 1)
    rates = [b / decode_step(model, b) for b in (1, 16, 64, 256)]
    assert rates == sorted(rates)
    assert rates[1] / rates[0] > 10  # nearly free to add sequences while weights dominate
    assert rates[3] / rates[2] < 4  # compute and KV reads catch up


def test_longer_contexts_make_decode_steps_slower():
    model = StepCostModel(LLAMA_7B, A100, 1)
    assert decode_step(model, 64, context=4000) > 2 * decode_step(model, 64, context=100)


def test_prefill_is_compute_bound_and_linear_in_tokens():
    model = StepCostModel(LLAMA_7B, A100, 1)
    short, long = (model.cost(StepBatch(prefill_tokens=n, prefill_attention_pairs=n * n / 2)) for n in (2048, 4096))
    assert long.attention_math_s > short.attention_math_s * 3.9  # attention grows quadratically
    assert long.gemm_math_s == pytest.approx(2 * short.gemm_math_s)
    assert short.gemm_math_s > 10 * short.weights_s
    # One 2,048-token prompt takes about LMDeploy's published 139 ms on an A100.
    assert short.total_s == pytest.approx(0.139, rel=0.1)


def test_tensor_parallelism_speeds_up_sub_linearly():
    # At 32 sequences; at a handful, TP 8's all-reduce latency eats what it saves over TP 4.
    steps = {tp: decode_step(StepCostModel(INTERNVL_38B, H100, tp), 32) for tp in (2, 4, 8)}
    assert steps[2] > steps[4] > steps[8]
    assert steps[2] / steps[4] < 2
    assert steps[4] / steps[8] < steps[2] / steps[4]


def test_all_reduce_grows_with_tp_and_costs_more_over_pcie():
    nvlink = {tp: StepCostModel(LLAMA_70B, H100, tp).allreduce_s(256) for tp in (1, 2, 4, 8)}
    pcie = {tp: StepCostModel(LLAMA_70B, H100_PCIE, tp).allreduce_s(256) for tp in (2, 4, 8)}
    assert nvlink[1] == 0.0
    assert nvlink[2] < nvlink[4] < nvlink[8]
    for tp in (2, 4, 8):
        assert pcie[tp] > 3 * nvlink[tp]


def test_tp_helps_less_over_pcie_than_over_nvlink():
    def speedup(gpu: GpuSpec) -> float:
        return decode_step(StepCostModel(LLAMA_70B, gpu, 2), 64) / decode_step(StepCostModel(LLAMA_70B, gpu, 8), 64)

    assert speedup(H100_PCIE) < speedup(H100)


def test_predict_small_tp_is_kv_limited_and_queues():
    heavy = Workload(concurrency=256, mean_prompt_tokens=1000, mean_output_tokens=300)
    tp2 = predict(INTERNVL_38B, H100, 2, heavy)
    tp4 = predict(INTERNVL_38B, H100, 4, heavy)
    assert tp2.batch_limit == "kv_cache"
    assert tp2.running_batch < heavy.concurrency
    assert tp2.queue_s > 0
    assert tp4.batch_limit == "concurrency"
    assert tp4.queue_s == 0
    assert tp4.ttft_s < tp2.ttft_s


def test_predict_batch_bounded_by_max_batch_size():
    prediction = predict(LLAMA_7B, A100, 1, Workload(64, 200, 100), knobs=EngineKnobs(max_batch_size=16))
    assert prediction.batch_limit == "max_batch_size"
    assert prediction.running_batch == 16
    assert prediction.queue_s > 0


def test_predict_figures_are_consistent():
    p = predict(LLAMA_7B, A100, 1, Workload(32, 500, 200))
    assert p.output_tokens_per_s == pytest.approx(p.requests_per_s * 200)
    assert p.e2e_latency_s == pytest.approx(p.ttft_s + 199 * p.tpot_s)
    assert 0 < p.ttft_s < p.e2e_latency_s
    # Little's law: with every client served at once, throughput is concurrency over latency.
    assert p.requests_per_s == pytest.approx(32 / p.e2e_latency_s, rel=0.1)


def test_predict_few_users_prefer_larger_tp_for_latency_and_many_users_smaller_tp_per_gpu():
    interactive = Workload(4, 500, 150)
    batch = Workload(256, 1000, 300)
    latency = {tp: predict(INTERNVL_38B, H100, tp, interactive).e2e_latency_s for tp in (2, 8)}
    assert latency[8] < latency[2]
    per_gpu = {tp: predict(INTERNVL_38B, H100, tp, batch).output_tokens_per_s / tp for tp in (2, 4, 8)}
    assert per_gpu[2] > per_gpu[4] > per_gpu[8]


def test_predict_refuses_a_tp_the_planner_rejects():
    with pytest.raises(UserError, match="not divisible by 3"):
        predict(INTERNVL_38B, H100, 3, Workload(4, 500, 150))
    with pytest.raises(UserError, match="KV cache"):
        predict(INTERNVL_38B, H100, 1, Workload(4, 500, 150))


def test_deviation_changes_engine_steps_but_the_predictor_never_sees_it():
    assert "deviation" not in inspect.signature(predict).parameters
    deviation = Deviation(allreduce_factor=1.5, decode_efficiency_factor_by_tp={4: 0.8}, pcie_extra_step_s=0.002)
    batch = StepBatch(decode_sequences=32, decode_context_tokens=32 * 600)
    exact = StepCostModel(INTERNVL_38B, H100, 4)
    wrong = StepCostModel(INTERNVL_38B, H100, 4, deviation=deviation)
    assert wrong.cost(batch).allreduce_s == pytest.approx(1.5 * exact.cost(batch).allreduce_s)
    assert wrong.cost(batch).weights_s == pytest.approx(exact.cost(batch).weights_s / 0.8)
    assert wrong.cost(batch).kv_s == pytest.approx(exact.cost(batch).kv_s / 0.8)
    assert wrong.cost(batch).overhead_s == exact.cost(batch).overhead_s  # NVLink: no PCIe extra
    # Only TP 4 is slowed down in decode.
    tp2 = StepCostModel(INTERNVL_38B, H100, 2, deviation=deviation)
    assert tp2.cost(batch).weights_s == StepCostModel(INTERNVL_38B, H100, 2).cost(batch).weights_s
    pcie = StepCostModel(LLAMA_70B, H100_PCIE, 4, deviation=deviation).cost(batch).overhead_s
    assert pcie == pytest.approx(StepCostModel(LLAMA_70B, H100_PCIE, 4).cost(batch).overhead_s + 0.002)
    # The predictor's time per token is the exact model's step (long outputs: prefill is negligible).
    tpot_s = predict(INTERNVL_38B, H100, 4, Workload(32, 600, 2000)).tpot_s
    steady = StepBatch(decode_sequences=32, decode_context_tokens=32 * 1600)
    assert tpot_s == pytest.approx(exact.step_s(steady), rel=0.05)
    assert wrong.step_s(steady) > 1.1 * tpot_s


def test_deviation_from_mapping_validates_names_and_values():
    deviation = Deviation.from_mapping({"allreduce_factor": 2, "decode_efficiency_factor_by_tp": {"4": 0.5}})
    assert deviation.allreduce_factor == 2.0
    assert deviation.decode_factor(4) == 0.5
    assert deviation.decode_factor(2) == 1.0
    with pytest.raises(UserError, match="unknown deviation field.*allreduce"):
        Deviation.from_mapping({"allreduce": 2})
    with pytest.raises(UserError, match="must be a number"):
        Deviation.from_mapping({"allreduce_factor": "fast"})
    with pytest.raises(UserError, match="must be positive"):
        Deviation.from_mapping({"prefill_efficiency_factor": 0})
    with pytest.raises(UserError, match="must not be negative"):
        Deviation(extra_step_s=-1)


def test_kv_cache_blocks_come_from_the_planner():
    fp16 = kv_cache_blocks(LLAMA_7B, A100, 1)
    assert fp16 == 105_592 // 64  # the planner's KV tokens for this setup, in 64-token blocks
    assert kv_cache_blocks(LLAMA_7B, A100, 1, knobs=EngineKnobs(quant_policy=8)) > 1.9 * fp16
