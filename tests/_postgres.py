"""The PostgreSQL server the tests use, and fresh stores on it.

Tests reach PostgreSQL through one setting, ``SVANTIC_TEST_POSTGRES_DSN`` (default: the
local server on 127.0.0.1:5432, database ``test``, user ``postgres``). Each store gets a
schema of its own, dropped afterwards. Where no server answers, the PostgreSQL tests are
skipped with a reason that says how to run them; with ``SVANTIC_REQUIRE_POSTGRES=1`` (as
in ``.ci/run``) they fail instead, so CI never passes without them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from svantic_grpc.stores.postgres import PostgresStore
from tests._support import Client, running_server

POSTGRES_DSN = os.environ.get("SVANTIC_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@functools.cache
def _unreachable_reason() -> str:
    """Empty when the server answers; else why not (probed once per test run)."""

    async def probe() -> None:
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=3)
        await conn.close()

    # On a thread of its own: callers may be inside a running event loop.
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(lambda: asyncio.run(probe())).result()
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def require_postgres() -> None:
    """Skip (or, under ``SVANTIC_REQUIRE_POSTGRES=1``, fail) when no PostgreSQL server answers."""
    reason = _unreachable_reason()
    if not reason:
        return
    message = (
        f"PostgreSQL not reachable at {POSTGRES_DSN} ({reason}); these tests did not run. "
        "Start a server and set SVANTIC_TEST_POSTGRES_DSN=postgresql://user@host:port/db to run them."
    )
    if os.environ.get("SVANTIC_REQUIRE_POSTGRES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def new_schema() -> str:
    return f"svantic_test_{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def store_settings() -> AsyncIterator[dict[str, Any]]:
    """Server settings of a PostgreSQL store in a schema of its own, dropped afterwards."""
    require_postgres()
    schema = new_schema()
    try:
        yield {"store": POSTGRES_DSN, "postgres": {"schema_name": schema, "pool_size": 4}}
    finally:
        await drop_schema(schema)


async def fresh_store(schema: str | None = None) -> PostgresStore:
    """A connected store in a schema of its own."""
    require_postgres()
    store = PostgresStore(POSTGRES_DSN, schema=schema or new_schema(), pool_size=4)
    await store.connect()
    return store


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running_replicas(
    count: int, *, env: dict[str, str] | None = None, **settings: Any
) -> AsyncIterator[list[Client]]:
    """``count`` real servers in this process sharing one fresh schema (dropped afterwards), each
    with ``settings`` (short leases unless given)."""
    require_postgres()
    schema = new_schema()
    merged: dict[str, Any] = {
        "store": POSTGRES_DSN,
        "postgres": {"schema_name": schema, "pool_size": 4},
        "replica": {"lease_ms": 2000, "renew_ms": 500},
        **settings,
    }
    try:
        async with contextlib.AsyncExitStack() as stack:
            yield [await stack.enter_async_context(running_server(env=env, **merged)) for _ in range(count)]
    finally:
        await drop_schema(schema)
