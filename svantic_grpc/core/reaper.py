"""The idle-session reaper and the expiry of input requests: act on items whose deadline passed.

Deadlines sit in a ``DeadlineHeap``. Activity does not touch the heap: when an entry
comes due, the item's real deadline is read back and the entry is pushed again if it
moved meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from svantic_grpc.core.clock import Clock
from svantic_grpc.core.deadlines import DeadlineHeap

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
        self._deadlines: DeadlineHeap[Key] = DeadlineHeap(
            clock=clock, name="svantic-idle-reaper", max_sleep_s=max_sleep_s
        )

    def __len__(self) -> int:
        """Items with a scheduled deadline."""
        return len(self._deadlines)

    def schedule(self, tenant_id: str, item_id: str, deadline: float) -> None:
        """Act on the item at ``deadline`` unless its deadline moved since."""
        self._deadlines.schedule((tenant_id, item_id), deadline)

    def forget(self, tenant_id: str, item_id: str) -> None:
        """Stop tracking an item (a session closed, a request ended)."""
        self._deadlines.forget((tenant_id, item_id))

    async def run_once(self) -> int:
        """Act on every item that is due now; returns on how many."""
        closed = 0
        now = self._clock.now()
        for key, _ in self._deadlines.pop_due(now):
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
                # One item failing must not stop the reaper for the rest.
                _log.exception("idle reaper could not act on %s/%s; retrying later", *key)
                self.schedule(*key, now + max(self._max_sleep_s, 1.0))
        return closed

    def start(self) -> None:
        """Run in the background until ``stop``."""
        self._deadlines.start(self.run_once)

    async def stop(self) -> None:
        """Stop the background task; safe to call twice."""
        await self._deadlines.stop()
