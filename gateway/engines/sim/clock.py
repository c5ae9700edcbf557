"""Simulated time for the engine: the wall clock run ``time_scale`` times faster.

The engine measures and reports everything (step times, TTFT, metrics) in simulated seconds, so its figures
do not depend on the time scale. Whenever a sleep ends late (a busy CPU, the event loop's timer
granularity), the clock is re-anchored at the step's simulated end instead of catching up with a burst of
short steps; simulated time then runs a little slower than ``time_scale`` x real time, and step durations
stay as the model says in simulated seconds. (If a request read the clock during the overrun, the anchor is
that later reading instead: simulated time never runs backwards.) Seen from outside, latencies are at least
the simulated ones divided by ``time_scale``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol


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
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, not {time_scale}")
        self.time_scale = time_scale
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
        if self._scaled_now_s() > deadline_s:
            # Late (a busy CPU, or the loop's timer granularity): the step ends at its deadline in simulated
            # time, and the clock goes on from there instead of catching up.
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
