"""Session leases in PostgreSQL: which replica runs a session, and the hand-off of messages to it.

A lease is a row (``leases``): its owner, an expiry (database time, so replicas' clocks do
not matter) and a fencing number raised at every change of owner. The owner renews its
leases every ``renew_s``; every write it makes for a leased session checks, in the writing
transaction, that the row still names it with the same fence (``PostgresStore.write``), so a
replica whose lease was taken over cannot write any more. Expired leases are taken over by
any replica with ``FOR UPDATE SKIP LOCKED``, oldest first (an index on the expiry): each is
taken once, and the cost of a sweep does not grow with the leases that are not due.

A message sent to a replica that does not own its session is written with a ``handoffs`` row
naming the owner and a ``NOTIFY`` on the owner's channel in the same transaction (the other
replicas do not hear it); the owner claims its rows (again ``SKIP LOCKED``), on the bell and on
every renewal tick in case a bell was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING

import asyncpg

from svantic_grpc.core._locks import KeyedLock
from svantic_grpc.core.ownership import HandOff, LeaseLost, Ownership, SessionKey, Takeover
from svantic_grpc.stores._pg_listen import cancel_tasks, replica_channel, stop_listening

if TYPE_CHECKING:
    from svantic_grpc.stores.postgres import PostgresStore

__all__ = ["PgLeases", "check_fence", "record_hand_offs"]

_log = logging.getLogger(__name__)

_NOW = "extract(epoch from clock_timestamp())"
"""Database time in seconds: every replica compares expiries against the same clock."""

_TAKE_HELD = f"""
    WITH due AS (
        SELECT tenant_id, session_id FROM leases
        WHERE (tenant_id, session_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
            AND (expires_at < {_NOW} OR owner = $3)
        ORDER BY tenant_id, session_id FOR UPDATE SKIP LOCKED
    )
    UPDATE leases AS l SET owner = $3, fence = l.fence + 1, expires_at = {_NOW} + $4
    FROM due WHERE l.tenant_id = due.tenant_id AND l.session_id = due.session_id
    RETURNING l.tenant_id, l.session_id, l.fence
"""
"""Take the leases among the keys that are expired or this replica's from an earlier life. Only
rows nobody holds are locked (``SKIP LOCKED``): a live owner's writes (``FOR KEY SHARE``) are never
waited for, and two replicas taking overlapping sets never deadlock; a skipped one is not taken."""

_TAKE_FREE = f"""
    INSERT INTO leases (tenant_id, session_id, owner, fence, expires_at)
    SELECT t, s, $3, 1, {_NOW} + $4 FROM unnest($1::text[], $2::text[]) AS u(t, s)
    ON CONFLICT (tenant_id, session_id) DO NOTHING
    RETURNING tenant_id, session_id, fence
"""
"""Take the leases among the keys that have no row yet (a conflict leaves the row unlocked)."""

_TAKE_OVER_DUE = f"""
    WITH due AS (
        SELECT tenant_id, session_id, owner FROM leases WHERE expires_at < {_NOW}
        ORDER BY expires_at LIMIT $3 FOR UPDATE SKIP LOCKED
    ), taken AS (
        UPDATE leases AS l SET owner = $1, fence = l.fence + 1, expires_at = {_NOW} + $2
        FROM due WHERE l.tenant_id = due.tenant_id AND l.session_id = due.session_id
        RETURNING l.tenant_id, l.session_id, l.fence, due.owner
    ), handed AS (
        DELETE FROM handoffs WHERE (tenant_id, session_id) IN (SELECT tenant_id, session_id FROM taken)
        RETURNING tenant_id, session_id, message_id
    )
    SELECT t.tenant_id, t.session_id, t.fence, t.owner, ARRAY(
        SELECT h.message_id FROM handed AS h WHERE h.tenant_id = t.tenant_id AND h.session_id = t.session_id
    ) FROM taken AS t
"""
"""Take over expired leases, oldest first, with the hand-offs waiting in their sessions (the new
owner runs them): one statement, so a sweep that finds nothing due (nearly every one) is one round
trip, no ``BEGIN``/``COMMIT``."""

_ADOPT = """
    DELETE FROM handoffs WHERE (tenant_id, session_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
    RETURNING tenant_id, session_id, message_id
"""
"""Hand-offs waiting in sessions just taken over: the new owner runs them."""


class PgLeases(Ownership):
    """Leases of one replica on a ``PostgresStore``.

    Args:
        store: The store whose writes carry this replica's fences.
        replica_id: This replica's name in lease rows; unique among the replicas.
        lease_s: How long a lease lasts without renewal (how long a dead replica's sessions wait).
        renew_s: How often leases are renewed and expired ones looked for.
    """

    def __init__(self, store: PostgresStore, *, replica_id: str, lease_s: float, renew_s: float) -> None:
        self._store = store
        self.replica_id = replica_id
        self._lease_s = lease_s
        self._renew_s = renew_s
        self._valid_until: dict[SessionKey, float] = {}
        """Leases held, with the monotonic time until which they surely are (half a lease on)."""
        self._recovering: set[SessionKey] = set()
        """Leases just taken over whose sessions are being recovered: renewed like those held (a
        recovery may outlast a lease), run here once recovered."""
        self._locks = KeyedLock()
        self._takeover: Takeover | None = None
        self._run: Callable[[HandOff], Awaitable[None]] | None = None
        self._abandon: Callable[[str, str], Awaitable[None]] | None = None
        self._closed: Callable[[str, str], Awaitable[None]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._abandoning: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        store.replica_id = replica_id

    async def start(
        self,
        *,
        takeover: Takeover,
        run: Callable[[HandOff], Awaitable[None]],
        abandon: Callable[[str, str], Awaitable[None]],
        closed: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self._takeover, self._run, self._abandon, self._closed = takeover, run, abandon, closed
        await self._listen()
        await cancel_tasks(self._tasks)  # the renewal during start-up recovery: the full round now
        # Renewal runs on its own: taking over a dead replica's sessions (their recovery may take
        # longer than a lease) must never hold up the leases this replica already has.
        self._tasks = [
            asyncio.create_task(self._every(self._renew_all), name="svantic-leases"),
            asyncio.create_task(self._every(self._sweep), name="svantic-take-over"),
            asyncio.create_task(self._take_hand_offs(), name="svantic-hand-offs"),
        ]

    async def halt(self) -> None:
        tasks, self._tasks = [*self._tasks, *self._abandoning], []
        listener, self._listener = self._listener, None
        await stop_listening(tasks, listener)

    async def stop(self) -> None:
        await self.halt()
        if self._valid_until and self._store.is_open:
            # Let go at once: another replica takes the sessions over at its next sweep.
            tenants, sessions = _columns(self._valid_until)
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await self._store.pool.execute(
                    "UPDATE leases SET expires_at = 0 WHERE owner = $1 AND (tenant_id, session_id) IN "
                    "(SELECT * FROM unnest($2::text[], $3::text[]))",
                    self.replica_id,
                    tenants,
                    sessions,
                )
        self._valid_until.clear()

    async def claim(self, keys: Collection[SessionKey]) -> tuple[set[SessionKey], set[tuple[str, str, str]]]:
        taken, handed = await self._take(keys)
        for key, _ in taken:  # recovered by the caller at start-up, before anything is served
            self._hold(key, self._store.fences[key])
        if taken and not self._tasks:
            # Renewed from now on, not once the recovery is done: a recovery longer than a lease
            # would otherwise let them lapse to another replica while this one recovers them.
            self._tasks = [asyncio.create_task(self._every(self._renew_all), name="svantic-leases-renewal")]
        return {key for key, _ in taken}, handed

    async def runs_here(self, tenant_id: str, session_id: str) -> bool:
        key = (tenant_id, session_id)
        until = self._valid_until.get(key)
        if until is not None and time.monotonic() < until:
            return True
        async with self._locks.hold(key):
            if key in self._valid_until and await self._renew_one(key):
                return True
            taken, handed = await self._take((key,))
            if not taken:
                return False
            ((_, fresh),) = taken
            if not fresh or handed:
                # Taken from a replica that died (or from this one's former life): recover it first.
                await self._recover([key], handed)
            return True

    def lost(self, tenant_id: str, session_id: str) -> None:
        self._lost([(tenant_id, session_id)])

    async def owner_of(self, tenant_id: str, session_id: str) -> str | None:
        owner = await self._store.pool.fetchval(
            f"SELECT owner FROM leases WHERE tenant_id = $1 AND session_id = $2 AND expires_at >= {_NOW}",
            tenant_id,
            session_id,
        )
        return None if owner is None else str(owner)

    # Taking leases

    async def _take(
        self, keys: Collection[SessionKey]
    ) -> tuple[list[tuple[SessionKey, bool]], set[tuple[str, str, str]]]:
        """Take what is free or expired among ``keys``, and the hand-offs waiting in what was
        taken from another owner; returns (key, whether the lease is new) for each taken."""
        if not keys:
            return [], set()
        tenants, sessions = _columns(keys)
        # Leases nobody held yet (a new session's): one statement, no transaction of its own.
        free = await self._store.pool.fetch(_TAKE_FREE, tenants, sessions, self.replica_id, self._lease_s)
        rest = set(keys) - {(r[0], r[1]) for r in free}
        held: list[asyncpg.Record] = []
        handed: set[tuple[str, str, str]] = set()
        if rest:
            tenants, sessions = _columns(rest)
            async with self._store.pool.acquire() as conn, conn.transaction():
                held = await conn.fetch(_TAKE_HELD, tenants, sessions, self.replica_id, self._lease_s)
                handed = await self._adopt(conn, [(r[0], r[1]) for r in held])
        taken = [((r[0], r[1]), int(r[2]), False) for r in held] + [
            ((r[0], r[1]), int(r[2]), True) for r in free
        ]
        for key, fence, fresh in taken:
            if fresh:
                self._hold(key, fence)
            else:  # taken over: its writes carry the fence now, but it runs here once recovered
                self._store.fences[key] = fence
        return [(key, fresh) for key, _, fresh in taken], handed

    @staticmethod
    async def _adopt(conn: asyncpg.Connection, keys: list[SessionKey]) -> set[tuple[str, str, str]]:
        if not keys:
            return set()
        tenants, sessions = _columns(keys)
        return {(r[0], r[1], r[2]) for r in await conn.fetch(_ADOPT, tenants, sessions)}

    async def _recover(self, keys: list[SessionKey], handed: set[tuple[str, str, str]]) -> None:
        """Recover sessions just taken over (their keys locked by the caller); they run here once
        recovered. A recovery that fails gives the leases back (expired, with their hand-offs), so
        that a later sweep, here or elsewhere, tries again instead of the sessions staying half done."""
        assert self._takeover is not None
        try:
            await self._takeover(set(keys), handed)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._give_back(keys, handed)
            raise
        for key in keys:
            fence = self._store.fences.get(key)
            if fence is not None:
                self._hold(key, fence)

    async def _give_back(self, keys: list[SessionKey], handed: set[tuple[str, str, str]]) -> None:
        fences = [self._store.fences.get(k, 0) for k in keys]
        async with self._store.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE leases SET expires_at = 0 WHERE owner = $1 AND (tenant_id, session_id, fence) IN "
                "(SELECT * FROM unnest($2::text[], $3::text[], $4::bigint[]))",
                self.replica_id,
                *_columns(keys),
                fences,
            )
            if handed:
                await self._hand_back(list(handed), conn)
        for key in keys:
            self._store.fences.pop(key, None)
            self._valid_until.pop(key, None)

    def _hold(self, key: SessionKey, fence: int) -> None:
        self._store.fences[key] = fence
        self._valid_until[key] = time.monotonic() + self._lease_s / 2

    async def _renew_one(self, key: SessionKey) -> bool:
        fence = self._store.fences.get(key)
        renewed = await self._store.pool.fetchval(
            f"UPDATE leases SET expires_at = {_NOW} + $5 "
            "WHERE tenant_id = $1 AND session_id = $2 AND owner = $3 AND fence = $4 RETURNING 1",
            *key,
            self.replica_id,
            fence,
            self._lease_s,
        )
        if renewed is None:
            self._lost([key])
            return False
        self._valid_until[key] = time.monotonic() + self._lease_s / 2
        return True

    def _lost(self, keys: Collection[SessionKey]) -> None:
        """Leases another replica took: this one stops believing it owns them and drops their work.
        Their fences stay until that work is gone, so a write it still makes is refused rather
        than written without one."""
        for key in keys:
            if self._valid_until.pop(key, None) is None:
                continue
            task = asyncio.create_task(
                self._drop(key, self._store.fences.get(key)), name="svantic-lease-lost"
            )
            self._abandoning.add(task)
            task.add_done_callback(self._abandoning.discard)
        if keys:
            _log.warning("lost the lease of %d session(s) to another replica", len(keys))
            self._store.metrics.lease_changes(change="lost", count=len(keys))

    async def _drop(self, key: SessionKey, fence: int | None) -> None:
        try:
            if self._abandon is not None:
                await self._abandon(*key)
        finally:
            if key not in self._valid_until and self._store.fences.get(key) == fence:
                self._store.fences.pop(key, None)  # writes here are a non-owner's from now on

    # Background work

    async def _every(self, step: Callable[[], Awaitable[object]]) -> None:
        """``step`` every ``renew_s``: the renewal of what is held (and the forgetting of leases of
        closed sessions), or the take-over of expired leases, each in a task of its own."""
        while True:
            await asyncio.sleep(self._renew_s)
            try:
                await step()
            except (OSError, asyncpg.PostgresError) as exc:
                _log.warning("leases: cannot reach PostgreSQL (%s); trying again", exc)
            except Exception:
                _log.exception("leases: renewal or take-over failed; trying again")

    async def tick(self, batch: int = 100) -> int:
        """One renewal and take-over round; returns how many sessions were taken over."""
        await self._renew_all()
        return await self._sweep(batch)

    async def _sweep(self, batch: int = 100) -> int:
        """Take over expired leases, a batch at a time, and recover their sessions; returns how
        many were taken over."""
        taken = 0
        while True:
            rows = await self._store.pool.fetch(_TAKE_OVER_DUE, self.replica_id, self._lease_s, batch)
            keys = [(r[0], r[1]) for r in rows]
            handed = {(r[0], r[1], message_id) for r in rows for message_id in r[4]}
            for row in rows:
                self._store.fences[(row[0], row[1])] = int(row[2])  # valid here once recovered
            for row in rows:
                _log.info(
                    "lease taken over: session %s from replica %s (fence %d)",
                    row[1],
                    row[3],
                    row[2],
                    extra={"session_id": row[1], "previous_owner": row[3], "fence": int(row[2])},
                )
            if keys:
                self._store.metrics.lease_changes(change="taken_over", count=len(keys))
                async with contextlib.AsyncExitStack() as locked:
                    for key in sorted(keys):  # a send to one of them waits until it is recovered
                        await locked.enter_async_context(self._locks.hold(key))
                    self._recovering.update(keys)
                    try:
                        await self._recover(keys, handed)
                    except Exception:
                        _log.exception("recovering %d session(s) taken over failed; given back", len(keys))
                        return taken  # the next tick (here or elsewhere) tries them again
                    finally:
                        self._recovering.difference_update(keys)
            taken += len(keys)
            if len(rows) < batch:
                return taken

    async def _renew_all(self) -> None:
        held = [*self._valid_until, *(k for k in self._recovering if k not in self._valid_until)]
        if not held:
            return
        tenants, sessions = _columns(held)
        fences = [self._store.fences.get(k, 0) for k in held]
        pool = self._store.pool
        # Renew first: nothing below (a slow or failing close hook) may delay the leases of the rest.
        rows = await pool.fetch(
            f"UPDATE leases SET expires_at = {_NOW} + $5 WHERE owner = $1 AND (tenant_id, session_id, fence) "
            "IN (SELECT * FROM unnest($2::text[], $3::text[], $4::bigint[])) RETURNING tenant_id, session_id",
            self.replica_id,
            tenants,
            sessions,
            fences,
            self._lease_s,
        )
        renewed = {(r[0], r[1]) for r in rows}
        until = time.monotonic() + self._lease_s / 2
        for key in renewed:
            if key in self._valid_until:
                self._valid_until[key] = until
        # A key lost and taken again while the renewal ran carries a new fence: still this replica's.
        self._lost(
            [
                k
                for k, f in zip(held, fences, strict=True)
                if k not in renewed and self._store.fences.get(k) == f
            ]
        )
        closed = await pool.fetch(
            "SELECT l.tenant_id, l.session_id FROM leases AS l JOIN sessions AS s "
            "ON s.tenant_id = l.tenant_id AND s.session_id = l.session_id "
            "WHERE l.owner = $1 AND s.status = 'closed'",
            self.replica_id,
        )
        for row in closed:
            # Closed by another replica (or here): work still running here for it ends, then the lease goes.
            if self._closed is not None:
                try:
                    await self._closed(row[0], row[1])
                except Exception:
                    _log.exception("ending the work of closed session %s failed", row[1])
            self._valid_until.pop((row[0], row[1]), None)
            self._store.fences.pop((row[0], row[1]), None)
        if closed:
            # Rows a write still holds are skipped (and deleted at the next tick): never a wait.
            await pool.execute(
                "DELETE FROM leases WHERE (tenant_id, session_id) IN ("
                "SELECT tenant_id, session_id FROM leases WHERE owner = $1 AND (tenant_id, session_id) IN "
                "(SELECT * FROM unnest($2::text[], $3::text[])) FOR UPDATE SKIP LOCKED)",
                self.replica_id,
                *_columns([(r[0], r[1]) for r in closed]),
            )

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._store.dsn, timeout=10)
        await conn.add_listener(replica_channel(self._store.handoff_channel, self.replica_id), self._rung)
        conn.add_termination_listener(self._dropped)
        self._listener = conn

    def _rung(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if payload == self.replica_id:
            self._wake.set()

    def _dropped(self, conn: object) -> None:
        """The listening connection closed: listen again at once, then take what a missed bell rang for."""
        self._wake.set()

    async def _take_hand_offs(self) -> None:
        """Run the messages other replicas handed to this one: on the bell, and every ``renew_s``.
        A listening connection that dropped is opened again first (each round until it is)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._renew_s):  # (not wait_for: it can drop a cancel on 3.11)
                    await self._wake.wait()
            self._wake.clear()
            if self._listener is None or self._listener.is_closed():
                try:
                    await self._listen()
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    _log.warning("hand-offs: cannot listen to PostgreSQL (%s); trying again", exc)
                else:
                    _log.info("hand-offs: listening again; taking what was handed over meanwhile")
            try:
                rows = await self._store.pool.fetch(
                    "DELETE FROM handoffs WHERE (tenant_id, session_id, message_id) IN ("
                    "SELECT tenant_id, session_id, message_id FROM handoffs WHERE replica = $1 "
                    "LIMIT 500 FOR UPDATE SKIP LOCKED) RETURNING tenant_id, session_id, message_id",
                    self.replica_id,
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                _log.warning("hand-offs: cannot reach PostgreSQL (%s); trying again", exc)
                continue
            except Exception:  # never let the loop end silently
                _log.exception("hand-offs: reading the queue failed; trying again")
                continue
            assert self._run is not None
            waiting, failed = list(rows), []
            try:
                while waiting:
                    row = waiting[0]
                    try:
                        await self._run(HandOff(row[0], row[1], row[2]))
                    except Exception:
                        _log.exception("could not start handed-off message %s; trying again", row[2])
                        failed.append(row)
                    waiting.pop(0)
            finally:
                # Taken but not started (a failure, or this replica stopping): back in the table,
                # for this replica's next round or the next owner's take-over, never dropped.
                if failed or waiting:
                    with contextlib.suppress(Exception):
                        await self._hand_back([*failed, *waiting])
            if len(rows) == 500:
                self._wake.set()

    async def _hand_back(
        self, rows: Sequence[Sequence[str]], conn: asyncpg.Connection | asyncpg.Pool | None = None
    ) -> None:
        """Put (tenant id, session id, message id) hand-offs back in the table, for this replica."""
        await (conn or self._store.pool).execute(
            "INSERT INTO handoffs (tenant_id, session_id, message_id, replica) "
            "SELECT t, s, m, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, s, m) "
            "ON CONFLICT DO NOTHING",
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            self.replica_id,
        )


def _columns(keys: Collection[SessionKey]) -> tuple[list[str], list[str]]:
    return [k[0] for k in keys], [k[1] for k in keys]


async def check_fence(conn: asyncpg.Connection, key: SessionKey, owner: str, fence: int) -> None:
    """Refuse (``LeaseLost``) a write of the owner whose lease moved on. The row stays key-share
    locked until the write commits: a take-over (which changes the fence, a key column) waits for
    it and then sees it, while a renewal (the expiry only) never waits, so a transaction carrying
    writes of several sessions cannot deadlock with the renewal of their leases."""
    held = await conn.fetchval(
        "SELECT fence FROM leases WHERE tenant_id = $1 AND session_id = $2 AND owner = $3 FOR KEY SHARE",
        *key,
        owner,
    )
    if held != fence:
        raise LeaseLost(
            f"session {key[1]!r} is now run by another replica; this one's lease ended",
            metadata={"session_id": key[1]},
        )


async def record_hand_offs(
    conn: asyncpg.Connection, key: SessionKey, message_ids: list[str], prefix: str
) -> None:
    """Hand new messages to the session's owner and ring it, on its own channel (``prefix`` and
    its id: ``replica_channel``; delivered only if the write commits)."""
    owner = await conn.fetchval(
        "SELECT owner FROM leases WHERE tenant_id = $1 AND session_id = $2 FOR KEY SHARE", *key
    )
    await conn.execute(
        "INSERT INTO handoffs (tenant_id, session_id, message_id, replica) "
        "SELECT $1, $2, m, $3 FROM unnest($4::text[]) AS m",
        *key,
        owner or "",
        message_ids,
    )
    if owner:
        await conn.execute("SELECT pg_notify($1, $2)", replica_channel(prefix, owner), owner)
