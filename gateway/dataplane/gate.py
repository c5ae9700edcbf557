"""A pool's concurrency gate: at most ``limit`` requests in flight, others wait (bounded) in FIFO order.

The limit follows the pool's healthy replicas (replicas x per-replica limit), so it can change while
requests wait; raising it wakes waiters at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class ConcurrencyGate:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def set_limit(self, limit: int) -> None:
        self._limit = limit
        self._wake()

    def try_acquire(self) -> bool:
        if self.inflight < self._limit and not self._waiters:
            self.inflight += 1
            return True
        return False

    async def acquire(self, timeout_s: float) -> bool:
        """Take a slot, waiting up to ``timeout_s``; False when none freed up in time."""
        if self.try_acquire():
            return True
        if timeout_s <= 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)  # a slot granted as the timeout fires still counts
            return True
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, but the caller is gone: hand the slot on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def release(self) -> None:
        self.inflight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.inflight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.inflight += 1
                waiter.set_result(None)
