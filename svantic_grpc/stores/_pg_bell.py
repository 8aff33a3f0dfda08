"""The event bell of the PostgreSQL store: LISTEN/NOTIFY on a channel per watched session.

A session's events ring one of ``_BELL_BUCKETS`` channels of the schema, naming the session;
a replica listens only on the channels of sessions it has subscribers for. The event table
stays the truth: a bell only tells the bus to read the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib

import asyncpg

from svantic_grpc.core.events import RingHandler
from svantic_grpc.core.ownership import SessionKey
from svantic_grpc.stores._pg_listen import stop_listening

__all__ = ["PostgresBell", "bell_of"]

_log = logging.getLogger(__name__)

_UNIT = "\x1f"
"""Between tenant and session id in a bell's payload (ids never hold control characters)."""


class PostgresBell:
    """The event bell over LISTEN/NOTIFY, on a connection of its own.

    It listens only on the channels of sessions that have subscribers here (``watch`` on the
    first, ``unwatch`` after the last), so a replica is not woken by the writes of sessions
    nobody here follows. Once a channel is listened on, the bell rings for the session once:
    what was written before is read from the log. A channel is let go a little after its last
    watcher, so a session watched again soon costs nothing. A dropped connection is opened
    again (every second until it works), and then the bell rings with ``None`` so the bus reads
    every watched session's log: rings sent while it was away are lost, the events are not.
    Its task wakes for a change of watches, a dropped connection, or (only while a channel
    lingers) to let go: an idle replica's bell costs nothing between rings.
    """

    LINGER_S = 2.0
    """How long a channel stays listened on after its last watcher left."""

    def __init__(self, dsn: str, prefix: str) -> None:
        self._dsn = dsn
        self._prefix = prefix
        self._ring: RingHandler | None = None
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._watched: dict[str, dict[SessionKey, str]] = {}
        """Per channel, the sessions watched here and their payloads."""
        self._listening: dict[str, float | None] = {}
        """Channels listened on: ``None`` while watched, else since when they were seen unwatched."""
        self._changed = asyncio.Event()

    async def start(self, ring: RingHandler) -> None:
        self._ring = ring
        self._conn = await self._connect()
        self._task = asyncio.create_task(self._keep_listening(), name="svantic-event-bell")

    async def stop(self) -> None:
        task, self._task = self._task, None
        conn, self._conn = self._conn, None
        await stop_listening([task] if task else [], conn)

    def watch(self, key: SessionKey) -> None:
        channel, payload = bell_of(self._prefix, *key)
        self._watched.setdefault(channel, {})[key] = payload
        if channel not in self._listening:  # else rings from now on reach the bus already
            self._changed.set()

    def unwatch(self, key: SessionKey) -> None:
        channel, _ = bell_of(self._prefix, *key)
        keys = self._watched.get(channel)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._watched[channel]  # let go of by a later round, if not watched again
                self._changed.set()  # that round starts its linger

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn, timeout=10)
        conn.add_termination_listener(self._dropped)
        return conn

    def _dropped(self, conn: object) -> None:
        """The listening connection closed: the task opens another at once and rings for everything."""
        self._changed.set()

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        keys = self._watched.get(channel)
        if self._ring is None or not keys:
            return
        rung = [key for key, named in keys.items() if named == payload]
        if rung:
            self._ring(rung)

    async def _keep_listening(self) -> None:
        """Listen on what is watched, let go of what no longer is, reconnect when dropped."""
        while True:
            # A timer only while a channel lingers: nothing else here needs a round of its own.
            lingering = any(since is not None for since in self._listening.values())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0 if lingering else None):  # (not wait_for: 3.11 drops cancels)
                    await self._changed.wait()
            self._changed.clear()
            try:
                await self._follow_watches()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                _log.warning("event bell: cannot reach PostgreSQL (%s); trying again", exc)
                await asyncio.sleep(1.0)
                self._changed.set()

    async def _follow_watches(self) -> None:
        conn = self._conn
        if conn is None or conn.is_closed():
            self._listening.clear()
            conn = self._conn = await self._connect()
            again = bool(self._watched)
        else:
            again = False
        added = [c for c in self._watched if c not in self._listening]
        for channel in added:
            await conn.add_listener(channel, self._notified)
            self._listening[channel] = None
        now = time.monotonic()
        for channel, idle_since in list(self._listening.items()):
            if channel in self._watched:
                self._listening[channel] = None
            elif idle_since is None:
                self._listening[channel] = now
            elif now - idle_since >= self.LINGER_S:
                del self._listening[channel]
                await conn.remove_listener(channel, self._notified)
        if self._ring is None:
            return
        if again:
            _log.info("event bell: listening again; reading every watched session's log")
            self._ring(None)
        elif added:  # what was written before the bell listened is read from the log
            self._ring([key for channel in added for key in self._watched.get(channel, {})])


_BELL_BUCKETS = 1024
"""Event bell channels per schema: a session rings one of them (with its name in the payload), a
replica listens on those of the sessions it has subscribers for, so it hears (nearly) only the
rings it needs while the channels it listens on stay few whatever the number of sessions."""


def bell_of(prefix: str, tenant_id: str, session_id: str) -> tuple[str, str]:
    """The channel and payload of a session's event bell."""
    payload = f"{tenant_id}{_UNIT}{session_id}"
    return f"{prefix}{zlib.crc32(payload.encode()) % _BELL_BUCKETS}", payload
