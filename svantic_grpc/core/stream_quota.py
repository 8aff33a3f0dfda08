"""How many long-lived streams a tenant may hold open on one server.

Every open stream costs the server memory (~25 KB for an event stream, ~28 KB for an agent's
``Connect``), so one credential must not open them without end. Event streams (WatchSession,
Converse, streaming sends, A2A streams) and agents' ``Connect`` streams count against one
allowance per tenant, ``max_streams_per_tenant``; one more is ``ResourceExhausted``
``TOO_MANY_STREAMS`` with a retry delay. Per process: several replicas each allow as many.
"""

from __future__ import annotations

from svantic_grpc.core.errors import ResourceExhausted

__all__ = ["StreamQuota"]


class StreamQuota:
    """Streams open per tenant in this process, against ``limit`` (0: no limit)."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def open(self, tenant_id: str) -> int:
        """How many streams ``tenant_id`` holds open here."""
        return self._open.get(tenant_id, 0)

    def take(self, tenant_id: str, *, retry_after_s: float = 1.0) -> None:
        """Count one more stream of ``tenant_id``, or refuse it (``ResourceExhausted``, asking the
        caller to wait ``retry_after_s``); every ``take`` that returns is matched by one
        ``give_back``."""
        open_now = self._open.get(tenant_id, 0)
        if self.limit and open_now >= self.limit:
            raise ResourceExhausted(
                f"tenant {tenant_id!r} has {open_now} live streams (event streams and agents' Connect "
                "streams) open on this server, the most it may (max_streams_per_tenant): close one "
                "first, or spread them over replicas",
                reason="TOO_MANY_STREAMS",
                retry_after_s=retry_after_s,
                metadata={"limit": str(self.limit)},
            )
        self._open[tenant_id] = open_now + 1

    def give_back(self, tenant_id: str) -> None:
        left = self._open.get(tenant_id, 1) - 1
        if left > 0:
            self._open[tenant_id] = left
        else:
            self._open.pop(tenant_id, None)
