"""The continuous-batching scheduler, on a manual clock (steps take no real time)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.engines.sim.batch import BatchLimits
from gateway.engines.sim.clock import ClockRateMeter, ManualClock, ScaledClock
from gateway.engines.sim.scheduler import EngineStopped, Scheduler, Sequence
from gateway.planner import find_gpu, load_model
from gateway.planner.perf import StepBatch, StepCostModel

LLAMA_7B = load_model("llama-2-7b")
A100 = find_gpu("a100-80gb")


class RecordingObserver:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.first_tokens: list[Sequence] = []
        self.finished: list[Sequence] = []

    def on_step(self, *, prompt_tokens: int, generation_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generation_tokens

    def on_first_token(self, seq: Sequence) -> None:
        self.first_tokens.append(seq)

    def on_finish(self, seq: Sequence) -> None:
        self.finished.append(seq)


def make_scheduler(
    *, max_batch_size: int = 64, kv_cache_blocks: int = 10_000, max_prefill_token_num: int = 8192
) -> tuple[Scheduler, ManualClock, RecordingObserver]:
    clock = ManualClock()
    observer = RecordingObserver()
    limits = BatchLimits.turbomind(max_batch_size=max_batch_size, kv_cache_blocks=kv_cache_blocks,
                                   max_prefill_token_num=max_prefill_token_num, session_len=16384, tp=1)
    scheduler = Scheduler(StepCostModel(LLAMA_7B, A100, 1), clock, limits, observer=observer)
    return scheduler, clock, observer


async def run_until_done(scheduler: Scheduler, seqs: list[Sequence]) -> None:
    scheduler.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(s.done for s in seqs if s.done is not None)), timeout=10)
    finally:
        await scheduler.stop()


async def test_a_request_streams_its_tokens_and_finishes_with_simulated_timings():
    scheduler, clock, observer = make_scheduler()
    seq = scheduler.submit(Sequence(prompt_tokens=100, output_tokens=5, finish_reason="length", stream=True))
    await run_until_done(scheduler, [seq])
    received = []
    while not seq.tokens.empty():
        received.append(seq.tokens.get_nowait())
    assert sum(received) == 5
    assert seq.generated == 5
    assert observer.finished == [seq]
    assert observer.prompt_tokens == 100 and observer.generation_tokens == 5
    cost = StepCostModel(LLAMA_7B, A100, 1)
    prefill_s = cost.step_s(StepBatch(prefill_tokens=100, prefill_attention_pairs=100 * 50))
    assert seq.first_token_s == pytest.approx(prefill_s)
    assert seq.finished_s is not None and seq.finished_s > seq.first_token_s
    assert clock.now_s() == pytest.approx(seq.finished_s)


async def test_batch_is_bounded_by_max_batch_size():
    scheduler, _, _ = make_scheduler(max_batch_size=4)
    seqs = [scheduler.submit(Sequence(10, 50, "length")) for _ in range(10)]
    scheduler.start()
    for _ in range(20):
        await asyncio.sleep(0)
    stats = scheduler.stats()
    assert stats.running == 4
    assert (stats.waiting, stats.queued) == (0, 6)  # beyond max_batch_size, requests queue outside the batch
    await run_until_done(scheduler, seqs)
    admitted = sorted(s.admitted_s for s in seqs if s.admitted_s is not None)
    assert admitted[4] > admitted[3]  # the fifth waited for a free slot


async def test_kv_cache_bounds_the_batch_and_requests_wait_for_blocks():
    # 20 blocks of 64 tokens: a 300-token prompt plus its first token takes 5 blocks, so four fit.
    scheduler, _, _ = make_scheduler(kv_cache_blocks=20)
    seqs = [scheduler.submit(Sequence(300, 20, "length")) for _ in range(8)]
    scheduler.start()
    for _ in range(20):
        await asyncio.sleep(0)
    stats = scheduler.stats()
    assert stats.running == 4
    assert stats.waiting == 4
    assert stats.cache_usage_ratio == 1.0
    await run_until_done(scheduler, seqs)
    assert all(s.generated == 20 for s in seqs)
    assert scheduler.stats().free_blocks == 20


async def test_growing_sequences_preempt_the_newest_when_blocks_run_out():
    # Two sequences admitted with 2 blocks each; they grow to 5 blocks each, more than 8 blocks hold.
    scheduler, _, observer = make_scheduler(kv_cache_blocks=8)
    first = scheduler.submit(Sequence(64, 250, "length"))
    second = scheduler.submit(Sequence(64, 250, "length"))
    await run_until_done(scheduler, [first, second])
    assert scheduler.stats().preemptions >= 1
    assert second.preemptions >= 1 and first.preemptions == 0
    assert first.generated == second.generated == 250
    assert observer.generation_tokens == 500  # recomputation produces no duplicate tokens
    assert first.finished_s is not None and second.finished_s is not None and first.finished_s < second.finished_s


async def test_prefill_is_chunked_and_interleaved_with_decode():
    scheduler, _, _ = make_scheduler(max_prefill_token_num=512)
    short = scheduler.submit(Sequence(10, 30, "length"))
    scheduler.start()
    while short.generated < 2:
        await asyncio.sleep(0)
    long = scheduler.submit(Sequence(2000, 5, "length"))
    while long.first_token_s is None:
        await asyncio.sleep(0)
    # The 2,000-token prompt took 4 chunks of 512; the short request kept decoding meanwhile.
    assert short.generated >= 2 + 4
    await run_until_done(scheduler, [short, long])


async def test_cancelling_frees_slot_and_blocks_at_once():
    scheduler, _, observer = make_scheduler(max_batch_size=1)
    running = scheduler.submit(Sequence(100, 1000, "length"))
    waiting = scheduler.submit(Sequence(100, 3, "length"))
    scheduler.start()
    while running.generated < 3:
        await asyncio.sleep(0)
    assert scheduler.stats().queued == 1
    scheduler.cancel(running)
    stats = scheduler.stats()
    assert stats.running == 0 and stats.free_blocks == stats.total_blocks
    assert running.done is not None and running.done.cancelled()
    await run_until_done(scheduler, [waiting])
    assert running not in observer.finished
    assert running.generated < 10  # no token after the cancellation


async def test_cancelling_a_waiting_request_removes_it_from_the_queue():
    scheduler, _, _ = make_scheduler(max_batch_size=1)
    scheduler.submit(Sequence(10, 5, "length"))
    queued = scheduler.submit(Sequence(10, 5, "length"))
    scheduler.cancel(queued)
    assert scheduler.stats().queued == 1


async def test_stop_fails_unfinished_requests():
    scheduler, _, _ = make_scheduler()
    seq = scheduler.submit(Sequence(10, 10_000, "length", stream=True))
    scheduler.start()
    while seq.generated < 2:
        await asyncio.sleep(0)
    await scheduler.stop()
    assert seq.done is not None
    with pytest.raises(EngineStopped):
        await seq.done
    items = [seq.tokens.get_nowait() for _ in range(seq.tokens.qsize())]
    assert items[-1] is None


async def test_submit_rejects_what_can_never_fit():
    scheduler, _, _ = make_scheduler(kv_cache_blocks=2)
    with pytest.raises(ValueError, match="never fit"):
        scheduler.submit(Sequence(100, 100, "length"))


async def test_scaled_clock_runs_faster_and_never_catches_up_after_being_late():
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds + 0.5  # every sleep ends 0.5 s late

    clock = ScaledClock(10.0, monotonic=lambda: now[0], sleep=fake_sleep)
    await clock.sleep_until(20.0)
    assert slept == [pytest.approx(2.0)]
    assert clock.now_s() == pytest.approx(20.0)  # the lateness does not count as simulated time
    now[0] += 1.0
    assert clock.now_s() == pytest.approx(30.0)


async def test_a_little_lateness_is_caught_up_and_costs_no_simulated_time():
    now = [0.0]

    async def jittery_sleep(seconds: float) -> None:
        now[0] += seconds + (0.004 if seconds > 0 else 0)  # the event loop's timer granularity: 4 ms late

    clock = ScaledClock(10.0, monotonic=lambda: now[0], sleep=jittery_sleep)
    deadline = 0.0
    for _ in range(500):  # steps of 20 ms simulated (2 ms real): the jitter is twice a step
        deadline += 0.02
        await clock.sleep_until(deadline)
    assert clock.now_s() == pytest.approx(now[0] * 10)  # still time_scale x real time
    assert deadline == pytest.approx(10.0) and clock.now_s() - deadline < 0.05 * 10  # caught up


async def test_back_to_back_steps_keep_the_models_step_time_despite_a_jittery_loop():
    from gateway.engines.sim.scheduler import Scheduler as RealScheduler

    now = [0.0]

    async def jittery_sleep(seconds: float) -> None:
        await asyncio.sleep(0)
        now[0] += seconds + 0.003

    scheduler, _, _ = make_scheduler(max_batch_size=4, kv_cache_blocks=64)
    clock = ScaledClock(10.0, monotonic=lambda: now[0], sleep=jittery_sleep)
    jittery = RealScheduler(scheduler._cost, clock, scheduler._batch.limits)
    jittery.start()
    try:
        seqs = [jittery.submit(Sequence(100, 50, "length")) for _ in range(4)]
        await asyncio.gather(*(seq.done for seq in seqs))
    finally:
        await jittery.stop()
    tpot = [(s.finished_s - s.first_token_s) / 49 for s in seqs]
    assert all(t == pytest.approx(tpot[0], rel=0.05) for t in tpot)
    assert tpot[0] < 0.02  # about 10 ms, the model's step time: not inflated by 3 ms of jitter x a scale of 10


async def test_scaled_clock_never_goes_back_past_a_time_it_reported():
    now = [0.0]

    async def late_sleep(seconds: float) -> None:
        now[0] += seconds + 0.5
        seen.append(clock.now_s())  # a request arriving while the step overran

    seen: list[float] = []
    clock = ScaledClock(10.0, monotonic=lambda: now[0], sleep=late_sleep)
    await clock.sleep_until(20.0)
    assert seen == [pytest.approx(25.0)]
    assert clock.now_s() == pytest.approx(25.0)


async def test_a_clock_whose_sleeps_overrun_reports_a_rate_below_its_time_scale():
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    clock = ScaledClock(10.0, monotonic=lambda: now[0], sleep=sleep)
    meter = ClockRateMeter(clock, window_s=10.0, monotonic=lambda: now[0])
    deadline = 0.0
    for _ in range(200):  # 200 steps of 0.5 simulated seconds back to back: 10 s of wall time asked, 12.5 s taken
        now[0] += 0.0625  # a CPU that cannot keep up: each step's own work takes longer than its 50 ms
        deadline += 0.5
        await clock.sleep_until(deadline)
        meter.sample()
    rates = meter.rates()
    assert rates.simulated_s == pytest.approx(100.0, rel=0.01)  # the lateness is not caught up for ever
    assert rates.wall_s == pytest.approx(12.5, rel=0.01)
    assert rates.life_ratio == pytest.approx(8.0, rel=0.03)  # 10 x time scale / 1.25
    assert rates.recent_ratio == pytest.approx(8.0, rel=0.05)
    assert 9.9 <= rates.recent_window_s <= 10.5


async def test_the_recent_rate_recovers_when_the_machine_does():
    now = [0.0]
    lateness = [1.5]

    async def sleep(seconds: float) -> None:
        now[0] += seconds * lateness[0] + (0.1 if lateness[0] > 1 else 0)

    clock = ScaledClock(10.0, monotonic=lambda: now[0], sleep=sleep)
    meter = ClockRateMeter(clock, window_s=5.0, monotonic=lambda: now[0])
    for _ in range(100):  # 25 s of wall time (a stall of 150 ms after every 100 ms step) at 4 x
        await clock.sleep_until(clock.now_s() + 1.0)
        meter.sample()
    lateness[0] = 1.0
    for _ in range(100):  # 10 s on time
        await clock.sleep_until(clock.now_s() + 1.0)
        meter.sample()
    rates = meter.rates()
    assert rates.recent_ratio == pytest.approx(10.0, rel=0.02)  # the last 5 s ran at full speed
    assert rates.life_ratio == pytest.approx(200 / 35, rel=0.01)  # 200 simulated seconds in 35 wall seconds
    now[0] += 3.0  # idle: the clock runs at its time scale, without steps
    assert meter.rates().recent_ratio == pytest.approx(10.0, rel=0.02)


async def test_stats_report_the_clock_rate_and_leave_lmdeploys_waiting_to_the_batch():
    scheduler, _, _ = make_scheduler(max_batch_size=2, kv_cache_blocks=4)
    seqs = [scheduler.submit(Sequence(100, 5, "length")) for _ in range(4)]
    scheduler.start()
    for _ in range(5):
        await asyncio.sleep(0)
    stats = scheduler.stats()
    # 4 blocks hold two 100-token prompts (2 blocks each) only just; the batch has 2 slots, 2 more queue.
    assert (stats.running, stats.waiting, stats.queued) == (2, 0, 2)
    assert stats.clock.simulated_s > 0
    await run_until_done(scheduler, seqs)
    assert scheduler.stats().mean_running > 1
