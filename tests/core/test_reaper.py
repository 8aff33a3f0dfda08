"""The idle-session reaper, driven by a manual clock and fake close/load callables."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from svantic_grpc.core.clock import ManualClock, SystemClock
from svantic_grpc.core.reaper import IdleReaper

Key = tuple[str, str]


class FakeSessions:
    """Real deadlines by session, and a record of what the reaper asked for."""

    def __init__(self) -> None:
        self.deadlines: dict[Key, float | None] = {}
        self.loads: list[Key] = []
        self.closed: list[Key] = []
        self.failing: set[Key] = set()
        self.closed_event = asyncio.Event()

    async def load(self, tenant_id: str, session_id: str) -> float | None:
        self.loads.append((tenant_id, session_id))
        return self.deadlines.get((tenant_id, session_id))

    async def close(self, tenant_id: str, session_id: str) -> None:
        key = (tenant_id, session_id)
        if key in self.failing:
            raise RuntimeError(f"store unavailable for {session_id}")
        self.closed.append(key)
        self.closed_event.set()


@pytest.fixture
def sessions() -> FakeSessions:
    return FakeSessions()


def _reaper(
    clock: ManualClock | SystemClock, sessions: FakeSessions, max_sleep_s: float = 60.0
) -> IdleReaper:
    return IdleReaper(clock=clock, close=sessions.close, load=sessions.load, max_sleep_s=max_sleep_s)


def _schedule(reaper: IdleReaper, sessions: FakeSessions, key: Key, deadline: float) -> None:
    sessions.deadlines[key] = deadline
    reaper.schedule(*key, deadline)


async def test_closes_exactly_the_due_sessions(clock: ManualClock, sessions: FakeSessions) -> None:
    reaper = _reaper(clock, sessions)
    now = clock.now()
    for n, tenant in [(30, "acme"), (10, "acme"), (20, "globex"), (40, "acme")]:
        _schedule(reaper, sessions, (tenant, f"s{n}"), now + n)
    assert await reaper.run_once() == 0
    assert sessions.loads == []

    clock.advance(20)
    assert await reaper.run_once() == 2
    assert sessions.closed == [("acme", "s10"), ("globex", "s20")]  # earliest deadline first
    assert len(reaper) == 2

    assert await reaper.run_once() == 0  # nothing closes twice
    clock.advance(100)
    assert await reaper.run_once() == 2
    assert sessions.closed[2:] == [("acme", "s30"), ("acme", "s40")]
    assert len(reaper) == 0


async def test_a_session_active_since_is_rescheduled_then_closed(
    clock: ManualClock, sessions: FakeSessions
) -> None:
    reaper = _reaper(clock, sessions)
    key = ("acme", "busy")
    _schedule(reaper, sessions, key, clock.now() + 10)
    sessions.deadlines[key] = clock.now() + 25  # activity moved the real deadline

    clock.advance(10)
    assert await reaper.run_once() == 0
    assert sessions.loads == [key]
    assert sessions.closed == []
    assert len(reaper) == 1

    clock.advance(10)
    assert await reaper.run_once() == 0
    assert sessions.loads == [key]  # not due yet: not even looked at

    clock.advance(5)
    assert await reaper.run_once() == 1
    assert sessions.closed == [key]
    assert len(reaper) == 0


async def test_rescheduling_supersedes_the_old_deadline(clock: ManualClock, sessions: FakeSessions) -> None:
    reaper = _reaper(clock, sessions)
    key = ("acme", "s1")
    _schedule(reaper, sessions, key, clock.now() + 10)
    _schedule(reaper, sessions, key, clock.now() + 30)
    assert len(reaper) == 1
    clock.advance(10)
    assert await reaper.run_once() == 0
    assert sessions.loads == []
    clock.advance(20)
    assert await reaper.run_once() == 1
    assert sessions.loads == [key]


async def test_forget_prevents_closing(clock: ManualClock, sessions: FakeSessions) -> None:
    reaper = _reaper(clock, sessions)
    _schedule(reaper, sessions, ("acme", "gone"), clock.now() + 5)
    _schedule(reaper, sessions, ("acme", "kept"), clock.now() + 5)
    reaper.forget("acme", "gone")
    reaper.forget("acme", "never-scheduled")  # harmless
    assert len(reaper) == 1
    clock.advance(5)
    assert await reaper.run_once() == 1
    assert sessions.closed == [("acme", "kept")]
    assert ("acme", "gone") not in sessions.loads


async def test_load_returning_none_drops_the_session(clock: ManualClock, sessions: FakeSessions) -> None:
    reaper = _reaper(clock, sessions)
    key = ("acme", "closed-elsewhere")
    _schedule(reaper, sessions, key, clock.now() + 5)
    sessions.deadlines[key] = None
    clock.advance(5)
    assert await reaper.run_once() == 0
    assert len(reaper) == 0
    clock.advance(1_000)
    assert await reaper.run_once() == 0
    assert sessions.loads == [key]
    assert sessions.closed == []


async def test_failed_close_is_logged_and_retried_without_stopping_others(
    clock: ManualClock, sessions: FakeSessions, caplog: pytest.LogCaptureFixture
) -> None:
    reaper = _reaper(clock, sessions, max_sleep_s=30)
    broken, fine = ("acme", "broken"), ("acme", "fine")
    _schedule(reaper, sessions, broken, clock.now() + 5)
    _schedule(reaper, sessions, fine, clock.now() + 6)
    sessions.failing.add(broken)

    clock.advance(10)
    with caplog.at_level(logging.ERROR, logger="svantic_grpc.core.reaper"):
        assert await reaper.run_once() == 1
    assert sessions.closed == [fine]
    (record,) = caplog.records
    assert "acme/broken" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert len(reaper) == 1

    assert await reaper.run_once() == 0  # retried later, not in a tight loop
    sessions.failing.clear()
    clock.advance(30)
    assert await reaper.run_once() == 1
    assert sessions.closed == [fine, broken]
    assert len(reaper) == 0


async def test_failed_load_is_retried(clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    attempts = 0
    closed: list[Key] = []

    async def flaky_load(tenant_id: str, session_id: str) -> float | None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("database restarting")
        return 0.0

    async def close(tenant_id: str, session_id: str) -> None:
        closed.append((tenant_id, session_id))

    reaper = IdleReaper(clock=clock, close=close, load=flaky_load, max_sleep_s=10)
    reaper.schedule("acme", "s1", clock.now())
    with caplog.at_level(logging.ERROR, logger="svantic_grpc.core.reaper"):
        assert await reaper.run_once() == 0
    assert len(caplog.records) == 1
    clock.advance(10)
    assert await reaper.run_once() == 1
    assert closed == [("acme", "s1")]


async def test_run_once_only_loads_due_entries(clock: ManualClock, sessions: FakeSessions) -> None:
    reaper = _reaper(clock, sessions)
    later = clock.now() + 3_600
    for i in range(10_000):
        _schedule(reaper, sessions, ("acme", f"idle-{i}"), later + i)
    assert await reaper.run_once() == 0
    assert sessions.loads == []

    _schedule(reaper, sessions, ("globex", "due"), clock.now())
    assert await reaper.run_once() == 1
    assert sessions.loads == [("globex", "due")]
    assert len(reaper) == 10_000


async def test_background_task_closes_a_due_session(sessions: FakeSessions) -> None:
    reaper = _reaper(SystemClock(), sessions)
    reaper.start()
    reaper.start()  # a second start does not add a second task
    try:
        await asyncio.sleep(0)  # the task is now asleep with nothing scheduled
        started = time.monotonic()
        _schedule(reaper, sessions, ("acme", "soon"), time.time() + 0.05)
        await asyncio.wait_for(sessions.closed_event.wait(), 2.0)
        assert time.monotonic() - started >= 0.04  # not before its deadline
        assert sessions.closed == [("acme", "soon")]
    finally:
        await reaper.stop()
        await reaper.stop()


async def test_stop_without_start_is_fine(clock: ManualClock, sessions: FakeSessions) -> None:
    reaper = _reaper(clock, sessions)
    await reaper.stop()
    await reaper.stop()
