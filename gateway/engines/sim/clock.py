"""Simulated time for the engine: the wall clock run ``time_scale`` times faster.

The engine measures and reports everything (step times, TTFT, metrics) in simulated seconds, so its figures
do not depend on the time scale. A sleep that ends a little late (the event loop's timer granularity, a short
busy spell: up to ``max_lateness_s`` of wall time) costs nothing: the engine schedules its next step from the
previous step's simulated end, so it catches up, and simulated time stays ``time_scale`` x real time. A longer
stall (a CPU that cannot keep up) re-anchors the clock at the step's simulated end instead of catching up with a
burst of steps; simulated time then runs slower than ``time_scale`` x real time — the lag the rate meter shows —
and step durations stay as the model says in simulated seconds. (If a request read the clock during the
overrun, the anchor is that later reading instead: simulated time never runs backwards.) Seen from outside,
latencies are about the simulated ones divided by ``time_scale``.

:class:`ClockRateMeter` measures how fast simulated time really ran (simulated seconds per wall second), over
the engine's life and over a recent window, so that a busy machine shows.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

MAX_LATENESS_S = 0.05  # wall seconds a step may end late and still be caught up


class Clock(Protocol):
    """Simulated time in seconds, and a way to wait for a simulated moment."""

    def now_s(self) -> float: ...

    async def sleep_until(self, deadline_s: float) -> None: ...


class ScaledClock:
    """Wall-clock time multiplied by ``time_scale``, starting at 0 when created."""

    def __init__(
        self,
        time_scale: float = 1.0,
        *,
        max_lateness_s: float = MAX_LATENESS_S,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, not {time_scale}")
        self.time_scale = time_scale
        self.max_lateness_s = max_lateness_s
        self._monotonic = monotonic
        self._sleep = sleep
        self._real_anchor_s = monotonic()
        self._sim_anchor_s = 0.0
        self._latest_read_s = 0.0  # simulated time never runs backwards past a value someone has read

    def now_s(self) -> float:
        self._latest_read_s = max(self._latest_read_s, self._scaled_now_s())
        return self._latest_read_s

    def _scaled_now_s(self) -> float:
        return self._sim_anchor_s + (self._monotonic() - self._real_anchor_s) * self.time_scale

    async def sleep_until(self, deadline_s: float) -> None:
        wait_real_s = (deadline_s - self._scaled_now_s()) / self.time_scale
        await self._sleep(max(0.0, wait_real_s))
        if self._scaled_now_s() > deadline_s + self.max_lateness_s * self.time_scale:
            # A stall: the step ends at its deadline in simulated time, and the clock goes on from there
            # instead of catching up with a burst of steps.
            self._real_anchor_s = self._monotonic()
            self._sim_anchor_s = max(deadline_s, self._latest_read_s)


class ManualClock:
    """A clock for tests: sleeping jumps straight to the deadline (after letting other tasks run)."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now_s = start_s

    def now_s(self) -> float:
        return self._now_s

    def advance(self, seconds: float) -> None:
        self._now_s += seconds

    async def sleep_until(self, deadline_s: float) -> None:
        await asyncio.sleep(0)
        self._now_s = max(self._now_s, deadline_s)


@dataclass(frozen=True)
class ClockRates:
    """How fast a clock ran: simulated seconds per wall second, over its life and over a recent window."""

    simulated_s: float  # simulated seconds since the meter started
    wall_s: float  # wall-clock seconds since the meter started
    life_ratio: float  # simulated_s / wall_s (0 before any wall time passed)
    recent_ratio: float  # the same over the last ``recent_window_s`` wall seconds
    recent_window_s: float


class ClockRateMeter:
    """Samples a :class:`Clock` against the wall clock and reports its effective rate.

    ``sample()`` is cheap (the scheduler calls it after every step); samples closer than a fiftieth of the
    window are skipped, so the memory used is bounded whatever the step rate. ``rates()`` reads both clocks
    now, so an idle stretch without samples still counts.
    """

    def __init__(
        self, clock: Clock, *, window_s: float = 10.0, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        self._clock = clock
        self._monotonic = monotonic
        self.window_s = window_s
        self._start = (monotonic(), clock.now_s())
        self._samples: deque[tuple[float, float]] = deque([self._start])

    def sample(self) -> None:
        wall_s = self._monotonic()
        if wall_s - self._samples[-1][0] >= self.window_s / 50:
            self._samples.append((wall_s, self._clock.now_s()))
            while len(self._samples) > 2 and self._samples[1][0] <= wall_s - self.window_s:
                self._samples.popleft()  # keep one sample at or before the window's start as its anchor

    def rates(self) -> ClockRates:
        wall_s, sim_s = self._monotonic(), self._clock.now_s()
        start_wall_s, start_sim_s = self._start
        anchor_wall_s, anchor_sim_s = self._samples[0]
        for sample_wall_s, sample_sim_s in self._samples:
            if sample_wall_s > wall_s - self.window_s:
                break
            anchor_wall_s, anchor_sim_s = sample_wall_s, sample_sim_s
        return ClockRates(
            simulated_s=sim_s - start_sim_s,
            wall_s=wall_s - start_wall_s,
            life_ratio=_ratio(sim_s - start_sim_s, wall_s - start_wall_s),
            recent_ratio=_ratio(sim_s - anchor_sim_s, wall_s - anchor_wall_s),
            recent_window_s=wall_s - anchor_wall_s,
        )


def _ratio(simulated_s: float, wall_s: float) -> float:
    return simulated_s / wall_s if wall_s > 0 else 0.0
