import asyncio

from gateway.dataplane.gate import ConcurrencyGate


async def test_limit_and_bounded_wait():
    gate = ConcurrencyGate(2)
    assert await gate.acquire(0) and await gate.acquire(0)
    assert not await gate.acquire(0.01)
    assert gate.inflight == 2 and gate.waiting == 0


async def test_waiters_are_served_in_order_when_slots_free_up():
    gate = ConcurrencyGate(1)
    await gate.acquire(0)
    order = []

    async def wait(name):
        assert await gate.acquire(1.0)
        order.append(name)

    tasks = [asyncio.create_task(wait(n)) for n in ("first", "second")]
    await asyncio.sleep(0.01)
    gate.release()
    await asyncio.sleep(0.01)
    assert order == ["first"]
    gate.release()
    await asyncio.gather(*tasks)
    assert order == ["first", "second"] and gate.inflight == 1


async def test_raising_the_limit_wakes_waiters():
    gate = ConcurrencyGate(1)
    await gate.acquire(0)
    waiter = asyncio.create_task(gate.acquire(1.0))
    await asyncio.sleep(0.01)
    gate.set_limit(2)
    assert await waiter and gate.inflight == 2


async def test_a_cancelled_waiter_leaves_no_slot_behind():
    gate = ConcurrencyGate(1)
    await gate.acquire(0)
    waiter = asyncio.create_task(gate.acquire(1.0))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.sleep(0.01)
    gate.release()
    assert gate.inflight == 0 and gate.waiting == 0
    assert await gate.acquire(0)
