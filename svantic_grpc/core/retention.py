"""Retention: what is finished does not stay for ever.

A long-running mesh would otherwise keep every closed session, its messages and
its event log. The sweeper deletes closed sessions a set time after they closed,
in batches, from a background task its owner starts and stops; the event bus
caps each open session's log (``EventBus(max_events_per_session=...)``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from svantic_grpc.core.clock import Clock
from svantic_grpc.core.deadlines import BackgroundTask

if TYPE_CHECKING:
    from svantic_grpc.core.store import Store

__all__ = ["Retention", "RetentionSweeper"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    """How long what is finished is kept."""

    closed_sessions_s: float = 86_400.0
    """Delete a closed session, with its messages, requests and events, this long after it closed;
    0 keeps them for ever."""
    max_events_per_session: int = 10_000
    """Newest events a session's log keeps; 0 keeps all."""
    sweep_interval_s: float = 60.0
    """Time between two sweeps for closed sessions."""
    batch: int = 500
    """Sessions deleted per store write; a sweep writes until it finds fewer."""


class RetentionSweeper:
    """Deletes closed sessions past their retention, periodically.

    Args:
        store: Where the sessions are.
        clock: Time source.
        retention: The limits.
    """

    def __init__(self, *, store: Store, clock: Clock, retention: Retention) -> None:
        self._store = store
        self._clock = clock
        self._retention = retention
        self._task = BackgroundTask("svantic-retention")

    async def run_once(self) -> int:
        """Delete every closed session due now; returns how many went."""
        keep = self._retention.closed_sessions_s
        if keep <= 0:
            return 0
        cutoff = self._clock.now() - keep
        purged = 0
        while True:
            count = await self._store.purge_closed_sessions(closed_before=cutoff, limit=self._retention.batch)
            purged += count
            if count < self._retention.batch:
                break
        if purged:
            _log.info("retention: deleted %d sessions closed more than %gs ago", purged, keep)
        return purged

    def start(self) -> None:
        """Sweep in the background until ``stop``; does nothing when closed sessions are kept for ever."""
        if self._retention.closed_sessions_s > 0:
            self._task.start(self._run)

    async def stop(self) -> None:
        """Stop the background task; safe to call twice."""
        await self._task.stop()

    async def _run(self) -> None:
        interval = self._retention.sweep_interval_s
        while True:
            try:
                await self.run_once()
            except Exception:
                # A failing sweep (a locked database, say) must not end retention for good.
                _log.exception("retention sweep failed; trying again in %gs", interval)
            await asyncio.sleep(interval)
