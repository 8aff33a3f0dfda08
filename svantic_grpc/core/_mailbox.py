"""A small FIFO for one reader, for objects that exist once per open stream."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Mailbox"]

T = TypeVar("T")


class Mailbox(Generic[T]):
    """An unbounded FIFO read by one task, with the ``asyncio.Queue`` methods the streams use.

    An idle ``asyncio.Queue`` holds four deques and an ``asyncio.Event`` (about 3 KB); a
    thousand connected agents would carry 3 MB of empty queues. This one holds its items
    only while it has some, and a future only while its reader waits.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def get_nowait(self) -> T:
        """The oldest item; ``asyncio.QueueEmpty`` when there is none."""
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None  # an idle stream keeps no buffer
        return item

    async def get(self) -> T:
        """The oldest item, waiting for one. One reader at a time."""
        while not self._items:
            if self._waiter is not None:
                raise RuntimeError("a Mailbox has one reader")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()
