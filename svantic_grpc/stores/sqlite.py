"""The durable store: one SQLite file through ``aiosqlite``.

Every store call is one trip to the connection's thread: a read is one
statement, a write runs in a ``BEGIN IMMEDIATE`` transaction. Writes that arrive
while another transaction is on the thread wait together and then share one
transaction and one commit (group commit), each in its own savepoint, so one
that fails rolls back alone and the others still land. Updates are
conditional on the integer ``version`` that was read, so two writers (two
coroutines, or two processes sharing the file) can never overwrite each other:
the loser gets ``Conflict``. Event and audit sequence numbers are taken inside
the write transaction, so appends from several processes never collide.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import aiosqlite

from svantic_grpc.core.errors import Conflict, NotFound, Unavailable
from svantic_grpc.core.events import Event, EventPayload
from svantic_grpc.core.evolve import evolve
from svantic_grpc.core.inputs.model import GRANTING_DECISIONS, InputRequest, InputState
from svantic_grpc.core.messages.model import Message, MessageState
from svantic_grpc.core.models import AgentRegistration, Session, SessionStatus
from svantic_grpc.core.store import (
    AuditRecord,
    Change,
    Changed,
    InputPage,
    MessagePage,
    SessionPage,
    Store,
)
from svantic_grpc.stores import _codec
from svantic_grpc.stores._batch import settle
from svantic_grpc.stores._copy import detach
from svantic_grpc.stores._cursor import decode_cursor, encode_cursor
from svantic_grpc.stores._kinds import Kinds, RecordKind, message_key
from svantic_grpc.stores._schema import ForeignDatabaseError, StoreVersionError, prepare

__all__ = ["ForeignDatabaseError", "SqliteStore", "StoreVersionError"]

T = TypeVar("T")
R = TypeVar("R", Session, AgentRegistration, Message, InputRequest)
Query = Callable[[sqlite3.Connection], T]


_UNFINISHED = "state NOT IN ('completed', 'failed', 'canceled', 'rejected')"
"""Messages whose state is not terminal (``TERMINAL_STATES``); the same text as their partial index."""

_KINDS = Kinds(lambda n: "?")
_SESSIONS, _AGENTS, _MESSAGES, _INPUTS = _KINDS.sessions, _KINDS.agents, _KINDS.messages, _KINDS.inputs


class SqliteStore(Store):
    """A store in one SQLite file; several processes may share the file.

    ``SqliteStore(path)`` opens nothing; ``await store.connect()`` opens the file
    (creating it and its directories if missing) and migrates its schema forward.
    ``await SqliteStore.open(path)`` does both. Close it when done.

    Args:
        path: The database file.
        busy_timeout_ms: How long a write waits for another writer's lock before failing.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000) -> None:
        self._path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._opening = asyncio.Lock()
        self._waiting: list[tuple[Query[Any], asyncio.Future[Any]]] = []
        """Writes queued for the next transaction, each with the future its caller awaits."""
        self._committer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000) -> SqliteStore:
        """A connected store on ``path`` (see ``connect``)."""
        store = cls(path, busy_timeout_ms=busy_timeout_ms)
        await store.connect()
        return store

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    async def connect(self) -> None:
        """Open (or create) the database file and migrate its schema forward; a no-op when open.

        Raises:
            ForeignDatabaseError: the file is not SQLite, is damaged, or belongs to another program.
            StoreVersionError: the file was written by a newer svantic-grpc.
        """
        async with self._opening:
            if self._db is not None:
                return
            path = self._path
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: sqlite3 opens no transactions behind our back; we issue BEGIN.
            connection = await aiosqlite.connect(path, isolation_level=None)
            timeout = self._busy_timeout_ms
            try:
                await _on_thread(connection, lambda conn: prepare(conn, str(path), busy_timeout_ms=timeout))
            except BaseException:
                await connection.close()
                raise
            self._db = connection

    async def close(self) -> None:
        committer = self._committer
        if committer is not None:
            await asyncio.wait([committer])  # writes already accepted are committed first
        connection, self._db = self._db, None
        if connection is not None:
            await connection.close()

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # Sessions

    async def create_session(self, session: Session) -> Session:
        return await self._insert(_SESSIONS, session)

    async def get_session(self, *, tenant_id: str, session_id: str) -> Session | None:
        return await self._get(_SESSIONS, (tenant_id, session_id))

    async def update_session(self, session: Session) -> Session:
        return await self._replace(_SESSIONS, session)

    async def list_sessions(
        self,
        *,
        tenant_id: str,
        statuses: Iterable[SessionStatus] = (),
        page_size: int = 50,
        cursor: str = "",
    ) -> SessionPage:
        after = decode_cursor(cursor) if cursor else None
        page_size = max(page_size, 0)
        # One indexed range per status (sessions_by_status, or sessions_by_created for all), each
        # read no further than the page: a page costs the same whatever the tenant's total.
        values: list[str | None] = [*sorted(s.value for s in set(statuses))] or [None]
        parts: list[str] = []
        params: list[Any] = []
        for value in values:
            where = "tenant_id = ?" + ("" if value is None else " AND status = ?")
            params.extend([tenant_id] if value is None else [tenant_id, value])
            if after is not None:
                where += " AND (created_at, session_id) < (?, ?)"
                params.extend(after)
            parts.append(
                f"SELECT * FROM (SELECT record, created_at, session_id FROM sessions WHERE {where} "
                f"ORDER BY created_at DESC, session_id DESC LIMIT ?)"
            )
            params.append(page_size + 1)
        sql = (
            f"SELECT record FROM ({' UNION ALL '.join(parts)}) "
            "ORDER BY created_at DESC, session_id DESC LIMIT ?"
        )
        params.append(page_size + 1)  # one more than asked tells whether a next page exists
        found = await self._read(lambda conn: _records(_SESSIONS, conn.execute(sql, params)))
        page, more = found[:page_size], len(found) > page_size
        last = page[-1] if page else None
        next_cursor = encode_cursor(last.created_at, last.session_id) if more and last else ""
        return SessionPage(tuple(page), next_cursor)

    async def open_sessions(self) -> Sequence[Session]:
        sql = "SELECT record FROM sessions WHERE status != 'closed' ORDER BY rowid"
        return await self._read(lambda conn: _records(_SESSIONS, conn.execute(sql)))

    # Agent registrations

    async def create_agent(self, agent: AgentRegistration) -> AgentRegistration:
        return await self._insert(_AGENTS, agent)

    async def get_agent(self, *, tenant_id: str, instance_id: str) -> AgentRegistration | None:
        return await self._get(_AGENTS, (tenant_id, instance_id))

    async def update_agent(self, agent: AgentRegistration) -> AgentRegistration:
        return await self._replace(_AGENTS, agent)

    async def delete_agent(self, *, tenant_id: str, instance_id: str, version: int) -> None:
        key = (tenant_id, instance_id)
        sql = _AGENTS.delete_sql

        def delete(conn: sqlite3.Connection) -> None:
            if conn.execute(sql, (*key, version)).rowcount == 0:
                _raise_lost(conn, _AGENTS, key, version, f"agent instance {instance_id!r}")

        await self._write(delete)

    async def list_agents(self, *, tenant_id: str, agent_type: str = "") -> Sequence[AgentRegistration]:
        where: list[str] = ["tenant_id = ?"]
        params: list[Any] = [tenant_id]
        if agent_type:
            where.append("agent_type = ?")
            params.append(agent_type)
        page, _ = await self._page(_AGENTS, where, params, "agent_type, instance_id", None)
        return page

    # Messages

    async def create_message(self, message: Message) -> Message:
        return await self._insert(_MESSAGES, message)

    async def get_message(self, *, tenant_id: str, session_id: str, message_id: str) -> Message | None:
        return await self._get(_MESSAGES, (tenant_id, session_id, message_id))

    async def find_message(self, *, tenant_id: str, message_id: str) -> Message | None:
        sql = "SELECT record FROM messages WHERE tenant_id = ? AND message_id = ? LIMIT 1"

        def find(conn: sqlite3.Connection) -> Message | None:
            row = conn.execute(sql, (tenant_id, message_id)).fetchone()
            return None if row is None else _MESSAGES.decode(_codec.loads(row[0]))

        return await self._read(find)

    async def update_message(self, message: Message) -> Message:
        return await self._replace(_MESSAGES, message)

    async def list_messages(
        self,
        *,
        tenant_id: str,
        session_id: str = "",
        states: Iterable[MessageState] = (),
        page_size: int = 50,
        cursor: str = "",
    ) -> MessagePage:
        after = decode_cursor(cursor) if cursor else None
        where: list[str] = ["tenant_id = ?"]
        params: list[Any] = [tenant_id]
        if session_id:
            where.append("session_id = ?")
            params.append(session_id)
        _any_of(where, params, "state", [s.value for s in set(states)])
        if after is not None:
            where.append("(created_at, sort_key) > (?, ?)")
            params.extend(after)
        page, more = await self._page(_MESSAGES, where, params, "created_at, sort_key", page_size)
        last = page[-1] if page else None
        next_cursor = encode_cursor(last.created_at, message_key(last)) if more and last else ""
        return MessagePage(tuple(page), next_cursor)

    async def unfinished_messages(self) -> Sequence[Message]:
        # The same condition as the messages_unfinished index, so SQLite can use it.
        sql = f"SELECT record FROM messages WHERE {_UNFINISHED} ORDER BY rowid"
        return await self._read(lambda conn: _records(_MESSAGES, conn.execute(sql)))

    # Input requests and their audit trail

    async def create_input(self, request: InputRequest) -> InputRequest:
        return await self._insert(_INPUTS, request)

    async def get_input(self, *, tenant_id: str, request_id: str) -> InputRequest | None:
        return await self._get(_INPUTS, (tenant_id, request_id))

    async def update_input(self, request: InputRequest) -> InputRequest:
        return await self._replace(_INPUTS, request)

    async def list_inputs(
        self,
        *,
        tenant_id: str,
        session_id: str = "",
        message_id: str = "",
        states: Iterable[InputState] = (),
        page_size: int = 50,
        cursor: str = "",
    ) -> InputPage:
        after = decode_cursor(cursor) if cursor else None
        where: list[str] = ["tenant_id = ?"]
        params: list[Any] = [tenant_id]
        for column, value in (("session_id", session_id), ("message_id", message_id)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        _any_of(where, params, "state", [s.value for s in set(states)])
        if after is not None:
            where.append("(created_at, request_id) > (?, ?)")
            params.extend(after)
        page, more = await self._page(_INPUTS, where, params, "created_at, request_id", page_size)
        last = page[-1] if page else None
        next_cursor = encode_cursor(last.created_at, last.request_id) if more and last else ""
        return InputPage(tuple(page), next_cursor)

    async def pending_inputs(self) -> Sequence[InputRequest]:
        sql = "SELECT record FROM inputs WHERE state = 'pending' ORDER BY rowid"
        return await self._read(lambda conn: _records(_INPUTS, conn.execute(sql)))

    async def untold_outcomes(self, *, tenant_id: str = "", session_id: str = "") -> Sequence[InputRequest]:
        if session_id:
            sql = (
                "SELECT record FROM inputs WHERE untold = 1 AND tenant_id = ? AND session_id = ? "
                "ORDER BY created_at, request_id"
            )
            return await self._read(
                lambda conn: _records(_INPUTS, conn.execute(sql, (tenant_id, session_id)))
            )
        every = "SELECT record FROM inputs WHERE untold = 1 ORDER BY created_at, request_id"
        return await self._read(lambda conn: _records(_INPUTS, conn.execute(every)))

    async def granting_inputs(self) -> Sequence[InputRequest]:
        decisions = tuple(d.value for d in GRANTING_DECISIONS)
        sql = (
            "SELECT record FROM inputs WHERE state = 'resolved' AND json_extract(record, "
            f"'$.resolution.decision') IN ({', '.join('?' * len(decisions))}) ORDER BY rowid"
        )
        return await self._read(lambda conn: _records(_INPUTS, conn.execute(sql, decisions)))

    async def approved_always(self, *, tenant_id: str, policy: str) -> bool:
        sql = (
            "SELECT 1 FROM inputs WHERE tenant_id = ? AND state = 'resolved' "
            "AND json_extract(record, '$.resolution.decision') = 'approve_always' "
            "AND json_extract(record, '$.policy') = ? LIMIT 1"
        )
        row = await self._read(lambda conn: conn.execute(sql, (tenant_id, policy)).fetchone())
        return row is not None

    async def put_adapter_value(
        self,
        adapter: str,
        key: str,
        value: Mapping[str, Any],
        *,
        session: tuple[str, str] | None = None,
        if_absent: bool = False,
    ) -> bool:
        text = _codec.dumps(dict(value))
        tenant_id, session_id = session or ("", "")
        verb = "INSERT OR IGNORE" if if_absent else "INSERT OR REPLACE"

        def put(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                f"{verb} INTO adapter_values (adapter, key, value, tenant_id, session_id) "
                "VALUES (?, ?, ?, ?, ?)",
                (adapter, key, text, tenant_id, session_id),
            )
            return cursor.rowcount == 1

        return await self._write(put)

    async def get_adapter_value(self, adapter: str, key: str) -> dict[str, Any] | None:
        sql = "SELECT value FROM adapter_values WHERE adapter = ? AND key = ?"
        row = await self._read(lambda conn: conn.execute(sql, (adapter, key)).fetchone())
        return None if row is None else dict(_codec.loads(row[0]))

    async def delete_adapter_value(self, adapter: str, key: str) -> None:

        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM adapter_values WHERE adapter = ? AND key = ?", (adapter, key))

        await self._write(delete)

    async def purge_expired_adapter_values(self, adapter: str, *, before: float) -> int:
        def purge(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM adapter_values WHERE adapter = ? "
                "AND json_type(value, '$.expires_at') IN ('integer', 'real') "
                "AND json_extract(value, '$.expires_at') < ?",
                (adapter, before),
            )
            return int(cursor.rowcount)

        return await self._write(purge)

    async def append_audit(self, record: AuditRecord) -> AuditRecord:
        (stored,) = await self._write(_audit_op((record,)))
        return stored

    async def list_audit(self, *, tenant_id: str, request_id: str = "") -> Sequence[AuditRecord]:
        if request_id:
            sql = "SELECT record FROM audit WHERE tenant_id = ? AND request_id = ? ORDER BY sequence"
            params: tuple[str, ...] = (tenant_id, request_id)
        else:
            sql, params = "SELECT record FROM audit WHERE tenant_id = ? ORDER BY sequence", (tenant_id,)
        return await self._read(
            lambda conn: [_codec.decode_audit(_codec.loads(r)) for (r,) in conn.execute(sql, params)]
        )

    # Event log

    async def append_events(
        self, *, tenant_id: str, session_id: str, time: float, payloads: Sequence[EventPayload]
    ) -> list[Event]:
        """Append several events to the session's log in one transaction (one commit), numbered
        consecutively."""
        return await self._write(_append_op(tenant_id, session_id, time, payloads))

    async def list_events(
        self, *, tenant_id: str, session_id: str, after_sequence: int = 0, limit: int = 500
    ) -> Sequence[Event]:
        if limit <= 0:
            return []
        sql = (
            "SELECT sequence, time, payload FROM events WHERE tenant_id = ? AND session_id = ? "
            "AND sequence > ? ORDER BY sequence LIMIT ?"
        )
        params = (tenant_id, session_id, after_sequence, limit)
        return await self._read(
            lambda conn: [
                Event(tenant_id, session_id, sequence, time, _codec.decode_payload(_codec.loads(payload)))
                for sequence, time, payload in conn.execute(sql, params)
            ]
        )

    # Retention

    async def trim_events(self, *, tenant_id: str, session_id: str, through_sequence: int) -> None:
        def trim(conn: sqlite3.Connection) -> None:
            # The newest event always stays: the next sequence number is read from it.
            conn.execute(
                "DELETE FROM events WHERE tenant_id = ? AND session_id = ? AND sequence <= ? "
                "AND sequence < (SELECT MAX(sequence) FROM events WHERE tenant_id = ? AND session_id = ?)",
                (tenant_id, session_id, through_sequence, tenant_id, session_id),
            )

        await self._write(trim)

    async def purge_closed_sessions(self, *, closed_before: float, limit: int) -> int:
        def purge(conn: sqlite3.Connection) -> int:
            # The expression matches the partial index of schema v3 (sessions_closed).
            due = conn.execute(
                "SELECT tenant_id, session_id FROM sessions WHERE status = 'closed' "
                "AND json_extract(record, '$.closed_at') < ? LIMIT ?",
                (closed_before, max(limit, 0)),
            ).fetchall()
            for table in ("events", "inputs", "messages", "adapter_values", "sessions"):
                sql = f"DELETE FROM {table} WHERE tenant_id = ? AND session_id = ?"
                if table == "inputs":  # an approve_always is the tenant's grant: it outlives its session
                    sql += (
                        " AND COALESCE(json_extract(record, '$.resolution.decision'), '') != 'approve_always'"
                    )
                conn.executemany(sql, due)
            return len(due)

        return await self._write(purge)

    # The versioned insert/get/replace shared by every record kind

    async def _insert(self, kind: RecordKind[R], record: R) -> R:
        stored, insert = _insert_op(kind, record)
        await self._write(insert)
        return stored

    async def _get(self, kind: RecordKind[R], key: tuple[str, ...]) -> R | None:
        sql = kind.get_sql

        def get(conn: sqlite3.Connection) -> R | None:
            row = conn.execute(sql, key).fetchone()
            return None if row is None else kind.decode(_codec.loads(row[0]))

        return await self._read(get)

    async def _replace(self, kind: RecordKind[R], record: R) -> R:
        """Write a record at the version it was read; bump the version."""
        stored, update = _replace_op(kind, record)
        await self._write(update)
        return stored

    async def write(self, change: Change) -> Changed:
        ops: list[Query[Any]] = []

        def put(kind: RecordKind[R], records: tuple[R, ...]) -> tuple[R, ...]:
            stored: list[R] = []
            for record in records:
                if record.version == 0:
                    done, op = _insert_op(kind, record)
                else:
                    done, op = _replace_op(kind, record)
                stored.append(done)
                ops.append(op)
            return tuple(stored)

        sessions = put(_SESSIONS, change.sessions)
        messages = put(_MESSAGES, change.messages)
        inputs = put(_INPUTS, change.inputs)
        agents = put(_AGENTS, change.agents)
        audit = _audit_op(change.audit) if change.audit else None
        append = (
            _append_op(change.tenant_id, change.session_id, change.time, change.events)
            if change.events
            else None
        )

        def everything(conn: sqlite3.Connection) -> tuple[list[AuditRecord], list[Event]]:
            for op in ops:
                op(conn)
            return (audit(conn) if audit else []), (append(conn) if append else [])

        # One query: in the group commit it runs in one savepoint, so it lands whole or not at all.
        numbered, events = await self._write(everything)
        return Changed(sessions, messages, inputs, agents, tuple(numbered), tuple(events))

    async def _page(
        self, kind: RecordKind[R], where: list[str], params: list[Any], order: str, page_size: int | None
    ) -> tuple[list[R], bool]:
        """Records matching ``where`` in ``order``: at most ``page_size``, and whether more follow."""
        sql = f"SELECT record FROM {kind.table} WHERE {' AND '.join(where)} ORDER BY {order}"
        if page_size is not None:
            page_size = max(page_size, 0)
            sql += " LIMIT ?"
            params = [*params, page_size + 1]  # one more than asked tells whether a next page exists
        records = await self._read(lambda conn: _records(kind, conn.execute(sql, params)))
        if page_size is None:
            return records, False
        return records[:page_size], len(records) > page_size

    # One trip to the connection's thread per store call

    async def _read(self, query: Query[T]) -> T:
        return await _on_thread(self._connection(), query)

    async def _write(self, query: Query[T]) -> T:
        """Run ``query`` in a ``BEGIN IMMEDIATE`` transaction; if it raises, nothing it wrote stays.

        The write joins the queue for the next transaction; a committer task takes
        everything queued each time the thread is free, so concurrent writers share one
        commit. A caller that is cancelled while waiting does not stop its write.
        """
        connection = self._connection()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append((query, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_waiting(connection))
        return await future

    async def _commit_waiting(self, connection: aiosqlite.Connection) -> None:
        """Commit queued writes, a batch per transaction, until none are left."""
        while self._waiting:
            batch, self._waiting = self._waiting, []
            queries = [query for query, _ in batch]
            run = partial(_transaction, queries=queries, path=self._path, timeout=self._busy_timeout_ms)
            began = time.perf_counter()
            try:
                outcomes = await _on_thread(connection, run)
            except asyncio.CancelledError:
                # Shutting down: the batch on the thread still runs to COMMIT or ROLLBACK,
                # but nobody is left to wait for it or for the writes queued behind it.
                batch, self._waiting = batch + self._waiting, []
                for _, future in batch:
                    future.cancel()
                raise
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.metrics.store_commit(latency_s=time.perf_counter() - began, batch=len(batch))
            settle(batch, outcomes)

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError(f"the SQLite store at {self._path} is not open (connect() it first)")
        return self._db


async def _on_thread(connection: aiosqlite.Connection, query: Query[T]) -> T:
    """Run ``query`` with the raw sqlite3 connection on aiosqlite's thread.

    aiosqlite has no public call for this, but every one of its methods is built on
    ``_execute``. One trip per store call matters: each costs tens of microseconds,
    and a transaction spread over several trips could be left open by a caller
    cancelled half-way; a function on the thread always runs to COMMIT or ROLLBACK.
    """
    result = await connection._execute(lambda: query(connection._conn))  # type: ignore[no-untyped-call]
    return cast(T, result)


def _transaction(
    conn: sqlite3.Connection, queries: Sequence[Query[Any]], path: Path, timeout: int
) -> list[tuple[Any, Exception | None]]:
    """Run ``queries`` in one transaction, each in a savepoint; ``(result, error)`` for each.

    A query that raises is rolled back to its savepoint alone; the rest commit together.
    """
    # IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so the
    # version a conditional update compares is the latest committed one.
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if not exc.sqlite_errorname.startswith("SQLITE_BUSY"):
            raise
        message = f"the store {path} is busy: another writer held it for over {timeout} ms"
        return [(None, Unavailable(message, reason="STORE_BUSY")) for _ in queries]
    outcomes: list[tuple[Any, Exception | None]] = []
    try:
        if len(queries) == 1:  # alone in its transaction: no savepoint needed
            try:
                outcomes.append((queries[0](conn), None))
            except Exception as exc:
                if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                    conn.execute("ROLLBACK")
                return [(None, exc)]
            conn.execute("COMMIT")
            return outcomes
        for query in queries:
            conn.execute("SAVEPOINT write")
            try:
                value = query(conn)
            except Exception as exc:
                conn.execute("ROLLBACK TO write")
                outcomes.append((None, exc))
            else:
                outcomes.append((value, None))
            conn.execute("RELEASE write")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def _records(kind: RecordKind[R], rows: Iterable[tuple[Any, ...]]) -> list[R]:
    return [kind.decode(_codec.loads(row[0])) for row in rows]


def _any_of(where: list[str], params: list[Any], column: str, values: list[str]) -> None:
    """Add ``column IN (values)`` to a query when a filter is given."""
    if values:
        where.append(f"{column} IN ({', '.join('?' * len(values))})")
        params.extend(values)


def _raise_lost(
    conn: sqlite3.Connection, kind: RecordKind[R], key: tuple[Any, ...], version: int, what: str
) -> None:
    """A conditional write matched no row: the record is missing, or someone else wrote first."""
    row = conn.execute(kind.version_sql, key).fetchone()
    if row is None:
        raise NotFound(f"{what} not found", reason=kind.not_found)
    raise Conflict(
        f"{what} changed concurrently (version {version} was read, {row[0]} is stored)",
        metadata={"stored_version": str(row[0])},
    )


def _insert_op(kind: RecordKind[R], record: R) -> tuple[R, Query[None]]:
    """The record as stored (version 1) and the statement that inserts it."""
    exists = kind.exists(record)
    stored: R = evolve(detach(record), version=1)
    values = (*kind.row(stored), 1, _codec.dumps(kind.encode(stored)))
    sql = kind.insert_sql

    def insert(conn: sqlite3.Connection) -> None:
        try:
            conn.execute(sql, values)
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorname == "SQLITE_CONSTRAINT_PRIMARYKEY":
                raise exists from exc
            raise

    return stored, insert


def _replace_op(kind: RecordKind[R], record: R) -> tuple[R, Query[None]]:
    """The record as stored (version bumped) and the conditional update that writes it."""
    stored: R = evolve(detach(record), version=record.version + 1)
    row: tuple[Any, ...] = kind.row(stored)
    key: tuple[Any, ...] = row[: len(kind.keys)]
    values = (*row[len(kind.keys) :], stored.version, _codec.dumps(kind.encode(stored)), *key, record.version)
    sql = kind.update_sql

    def update(conn: sqlite3.Connection) -> None:
        if conn.execute(sql, values).rowcount == 0:
            _raise_lost(conn, kind, key, record.version, kind.what(record))

    return stored, update


def _audit_op(records: Sequence[AuditRecord]) -> Query[list[AuditRecord]]:
    """The statements that append audit records, numbered under the write lock per tenant."""

    def append(conn: sqlite3.Connection) -> list[AuditRecord]:
        stored: list[AuditRecord] = []
        last: dict[str, int] = {}
        for record in records:
            tenant = record.tenant_id
            if tenant not in last:
                (last[tenant],) = conn.execute(
                    "SELECT COALESCE(MAX(sequence), 0) FROM audit WHERE tenant_id = ?", (tenant,)
                ).fetchone()
            last[tenant] += 1
            numbered = replace(record, sequence=last[tenant])
            conn.execute(
                "INSERT INTO audit (tenant_id, sequence, request_id, record) VALUES (?, ?, ?, ?)",
                (tenant, numbered.sequence, numbered.request_id, _codec.dumps(_codec.encode_audit(numbered))),
            )
            stored.append(numbered)
        return stored

    return append


_INSERT_EVENTS = "INSERT INTO events (tenant_id, session_id, sequence, time, payload) VALUES "
_ROWS_PER_INSERT = 100
"""Events per INSERT statement: 500 parameters, far below SQLite's limit (32766)."""


def _append_op(
    tenant_id: str, session_id: str, time: float, payloads: Sequence[EventPayload]
) -> Query[list[Event]]:
    """The statements that append events, numbered under the write lock so processes never collide."""
    frozen = [detach(p) for p in payloads]
    encoded = [_codec.dumps(_codec.encode_payload(p)) for p in frozen]

    def append(conn: sqlite3.Connection) -> list[Event]:
        (last,) = conn.execute(
            "SELECT COALESCE(MAX(sequence), 0) FROM events WHERE tenant_id = ? AND session_id = ?",
            (tenant_id, session_id),
        ).fetchone()
        # One multi-row INSERT per chunk: each statement is a trip out of and back into the
        # GIL, which under load costs far more than SQLite's own work.
        for start in range(0, len(encoded), _ROWS_PER_INSERT):
            chunk = encoded[start : start + _ROWS_PER_INSERT]
            params: list[Any] = []
            for n, payload in enumerate(chunk, start=last + start + 1):
                params += (tenant_id, session_id, n, time, payload)
            conn.execute(_INSERT_EVENTS + ", ".join(["(?, ?, ?, ?, ?)"] * len(chunk)), params)
        return [Event(tenant_id, session_id, last + n, time, p) for n, p in enumerate(frozen, start=1)]

    return append
