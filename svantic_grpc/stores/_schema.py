"""The SQLite store's schema, its forward migrations, and the checks made at open.

A database file is ours when its header carries our ``application_id``; its
schema version is ``PRAGMA user_version``. Both live in the SQLite header, so
they change in the same transaction as the tables they describe. Migration
``n`` (``MIGRATIONS[n - 1]``) takes a database from version ``n - 1`` to ``n``;
pending ones run at open inside one ``BEGIN IMMEDIATE`` transaction, so two
processes opening the same file at once migrate it exactly once, and a failed
migration leaves the file as it was.

Each table keeps the full record as JSON (``stores._codec``) beside the columns
the store filters and sorts on, plus the integer ``version`` its conditional
updates compare.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "ForeignDatabaseError",
    "StoreVersionError",
    "prepare",
    "schema_version",
]

APPLICATION_ID = int.from_bytes(b"SVGR", "big")
"""Marks a SQLite file as a svantic-grpc store (``PRAGMA application_id``)."""


class StoreVersionError(ValueError):
    """The database was written by a newer svantic-grpc; this code will not touch it."""


class ForeignDatabaseError(ValueError):
    """The file is not a svantic-grpc database (not SQLite, corrupted, or another program's)."""


Migration = Callable[[sqlite3.Connection], None]


def _v1(conn: sqlite3.Connection) -> None:
    """The first schema: one table per record kind, indexed for the store's queries."""
    for statement in (
        """CREATE TABLE sessions (
            tenant_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            version INTEGER NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (tenant_id, session_id)
        )""",
        "CREATE INDEX sessions_by_created ON sessions (tenant_id, created_at, session_id)",
        "CREATE INDEX sessions_open ON sessions (status) WHERE status != 'closed'",
        """CREATE TABLE agents (
            tenant_id TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            agent_type TEXT NOT NULL,
            version INTEGER NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (tenant_id, instance_id)
        )""",
        "CREATE INDEX agents_by_type ON agents (tenant_id, agent_type, instance_id)",
        # sort_key is "<session_id>/<message_id>": the tie-breaker the page cursors carry.
        """CREATE TABLE messages (
            tenant_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            sort_key TEXT NOT NULL,
            version INTEGER NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (tenant_id, session_id, message_id)
        )""",
        "CREATE INDEX messages_by_created ON messages (tenant_id, created_at, sort_key)",
        "CREATE INDEX messages_by_session ON messages (tenant_id, session_id, created_at, sort_key)",
        "CREATE INDEX messages_unfinished ON messages (state) WHERE state NOT IN "
        "('completed', 'failed', 'canceled', 'rejected')",
        """CREATE TABLE inputs (
            tenant_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            version INTEGER NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (tenant_id, request_id)
        )""",
        "CREATE INDEX inputs_by_created ON inputs (tenant_id, created_at, request_id)",
        "CREATE INDEX inputs_by_session ON inputs (tenant_id, session_id, created_at, request_id)",
        "CREATE INDEX inputs_by_message ON inputs (tenant_id, message_id)",
        "CREATE INDEX inputs_pending ON inputs (state) WHERE state = 'pending'",
        """CREATE TABLE audit (
            tenant_id TEXT NOT NULL,
            sequence INTEGER NOT NULL,
            request_id TEXT NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (tenant_id, sequence)
        )""",
        "CREATE INDEX audit_by_request ON audit (tenant_id, request_id, sequence)",
        """CREATE TABLE events (
            tenant_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            sequence INTEGER NOT NULL,
            time REAL NOT NULL,
            payload TEXT NOT NULL,
            PRIMARY KEY (tenant_id, session_id, sequence)
        ) WITHOUT ROWID""",
    ):
        conn.execute(statement)


def _v2(conn: sqlite3.Connection) -> None:
    """Small JSON values adapters keep across restarts (e.g. where a Slack post is)."""
    conn.execute(
        """CREATE TABLE adapter_values (
            adapter TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (adapter, key)
        ) WITHOUT ROWID"""
    )


def _v3(conn: sqlite3.Connection) -> None:
    """Closed sessions by when they closed, for the retention sweep (no new column to keep in step)."""
    conn.execute(
        "CREATE INDEX sessions_closed ON sessions (json_extract(record, '$.closed_at')) "
        "WHERE status = 'closed'"
    )


def _v4(conn: sqlite3.Connection) -> None:
    """Sessions by tenant and status in page order: a ListSessions page filtered on a status reads
    only its rows, however many sessions of other statuses the tenant has."""
    conn.execute("CREATE INDEX sessions_by_status ON sessions (tenant_id, status, created_at, session_id)")


def _v5(conn: sqlite3.Connection) -> None:
    """Adapter values may belong to a session (the A2A task index, webhook winners, Slack posts):
    retention deletes them with it."""
    conn.execute("ALTER TABLE adapter_values ADD COLUMN tenant_id TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE adapter_values ADD COLUMN session_id TEXT NOT NULL DEFAULT ''")
    conn.execute(
        "CREATE INDEX adapter_values_by_session ON adapter_values (tenant_id, session_id) "
        "WHERE session_id != ''"
    )


def _v6(conn: sqlite3.Connection) -> None:
    """Ended requests whose outcome the adapters have not been told yet (told again at start-up)."""
    conn.execute("ALTER TABLE inputs ADD COLUMN untold INTEGER NOT NULL DEFAULT 0")
    conn.execute("CREATE INDEX inputs_untold ON inputs (tenant_id, session_id) WHERE untold = 1")


MIGRATIONS: tuple[Migration, ...] = (_v1, _v2, _v3, _v4, _v5, _v6)
"""Forward migrations; append only. The code's schema version is their count."""


def schema_version() -> int:
    """The schema version this code writes."""
    return len(MIGRATIONS)


def prepare(conn: sqlite3.Connection, path: str, *, busy_timeout_ms: int) -> None:
    """Make a fresh connection ready: pragmas, refuse what is not ours, migrate forward.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Runs on the
    connection's thread.

    Raises:
        ForeignDatabaseError: not SQLite, corrupted, or another program's database.
        StoreVersionError: written by newer code.
    """
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    current = _our_version(conn, path)
    # WAL lets readers run beside the one writer and, with synchronous=NORMAL, a commit
    # survives the process being killed (an OS crash may lose the last commits).
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise ForeignDatabaseError(f"{path}: cannot use write-ahead logging (journal mode stays {mode!r})")
    conn.execute("PRAGMA synchronous = NORMAL")
    if current == schema_version():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        current = _our_version(conn, path)
        for migration in MIGRATIONS[current:]:
            migration(conn)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {schema_version()}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _our_version(conn: sqlite3.Connection, path: str) -> int:
    """The schema version of our database at ``conn`` (0 for a new, empty one)."""
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        has_objects = conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None
    except sqlite3.DatabaseError as exc:
        raise ForeignDatabaseError(
            f"{path} is not a svantic-grpc database, or it is damaged ({exc}); refusing to use it"
        ) from exc
    if application_id == APPLICATION_ID:
        if version > schema_version():
            raise StoreVersionError(
                f"{path} has schema version {version}, newer than this svantic-grpc supports "
                f"({schema_version()}); upgrade svantic-grpc or use another file"
            )
        return int(version)
    if application_id == 0 and version == 0 and not has_objects:
        return 0  # a new database: ours to create
    raise ForeignDatabaseError(
        f"{path} is a SQLite database of another program (application_id {application_id}, "
        f"user_version {version}); refusing to use it"
    )
