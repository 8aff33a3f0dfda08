"""The event bus (durable log plus live fan-out) and the per-key lock under it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import cast

import pytest

from svantic_grpc.core._locks import KeyedLock
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.errors import ResourceExhausted, Unavailable
from svantic_grpc.core.events import AgentLeft, Event, EventBus, StatusChanged
from svantic_grpc.core.models import SessionStatus
from svantic_grpc.stores import MemoryStore
from svantic_grpc.stores.sqlite import SqliteStore

TIMEOUT = 2.0


class YieldingStore(MemoryStore):
    """A memory store that gives up control around reads, as a database would."""

    async def list_events(
        self, *, tenant_id: str, session_id: str, after_sequence: int = 0, limit: int = 500
    ) -> Sequence[Event]:
        await asyncio.sleep(0)
        events = await super().list_events(
            tenant_id=tenant_id, session_id=session_id, after_sequence=after_sequence, limit=limit
        )
        await asyncio.sleep(0)
        return events


def _tick(n: int = 0) -> AgentLeft:
    return AgentLeft("researcher", f"r-{n}", "done")


def _closing() -> StatusChanged:
    return StatusChanged(SessionStatus.ACTIVE, SessionStatus.CLOSED, reason="closed by user")


def _bus(clock: ManualClock, *, buffer: int = 1024, store: MemoryStore | None = None) -> EventBus:
    return EventBus(store=store or MemoryStore(), clock=clock, subscriber_buffer=buffer)


async def _collect(events: AsyncIterator[Event]) -> list[int]:
    return [event.sequence async for event in events]


async def test_publish_assigns_sequences_and_delivers_in_order(clock: ManualClock) -> None:
    bus = _bus(clock)
    subscription = bus.subscribe("acme", "s1")
    published = []
    for i in range(5):
        published.append(await bus.publish("acme", "s1", _tick(i)))
        clock.advance(1)
    assert [e.sequence for e in published] == [1, 2, 3, 4, 5]
    assert [e.time for e in published] == [1_700_000_000.0 + i for i in range(5)]
    received = [await asyncio.wait_for(subscription.next(), TIMEOUT) for _ in range(5)]
    assert received == published
    subscription.close()


async def test_sessions_and_tenants_do_not_see_each_others_events(clock: ManualClock) -> None:
    bus = _bus(clock)
    s1 = bus.subscribe("acme", "s1")
    s2 = bus.subscribe("acme", "s2")
    other_tenant = bus.subscribe("globex", "s1")
    await bus.publish("acme", "s1", _tick(1))
    await bus.publish("acme", "s2", _tick(2))
    await bus.publish("acme", "s1", _tick(3))
    await bus.publish("globex", "s1", _tick(4))

    first = [await asyncio.wait_for(s1.next(), TIMEOUT) for _ in range(2)]
    assert [(e.session_id, e.sequence, e.payload) for e in first] == [
        ("s1", 1, _tick(1)),
        ("s1", 2, _tick(3)),
    ]
    second = await asyncio.wait_for(s2.next(), TIMEOUT)
    assert (second.session_id, second.sequence, second.payload) == ("s2", 1, _tick(2))
    foreign = await asyncio.wait_for(other_tenant.next(), TIMEOUT)
    assert (foreign.tenant_id, foreign.sequence, foreign.payload) == ("globex", 1, _tick(4))
    for subscription in (s1, s2):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(subscription.next(), 0.01)  # nothing else queued
    for subscription in (s1, s2, other_tenant):
        subscription.close()


async def test_replay_then_follow_replays_after_n_then_follows_live(clock: ManualClock) -> None:
    bus = _bus(clock)
    for i in range(5):
        await bus.publish("acme", "s1", _tick(i))
    events = bus.replay_then_follow("acme", "s1", after_sequence=2)
    replayed = [(await asyncio.wait_for(anext(events), TIMEOUT)).sequence for _ in range(3)]
    assert replayed == [3, 4, 5]
    assert bus.subscriber_count("acme", "s1") == 1

    await bus.publish("acme", "s1", _tick(6))
    await bus.publish("acme", "s1", _tick(7))
    await bus.publish("acme", "s1", _closing())
    rest = await asyncio.wait_for(_collect(events), TIMEOUT)
    assert rest == [6, 7, 8]  # ended by the closing event
    assert bus.subscriber_count("acme", "s1") == 0


async def test_replay_stops_at_a_stored_closing_event(clock: ManualClock) -> None:
    bus = _bus(clock)
    await bus.publish("acme", "s1", _tick())
    await bus.publish("acme", "s1", _closing())
    events = await asyncio.wait_for(_collect(bus.replay_then_follow("acme", "s1", after_sequence=0)), TIMEOUT)
    assert events == [1, 2]
    assert bus.subscriber_count("acme", "s1") == 0


async def test_follow_false_stops_after_replay(clock: ManualClock) -> None:
    bus = _bus(clock)
    for i in range(7):
        await bus.publish("acme", "s1", _tick(i))
    replay = bus.replay_then_follow("acme", "s1", after_sequence=1, follow=False, page=3)
    assert await asyncio.wait_for(_collect(replay), TIMEOUT) == [2, 3, 4, 5, 6, 7]
    assert bus.subscriber_count("acme", "s1") == 0
    empty = bus.replay_then_follow("acme", "s1", after_sequence=7, follow=False)
    assert await asyncio.wait_for(_collect(empty), TIMEOUT) == []


@pytest.mark.parametrize("after_sequence", [0, 13, 57])
@pytest.mark.parametrize("pause", [1, 5], ids=["fast-publisher", "slow-publisher"])
async def test_replay_has_no_gaps_or_duplicates_under_concurrent_publishing(
    clock: ManualClock, after_sequence: int, pause: int
) -> None:
    """A fast publisher outruns the replay (the log has it all); a slow one is caught up and followed."""
    bus = _bus(clock, store=YieldingStore())
    for i in range(60):
        await bus.publish("acme", "s1", _tick(i))
    total = 200

    async def publisher() -> None:
        for i in range(60, total - 1):
            await bus.publish("acme", "s1", _tick(i))
            for _ in range(pause):
                await asyncio.sleep(0)
        await bus.publish("acme", "s1", _closing())

    async def watcher() -> list[int]:
        seen = []
        async for event in bus.replay_then_follow("acme", "s1", after_sequence=after_sequence, page=7):
            seen.append(event.sequence)
            await asyncio.sleep(0)  # let the publisher interleave with the replay
        return seen

    watch = asyncio.create_task(watcher())
    await asyncio.sleep(0)  # the watcher subscribes and starts replaying first
    publish = asyncio.create_task(publisher())
    seen, _ = await asyncio.wait_for(asyncio.gather(watch, publish), TIMEOUT)
    assert seen == list(range(after_sequence + 1, total + 1))
    assert bus.subscriber_count("acme", "s1") == 0


async def test_several_watchers_all_see_every_event(clock: ManualClock) -> None:
    bus = _bus(clock, store=YieldingStore())
    await bus.publish("acme", "s1", _tick())

    async def watcher() -> list[int]:
        return await _collect(bus.replay_then_follow("acme", "s1", after_sequence=0, page=2))

    watchers = [asyncio.create_task(watcher()) for _ in range(5)]
    for i in range(30):
        await bus.publish("acme", "s1", _tick(i))
        await asyncio.sleep(0)
    await bus.publish("acme", "s1", _closing())
    results = await asyncio.wait_for(asyncio.gather(*watchers), TIMEOUT)
    assert all(result == list(range(1, 33)) for result in results)


async def test_a_stalled_subscriber_holds_back_neither_the_others_nor_the_writer(clock: ManualClock) -> None:
    bus = _bus(clock, buffer=16)
    stalled = bus.subscribe("acme", "s1")  # never reads until the end
    fast = [bus.subscribe("acme", "s1") for _ in range(3)]
    seen: list[list[int]] = [[] for _ in fast]

    async def read(index: int) -> None:
        while len(seen[index]) < 300:
            seen[index].append((await fast[index].next()).sequence)

    readers = [asyncio.create_task(read(i)) for i in range(len(fast))]
    for i in range(300):  # far more than the stalled one's buffer; no publish waits for it
        await asyncio.wait_for(bus.publish("acme", "s1", _tick(i)), TIMEOUT)
        if i % 7 == 0:
            await asyncio.sleep(0)  # the fast readers keep up now and then, not after every event
    await asyncio.wait_for(asyncio.gather(*readers), TIMEOUT)
    assert all(got == list(range(1, 301)) for got in seen)
    # The stalled one still gets what its buffer held, then is cut off with its resume point.
    held = [(await asyncio.wait_for(stalled.next(), TIMEOUT)).sequence for _ in range(16)]
    assert held == list(range(1, 17))
    with pytest.raises(ResourceExhausted) as excinfo:
        await asyncio.wait_for(stalled.next(), TIMEOUT)
    assert excinfo.value.metadata == {"after_sequence": "16"}
    for subscription in (stalled, *fast):
        subscription.close()
    assert bus.subscriber_count("acme", "s1") == 0


async def test_unread_subscription_overflows_and_names_the_resume_point(clock: ManualClock) -> None:
    bus = _bus(clock, buffer=2)
    subscription = bus.subscribe("acme", "s1")
    await bus.publish("acme", "s1", _tick(1))
    assert (await asyncio.wait_for(subscription.next(), TIMEOUT)).sequence == 1
    for i in range(2, 6):
        await bus.publish("acme", "s1", _tick(i))  # 2 and 3 fit, 4 overflows
    assert (await asyncio.wait_for(subscription.next(), TIMEOUT)).sequence == 2
    assert (await asyncio.wait_for(subscription.next(), TIMEOUT)).sequence == 3
    with pytest.raises(ResourceExhausted) as excinfo:
        await asyncio.wait_for(subscription.next(), TIMEOUT)
    assert excinfo.value.reason == "SUBSCRIBER_TOO_SLOW"
    assert excinfo.value.metadata == {"after_sequence": "3"}
    await bus.publish("acme", "s1", _tick(6))
    with pytest.raises(ResourceExhausted):  # stays cut off
        await asyncio.wait_for(subscription.next(), TIMEOUT)
    # Nothing was lost: the log still has everything after the resume point.
    resumed = bus.replay_then_follow("acme", "s1", after_sequence=3, follow=False)
    assert await asyncio.wait_for(_collect(resumed), TIMEOUT) == [4, 5, 6]
    subscription.close()


async def test_overflow_is_reported_once_the_buffer_drains(clock: ManualClock) -> None:
    bus = _bus(clock, buffer=1)
    subscription = bus.subscribe("acme", "s1")
    await bus.publish("acme", "s1", _tick(1))
    await bus.publish("acme", "s1", _tick(2))
    assert (await asyncio.wait_for(subscription.next(), TIMEOUT)).sequence == 1
    with pytest.raises(ResourceExhausted) as excinfo:
        await asyncio.wait_for(subscription.next(), TIMEOUT)
    assert excinfo.value.metadata["after_sequence"] == "1"
    subscription.close()


async def test_slow_subscriber_does_not_hold_up_others(clock: ManualClock) -> None:
    bus = _bus(clock, buffer=2)
    slow = bus.subscribe("acme", "s1")
    fast = bus.subscribe("acme", "s1")
    for i in range(6):
        await bus.publish("acme", "s1", _tick(i))
        assert (await asyncio.wait_for(fast.next(), TIMEOUT)).sequence == i + 1
    assert [(await slow.next()).sequence for _ in range(2)] == [1, 2]
    with pytest.raises(ResourceExhausted):
        await slow.next()
    slow.close()
    fast.close()


async def test_overflow_during_replay_names_the_last_event_the_watcher_got(clock: ManualClock) -> None:
    bus = _bus(clock, buffer=4)
    await bus.publish("acme", "s1", _tick(1))
    await bus.publish("acme", "s1", _tick(2))
    seen: list[int] = []
    events = cast(AsyncGenerator[Event, None], bus.replay_then_follow("acme", "s1", after_sequence=0, page=2))
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                seen.append(event.sequence)
                if event.sequence == 1:
                    for i in range(3, 10):  # 3..6 fill the live buffer, 7 overflows it
                        await bus.publish("acme", "s1", _tick(i))
                if event.sequence == 9:  # the replay's last, short page: 10 comes after it
                    await bus.publish("acme", "s1", _closing())
    except ResourceExhausted as exc:
        # Being cut off is acceptable, but only with the true resume point.
        assert exc.metadata["after_sequence"] == str(seen[-1])
    else:
        assert seen == list(range(1, 11))


async def test_live_overflow_after_an_empty_replay_names_the_last_event_read(clock: ManualClock) -> None:
    bus = _bus(clock, buffer=1)
    for i in range(5):
        await bus.publish("acme", "s1", _tick(i))
    events = cast(AsyncGenerator[Event, None], bus.replay_then_follow("acme", "s1", after_sequence=5))
    async with contextlib.aclosing(events):
        waiting = asyncio.create_task(anext(events))
        await asyncio.sleep(0)  # the watcher has replayed nothing and now waits on the live feed
        await bus.publish("acme", "s1", _tick(6))
        await bus.publish("acme", "s1", _tick(7))  # overflows the one-event buffer
        assert (await asyncio.wait_for(waiting, TIMEOUT)).sequence == 6
        with pytest.raises(ResourceExhausted) as excinfo:
            await asyncio.wait_for(anext(events), TIMEOUT)
    assert excinfo.value.metadata["after_sequence"] == "6"


async def test_shutdown_ends_waiting_watchers_with_their_resume_point(clock: ManualClock) -> None:
    bus = _bus(clock)
    for i in range(3):
        await bus.publish("acme", "s1", _tick(i))
    seen: list[int] = []

    async def watch(after_sequence: int) -> None:
        async for event in bus.replay_then_follow("acme", "s1", after_sequence=after_sequence):
            seen.append(event.sequence)

    watchers = [asyncio.create_task(watch(1)), asyncio.create_task(watch(3))]
    await asyncio.sleep(0)
    assert bus.subscriber_count("acme", "s1") == 2
    bus.shutdown()
    results = await asyncio.wait_for(asyncio.gather(*watchers, return_exceptions=True), TIMEOUT)
    assert [type(r) for r in results] == [Unavailable, Unavailable]
    errors = cast(list[Unavailable], results)
    assert [e.reason for e in errors] == ["SERVER_SHUTTING_DOWN"] * 2
    assert [e.metadata["after_sequence"] for e in errors] == ["3", "3"]
    assert sorted(seen) == [2, 3]
    assert bus.subscriber_count("acme", "s1") == 0


async def test_shutdown_delivers_buffered_events_first(clock: ManualClock) -> None:
    bus = _bus(clock, buffer=2)
    subscription = bus.subscribe("acme", "s1")
    await bus.publish("acme", "s1", _tick(1))
    await bus.publish("acme", "s1", _tick(2))  # the buffer is full
    bus.shutdown()
    await bus.publish("acme", "s1", _tick(3))  # not delivered after the end
    assert [(await asyncio.wait_for(subscription.next(), TIMEOUT)).sequence for _ in range(2)] == [1, 2]
    with pytest.raises(Unavailable) as excinfo:
        await asyncio.wait_for(subscription.next(), TIMEOUT)
    assert excinfo.value.metadata["after_sequence"] == "2"
    subscription.close()


async def test_closing_a_subscription_removes_it(clock: ManualClock) -> None:
    bus = _bus(clock)
    first = bus.subscribe("acme", "s1")
    second = bus.subscribe("acme", "s1")
    assert bus.subscriber_count("acme", "s1") == 2
    first.close()
    first.close()  # idempotent
    assert bus.subscriber_count("acme", "s1") == 1
    await bus.publish("acme", "s1", _tick())
    assert (await asyncio.wait_for(second.next(), TIMEOUT)).sequence == 1
    second.close()
    assert bus.subscriber_count("acme", "s1") == 0


async def test_abandoning_a_watch_removes_its_subscription(clock: ManualClock) -> None:
    bus = _bus(clock)
    await bus.publish("acme", "s1", _tick())
    events = cast(AsyncGenerator[Event, None], bus.replay_then_follow("acme", "s1", after_sequence=0))
    async with contextlib.aclosing(events):
        assert (await asyncio.wait_for(anext(events), TIMEOUT)).sequence == 1
        assert bus.subscriber_count("acme", "s1") == 1
    assert bus.subscriber_count("acme", "s1") == 0


async def test_cancelled_watch_removes_its_subscription(clock: ManualClock) -> None:
    bus = _bus(clock)

    async def watch() -> list[int]:
        return await _collect(bus.replay_then_follow("acme", "s1", after_sequence=0))

    task = asyncio.create_task(watch())
    await asyncio.sleep(0)
    assert bus.subscriber_count("acme", "s1") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert bus.subscriber_count("acme", "s1") == 0


# KeyedLock


async def test_keyed_lock_excludes_per_key() -> None:
    locks = KeyedLock()
    inside = 0
    most_inside = 0
    order: list[int] = []

    async def worker(n: int) -> None:
        nonlocal inside, most_inside
        async with locks.hold("k"):
            inside += 1
            most_inside = max(most_inside, inside)
            order.append(n)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            inside -= 1

    await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(10))), TIMEOUT)
    assert most_inside == 1
    assert order == list(range(10))  # waiters get the lock in arrival order
    assert len(locks) == 0


async def test_keyed_lock_different_keys_do_not_block() -> None:
    locks = KeyedLock()
    release = asyncio.Event()
    holding = asyncio.Event()

    async def hold_a() -> None:
        async with locks.hold(("acme", "a")):
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold_a())
    await asyncio.wait_for(holding.wait(), TIMEOUT)

    async def take_b() -> str:
        async with locks.hold(("acme", "b")):
            return "got b"

    assert await asyncio.wait_for(take_b(), TIMEOUT) == "got b"
    assert len(locks) == 1  # only "a" is still held
    release.set()
    await asyncio.wait_for(holder, TIMEOUT)
    assert len(locks) == 0


async def test_keyed_lock_table_empties_after_errors_and_cancelled_waiters() -> None:
    locks = KeyedLock()
    with pytest.raises(RuntimeError):
        async with locks.hold("k"):
            raise RuntimeError("boom")
    assert len(locks) == 0

    release = asyncio.Event()
    holding = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("k"):
            holding.set()
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("k"):
            pass

    held = asyncio.create_task(holder())
    await asyncio.wait_for(holding.wait(), TIMEOUT)
    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(locks) == 1
    release.set()
    await asyncio.wait_for(held, TIMEOUT)
    assert len(locks) == 0
    async with locks.hold("k"):  # still usable afterwards
        assert len(locks) == 1
    assert len(locks) == 0


async def test_a_publisher_cancelled_while_its_write_waits_still_reaches_live_subscribers(
    clock: ManualClock, tmp_path: Path
) -> None:
    # SQLite writes wait on a thread; the write lands even if its caller is cancelled meanwhile.
    async with await SqliteStore.open(tmp_path / "mesh.db") as store:
        bus = EventBus(store=store, clock=clock, subscriber_buffer=16)
        subscription = bus.subscribe("acme", "s1")
        first = asyncio.create_task(bus.publish("acme", "s1", _tick(1)))
        for _ in range(20):
            await asyncio.sleep(0)
            if store._waiting:
                break
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await bus.publish("acme", "s1", _tick(2))
        received = [await asyncio.wait_for(subscription.next(), TIMEOUT) for _ in range(2)]
        assert [(e.sequence, e.payload) for e in received] == [(1, _tick(1)), (2, _tick(2))]
        subscription.close()
