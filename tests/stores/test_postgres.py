"""What the PostgreSQL store adds to the contract: several replicas on one schema, the
group commit, and the schema checks at connect. Runs against a real PostgreSQL server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from dataclasses import replace

import asyncpg
import pytest

from svantic_grpc.core.errors import AlreadyExists, Conflict
from svantic_grpc.core.events import StatusChanged
from svantic_grpc.core.models import SessionStatus
from svantic_grpc.core.ownership import LeaseLost
from svantic_grpc.core.store import AuditRecord, Change
from svantic_grpc.stores._pg_bell import bell_of
from svantic_grpc.stores._schema import ForeignDatabaseError, StoreVersionError
from svantic_grpc.stores.postgres import PostgresStore
from tests import _postgres
from tests.stores.test_contract import T0, make_message, make_session


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    _postgres.require_postgres()
    name = _postgres.new_schema()
    try:
        yield name
    finally:
        await _postgres.drop_schema(name)


async def _replicas(schema: str, count: int) -> list[PostgresStore]:
    return list(await asyncio.gather(*(_postgres.fresh_store(schema) for _ in range(count))))


async def test_replicas_racing_one_update_have_one_winner(schema: str) -> None:
    stores = await _replicas(schema, 3)
    try:
        created = await stores[0].create_session(make_session())
        for round_ in range(10):
            read = await stores[0].get_session(tenant_id="acme", session_id="s1")
            assert read is not None
            results = await asyncio.gather(
                *(s.update_session(replace(read, user_id=f"r{round_}-{n}")) for n, s in enumerate(stores)),
                return_exceptions=True,
            )
            winners = [r for r in results if not isinstance(r, BaseException)]
            losers = [r for r in results if isinstance(r, BaseException)]
            assert len(winners) == 1 and all(isinstance(e, Conflict) for e in losers), results
            stored = await stores[1].get_session(tenant_id="acme", session_id="s1")
            assert stored == winners[0] and stored.version == created.version + round_ + 1
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_replicas_appending_to_one_log_number_it_without_gaps_or_collisions(schema: str) -> None:
    stores = await _replicas(schema, 3)
    payload = StatusChanged(SessionStatus.ACTIVE, SessionStatus.PAUSED)
    try:

        async def append(store: PostgresStore, n: int) -> list[int]:
            events = await store.append_events(
                tenant_id="acme", session_id="s1", time=T0, payloads=(payload,) * (1 + n % 3)
            )
            return [e.sequence for e in events]

        numbered = await asyncio.gather(*(append(stores[n % 3], n) for n in range(60)))
        handed_out = sorted(seq for batch in numbered for seq in batch)
        assert handed_out == list(range(1, len(handed_out) + 1))
        assert all(batch == list(range(batch[0], batch[0] + len(batch))) for batch in numbered)
        logged = await stores[2].list_events(tenant_id="acme", session_id="s1", limit=1000)
        assert [e.sequence for e in logged] == handed_out
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_writes_that_arrive_together_share_a_transaction_and_fail_alone(schema: str) -> None:
    (store,) = await _replicas(schema, 1)
    try:
        first = await store.create_session(make_session("s1"))
        writes = [store.create_session(make_session(f"new-{n}")) for n in range(5)] + [
            store.update_session(replace(first, version=99))
        ]  # stale: fails alone
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert isinstance(results[-1], Conflict)
        assert all(not isinstance(r, BaseException) for r in results[:-1])
        for n in range(5):
            assert await store.get_session(tenant_id="acme", session_id=f"new-{n}") is not None
    finally:
        await store.close()


async def test_a_schema_written_by_newer_code_is_refused_untouched(schema: str) -> None:
    (store,) = await _replicas(schema, 1)
    await store.create_session(make_session())
    await store.close()
    conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
    try:
        await conn.execute(f'UPDATE "{schema}".svantic_meta SET version = 99')
        with pytest.raises(StoreVersionError, match="newer than this svantic-grpc"):
            await _postgres.fresh_store(schema)
        assert await conn.fetchval(f'SELECT version FROM "{schema}".svantic_meta') == 99
        assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".sessions') == 1
    finally:
        await conn.close()


async def test_a_schema_of_another_program_is_refused(schema: str) -> None:
    conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'CREATE TABLE "{schema}".orders (id int)')
    finally:
        await conn.close()
    with pytest.raises(ForeignDatabaseError, match="another program"):
        await _postgres.fresh_store(schema)


async def test_replicas_starting_together_migrate_once(schema: str) -> None:
    stores = await _replicas(schema, 4)  # connect() runs at once on all four
    try:
        await stores[0].create_session(make_session())
        assert await stores[3].get_session(tenant_id="acme", session_id="s1") is not None
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_an_unreachable_server_is_a_plain_error_without_the_password() -> None:
    store = PostgresStore("postgresql://mesh:hunter2@127.0.0.1:1/none")
    with pytest.raises(ValueError, match="cannot connect to PostgreSQL") as excinfo:
        await store.connect()
    assert "hunter2" not in str(excinfo.value)


class _Rings:
    """What a bell rang, and a way to wait for a ring."""

    def __init__(self) -> None:
        self.rung: list[list[tuple[str, str]] | None] = []
        self._new = asyncio.Event()

    def __call__(self, keys: Collection[tuple[str, str]] | None) -> None:
        self.rung.append(None if keys is None else sorted(keys))
        self._new.set()

    async def until(self, ring: list[tuple[str, str]] | None) -> list[list[tuple[str, str]] | None]:
        """Wait for ``ring``; returns (and forgets) every ring up to it."""
        while ring not in self.rung:
            self._new.clear()
            await asyncio.wait_for(self._new.wait(), timeout=10)
        heard = self.rung[: self.rung.index(ring) + 1]
        del self.rung[: len(heard)]
        return heard


def _key(session_id: str) -> tuple[str, str]:
    return ("acme", session_id)


async def test_a_replica_hears_the_bell_only_of_the_sessions_it_watches(schema: str) -> None:
    writer, reader = await _replicas(schema, 2)
    bell, rings = reader.event_bell(), _Rings()
    bell.LINGER_S = 0.0
    payload = StatusChanged(SessionStatus.ACTIVE, SessionStatus.PAUSED)
    # Sessions on channels of their own (a channel carries several sessions, named in the payload).
    ids = [f"s{n}" for n in range(40)]
    channels = {bell_of(reader.bell_prefix, *_key(s))[0]: s for s in ids}
    watched, other, marker = list(channels.values())[:3]

    async def append(session_id: str) -> None:
        await writer.append_events(tenant_id="acme", session_id=session_id, time=T0, payloads=(payload,))

    await bell.start(rings)
    try:
        await append(watched)  # before anything is watched: rings nobody
        bell.watch(_key(watched))
        # Once it listens, the bell rings for the session: what was written before is read from the log.
        assert await rings.until([_key(watched)]) == [[_key(watched)]]
        bell.watch(_key(marker))
        await rings.until([_key(marker)])
        await append(other)
        await append(watched)
        await append(marker)
        # Rings arrive in commit order: the marker's comes last, after the watched session's,
        # and the session nobody here watches woke nobody.
        assert await rings.until([_key(marker)]) == [[_key(watched)], [_key(marker)]]
        bell.unwatch(_key(watched))
        for _ in range(100):  # let go of a little after its last watcher left
            await append(watched)
            await append(marker)
            if await rings.until([_key(marker)]) == [[_key(marker)]]:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the bell still rings for a session nobody watches")
    finally:
        await bell.stop()
        await asyncio.gather(writer.close(), reader.close())


async def test_a_bell_whose_connection_dropped_listens_again_and_rings_for_everything(schema: str) -> None:
    writer, reader = await _replicas(schema, 2)
    bell, rings = reader.event_bell(), _Rings()
    payload = StatusChanged(SessionStatus.ACTIVE, SessionStatus.PAUSED)
    await bell.start(rings)
    try:
        bell.watch(_key("s1"))
        await rings.until([_key("s1")])
        channel, _ = bell_of(reader.bell_prefix, *_key("s1"))
        conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
        try:  # the bell's own connection (the last thing it did was listen), cut by the server
            cut = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query = $1",
                f'LISTEN "{channel}"',
            )
            assert cut == 1
        finally:
            await conn.close()
        # Rings sent while it was away are lost: it rings for every watched session once back...
        await rings.until(None)
        # ...and hears the session's bell again.
        await writer.append_events(tenant_id="acme", session_id="s1", time=T0, payloads=(payload,))
        await rings.until([_key("s1")])
    finally:
        await bell.stop()
        await asyncio.gather(writer.close(), reader.close())


async def test_a_write_failing_in_sql_fails_alone_and_the_others_of_its_batch_land(schema: str) -> None:
    (store,) = await _replicas(schema, 1)
    payload = StatusChanged(SessionStatus.ACTIVE, SessionStatus.PAUSED)
    try:
        await store.create_session(make_session("s1"))
        taken = make_message("m1")
        await store.create_message_with_events(taken, time=T0, payloads=(payload,))
        writes = [
            store.create_message_with_events(make_message(f"m{n}"), time=T0, payloads=(payload,) * 2)
            for n in range(2, 6)
        ] + [
            store.create_message_with_events(taken, time=T0, payloads=(payload,)),  # its key is taken
            store.create_session(make_session("s1")),  # so is this one's
        ]
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert all(isinstance(r, AlreadyExists) for r in results[-2:]), results
        assert all(not isinstance(r, BaseException) for r in results[:-2]), results
        for n in range(2, 6):
            assert await store.get_message(tenant_id="acme", session_id="s1", message_id=f"m{n}") is not None
        logged = await store.list_events(tenant_id="acme", session_id="s1")
        assert [e.sequence for e in logged] == list(range(1, 1 + 1 + 4 * 2))  # no gap, nothing twice
    finally:
        await store.close()


async def test_a_write_with_events_whose_fence_moved_on_writes_nothing(schema: str) -> None:
    (store,) = await _replicas(schema, 1)
    payload = StatusChanged(SessionStatus.ACTIVE, SessionStatus.PAUSED)
    key = _key("s1")
    try:
        await store.create_session(make_session("s1"))
        created, _ = await store.create_message_with_events(make_message("m1"), time=T0, payloads=(payload,))
        await store.pool.execute(
            "INSERT INTO leases (tenant_id, session_id, owner, fence, expires_at) "
            "VALUES ($1, $2, 'r1', 2, 1e12)",
            *key,
        )
        store.replica_id, store.fences[key] = "r1", 1  # a fence the lease row moved on from
        before = await store.list_events(tenant_id="acme", session_id="s1")
        stale = [
            store.create_message_with_events(make_message("m2"), time=T0, payloads=(payload,)),
            store.update_message_with_events(created, time=T0, payloads=lambda m: (payload,)),
            store.append_events(tenant_id="acme", session_id="s1", time=T0, payloads=(payload,)),
        ]
        for write in stale:
            with pytest.raises(LeaseLost):
                await write
        assert await store.list_events(tenant_id="acme", session_id="s1") == before
        assert await store.get_message(tenant_id="acme", session_id="s1", message_id="m2") is None
        stored = await store.get_message(tenant_id="acme", session_id="s1", message_id="m1")
        assert stored == created
        store.fences[key] = 2  # the fence the row holds: the owner's writes land
        await store.update_message_with_events(created, time=T0, payloads=lambda m: (payload,))
        assert len(await store.list_events(tenant_id="acme", session_id="s1")) == len(before) + 1
    finally:
        await store.close()


async def test_a_write_chosen_as_a_deadlocks_victim_runs_again_and_lands(schema: str) -> None:
    # found from outside (review 5, F11): two replicas' writes locked one session's rows in opposite
    # orders; PostgreSQL aborted one of them and its caller got INTERNAL for a write that was lost.
    # Here another connection holds the session's row and then waits for its event log's head,
    # which the store's write holds while it waits for the row: the store's write (detecting the
    # deadlock first) is the victim.
    [store] = await _replicas(schema, 1)
    other = await asyncpg.connect(_postgres.POSTGRES_DSN, server_settings={"search_path": schema})
    try:
        session = await store.create_session(make_session())
        await store.write(
            Change("acme", "s1", events=(StatusChanged(SessionStatus.ACTIVE, SessionStatus.PAUSED),))
        )
        record = AuditRecord("acme", "r1", "s1", "m1", "tool_approval", "approve", "ada", "grpc", T0)
        paused = replace(session, status=SessionStatus.PAUSED)
        change = Change(
            "acme",
            "s1",
            sessions=(paused,),
            audit=(record,),  # (the write of several statements: its events first, then the records)
            events=(StatusChanged(SessionStatus.ACTIVE, SessionStatus.PAUSED),),
        )
        async with other.transaction():
            await other.execute("SET LOCAL deadlock_timeout = '20s'")  # so the store detects it first
            await other.execute("UPDATE sessions SET version = version WHERE session_id = 's1'")
            writing = asyncio.create_task(store.write(change))
            await asyncio.sleep(0.3)  # it holds the log's head and waits for the session's row
            await other.execute(
                "UPDATE event_heads SET last_sequence = last_sequence WHERE session_id = 's1'"
            )
        written = await asyncio.wait_for(writing, 30)
        assert written.sessions[0].status is SessionStatus.PAUSED
        assert [e.sequence for e in written.events] == [2]
        stored = await store.get_session(tenant_id="acme", session_id="s1")
        assert stored is not None and stored.status is SessionStatus.PAUSED
    finally:
        await other.close()
        await store.close()


async def test_reads_go_on_after_the_server_ended_the_connections_kept_for_them(schema: str) -> None:
    (store,) = await _replicas(schema, 1)
    try:
        await store.create_session(make_session("s1"))
        # Several reads at once: the store keeps more than one connection for reads after them.
        await asyncio.gather(*(store.get_session(tenant_id="acme", session_id="s1") for _ in range(4)))
        kept = [conn.get_server_pid() for conn in store._readers]
        assert kept
        conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
        try:
            cut = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM unnest($1::int[]) AS pid", kept
            )
            assert cut == len(kept)
        finally:
            await conn.close()
        await asyncio.sleep(0.2)  # the client sees its connections closed
        for _ in range(3):
            stored = await store.get_session(tenant_id="acme", session_id="s1")
            assert stored is not None and stored.session_id == "s1"
    finally:
        await store.close()


async def test_a_cancelled_read_leaves_reads_working_and_the_store_closes(schema: str) -> None:
    (store,) = await _replicas(schema, 1)
    closed = False
    try:
        await store.create_session(make_session("s1"))
        slow = asyncio.create_task(store._fetchval("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.3)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        stored = await asyncio.wait_for(store.get_session(tenant_id="acme", session_id="s1"), 3)
        assert stored is not None
        await asyncio.wait_for(store.close(), 5)  # every connection went back to the pool
        closed = True
    finally:
        if not closed:
            await store.close()
