"""The one deadline heap behind the idle reaper, request expiry and hosted liveness."""

from __future__ import annotations

import asyncio

from svantic_grpc.core.clock import ManualClock, SystemClock
from svantic_grpc.core.deadlines import BackgroundTask, DeadlineHeap


def test_due_keys_come_out_earliest_first_and_only_at_their_latest_deadline(clock: ManualClock) -> None:
    heap: DeadlineHeap[str] = DeadlineHeap(clock=clock, name="test")
    now = clock.now()
    heap.schedule("b", now + 20)
    heap.schedule("a", now + 10)
    heap.schedule("c", now + 5)
    heap.schedule("c", now + 30)  # moved later: its first entry is superseded
    heap.schedule("d", now + 1)
    heap.forget("d")
    assert len(heap) == 3
    assert heap.pop_due(now + 25) == [("a", now + 10), ("b", now + 20)]
    assert heap.pop_due(now + 25) == []
    assert len(heap) == 1
    assert heap.pop_due(now + 30) == [("c", now + 30)]
    assert len(heap) == 0


async def test_the_loop_wakes_for_an_earlier_deadline_and_stops_twice_cleanly() -> None:
    clock = SystemClock()
    heap: DeadlineHeap[str] = DeadlineHeap(clock=clock, name="test", max_sleep_s=60.0)
    fired: asyncio.Queue[str] = asyncio.Queue()

    async def tick() -> None:
        for key, _ in heap.pop_due(clock.now()):
            fired.put_nowait(key)

    heap.start(tick)
    heap.start(tick)  # a second start is no second loop
    heap.schedule("late", clock.now() + 3600)
    heap.schedule("soon", clock.now() + 0.01)  # earlier than the sleep: wakes the loop
    assert await asyncio.wait_for(fired.get(), 5) == "soon"
    await heap.stop()
    await heap.stop()
    assert fired.empty()


async def test_a_background_task_runs_until_stopped() -> None:
    task = BackgroundTask("test")
    started = asyncio.Event()

    async def run() -> None:
        started.set()
        await asyncio.Event().wait()

    task.start(run)
    await asyncio.wait_for(started.wait(), 5)
    assert task.running
    await task.stop()
    await task.stop()
    assert not task.running


def test_forgotten_deadlines_do_not_stay_in_memory_until_they_fall_due(clock: ManualClock) -> None:
    """Sessions closed long before their idle deadline: the heap lets their entries go."""
    heap: DeadlineHeap[tuple[str, str]] = DeadlineHeap(clock=clock, name="test")
    for n in range(10_000):
        heap.schedule(("acme", f"s{n}"), clock.now() + 3600)
    heap.schedule(("acme", "kept"), clock.now() + 7200)
    for n in range(10_000):
        heap.forget(("acme", f"s{n}"))
    assert len(heap) == 1
    assert len(heap._heap) <= 2 * len(heap) + 64  # the entries themselves, not only the count
    clock.advance(7200)
    assert heap.pop_due(clock.now()) == [(("acme", "kept"), clock.now())]
