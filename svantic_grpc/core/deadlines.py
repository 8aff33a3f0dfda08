"""Deadlines in a heap, and the background task that acts when they come due.

One entry per tracked item (an open session, a pending input request, an idle hosted
agent). The owner's ``tick`` runs when the earliest deadline passes, so its cost
depends only on the items that are due, never on how many are waiting. Activity need
not touch the heap: an entry popped by ``pop_due`` can be checked against the item's
real deadline and scheduled again if it moved. Scheduling a key again supersedes its
earlier entry, which is skipped when it comes up.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from svantic_grpc.core.clock import Clock

__all__ = ["BackgroundTask", "DeadlineHeap"]

K = TypeVar("K", bound=Hashable)


class BackgroundTask:
    """One owned background task: started once, stopped (cancelled and awaited) idempotently.

    Args:
        name: The asyncio task's name.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """A task was started and not stopped."""
        return self._task is not None

    def start(self, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``run()`` in the background until ``stop``; does nothing if already started."""
        if self._task is None:
            self._task = asyncio.create_task(run(), name=self._name)

    async def stop(self) -> None:
        """Cancel the task and wait for it to end; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class DeadlineHeap(Generic[K]):
    """Keys with one deadline each, earliest first, and a loop that ticks when one is due.

    Args:
        clock: Time source.
        name: Name of the background task.
        max_sleep_s: Longest sleep between ticks, a guard against clock jumps.
    """

    def __init__(self, *, clock: Clock, name: str, max_sleep_s: float = 60.0) -> None:
        self._clock = clock
        self._max_sleep_s = max_sleep_s
        self._heap: list[tuple[float, K]] = []
        self._due: dict[K, float] = {}
        self._wake = asyncio.Event()
        self._task = BackgroundTask(name)

    def __len__(self) -> int:
        """Keys with a scheduled deadline."""
        return len(self._due)

    def schedule(self, key: K, due: float) -> None:
        """Set ``key``'s deadline to ``due``, replacing an earlier one; wakes the loop if it is now first."""
        self._due[key] = due
        heap = self._heap
        heapq.heappush(heap, (due, key))
        if heap[0][1] == key:
            self._wake.set()
        if len(heap) > 2 * len(self._due) + 64:  # (checked here: every session opened schedules)
            self._compact()

    def forget(self, key: K) -> None:
        """Stop tracking ``key``."""
        if self._due.pop(key, None) is not None and len(self._heap) > 2 * len(self._due) + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop the entries of forgotten or moved deadlines once they are most of the heap (the
        callers check when): a session closed long before its idle deadline does not stay in memory
        until then."""
        self._heap = [(due, key) for key, due in self._due.items()]
        heapq.heapify(self._heap)

    def pop_due(self, now: float) -> list[tuple[K, float]]:
        """Remove and return every key whose current deadline is at or before ``now``, earliest first."""
        due: list[tuple[K, float]] = []
        while self._heap and self._heap[0][0] <= now:
            deadline, key = heapq.heappop(self._heap)
            if self._due.get(key) != deadline:
                continue  # superseded or forgotten
            del self._due[key]
            due.append((key, deadline))
        return due

    def start(self, tick: Callable[[], Awaitable[object]]) -> None:
        """Call ``tick`` in the background whenever the earliest deadline passes, until ``stop``."""

        async def run() -> None:
            while True:
                self._wake.clear()
                await tick()
                sleep = self._max_sleep_s
                if self._heap:
                    sleep = min(sleep, max(self._heap[0][0] - self._clock.now(), 0.0))
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel that comes
                # as the event fires, and the loop would sleep on through ``stop``.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sleep):
                        await self._wake.wait()

        self._task.start(run)

    async def stop(self) -> None:
        """Stop the background loop; safe to call twice."""
        await self._task.stop()
