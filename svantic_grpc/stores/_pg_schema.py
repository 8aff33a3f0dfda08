"""The PostgreSQL store's schema, its forward migrations, and the checks made at connect.

The store keeps its tables in one schema of the database (``svantic`` unless settings
say otherwise), so it can share a database with other programs. The schema's
version lives in its ``svantic_meta`` table. Migration ``n`` (``MIGRATIONS[n - 1]``)
takes it from version ``n - 1`` to ``n``; pending ones run at connect in one
transaction under an advisory lock, so replicas starting together migrate it
exactly once, and a failed migration leaves it as it was.

As in the SQLite store, each table keeps the full record as JSON text (key order
kept, which ``jsonb`` would not) beside the columns the store filters and sorts on,
and the integer ``version`` its conditional updates compare. Event and audit
numbers come from one counter row per session and per tenant (``event_heads``,
``audit_heads``): an upsert on it serialises appenders across replicas.
"""

from __future__ import annotations

import zlib

import asyncpg

from svantic_grpc.stores._schema import ForeignDatabaseError, StoreVersionError

__all__ = ["MIGRATIONS", "prepare", "schema_version"]

_V1 = (
    """CREATE TABLE sessions (
        tenant_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        closed_at DOUBLE PRECISION,
        version BIGINT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (tenant_id, session_id)
    )""",
    "CREATE INDEX sessions_by_created ON sessions (tenant_id, created_at, session_id)",
    "CREATE INDEX sessions_open ON sessions (created_at) WHERE status <> 'closed'",
    "CREATE INDEX sessions_closed ON sessions (closed_at) WHERE status = 'closed'",
    """CREATE TABLE agents (
        tenant_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        agent_type TEXT NOT NULL,
        version BIGINT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (tenant_id, instance_id)
    )""",
    "CREATE INDEX agents_by_type ON agents (tenant_id, agent_type, instance_id)",
    """CREATE TABLE messages (
        tenant_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        sort_key TEXT NOT NULL,
        version BIGINT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (tenant_id, session_id, message_id)
    )""",
    "CREATE INDEX messages_by_created ON messages (tenant_id, created_at, sort_key)",
    "CREATE INDEX messages_by_session ON messages (tenant_id, session_id, created_at, sort_key)",
    "CREATE INDEX messages_unfinished ON messages (created_at) "
    "WHERE state NOT IN ('completed', 'failed', 'canceled', 'rejected')",
    """CREATE TABLE inputs (
        tenant_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        version BIGINT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (tenant_id, request_id)
    )""",
    "CREATE INDEX inputs_by_created ON inputs (tenant_id, created_at, request_id)",
    "CREATE INDEX inputs_by_session ON inputs (tenant_id, session_id, created_at, request_id)",
    "CREATE INDEX inputs_by_message ON inputs (tenant_id, message_id)",
    "CREATE INDEX inputs_pending ON inputs (created_at) WHERE state = 'pending'",
    """CREATE TABLE audit_heads (
        tenant_id TEXT PRIMARY KEY,
        last_sequence BIGINT NOT NULL
    )""",
    """CREATE TABLE audit (
        tenant_id TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        request_id TEXT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (tenant_id, sequence)
    )""",
    "CREATE INDEX audit_by_request ON audit (tenant_id, request_id, sequence)",
    """CREATE TABLE event_heads (
        tenant_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        last_sequence BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, session_id)
    )""",
    """CREATE TABLE events (
        tenant_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (tenant_id, session_id, sequence)
    )""",
    """CREATE TABLE adapter_values (
        adapter TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (adapter, key)
    )""",
)

_V2 = (
    # Sessions by tenant and status in page order: a ListSessions page filtered on a status
    # reads only its rows, however many sessions of other statuses the tenant has.
    "CREATE INDEX sessions_by_status ON sessions (tenant_id, status, created_at, session_id)",
)

_V3 = (
    # Session ownership across replicas (stores/_pg_leases.py): one lease per session a replica runs.
    """CREATE TABLE leases (
        tenant_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        fence BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant_id, session_id),
        -- Makes the fence a key column: an owner's write holds FOR KEY SHARE on its lease, which a
        -- take-over (a new fence) waits for and a renewal (a new expiry only) does not.
        UNIQUE (tenant_id, session_id, fence)
    )""",
    "CREATE INDEX leases_by_expiry ON leases (expires_at)",
    "CREATE INDEX leases_by_owner ON leases (owner)",
    # Messages accepted by one replica for a session another one owns, until the owner takes them.
    """CREATE TABLE handoffs (
        tenant_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        replica TEXT NOT NULL,
        PRIMARY KEY (tenant_id, session_id, message_id)
    )""",
    "CREATE INDEX handoffs_by_replica ON handoffs (replica)",
)

_V4 = (
    # What replicas send each other about dispatches to connected agents another replica holds
    # (``_pg_relay``): one row per item, taken (deleted) by the replica it names, in id order.
    """CREATE TABLE relay (
        id BIGSERIAL PRIMARY KEY,
        replica TEXT NOT NULL,
        item TEXT NOT NULL
    )""",
    "CREATE INDEX relay_by_replica ON relay (replica, id)",
)

_V5 = (
    # Adapter values may belong to a session (the A2A task index, webhook winners, Slack posts):
    # retention deletes them with it.
    "ALTER TABLE adapter_values ADD COLUMN tenant_id TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE adapter_values ADD COLUMN session_id TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX adapter_values_by_session ON adapter_values (tenant_id, session_id) WHERE session_id <> ''",
)

_V6 = (
    # No table changes: event bells ring a channel per session (one of 1024 per schema) instead of
    # one channel for the schema. Replicas of both kinds on one schema would not hear each other's
    # bells, so older code refuses to start on a schema this version has touched.
    "COMMENT ON TABLE svantic_meta IS 'svantic-grpc: event bells on per-session channels since version 6'",
)

_V7 = (
    # Ended requests whose outcome the adapters have not been told yet (told again at start-up).
    "ALTER TABLE inputs ADD COLUMN untold BOOLEAN NOT NULL DEFAULT false",
    "CREATE INDEX inputs_untold ON inputs (tenant_id, session_id) WHERE untold",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4, _V5, _V6, _V7)
"""Forward migrations, each a list of statements; append only. The code's schema version is their count."""

_MARK = "svantic-grpc"
"""What ``svantic_meta.application`` says in a schema that is ours."""


def schema_version() -> int:
    """The schema version this code writes."""
    return len(MIGRATIONS)


async def prepare(conn: asyncpg.Connection, schema: str) -> None:
    """Create or migrate ``schema`` forward; refuse one that is newer or not ours.

    Raises:
        ForeignDatabaseError: the schema holds tables but is not a svantic-grpc store.
        StoreVersionError: written by newer code.
    """
    quoted = _quote(schema)
    async with conn.transaction():
        # Replicas starting at once: one migrates, the others wait here and then find it done.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", zlib.crc32(f"svantic:{schema}".encode()))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        current = await _our_version(conn, schema)
        if current > schema_version():
            raise StoreVersionError(
                f"PostgreSQL schema {schema!r} has version {current}, newer than this svantic-grpc "
                f"supports ({schema_version()}); upgrade svantic-grpc or use another schema"
            )
        if current == 0:
            await conn.execute(
                f"CREATE TABLE {quoted}.svantic_meta (application TEXT NOT NULL, version INTEGER NOT NULL)"
            )
            await conn.execute(f"INSERT INTO {quoted}.svantic_meta VALUES ($1, 0)", _MARK)
        await conn.execute(f"SET LOCAL search_path TO {quoted}")
        for statements in MIGRATIONS[current:]:
            for statement in statements:
                await conn.execute(statement)
        await conn.execute(f"UPDATE {quoted}.svantic_meta SET version = $1", schema_version())


async def _our_version(conn: asyncpg.Connection, schema: str) -> int:
    """The schema version of our store in ``schema`` (0 for a new, empty schema)."""
    tables = {
        row["table_name"]
        for row in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
    }
    if "svantic_meta" not in tables:
        if tables:
            raise ForeignDatabaseError(
                f"PostgreSQL schema {schema!r} holds tables of another program "
                f"({', '.join(sorted(tables)[:5])}); refusing to use it: "
                "name another schema in settings (postgres.schema_name)"
            )
        return 0
    row = await conn.fetchrow(f"SELECT application, version FROM {_quote(schema)}.svantic_meta")
    if row is None or row["application"] != _MARK:
        raise ForeignDatabaseError(
            f"PostgreSQL schema {schema!r} is not a svantic-grpc store; refusing to use it"
        )
    return int(row["version"])


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
