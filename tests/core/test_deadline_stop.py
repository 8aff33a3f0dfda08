"""A deadline loop stops when told, even if it was woken in the same instant.

On Python 3.11 ``asyncio.wait_for`` drops a cancellation that arrives as the awaited event
fires; the loop then went on sleeping and ``Mesh.stop`` waited for ever (seen with sessions
opened and closed while the server stopped: each new session's deadline wakes the reaper).
"""

from __future__ import annotations

import asyncio

from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.deadlines import DeadlineHeap


async def test_stop_ends_the_loop_when_a_wake_comes_with_the_cancel() -> None:
    clock = ManualClock()
    heap: DeadlineHeap[str] = DeadlineHeap(clock=clock, name="test-deadlines")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        ticks += 1

    heap.start(tick)
    for _ in range(5):  # the loop ticked once and sleeps on its wake event
        await asyncio.sleep(0)
    assert ticks == 1
    heap.schedule("s1", clock.now() + 60)  # wakes the loop...
    stopping = asyncio.ensure_future(heap.stop())  # ...as it is cancelled: it must end all the same
    # asyncio.wait, not wait_for: wait_for's own cancel on timeout would end the loop and hide a hang.
    done, _ = await asyncio.wait({stopping}, timeout=2)
    assert stopping in done, "the deadline loop did not stop"
