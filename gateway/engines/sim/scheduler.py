"""The simulated engine's step loop: TurboMind's batch (:mod:`gateway.engines.sim.batch`) timed by the
performance model.

One asyncio task drives the engine one step at a time. Each step

1. asks the batch which requests run and with how many tokens (admission, KV-cache blocks, eviction and
   chunked prefill as TurboMind decides them);
2. lasts what :class:`~gateway.planner.perf.StepCostModel` says that work takes (÷ the time scale, in real
   time);
3. hands a token to every request whose whole context is now in the cache: the first token after its prompt
   (or after recomputing what it lost to an eviction), or the next one while it decodes.

No timer runs per request or per token: requests wait on their own queue (streaming) or future.
A cancelled request leaves the queue or the batch at once and frees its blocks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from gateway.engines.sim.batch import BatchLimits, BatchSequence, StepPlan, TurboMindBatch
from gateway.engines.sim.clock import Clock, ClockRateMeter, ClockRates
from gateway.planner.perf import StepBatch, StepCostModel


class EngineStopped(Exception):
    """The engine shut down before the request finished."""


@dataclass(eq=False)
class Sequence(BatchSequence):
    """One request inside the engine. Times are simulated seconds; token counts are decided up front."""

    finish_reason: str  # "stop" or "length", reported when it finishes
    stream: bool = False
    id: int = 0
    arrival_s: float = 0.0
    admitted_s: float | None = None  # first step it ran in
    first_token_s: float | None = None
    finished_s: float | None = None
    cancelled: bool = False
    # Streaming: the number of new tokens after every step that produced some; None when the engine stopped.
    tokens: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    done: asyncio.Future[None] | None = None


class SchedulerObserver(Protocol):
    """Told about what the scheduler does (the metrics implement it). Calls must be cheap and not block."""

    def on_step(self, *, prompt_tokens: int, generation_tokens: int) -> None: ...

    def on_first_token(self, seq: Sequence) -> None: ...

    def on_finish(self, seq: Sequence) -> None: ...


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for the scheduler gauges and ``/sim/stats`` (simulated seconds for ``now_s``)."""

    running: int  # active in the latest step (LMDeploy's num_requests_running)
    waiting: int  # in the batch but not active (LMDeploy's num_requests_waiting)
    queued: int  # not yet in the batch (TurboMind's gateway queue; LMDeploy reports no gauge for it)
    cache_usage_ratio: float
    total_blocks: int
    free_blocks: int
    steps: int
    mean_running: float  # requests active per step, averaged over the steps
    preemptions: int
    evicted_blocks: int
    now_s: float
    busy_s: float  # simulated seconds spent in steps since the start
    clock: ClockRates


def step_batch(plan: StepPlan) -> StepBatch:
    """The cost model's view of a step: decode tokens (one-token chunks) and prefill chunks, in aggregate."""
    decode = decode_context = prefill = prefill_context = 0
    pairs = 0.0
    for chunk in plan.chunks:
        if chunk.tokens == 1:
            decode += 1
            decode_context += chunk.cached_tokens + 1
        else:
            prefill += chunk.tokens
            prefill_context += chunk.cached_tokens
            pairs += chunk.tokens * (chunk.cached_tokens + chunk.tokens / 2)
    return StepBatch(decode_sequences=decode, decode_context_tokens=decode_context, prefill_tokens=prefill,
                     prefill_context_tokens=prefill_context, prefill_attention_pairs=pairs)


class Scheduler:
    """The engine's step loop. Create it, ``start()`` it in a running loop, ``submit`` requests."""

    def __init__(
        self,
        cost: StepCostModel,
        clock: Clock,
        limits: BatchLimits,
        *,
        observer: SchedulerObserver | None = None,
        rate_meter: ClockRateMeter | None = None,
    ) -> None:
        self._cost = cost
        self._clock = clock
        self.limits = limits
        self._batch = TurboMindBatch(limits)
        self._observer = observer
        self._meter = rate_meter or ClockRateMeter(clock)
        self._wake = asyncio.Event()
        self._next_id = 1
        self._steps = 0
        self._active_sum = 0  # requests active, summed over the steps
        self._busy_s = 0.0
        self._preemptions = 0
        self._evicted_blocks = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def clock(self) -> Clock:
        return self._clock

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-scheduler")

    async def stop(self) -> None:
        """Stop stepping; every unfinished request fails with :class:`EngineStopped`."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # waits without re-raising the task's own cancellation
            self._task = None
        for seq in [*self._batch.queue, *self._batch.batch]:
            assert isinstance(seq, Sequence)
            self._batch.remove(seq)
            self._abort(seq)

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a request; the caller then waits on ``seq.done`` (and reads ``seq.tokens`` when streaming)."""
        if seq.output_tokens < 1:
            raise ValueError(f"output_tokens must be at least 1, not {seq.output_tokens}")
        if not self._batch.fits(seq.prompt_tokens, seq.output_tokens):
            limits = self.limits
            raise ValueError(
                f"a sequence of {seq.prompt_tokens + seq.output_tokens} tokens can never fit the KV cache "
                f"({limits.kv_cache_blocks * limits.block_tokens} tokens) or one step's context budget "
                f"({limits.max_context_tokens} tokens)"
            )
        seq.id = self._next_id
        self._next_id += 1
        seq.arrival_s = self._clock.now_s()
        seq.done = asyncio.get_running_loop().create_future()
        self._batch.add(seq)
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a request (client gone): out of the queue or the batch now, its blocks freed."""
        if seq.cancelled or (seq.done is not None and seq.done.done()):
            return
        seq.cancelled = True
        self._batch.remove(seq)
        if seq.done is not None and not seq.done.done():
            seq.done.cancel()

    def stats(self) -> SchedulerStats:
        batch = self._batch
        running = batch.running
        total = self.limits.kv_cache_blocks
        return SchedulerStats(
            running=running,
            waiting=len(batch.batch) - running,
            queued=len(batch.queue),
            cache_usage_ratio=batch.used_blocks / total,
            total_blocks=total,
            free_blocks=batch.free_blocks,
            steps=self._steps,
            mean_running=self._active_sum / self._steps if self._steps else 0.0,
            preemptions=self._preemptions,
            evicted_blocks=self._evicted_blocks,
            now_s=self._clock.now_s(),
            busy_s=self._busy_s,
            clock=self._meter.rates(),
        )

    async def _run(self) -> None:
        step_end_s: float | None = None
        while True:
            plan = self._batch.schedule()
            if plan.empty:
                # Nothing can run (an empty engine): wait for an arrival, which changes the picture.
                self._wake.clear()
                await self._wake.wait()
                step_end_s = None
                continue
            # Back to back, a step starts where the last one ended in simulated time, so a step that ended a
            # little late in real time is caught up; after an idle wait, now. Never before a request it admits
            # arrived.
            start_s = self._clock.now_s() if step_end_s is None else step_end_s
            for chunk in plan.chunks:
                seq = chunk.seq
                assert isinstance(seq, Sequence)
                if seq.admitted_s is None:
                    start_s = max(start_s, seq.arrival_s)
            for chunk in plan.chunks:
                seq = chunk.seq
                assert isinstance(seq, Sequence)
                if seq.admitted_s is None:
                    seq.admitted_s = start_s
            duration_s = self._cost.step_s(step_batch(plan))
            step_end_s = start_s + duration_s
            await self._clock.sleep_until(step_end_s)
            self._busy_s += duration_s
            self._evicted_blocks += plan.evicted_blocks
            self._preemptions += plan.preemptions
            self._complete(plan, ended_s=step_end_s)
            self._meter.sample()

    def _complete(self, plan: StepPlan, *, ended_s: float) -> None:
        self._steps += 1
        self._active_sum += len(plan.chunks)
        outcome = self._batch.complete(plan)
        now_s = ended_s
        for seq in outcome.first_tokens:
            assert isinstance(seq, Sequence)
            seq.first_token_s = now_s
            if self._observer is not None:
                self._observer.on_first_token(seq)
        for seq in outcome.produced:
            assert isinstance(seq, Sequence)
            if seq.stream:
                seq.tokens.put_nowait(1)
        for seq in outcome.finished:
            assert isinstance(seq, Sequence)
            seq.finished_s = now_s
            if seq.done is not None and not seq.done.done():
                seq.done.set_result(None)
            if self._observer is not None:
                self._observer.on_finish(seq)
        if self._observer is not None:
            self._observer.on_step(prompt_tokens=outcome.prompt_tokens, generation_tokens=len(outcome.produced))

    @staticmethod
    def _abort(seq: Sequence) -> None:
        if seq.stream:
            seq.tokens.put_nowait(None)
        if seq.done is not None and not seq.done.done():
            seq.done.set_exception(EngineStopped("the engine shut down"))
            seq.done.exception()  # retrieved here so an unobserved future logs nothing
