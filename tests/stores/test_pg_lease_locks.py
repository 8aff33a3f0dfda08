"""Taking leases never waits behind a live owner's writes, and never deadlocks with them.

An owner's writes hold ``FOR KEY SHARE`` on their session's lease until they commit (a group
commit may hold several). A replica taking leases (a non-owner asked for a message, or one
starting up and claiming every open session) must skip a live lease at once, not lock it: an
``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` locks the row even when its WHERE fails, which
made a claim wait behind the owner's write and, with two sessions, deadlock with its group commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from svantic_grpc.stores._pg_leases import _TAKE_FREE, _TAKE_HELD
from svantic_grpc.stores.postgres import PostgresStore
from tests import _postgres

_OWNER_WRITE = (
    "SELECT fence FROM leases WHERE tenant_id = 't' AND session_id = $1 AND owner = 'A' FOR KEY SHARE"
)


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    _postgres.require_postgres()
    name = _postgres.new_schema()
    store = PostgresStore(_postgres.POSTGRES_DSN, schema=name, pool_size=2)
    await store.connect()  # the real tables, at the code's schema version
    await store.close()
    try:
        conn = await asyncpg.connect(_postgres.POSTGRES_DSN, server_settings={"search_path": name})
        try:
            await conn.execute(
                "INSERT INTO leases VALUES ('t', 'x', 'A', 1, extract(epoch from clock_timestamp()) + 100), "
                "('t', 'y', 'A', 1, extract(epoch from clock_timestamp()) + 100)"
            )
        finally:
            await conn.close()
        yield name
    finally:
        await _postgres.drop_schema(name)


async def _take(conn: asyncpg.Connection, keys: list[str]) -> list[asyncpg.Record]:
    async with conn.transaction():
        held = await conn.fetch(_TAKE_HELD, ["t"] * len(keys), keys, "B", 10.0)
        free = await conn.fetch(_TAKE_FREE, ["t"] * len(keys), keys, "B", 10.0)
    return [*held, *free]


async def test_a_claim_skips_live_leases_under_an_owners_group_commit_without_deadlock(schema: str) -> None:
    settings = {"search_path": schema}
    owner = await asyncpg.connect(_postgres.POSTGRES_DSN, server_settings=settings)
    claimer = await asyncpg.connect(_postgres.POSTGRES_DSN, server_settings=settings)
    try:
        commit = owner.transaction()
        await commit.start()
        await owner.fetchval(_OWNER_WRITE, "y")  # the owner's group commit writes session y...
        taken = await asyncio.wait_for(_take(claimer, ["x", "y"]), 5)  # ...while B claims x and y
        assert taken == []  # both leases are live: nothing taken, and no wait
        assert await asyncio.wait_for(owner.fetchval(_OWNER_WRITE, "x"), 5) == 1  # then writes x
        await commit.commit()
    finally:
        await owner.close()
        await claimer.close()


async def test_an_expired_lease_or_a_free_session_is_taken_and_a_live_one_is_not(schema: str) -> None:
    conn = await asyncpg.connect(_postgres.POSTGRES_DSN, server_settings={"search_path": schema})
    try:
        await conn.execute("UPDATE leases SET expires_at = 0 WHERE session_id = 'x'")
        taken = {(r["session_id"], r["fence"]) for r in await _take(conn, ["x", "y", "z"])}
        assert taken == {("x", 2), ("z", 1)}  # x taken over (a new fence), z new; y still A's
        owners = dict(await conn.fetch("SELECT session_id, owner FROM leases"))
        assert owners == {"x": "B", "y": "A", "z": "B"}
    finally:
        await conn.close()
