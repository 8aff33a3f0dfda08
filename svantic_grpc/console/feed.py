"""Live changes of each tenant's approval queue, for the console's server-sent events.

The core's ``Inputs`` tells its listeners when a request is raised and when one ends
(resolved, expired, canceled); this listener fans that out to the browsers of the
request's tenant. A browser told of a change fetches the queue again, so nothing but
the request id travels on the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from svantic_grpc.core.inputs.model import InputRequest

__all__ = ["QueueFeed"]

_BUFFER = 256


class QueueFeed:
    """An ``InputListener`` that fans queue changes out per tenant."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[str | None]]] = {}
        self._closed = False

    async def on_request(self, request: InputRequest) -> None:
        self._publish(request.tenant_id, f"raised {request.request_id}")

    async def on_outcome(self, request: InputRequest) -> None:
        self._publish(request.tenant_id, f"ended {request.request_id}")

    def _publish(self, tenant_id: str, change: str) -> None:
        for queue in self._subscribers.get(tenant_id, ()):
            with contextlib.suppress(asyncio.QueueFull):  # a slow browser refetches anyway
                queue.put_nowait(change)

    def close(self) -> None:
        """End every subscription: each reader gets ``None`` next (the server is stopping)."""
        self._closed = True
        for subscribers in self._subscribers.values():
            for queue in subscribers:
                _drop_oldest_if_full(queue)
                queue.put_nowait(None)

    @contextlib.asynccontextmanager
    async def subscribe(self, tenant_id: str) -> AsyncIterator[asyncio.Queue[str | None]]:
        """A queue of changes (``"raised <id>"``, ``"ended <id>"``), then ``None`` once closed."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(_BUFFER)
        if self._closed:
            queue.put_nowait(None)
        self._subscribers.setdefault(tenant_id, set()).add(queue)
        try:
            yield queue
        finally:
            subscribers = self._subscribers.get(tenant_id, set())
            subscribers.discard(queue)
            if not subscribers:
                self._subscribers.pop(tenant_id, None)


def _drop_oldest_if_full(queue: asyncio.Queue[str | None]) -> None:
    if queue.full():
        queue.get_nowait()
