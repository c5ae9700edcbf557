"""TurboMind's batch rules with plain values: slots, admission, KV blocks, eviction, token budgets."""

from __future__ import annotations

import pytest

from gateway.engines.sim.batch import BatchLimits, BatchSequence, StepPlan, TurboMindBatch


def limits(**overrides: int) -> BatchLimits:
    values = {"max_batch_size": 8, "kv_cache_blocks": 100, "max_forward_tokens": 10_000,
              "max_context_tokens": 10_000, "block_tokens": 64} | overrides
    return BatchLimits(**values)


def chunks(plan: StepPlan) -> list[tuple[BatchSequence, int]]:
    return [(chunk.seq, chunk.tokens) for chunk in plan.chunks]


def run_step(batch: TurboMindBatch) -> StepPlan:
    plan = batch.schedule()
    batch.complete(plan)
    return plan


def test_turbomind_derives_the_budgets_from_its_settings():
    derived = BatchLimits.turbomind(max_batch_size=256, kv_cache_blocks=10, max_prefill_token_num=8192,
                                    session_len=4096, tp=1)
    assert (derived.max_forward_tokens, derived.max_context_tokens, derived.block_tokens) == (8448, 4096, 64)
    # The forward budget is rounded up to a multiple of TP; a session no longer than the batch is squared.
    odd = BatchLimits.turbomind(max_batch_size=3, kv_cache_blocks=10, max_prefill_token_num=8, session_len=2, tp=4,
                                block_tokens=4)
    assert (odd.max_forward_tokens, odd.max_context_tokens) == (12, 4)
    with pytest.raises(ValueError, match="kv_cache_blocks must be at least 1"):
        limits(kv_cache_blocks=0)
    with pytest.raises(ValueError, match=r"max_forward_tokens \(63\) must hold at least one block"):
        limits(max_forward_tokens=63)


def test_admission_reserves_blocks_for_the_whole_prompt():
    batch = TurboMindBatch(limits())
    seq = BatchSequence(300, 10)
    batch.add(seq)
    plan = batch.schedule()
    assert chunks(plan) == [(seq, 300)]
    assert seq.blocks == 5 and batch.free_blocks == 95  # ceil(300 / 64)
    batch.complete(plan)
    assert (seq.cached_tokens, seq.generated, seq.context_tokens) == (300, 1, 301)


def test_a_chunked_prefill_still_holds_the_whole_prompt_and_its_chunks_end_on_block_boundaries():
    batch = TurboMindBatch(limits(max_forward_tokens=200))
    seq = BatchSequence(300, 10)
    batch.add(seq)
    first = run_step(batch)
    assert chunks(first) == [(seq, 192)]  # 200 tokens of budget, cut down to three 64-token blocks
    assert seq.blocks == 5 and seq.generated == 0
    second = run_step(batch)
    assert chunks(second) == [(seq, 108)]  # the rest, and the first token with it
    assert seq.generated == 1 and seq.blocks == 5


def test_decoding_takes_a_new_block_only_when_crossing_a_boundary():
    batch = TurboMindBatch(limits())
    seq = BatchSequence(63, 10)
    batch.add(seq)
    run_step(batch)  # prefill of 63 tokens; the first token makes the context 64
    assert seq.blocks == 1
    run_step(batch)  # decodes token 64 (context 64): still one block
    assert seq.blocks == 1
    run_step(batch)  # token 65 crosses into a second block
    assert seq.blocks == 2 and batch.free_blocks == 98


def test_requests_beyond_max_batch_size_queue_outside_the_batch():
    batch = TurboMindBatch(limits(max_batch_size=2))
    seqs = [BatchSequence(10, 3) for _ in range(3)]
    for seq in seqs:
        batch.add(seq)
    plan = run_step(batch)
    assert [s for s, _ in chunks(plan)] == seqs[:2]
    assert list(batch.queue) == [seqs[2]] and batch.running == 2
    for _ in range(2):
        run_step(batch)  # the first two finish after their third token
    assert seqs[0] not in batch.batch and seqs[0].blocks == 0
    assert chunks(batch.schedule()) == [(seqs[2], 10)]  # the freed slot goes to the queued request


def test_an_older_request_takes_blocks_from_the_youngest_last_block_first():
    batch = TurboMindBatch(limits(kv_cache_blocks=6))
    old, young = BatchSequence(120, 100), BatchSequence(120, 100)
    batch.add(old)
    batch.add(young)
    run_step(batch)  # both prefill 120 tokens into 2 blocks each; 2 blocks stay free
    for _ in range(72):
        run_step(batch)  # from context 129 on, each holds a third block
    assert (old.blocks, young.blocks, batch.free_blocks) == (3, 3, 0)
    assert old.context_tokens == young.context_tokens == 193
    # Both need a fourth block for token 193; there is none: the older one takes the younger one's last block.
    plan = batch.schedule()
    assert [s for s, _ in chunks(plan)] == [old]
    assert (plan.preemptions, plan.evicted_blocks) == (1, 1)
    assert (old.blocks, young.blocks, young.preemptions) == (4, 2, 1)
    assert young.cached_tokens == 128  # it keeps the valid prefix of its cache (two blocks)
    assert young.active is False and batch.used_blocks == 6
    batch.complete(plan)
    # Next step the younger one cannot take anything back from the older one: it waits, holding its prefix.
    plan = batch.schedule()
    assert [s for s, _ in chunks(plan)] == [old]
    assert young.blocks == 2 and plan.preemptions == 0


def test_an_evicted_request_recomputes_the_lost_tail_and_produces_no_token_twice():
    batch = TurboMindBatch(limits(kv_cache_blocks=6))
    old, young = BatchSequence(120, 80), BatchSequence(120, 200)
    batch.add(old)
    batch.add(young)
    produced = {old: 0, young: 0}
    recomputed = 0
    while not batch.idle:
        plan = batch.schedule()
        recomputed += sum(c.tokens for c in plan.chunks if c.seq is young and c.tokens > 1 and young.generated)
        for seq in batch.complete(plan).produced:
            produced[seq] += 1
    assert produced == {old: 80, young: 200}
    assert young.preemptions >= 1 and recomputed > 0
    assert batch.free_blocks == 6


def test_a_request_that_cannot_get_blocks_stops_the_step_for_every_younger_one():
    batch = TurboMindBatch(limits(kv_cache_blocks=10))
    running, big, small = BatchSequence(500, 50), BatchSequence(300, 5), BatchSequence(10, 5)
    batch.add(running)
    run_step(batch)  # 8 blocks of 10 taken
    batch.add(big)  # needs 5 blocks: 2 free, and it may not take from the older request
    batch.add(small)  # needs 1 block, which is free, but it may not overtake the older request
    plan = batch.schedule()
    assert [s for s, _ in chunks(plan)] == [running]
    assert (big.blocks, small.blocks, plan.preemptions) == (0, 0, 0)  # nothing is evicted for a failed admission
    assert batch.free_blocks == 2


def test_the_forward_budget_gives_one_token_per_decoding_request_and_the_rest_to_prompts():
    batch = TurboMindBatch(limits(max_forward_tokens=150))
    decoding = [BatchSequence(20, 50) for _ in range(2)]
    for seq in decoding:
        batch.add(seq)
    run_step(batch)
    late_prompt, later_prompt = BatchSequence(400, 5), BatchSequence(20, 5)
    batch.add(late_prompt)
    batch.add(later_prompt)
    plan = batch.schedule()
    # 2 decode tokens, then 148 tokens of budget for the 400-token prompt: a 128-token chunk (block-aligned);
    # the 20 tokens left over are exactly the next prompt.
    assert chunks(plan) == [(decoding[0], 1), (decoding[1], 1), (late_prompt, 128), (later_prompt, 20)]
    assert late_prompt.blocks == 7  # the whole prompt is reserved
    batch.complete(plan)
    third = BatchSequence(20, 5)
    batch.add(third)
    plan = batch.schedule()
    # 3 decode tokens, 147 left: a 128-token chunk, 19 left, less than the third prompt's 20: it waits.
    assert chunks(plan) == [(decoding[0], 1), (decoding[1], 1), (late_prompt, 128), (later_prompt, 1)]
    assert third.active is False and third.blocks == 0


def test_the_context_budget_limits_how_many_prompts_start_in_one_step():
    batch = TurboMindBatch(limits(max_context_tokens=1000))
    prompts = [BatchSequence(400, 5) for _ in range(3)]
    for seq in prompts:
        batch.add(seq)
    plan = batch.schedule()
    assert [s for s, _ in chunks(plan)] == prompts[:2]  # 800 of 1,000 context tokens; the third waits
    batch.complete(plan)
    plan = batch.schedule()
    # Decoding requests spend no context budget; the third prompt starts now.
    assert chunks(plan) == [(prompts[0], 1), (prompts[1], 1), (prompts[2], 400)]


def test_removing_a_request_frees_its_blocks_and_slot():
    batch = TurboMindBatch(limits(max_batch_size=1))
    first, second = BatchSequence(100, 50), BatchSequence(100, 5)
    batch.add(first)
    batch.add(second)
    run_step(batch)
    batch.remove(first)
    assert batch.free_blocks == 100 and not batch.batch and first.blocks == 0
    batch.remove(second)  # still queued
    assert batch.idle


def test_fits_knows_what_could_never_run():
    batch = TurboMindBatch(limits(kv_cache_blocks=4, max_context_tokens=300))
    assert batch.fits(200, 56)  # 256 tokens: 4 blocks, within the context budget
    assert not batch.fits(200, 57)  # 257 tokens: a fifth block
    assert not TurboMindBatch(limits(max_context_tokens=300)).fits(250, 51)  # its context could never resume
