"""Session events and the live event bus.

The durable event log lives in the store (so a watcher can resume after any
sequence number); the bus is the live seam that fans new events out to the
subscribers of a session. Replicas sharing a store will swap in a bus backed by
their shared engine; the interface stays the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias, TypeVar, overload

from svantic_grpc.core._locks import KeyedLock
from svantic_grpc.core._subscriptions import Feed, Subscription
from svantic_grpc.core._tasks import to_the_end
from svantic_grpc.core.errors import OutOfRange, Unavailable
from svantic_grpc.core.inputs.model import InputRequest
from svantic_grpc.core.messages.model import Artifact, Message, MessageState, Turn
from svantic_grpc.core.metrics import NO_METRICS, Metrics
from svantic_grpc.core.models import INTERNAL_AGENTS, JoinReason, SessionAgent, SessionStatus
from svantic_grpc.core.stream_quota import StreamQuota

if TYPE_CHECKING:
    from svantic_grpc.core.clock import Clock
    from svantic_grpc.core.store import Store

T = TypeVar("T")

__all__ = [
    "AgentJoined",
    "AgentLeft",
    "ArtifactAdded",
    "Event",
    "EventBell",
    "EventBus",
    "EventPayload",
    "InputEnded",
    "InputRaised",
    "InternalAgentsJoined",
    "InternalAgentsLeft",
    "MessageStateChanged",
    "RingHandler",
    "StatusChanged",
    "Subscription",
    "TurnAdded",
]


@dataclass(frozen=True)
class AgentJoined:
    """An agent joined the session."""

    agent: SessionAgent


@dataclass(frozen=True)
class AgentLeft:
    """An agent left the session."""

    agent_type: str
    instance_id: str
    reason: str


@dataclass(frozen=True)
class StatusChanged:
    """The session moved between lifecycle phases."""

    from_status: SessionStatus
    to_status: SessionStatus
    reason: str = ""


@dataclass(frozen=True)
class MessageStateChanged:
    """A message changed state. ``message`` is its snapshot when it stops (terminal or input-required)."""

    message_id: str
    from_state: MessageState | None
    """``None`` when the message was just created."""
    to_state: MessageState
    reason: str = ""
    message: Message | None = None


@dataclass(frozen=True)
class TurnAdded:
    """An agent said something about a message."""

    message_id: str
    turn: Turn


@dataclass(frozen=True)
class ArtifactAdded:
    """An agent produced output for a message."""

    message_id: str
    artifact: Artifact


@dataclass(frozen=True)
class InputRaised:
    """A message now waits for a human."""

    request: InputRequest

    @property
    def message_id(self) -> str:
        return self.request.message_id


@dataclass(frozen=True)
class InputEnded:
    """An input request was resolved, expired or canceled."""

    request: InputRequest

    @property
    def message_id(self) -> str:
        return self.request.message_id


EventPayload: TypeAlias = (
    AgentJoined
    | AgentLeft
    | StatusChanged
    | MessageStateChanged
    | TurnAdded
    | ArtifactAdded
    | InputRaised
    | InputEnded
)


class _InternalAgentEvents(Sequence[EventPayload]):
    """One event per internal agent of a session (``INTERNAL_AGENTS`` order), each built when it
    is read, then ``rest``: a session's open and close append six of them, which a store that
    keeps them in short form (the memory store) takes from here without building them."""

    __slots__ = ("rest", "session_id")

    def __init__(self, session_id: str, rest: Sequence[EventPayload]) -> None:
        self.session_id = session_id
        self.rest = rest

    def internal(self, index: int) -> EventPayload:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(INTERNAL_AGENTS) + len(self.rest)

    @overload
    def __getitem__(self, index: int) -> EventPayload: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[EventPayload]: ...

    def __getitem__(self, index: int | slice) -> EventPayload | Sequence[EventPayload]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
            if index < 0:
                raise IndexError(index)
        if index < len(INTERNAL_AGENTS):
            return self.internal(index)
        return self.rest[index - len(INTERNAL_AGENTS)]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to a list of the same events, as a list


class InternalAgentsJoined(_InternalAgentEvents):
    """A new session's internal agents joining at ``joined_at`` (its ``created_at``), then ``rest``."""

    __slots__ = ("joined_at",)

    def __init__(self, session_id: str, joined_at: float, rest: Sequence[EventPayload] = ()) -> None:
        self.session_id = session_id  # (set here, not through the base's __init__: one call less)
        self.rest = rest
        self.joined_at = joined_at

    def internal(self, index: int) -> EventPayload:
        agent_type, prefix = INTERNAL_AGENTS[index]
        return AgentJoined(
            SessionAgent(agent_type, prefix + self.session_id, JoinReason.AUTO, self.joined_at, True)
        )


class InternalAgentsLeft(_InternalAgentEvents):
    """A closing session's internal agents leaving for ``reason``, then ``rest``."""

    __slots__ = ("reason",)

    def __init__(self, session_id: str, reason: str, rest: Sequence[EventPayload] = ()) -> None:
        self.session_id = session_id
        self.rest = rest
        self.reason = reason

    def internal(self, index: int) -> EventPayload:
        agent_type, prefix = INTERNAL_AGENTS[index]
        return AgentLeft(agent_type, prefix + self.session_id, self.reason)


@dataclass(frozen=True)
class Event:
    """One entry of a session's event log."""

    tenant_id: str
    session_id: str
    sequence: int
    time: float
    payload: EventPayload

    @property
    def message_id(self) -> str:
        """The message the event is about, or ``""``."""
        return getattr(self.payload, "message_id", "")

    @property
    def closes_session(self) -> bool:
        """True for the event after which nothing more happens in the session."""
        return isinstance(self.payload, StatusChanged) and self.payload.to_status is SessionStatus.CLOSED


RingHandler: TypeAlias = Callable[[Collection[tuple[str, str]] | None], None]
"""Told which sessions (tenant id, session id) got events elsewhere; ``None``: any may have."""


class EventBell(Protocol):
    """Rings when another process appended events to a session's log (a replica sharing the store).

    The store's event log stays the truth: a ring carries nothing that would be lost if it
    were missed, and after a ring the bus reads what it has not seen from the log. A bell
    that may have missed rings (its connection dropped) rings with ``None``.
    """

    async def start(self, ring: RingHandler) -> None:
        """Listen from now on, calling ``ring`` for every ring."""

    async def stop(self) -> None:
        """Stop listening; safe to call twice."""

    def watch(self, key: tuple[str, str]) -> None:
        """Ring for this session (its first subscriber here came). Rings sent before the bell
        listens are not heard: once it listens, it rings for the session, so the bus reads the log."""

    def unwatch(self, key: tuple[str, str]) -> None:
        """The session's last subscriber here left: its rings are not needed any more."""


class EventBus:
    """Appends events to the store's log and hands them to live subscribers.

    Appending and fanning out happen under a per-session lock, so every
    subscriber sees a session's events in sequence order.

    Args:
        max_events_per_session: How many of a session's newest events the log keeps
            (0: all). Older ones are trimmed every ``TRIM_EVERY`` events, so the log
            holds between that many and ``TRIM_EVERY`` more.
    """

    TRIM_EVERY = 64
    """Trim once per this many events: one delete amortised over many appends."""

    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        subscriber_buffer: int = 1024,
        max_events_per_session: int = 0,
        max_streams_per_tenant: int = 0,
        quota: StreamQuota | None = None,
        bell: EventBell | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._store = store
        self._quota = quota if quota is not None else StreamQuota(max_streams_per_tenant)
        """Clients' live streams a tenant may hold open in this process (shared with agents' streams)."""
        self._metrics = metrics
        self._clock = clock
        self._buffer = subscriber_buffer
        self.shut_down = False
        """``shutdown`` ended every subscription: the server is stopping."""
        self._max_events = max_events_per_session
        self._locks = KeyedLock()
        self._feeds: dict[tuple[str, str], Feed] = {}
        """Per watched session, its live tail and its subscribers in this process."""
        self._bell = bell
        self.atomic = not store.suspends and bell is None
        """True when a ``commit`` runs to its end without suspending (a store whose calls never
        suspend, nothing heard from other processes): no other task runs while it does."""
        self._offered: dict[tuple[str, str], int] = {}
        """With a bell: per watched session, the highest sequence offered to its subscribers."""
        self._catching_up: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._rung_again: set[tuple[str, str]] = set()

    async def start(self) -> None:
        """Start hearing events written by other processes (when the store has a bell)."""
        if self._bell is not None:
            await self._bell.start(self._rung)

    async def stop(self) -> None:
        """Stop hearing other processes; safe to call twice."""
        if self._bell is not None:
            await self._bell.stop()
        tasks = list(self._catching_up.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def publish(self, tenant_id: str, session_id: str, payload: EventPayload) -> Event:
        """Record ``payload`` in the session's log and deliver it live."""
        (event,) = await self.publish_many(tenant_id, session_id, (payload,))
        return event

    async def publish_many(
        self, tenant_id: str, session_id: str, payloads: Sequence[EventPayload]
    ) -> Sequence[Event]:
        """Record several events in one store write and deliver them live, in order."""
        store = self._store

        async def append(now: float) -> tuple[Sequence[Event], Sequence[Event]]:
            events = await store.append_events(
                tenant_id=tenant_id, session_id=session_id, time=now, payloads=payloads
            )
            return events, events

        return await self.commit(tenant_id, session_id, append)

    async def commit(
        self,
        tenant_id: str,
        session_id: str,
        write: Callable[[float], Awaitable[tuple[T, Sequence[Event]]]],
    ) -> T:
        """Run ``write(now)`` (a store change that appends events with it) and deliver its events live.

        Lets a record change and its events land in one store write, in order with every other
        event of the session. The write and the delivery run in a task of their own: a caller
        cancelled while the store works does not stop a write that then lands, so its events
        still reach live subscribers (who would otherwise see a gap).
        """
        key = (tenant_id, session_id)
        if self.atomic:
            # Nothing here awaits anything that suspends (the store's calls each run to the end in
            # one step; with no bell nothing is read from other processes): no other commit of the
            # session can come in between, so the session's lock would only be taken and let go.
            result, events = await write(self._clock.now())
            self._deliver(key, events)
            if self._trim_due(events):
                await self._trim(key, events)
            return result
        async with self._locks.hold(key):
            if self._store.suspends:
                # The session's next write waits for this one to land (it holds the lock until
                # then, its caller cancelled or not), so it starts from what this one stored.
                return await to_the_end(self._write_and_deliver(key, write))
            result, events = await write(self._clock.now())  # runs to the end: nothing to shield
            await self._deliver_in_order(key, events)
            if self._trim_due(events):
                await self._trim(key, events)
            return result

    async def _write_and_deliver(
        self, key: tuple[str, str], write: Callable[[float], Awaitable[tuple[T, Sequence[Event]]]]
    ) -> T:
        result, events = await write(self._clock.now())
        await self._deliver_in_order(key, events)
        if self._trim_due(events):
            await self._trim(key, events)
        return result

    def _trim_due(self, events: Sequence[Event]) -> bool:
        """True when these events crossed a multiple of ``TRIM_EVERY`` past the cap."""
        if not self._max_events:
            return False
        # A store that builds its events when read (the memory store's ``Appended``) says where
        # they start: reading the last one to learn its number would build it on every write.
        first = getattr(events, "first", None)
        if type(first) is int:
            last: int = getattr(events, "last")  # noqa: B009  (it says where they end too)
            if last < first:
                return False
        elif not events:
            return False
        else:
            first, last = events[0].sequence, events[-1].sequence
        if last <= self._max_events:
            return False
        return (first - 1) // self.TRIM_EVERY != last // self.TRIM_EVERY

    async def _trim(self, key: tuple[str, str], events: Sequence[Event]) -> None:
        tenant_id, session_id = key
        through = events[-1].sequence - self._max_events
        await self._store.trim_events(tenant_id=tenant_id, session_id=session_id, through_sequence=through)

    async def _deliver_in_order(self, key: tuple[str, str], events: Sequence[Event]) -> None:
        """Deliver ``events``; with a bell, first what other processes wrote before them."""
        feed = self._feeds.get(key)
        if self._bell is not None and events and feed is not None:
            offered = self._offered.get(key)
            if offered is None:  # nothing offered yet: start where the slowest subscriber is
                offered = min(s.last_delivered for s in feed.subscribers)
            if events[0].sequence > offered + 1:
                missed = await self._read(key, after=offered, through=events[0].sequence - 1)
                events = [*missed, *events]
        self._deliver(key, events)

    def _deliver(self, key: tuple[str, str], events: Sequence[Event]) -> None:
        """Hand events to the session's live subscribers: one append to their shared tail."""
        feed = self._feeds.get(key)
        if feed is None or not events:
            return
        if self._bell is not None:
            offered = self._offered.get(key, 0)
            events = [e for e in events if e.sequence > offered]  # a ring may have brought them already
            if not events:
                return
            self._offered[key] = events[-1].sequence
        feed.append(events)

    def _rung(self, keys: Collection[tuple[str, str]] | None) -> None:
        """The bell rang: catch up the watched sessions it names (all of them for ``None``)."""
        watched = self._feeds.keys() if keys is None else [k for k in keys if k in self._feeds]
        for key in tuple(watched):
            if key in self._catching_up:
                self._rung_again.add(key)  # read once more when the running catch-up ends
                continue
            task = asyncio.create_task(self._catch_up(key), name=f"svantic-catch-up-{key[1]}")
            self._catching_up[key] = task

    async def _catch_up(self, key: tuple[str, str]) -> None:
        """Read what the session's log gained since it was last offered, and offer it."""
        try:
            while True:
                self._rung_again.discard(key)
                async with self._locks.hold(key):
                    feed = self._feeds.get(key)
                    if feed is not None:
                        after = self._offered.get(key)
                        if after is None:
                            after = min(s.last_delivered for s in feed.subscribers)
                        caught = await self._read(key, after=after)
                        now = self._clock.now()
                        for event in caught:
                            self._metrics.event_from_replica(delay_s=max(now - event.time, 0.0))
                        self._deliver(key, caught)
                if key not in self._rung_again:
                    return
        finally:
            self._catching_up.pop(key, None)

    async def _read(self, key: tuple[str, str], *, after: int, through: int | None = None) -> list[Event]:
        """Events of the session's log after ``after`` (up to ``through``), in order."""
        tenant_id, session_id = key
        found: list[Event] = []
        while through is None or after < through:
            page = await self._store.list_events(
                tenant_id=tenant_id, session_id=session_id, after_sequence=after, limit=500
            )
            found.extend(e for e in page if through is None or e.sequence <= through)
            if len(page) < 500:
                break
            after = page[-1].sequence
        return found

    @property
    def total_subscribers(self) -> int:
        """Live subscriptions in this process, over every session."""
        return sum(len(feed.subscribers) for feed in self._feeds.values())

    @property
    def subscriber_lag(self) -> int:
        """Events the slowest live subscriber in this process has yet to read (0 with none)."""
        return max(
            (
                feed.end - s.position
                for feed in self._feeds.values()
                for s in feed.subscribers
                if s.reads_feed
            ),
            default=0,
        )

    def subscribe(self, tenant_id: str, session_id: str, *, for_client: bool = False) -> Subscription:
        """Start receiving the session's new events. Close the subscription when done.

        ``for_client``: a client's stream (WatchSession, Converse, a streaming send): at most
        ``max_streams_per_tenant`` of a tenant are open at once in this process, so one credential
        cannot grow the server's memory without bound; one more is ``ResourceExhausted``."""
        key = (tenant_id, session_id)
        on_close = self._unsubscribe
        if for_client:
            self._quota.take(tenant_id)
            on_close = self._client_unsubscribe
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = Feed(key)
            if self._bell is not None:
                self._bell.watch(key)
        subscription = Subscription(feed, self._buffer, on_close)
        feed.subscribers.add(subscription)
        return subscription

    def _client_unsubscribe(self, subscription: Subscription) -> None:
        self._quota.give_back(subscription.feed.key[0])
        self._unsubscribe(subscription)

    def _unsubscribe(self, subscription: Subscription) -> None:
        feed = subscription.feed
        feed.subscribers.discard(subscription)
        if not feed.subscribers and self._feeds.get(feed.key) is feed:
            del self._feeds[feed.key]
            self._offered.pop(feed.key, None)
            if self._bell is not None:
                self._bell.unwatch(feed.key)

    def shutdown(self) -> None:
        """End every live subscription (server stopping); readers are told to reconnect."""
        self.shut_down = True
        for feed in tuple(self._feeds.values()):
            for subscription in tuple(feed.subscribers):
                subscription.end(Unavailable("the server is shutting down", reason="SERVER_SHUTTING_DOWN"))

    def subscriber_count(self, tenant_id: str, session_id: str) -> int:
        """How many live subscribers the session has."""
        feed = self._feeds.get((tenant_id, session_id))
        return 0 if feed is None else len(feed.subscribers)

    async def _check_known(self, tenant_id: str, session_id: str, sequence: int) -> None:
        """A resume point must be an event of this session's log (the newest is always kept): one
        past its end came from another session or another store, and would wait for ever."""
        known = await self._store.list_events(
            tenant_id=tenant_id, session_id=session_id, after_sequence=sequence - 1, limit=1
        )
        if not known or known[0].sequence != sequence:
            raise OutOfRange(
                f"after_sequence {sequence} is past the end of session {session_id!r}'s event log: "
                "resume with a sequence number this session's events carried, or 0 for everything kept",
                reason="SEQUENCE_NOT_FOUND",
                metadata={"after_sequence": str(sequence)},
            )

    async def replay_then_follow(
        self,
        tenant_id: str,
        session_id: str,
        *,
        after_sequence: int,
        follow: bool = True,
        page: int = 500,
        for_client: bool = True,
    ) -> AsyncIterator[Event]:
        """Every stored event after ``after_sequence``, then (with ``follow``) live ones, in order.

        Stops after the event that closes the session. ``after_sequence`` 0 starts from the
        oldest event kept; resuming after a sequence whose successors retention already let go
        raises ``OutOfRange`` naming the oldest one kept, rather than skipping the gap silently.
        """
        subscription = self.subscribe(tenant_id, session_id, for_client=for_client)
        subscription.acknowledge(after_sequence)
        try:
            last = after_sequence
            first_page = True
            while True:
                stored = await self._store.list_events(
                    tenant_id=tenant_id, session_id=session_id, after_sequence=last, limit=page
                )
                if first_page and after_sequence > 0 and stored and stored[0].sequence > after_sequence + 1:
                    oldest = stored[0].sequence
                    raise OutOfRange(
                        f"events after sequence {after_sequence} are no longer kept (the session log keeps "
                        f"its newest events); the oldest kept is {oldest}: resume with "
                        f"after_sequence={oldest - 1}, or 0 for everything kept",
                        reason="EVENTS_NOT_RETAINED",
                        metadata={"oldest_sequence": str(oldest), "after_sequence": str(oldest - 1)},
                    )
                if first_page and after_sequence > 0 and not stored and follow:  # else it ends at once
                    await self._check_known(tenant_id, session_id, after_sequence)
                first_page = False
                for event in stored:
                    last = event.sequence
                    subscription.acknowledge(last)
                    yield event
                    if event.closes_session:
                        return
                if len(stored) < page:
                    break
            while follow:
                event = await subscription.next()
                if event.sequence <= last:
                    continue  # already replayed from the log
                last = event.sequence
                yield event
                if event.closes_session:
                    return
        finally:
            subscription.close()
