"""Live subscriptions to a session's events: one shared tail per session, a cursor per subscriber.

A session with a thousand watchers must not cost a thousand queues, nor a thousand
``put`` calls on the writer's time for every event. The session's recent events live
once, in its ``Feed``; each ``Subscription`` is a position in it. The writer appends
and wakes the waiting readers (one ``asyncio.Event``); each reader takes what it has
not read yet on its own time. Memory stays bounded: the tail is trimmed to the slowest
subscriber that is no more than ``capacity`` events behind, and one that falls further
behind is cut off, keeping only the ``capacity`` events it had not read (what its own
buffer held before), exactly as a full per-subscriber buffer of that size would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from svantic_grpc.core.errors import MeshError, ResourceExhausted

if TYPE_CHECKING:
    from svantic_grpc.core.events import Event

__all__ = ["Feed", "Subscription"]

_TRIM_EVERY = 64
"""Trim a feed's tail once per this many appended events: one pass over the subscribers, amortised."""
_WAKE_AT_ONCE = 64
"""Readers woken per turn of the event loop: a large fan-out leaves room for other calls between turns."""


class Feed:
    """The live tail of one session's events, shared by that session's subscribers in this process."""

    __slots__ = ("_appended", "_waiting", "_waking", "events", "key", "start", "subscribers")

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        """The session: (tenant id, session id)."""
        self.events: list[Event] = []
        self.start = 0
        """Position (count of events appended before) of ``events[0]``."""
        self.subscribers: set[Subscription] = set()
        self._waiting: dict[asyncio.Future[None], None] = {}
        """Readers waiting for more, in arrival order."""
        self._appended = 0
        self._waking = False

    @property
    def end(self) -> int:
        """Position of the next event to be appended."""
        return self.start + len(self.events)

    def append(self, events: Sequence[Event]) -> None:
        """Add events (in sequence order); the readers are woken after the writer's step.

        Waking a thousand readers means a thousand task steps: they are started from the
        loop, not from the writer's call, so the writer answers its caller first, and
        ``_WAKE_AT_ONCE`` per turn of the loop, so other calls get their turn in between. A
        reader that looks before it is woken already finds the events (``Subscription.next``
        reads first).
        """
        self.events.extend(events)
        self._appended += len(events)
        if self._appended >= _TRIM_EVERY:
            self._appended = 0
            self._trim()
        if self._waiting and not self._waking:
            self._waking = True
            asyncio.get_running_loop().call_soon(self.wake)

    async def wait(self) -> None:
        """Return once woken (something was appended, or a subscription ended)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[waiter] = None
        try:
            await waiter
        finally:
            self._waiting.pop(waiter, None)  # a reader cancelled while waiting leaves nothing behind

    def wake(self) -> None:
        """Wake every reader waiting now (they look again at their position), a batch per loop turn."""
        self._waking = False
        waiting = list(self._waiting)
        self._waiting.clear()
        self._release(waiting, 0)

    def _release(self, waiting: list[asyncio.Future[None]], start: int) -> None:
        end = start + _WAKE_AT_ONCE
        for waiter in waiting[start:end]:
            if not waiter.done():
                waiter.set_result(None)
        if end < len(waiting):
            asyncio.get_running_loop().call_soon(self._release, waiting, end)

    def _trim(self) -> None:
        """Forget the events every subscriber has read; cut off those too far behind to wait for."""
        keep_from = self.end
        for subscription in tuple(self.subscribers):
            if subscription.lagging(self):
                subscription.cut_off(self)
            elif subscription.reads_feed:
                keep_from = min(keep_from, subscription.position)
        del self.events[: keep_from - self.start]
        self.start = keep_from


class Subscription:
    """A live feed of one session's events with a bounded buffer.

    A subscriber that falls ``capacity`` events behind is cut off: once it has
    read what was buffered, ``next`` raises ``ResourceExhausted`` naming the
    last sequence it received, so it can resume from the durable log instead of
    slowing the session or growing memory. ``end`` stops it the same way with
    another error (server shutdown).
    """

    __slots__ = (
        "_capacity",
        "_closed",
        "_error",
        "_feed",
        "_held",
        "_last_delivered",
        "_on_close",
        "position",
    )

    def __init__(self, feed: Feed, capacity: int, on_close: Callable[[Subscription], None]) -> None:
        self._feed = feed
        self.position = feed.end
        """Position in the feed of the next event to read."""
        self._capacity = capacity
        self._held: list[Event] = []
        """Once stopped: what was left to read, in order (at most ``capacity`` events)."""
        self._error: MeshError | None = None
        self._last_delivered = 0
        self._on_close = on_close
        self._closed = False

    @property
    def feed(self) -> Feed:
        """The session tail it reads."""
        return self._feed

    @property
    def reads_feed(self) -> bool:
        """False once stopped (cut off or ended): it then reads only what it held back."""
        return self._error is None

    def lagging(self, feed: Feed) -> bool:
        """True when it fell more than ``capacity`` events behind the feed."""
        return self.reads_feed and feed.end - self.position > self._capacity

    def cut_off(self, feed: Feed) -> None:
        """It fell too far behind: keep the ``capacity`` events its buffer would have held, then fail."""
        self._stop(
            feed,
            ResourceExhausted(
                f"event stream fell behind by more than {self._capacity} events and was cut off",
                reason="SUBSCRIBER_TOO_SLOW",
            ),
        )

    def end(self, error: MeshError) -> None:
        """Stop the feed: after the buffered events, ``next`` raises ``error``."""
        if self.reads_feed:
            self._stop(self._feed, error)
            self._feed.wake()  # a reader blocked on an empty feed must see the error

    def _stop(self, feed: Feed, error: MeshError) -> None:
        begin = self.position - feed.start
        self._held = feed.events[begin : begin + self._capacity]
        self._error = error

    async def next(self) -> Event:
        """The next event; raises once the feed was cut off or ended and the buffer is drained."""
        feed = self._feed
        while self.reads_feed:
            if self.lagging(feed):
                self.cut_off(feed)
                break
            if self.position < feed.end:
                event = feed.events[self.position - feed.start]
                self.position += 1
                self.acknowledge(event.sequence)
                return event
            await feed.wait()
        if self._held:
            event = self._held.pop(0)
            self.acknowledge(event.sequence)
            return event
        error = self._error
        assert error is not None
        raise type(error)(
            f"{error.message}; resume with after_sequence={self._last_delivered}",
            reason=error.reason,
            metadata={**error.metadata, "after_sequence": str(self._last_delivered)},
        )

    @property
    def last_delivered(self) -> int:
        """The highest sequence the reader has passed (resume points start after it)."""
        return self._last_delivered

    def acknowledge(self, sequence: int) -> None:
        """The reader has passed ``sequence`` (also through replay); resume points start after it."""
        if sequence > self._last_delivered:
            self._last_delivered = sequence

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._held = []
            self._on_close(self)
