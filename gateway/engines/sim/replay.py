"""Replay a benchmark's request pattern through the engine's own scheduler on a manual clock.

No HTTP and no real waiting: steps last their model time on a :class:`~gateway.engines.sim.clock.ManualClock`,
so thousands of requests replay in seconds. The figures are what the running engine would report, because
the scheduler, the batch and the cost model are the engine's own. Two patterns, as LMDeploy's benchmarks:

- :func:`replay_closed_loop` (``profile_throughput``): ``concurrency`` clients, each sending its next request
  as soon as the last one finished, until the list of requests is used up;
- :func:`replay_static_batch` (``profile_generation``): ``batch`` identical requests sent together.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.engines.sim.batch import BatchLimits
from gateway.engines.sim.clock import ManualClock
from gateway.engines.sim.scheduler import Scheduler, Sequence
from gateway.planner.perf import StepCostModel


@dataclass(frozen=True)
class ReplayResult:
    """What a replay measured, in simulated seconds, from the first request sent to the last one finished."""

    requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    mean_ttft_s: float  # first-token latency, queueing included
    steady_ttft_s: float  # the same without the start-up burst (each client's first request)
    mean_running: float  # requests active per step, averaged over the steps
    steps: int
    preemptions: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s


class _Recorder:
    """The scheduler's observer during a replay: keeps the first-token latencies."""

    def __init__(self) -> None:
        self.ttft_s: dict[int, float] = {}  # by request id, which counts up in submission order

    def on_step(self, *, prompt_tokens: int, generation_tokens: int) -> None:
        return None

    def on_first_token(self, seq: Sequence) -> None:
        assert seq.first_token_s is not None
        self.ttft_s[seq.id] = seq.first_token_s - seq.arrival_s

    def on_finish(self, seq: Sequence) -> None:
        return None


async def _replay(
    cost: StepCostModel, limits: BatchLimits, lengths: Iterable[tuple[int, int]], concurrency: int
) -> ReplayResult:
    clock = ManualClock()
    recorder = _Recorder()
    scheduler = Scheduler(cost, clock, limits, observer=recorder)
    jobs = iter(lengths)
    done: list[Sequence] = []

    async def client() -> None:
        for prompt_tokens, output_tokens in jobs:
            seq = scheduler.submit(Sequence(prompt_tokens, output_tokens, "length"))
            assert seq.done is not None
            await seq.done
            done.append(seq)

    clients = [asyncio.create_task(client()) for _ in range(concurrency)]
    await asyncio.sleep(0)  # every client sends its first request at time 0
    scheduler.start()
    try:
        await asyncio.gather(*clients)
    finally:
        await scheduler.stop()
    stats = scheduler.stats()
    return ReplayResult(
        requests=len(done),
        prompt_tokens=sum(seq.prompt_tokens for seq in done),
        output_tokens=sum(seq.generated for seq in done),
        elapsed_s=max(seq.finished_s or 0.0 for seq in done),
        mean_ttft_s=statistics.fmean(recorder.ttft_s.values()),
        steady_ttft_s=statistics.fmean([ttft for id_, ttft in recorder.ttft_s.items() if id_ > concurrency]
                                       or recorder.ttft_s.values()),
        mean_running=stats.mean_running,
        steps=stats.steps,
        preemptions=stats.preemptions,
    )


def replay_closed_loop(
    cost: StepCostModel, limits: BatchLimits, lengths: Iterable[tuple[int, int]], *, concurrency: int
) -> ReplayResult:
    """``concurrency`` clients send the (prompt, output) requests of ``lengths`` back to back."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    return asyncio.run(_replay(cost, limits, lengths, concurrency))


def replay_static_batch(
    cost: StepCostModel, limits: BatchLimits, *, batch: int, prompt_tokens: int, output_tokens: int
) -> ReplayResult:
    """``batch`` identical requests sent together (each client sends one)."""
    return replay_closed_loop(cost, limits, [(prompt_tokens, output_tokens)] * batch, concurrency=batch)
