"""A deadline heap: the idle-session reaper, and the expiry of input requests.

Deadlines sit in a heap, one entry per tracked item (an open session, a pending
request). The reaper sleeps until the earliest one, so its cost per tick depends
only on the items that are due, never on how many are waiting. Activity does not
touch the heap: when an entry comes due, the item's real deadline is read back and
the entry is pushed again if it moved meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable

from svantic_grpc.core.clock import Clock

__all__ = ["IdleReaper"]

_log = logging.getLogger(__name__)

Key = tuple[str, str]


class IdleReaper:
    """Acts on items whose deadline passed (closes idle sessions, expires requests).

    Args:
        clock: Time source.
        close: Acts on one item, given tenant id and item id.
        load: The item's current deadline, or ``None`` if it needs nothing any more.
        max_sleep_s: Longest sleep between checks, a guard against clock jumps.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        close: Callable[[str, str], Awaitable[None]],
        load: Callable[[str, str], Awaitable[float | None]],
        max_sleep_s: float = 60.0,
    ) -> None:
        self._clock = clock
        self._close = close
        self._load = load
        self._max_sleep_s = max_sleep_s
        self._heap: list[tuple[float, Key]] = []
        self._deadlines: dict[Key, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        """Sessions with a scheduled deadline."""
        return len(self._deadlines)

    def schedule(self, tenant_id: str, session_id: str, deadline: float) -> None:
        """Close the session at ``deadline`` unless it was active since."""
        key = (tenant_id, session_id)
        self._deadlines[key] = deadline
        heapq.heappush(self._heap, (deadline, key))
        if self._heap[0][1] == key:
            self._wake.set()

    def forget(self, tenant_id: str, session_id: str) -> None:
        """Stop tracking a session (it closed)."""
        self._deadlines.pop((tenant_id, session_id), None)

    async def run_once(self) -> int:
        """Close every session that is due now; returns how many were closed."""
        closed = 0
        now = self._clock.now()
        while self._heap and self._heap[0][0] <= now:
            deadline, key = heapq.heappop(self._heap)
            if self._deadlines.get(key) != deadline:
                continue  # superseded or forgotten
            del self._deadlines[key]
            try:
                actual = await self._load(*key)
                if actual is None:
                    continue
                if actual > now:
                    self.schedule(*key, actual)
                    continue
                await self._close(*key)
                closed += 1
            except Exception:
                # One session failing to close must not stop the reaper for the rest.
                _log.exception("idle reaper could not close session %s/%s; retrying later", *key)
                self.schedule(*key, now + max(self._max_sleep_s, 1.0))
        return closed

    def start(self) -> None:
        """Run in the background until ``stop``."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="svantic-idle-reaper")

    async def stop(self) -> None:
        """Stop the background task; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            await self.run_once()
            sleep = self._max_sleep_s
            if self._heap:
                sleep = min(sleep, max(self._heap[0][0] - self._clock.now(), 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=sleep)
