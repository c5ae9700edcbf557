"""Continuous batching as LMDeploy's TurboMind engine does it, timed by the performance model.

One asyncio task drives the engine, one step at a time. Each step

1. grows every decoding sequence by one token, allocating KV-cache blocks as it crosses a block boundary;
   when blocks run out, the most recently admitted sequence is preempted (its blocks freed, and it goes back
   to the head of the queue to recompute its prompt and the tokens it already produced);
2. gives the step's prefill budget (``max_prefill_token_num`` tokens) to sequences still prefilling, in
   admission order, then admits waiting requests first-come first-served while the running batch is below
   ``max_batch_size``, the budget lasts and the KV cache has blocks for the whole prompt;
3. lasts what :class:`~gateway.planner.perf.StepCostModel` says (÷ the time scale, in real time), then hands
   every decoding sequence one token, and a first (or next) token to every sequence whose prefill completed.

No timer runs per request or per token: requests wait on their own queue (streaming) or future.
A cancelled request leaves the queue or the batch at once and frees its blocks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from gateway.engines.sim.clock import Clock
from gateway.planner.perf import KV_BLOCK_TOKENS, StepBatch, StepCostModel


class EngineStopped(Exception):
    """The engine shut down before the request finished."""


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Times are simulated seconds; token counts are decided up front."""

    prompt_tokens: int
    output_tokens: int  # tokens it will generate before finishing
    finish_reason: str  # "stop" or "length", reported when it finishes
    stream: bool = False
    id: int = 0
    arrival_s: float = 0.0
    admitted_s: float | None = None  # first admission into the running batch
    first_token_s: float | None = None
    finished_s: float | None = None
    generated: int = 0
    prefill_target: int = 0  # tokens to put in the cache before the next token (prompt, + output after preemption)
    prefilled: int = 0
    blocks: int = 0
    preemptions: int = 0
    cancelled: bool = False
    # Streaming: the number of new tokens after every step that produced some; None when the engine stopped.
    tokens: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    done: asyncio.Future[None] | None = None

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.prefill_target


class SchedulerObserver(Protocol):
    """Told about what the scheduler does (the metrics implement it). Calls must be cheap and not block."""

    def on_step(self, *, prompt_tokens: int, generation_tokens: int) -> None: ...

    def on_first_token(self, seq: Sequence) -> None: ...

    def on_finish(self, seq: Sequence) -> None: ...


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for the scheduler gauges (simulated seconds for ``now_s``)."""

    running: int
    waiting: int
    cache_usage_ratio: float
    total_blocks: int
    free_blocks: int
    steps: int
    preemptions: int
    now_s: float
    busy_s: float  # simulated seconds spent in steps since the start


@dataclass
class _Step:
    batch: StepBatch
    decoding: list[Sequence]
    prefill_chunks: list[tuple[Sequence, int]]


def blocks_for(tokens: int) -> int:
    return -(-tokens // KV_BLOCK_TOKENS)


class Scheduler:
    """The engine's continuous-batching loop. Create it, ``start()`` it in a running loop, ``submit`` requests."""

    def __init__(
        self,
        cost: StepCostModel,
        clock: Clock,
        *,
        max_batch_size: int,
        kv_cache_blocks: int,
        max_prefill_token_num: int,
        observer: SchedulerObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or kv_cache_blocks < 1 or max_prefill_token_num < 1:
            raise ValueError(
                f"max_batch_size ({max_batch_size}), kv_cache_blocks ({kv_cache_blocks}) and "
                f"max_prefill_token_num ({max_prefill_token_num}) must be at least 1"
            )
        self._cost = cost
        self._clock = clock
        self.max_batch_size = max_batch_size
        self.total_blocks = kv_cache_blocks
        self.max_prefill_token_num = max_prefill_token_num
        self._observer = observer
        self._free_blocks = kv_cache_blocks
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._steps = 0
        self._busy_s = 0.0
        self._preemptions = 0
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
        for seq in [*self._waiting, *self._running]:
            self._abort(seq)
        self._waiting.clear()
        self._running.clear()
        self._free_blocks = self.total_blocks

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a request; the caller then waits on ``seq.done`` (and reads ``seq.tokens`` when streaming)."""
        if seq.prompt_tokens + seq.output_tokens > self.total_blocks * KV_BLOCK_TOKENS:
            raise ValueError(
                f"a sequence of {seq.prompt_tokens + seq.output_tokens} tokens can never fit the KV cache "
                f"({self.total_blocks * KV_BLOCK_TOKENS} tokens)"
            )
        if seq.output_tokens < 1:
            raise ValueError(f"output_tokens must be at least 1, not {seq.output_tokens}")
        seq.id = next(self._ids)
        seq.arrival_s = self._clock.now_s()
        seq.prefill_target = seq.prompt_tokens
        seq.done = asyncio.get_running_loop().create_future()
        self._waiting.append(seq)
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a request (client gone): out of the queue or the batch now, its blocks freed."""
        if seq.cancelled or (seq.done is not None and seq.done.done()):
            return
        seq.cancelled = True
        if seq in self._running:
            self._running.remove(seq)
            self._free_blocks += seq.blocks
            seq.blocks = 0
        elif seq in self._waiting:
            self._waiting.remove(seq)
        if seq.done is not None and not seq.done.done():
            seq.done.cancel()

    def stats(self) -> SchedulerStats:
        used = self.total_blocks - self._free_blocks
        return SchedulerStats(
            running=len(self._running),
            waiting=len(self._waiting),
            cache_usage_ratio=used / self.total_blocks,
            total_blocks=self.total_blocks,
            free_blocks=self._free_blocks,
            steps=self._steps,
            preemptions=self._preemptions,
            now_s=self._clock.now_s(),
            busy_s=self._busy_s,
        )

    async def _run(self) -> None:
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            step = self._plan_step()
            duration_s = self._cost.step_s(step.batch)
            await self._clock.sleep_until(self._clock.now_s() + duration_s)
            self._busy_s += duration_s
            self._complete_step(step)

    def _plan_step(self) -> _Step:
        decoding = self._grow_decoding()
        budget = self.max_prefill_token_num
        chunks: list[tuple[Sequence, int]] = []
        for seq in self._running:
            if budget <= 0:
                break
            if not seq.decoding:
                chunk = min(seq.prefill_target - seq.prefilled, budget)
                chunks.append((seq, chunk))
                budget -= chunk
        while budget > 0 and self._waiting and len(self._running) < self.max_batch_size:
            seq = self._waiting[0]
            needed = blocks_for(seq.prefill_target + 1)
            if needed > self._free_blocks:
                break  # first come, first served: the head waits for blocks, nobody overtakes it
            self._waiting.popleft()
            self._free_blocks -= needed
            seq.blocks = needed
            if seq.admitted_s is None:
                seq.admitted_s = self._clock.now_s()
            self._running.append(seq)
            chunk = min(seq.prefill_target, budget)
            chunks.append((seq, chunk))
            budget -= chunk
        batch = StepBatch(
            decode_sequences=len(decoding),
            decode_context_tokens=sum(seq.context_tokens for seq in decoding),
            prefill_tokens=sum(chunk for _, chunk in chunks),
            prefill_context_tokens=sum(seq.prefilled for seq, _ in chunks),
            prefill_attention_pairs=sum(chunk * (seq.prefilled + chunk / 2) for seq, chunk in chunks),
        )
        return _Step(batch, decoding, chunks)

    def _grow_decoding(self) -> list[Sequence]:
        """Blocks for one more token per decoding sequence, oldest first; preempt the newest when short."""
        decoding: list[Sequence] = []
        index = 0
        while index < len(self._running):
            seq = self._running[index]
            index += 1
            if not seq.decoding:
                continue
            needed = blocks_for(seq.context_tokens) - seq.blocks
            while needed > self._free_blocks and self._running[-1] is not seq:
                self._preempt(self._running[-1])
            if needed > self._free_blocks:
                self._preempt(seq)
                break
            self._free_blocks -= needed
            seq.blocks += needed
            decoding.append(seq)
        return decoding

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self._free_blocks += seq.blocks
        seq.blocks = 0
        seq.prefilled = 0
        seq.prefill_target = seq.context_tokens
        seq.preemptions += 1
        self._preemptions += 1
        self._waiting.appendleft(seq)

    def _complete_step(self, step: _Step) -> None:
        self._steps += 1
        now_s = self._clock.now_s()
        finished: list[Sequence] = []
        prompt_tokens = 0
        generated = 0
        for seq in step.decoding:
            if seq.cancelled or seq.blocks == 0:
                continue  # cancelled or preempted during the step
            seq.generated += 1
            generated += 1
            self._deliver(seq, finished)
        for seq, chunk in step.prefill_chunks:
            if seq.cancelled or seq.blocks == 0:
                continue
            seq.prefilled += chunk
            if seq.prefilled >= seq.prefill_target:
                if seq.generated == 0:
                    prompt_tokens += seq.prompt_tokens
                    seq.first_token_s = now_s
                    if self._observer is not None:
                        self._observer.on_first_token(seq)
                seq.generated += 1
                generated += 1
                self._deliver(seq, finished)
        for seq in finished:
            self._running.remove(seq)
            self._free_blocks += seq.blocks
            seq.blocks = 0
            seq.finished_s = now_s
            if seq.done is not None and not seq.done.done():
                seq.done.set_result(None)
            if self._observer is not None:
                self._observer.on_finish(seq)
        if self._observer is not None:
            self._observer.on_step(prompt_tokens=prompt_tokens, generation_tokens=generated)

    @staticmethod
    def _deliver(seq: Sequence, finished: list[Sequence]) -> None:
        if seq.stream:
            seq.tokens.put_nowait(1)
        if seq.generated >= seq.output_tokens:
            finished.append(seq)

    @staticmethod
    def _abort(seq: Sequence) -> None:
        if seq.stream:
            seq.tokens.put_nowait(None)
        if seq.done is not None and not seq.done.done():
            seq.done.set_exception(EngineStopped("the engine shut down"))
            seq.done.exception()  # retrieved here so an unobserved future logs nothing
