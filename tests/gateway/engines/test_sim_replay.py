"""Replays through the engine's scheduler, and the analytical predict() against them in steady state."""

from __future__ import annotations

import math
import random

import pytest

from gateway.engines.sim.batch import BatchLimits
from gateway.engines.sim.replay import replay_closed_loop, replay_static_batch
from gateway.planner import EngineKnobs, evaluate_tp, find_gpu, load_model
from gateway.planner.perf import KV_BLOCK_TOKENS, StepBatch, StepCostModel, Workload, predict

A100, H100 = find_gpu("a100-80gb"), find_gpu("h100-80gb")
LLAMA_7B, LLAMA_70B, INTERNVL_38B = load_model("llama-2-7b"), load_model("llama-2-70b"), load_model("internvl2_5-38b")


def engine(model, gpu, tp, knobs=EngineKnobs()):  # type: ignore[no-untyped-def]
    verdict = evaluate_tp(model, gpu, tp, gpus=tp, gpus_per_node=tp, knobs=knobs)
    limits = BatchLimits.turbomind(
        max_batch_size=knobs.batch_size_on(gpu), kv_cache_blocks=verdict.kv_cache_tokens_per_replica // KV_BLOCK_TOKENS,
        max_prefill_token_num=knobs.max_prefill_token_num, session_len=knobs.session_len_for(model), tp=tp,
    )
    return StepCostModel(model, gpu, tp, quant_policy=knobs.quant_policy), limits


def lengths(count: int, prompt_mean: float, output_mean: float, *, seed: int = 1) -> list[tuple[int, int]]:
    """Mildly varied lengths (log-normal, spread 0.3) so that the clients fall out of step."""
    rng = random.Random(seed)

    def draw(mean: float) -> int:
        return max(1, round(rng.lognormvariate(math.log(mean) - 0.045, 0.3)))

    return [(draw(prompt_mean), draw(output_mean)) for _ in range(count)]


def test_a_static_batch_of_one_decodes_at_the_models_step_time():
    cost, limits = engine(LLAMA_7B, A100, 1)
    result = replay_static_batch(cost, limits, batch=1, prompt_tokens=1, output_tokens=100)
    # 100 one-token steps over a growing context (a one-token prompt runs like a decode token).
    steps = [cost.step_s(StepBatch(decode_sequences=1, decode_context_tokens=n)) for n in range(1, 101)]
    assert result.elapsed_s == pytest.approx(sum(steps))
    assert (result.requests, result.output_tokens, result.steps, result.preemptions) == (1, 100, 100, 0)
    assert result.mean_ttft_s == pytest.approx(steps[0])


def test_a_closed_loop_keeps_its_clients_busy_and_counts_every_token():
    cost, limits = engine(LLAMA_7B, A100, 1)
    pairs = lengths(400, 300, 100)
    result = replay_closed_loop(cost, limits, pairs, concurrency=16)
    assert result.requests == 400
    assert (result.prompt_tokens, result.output_tokens) == (sum(p for p, _ in pairs), sum(o for _, o in pairs))
    assert 14 < result.mean_running <= 16
    assert result.requests_per_s == pytest.approx(400 / result.elapsed_s)


@pytest.mark.parametrize(
    ("model", "gpu", "tp", "workload", "knobs", "limit"),
    [
        (LLAMA_7B, A100, 1, Workload(64, 500, 200), EngineKnobs(), "concurrency"),
        (LLAMA_70B, A100, 4, Workload(64, 800, 200), EngineKnobs(), "concurrency"),
        (LLAMA_7B, A100, 1, Workload(64, 200, 100), EngineKnobs(max_batch_size=16), "max_batch_size"),
        (INTERNVL_38B, H100, 2, Workload(160, 1000, 300), EngineKnobs(cache_max_entry_count=0.5), "kv_cache"),
    ],
)
def test_predict_agrees_with_the_engines_scheduler_in_steady_state(model, gpu, tp, workload, knobs, limit):  # type: ignore[no-untyped-def]
    """predict() (the tuner's analytical model) against a replay through the engine's scheduler with the same
    means. Tolerances: requests/s and the running batch within 10 %; first-token latency after the start-up
    burst within a factor of two (predict() sees arrivals spread evenly at the mean, the replay sees them
    cluster)."""
    predicted = predict(model, gpu, tp, workload, knobs=knobs)
    assert predicted.batch_limit == limit
    cost, limits = engine(model, gpu, tp, knobs)
    pairs = lengths(20 * workload.concurrency, workload.mean_prompt_tokens, workload.mean_output_tokens)
    replayed = replay_closed_loop(cost, limits, pairs, concurrency=workload.concurrency)
    assert predicted.requests_per_s == pytest.approx(replayed.requests_per_s, rel=0.10)
    assert predicted.running_batch == pytest.approx(replayed.mean_running, rel=0.10)
    assert replayed.steady_ttft_s / 2 < predicted.ttft_s < 2 * replayed.steady_ttft_s
