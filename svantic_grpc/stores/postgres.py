"""The store for several replicas: PostgreSQL through ``asyncpg``.

The same guarantees as the SQLite store, for processes on many machines: updates
are conditional on the integer ``version`` that was read (the loser of a race gets
``Conflict``, never an overwrite); a ``Change`` lands in one transaction; event and
audit numbers come from counter rows updated inside the writing transaction, so
appends from several replicas never collide. Writes that arrive while a
transaction is in flight wait together and then share the next transaction and its
commit (group commit), each in its own savepoint, so one that fails rolls back
alone. Reads use a connection pool sized from settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from svantic_grpc.core.errors import AlreadyExists, Conflict, NotFound
from svantic_grpc.core.events import Event, EventPayload
from svantic_grpc.core.evolve import evolve
from svantic_grpc.core.inputs.model import GRANTING_DECISIONS, InputRequest, InputState
from svantic_grpc.core.messages.model import Message, MessageState
from svantic_grpc.core.models import AgentRegistration, Session, SessionStatus
from svantic_grpc.core.ownership import LeaseLost, SessionKey
from svantic_grpc.core.store import AuditRecord, Change, Changed, InputPage, MessagePage, SessionPage, Store
from svantic_grpc.stores import _codec
from svantic_grpc.stores._batch import settle
from svantic_grpc.stores._copy import detach
from svantic_grpc.stores._cursor import decode_cursor, encode_cursor
from svantic_grpc.stores._kinds import Kinds, RecordKind, message_key
from svantic_grpc.stores._pg_bell import PostgresBell, bell_of
from svantic_grpc.stores._pg_leases import PgLeases, check_fence, record_hand_offs
from svantic_grpc.stores._pg_relay import PgRelay
from svantic_grpc.stores._pg_schema import prepare

__all__ = ["PostgresBell", "PostgresStore"]

_log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R", Session, AgentRegistration, Message, InputRequest)
Op = Callable[[asyncpg.Connection], Awaitable[T]]


_KINDS = Kinds(lambda n: f"${n}", closed_at_column=True)
_SESSIONS, _AGENTS, _MESSAGES, _INPUTS = _KINDS.sessions, _KINDS.agents, _KINDS.messages, _KINDS.inputs

_UNFINISHED = "state NOT IN ('completed', 'failed', 'canceled', 'rejected')"
"""Messages whose state is not terminal; the same text as their partial index."""


class PostgresStore(Store):
    """A store in one PostgreSQL schema; any number of replicas may share it.

    Args:
        dsn: ``postgresql://user@host:port/db``.
        schema: Where the tables live (created at connect).
        pool_size: Most connections this process holds (one serves the writer at a time).
    """

    _LINGER_S = 0.05
    """How long the committer (and its connection) waits for the next write before it ends."""

    _KEPT_READERS = 2
    """Connections kept out of the pool for reads between them (fewer when the pool is small)."""

    def __init__(self, dsn: str, *, schema: str = "svantic", pool_size: int = 10) -> None:
        self._dsn = dsn
        self._schema = schema
        self._pool_size = max(pool_size, 2)
        self._pool: asyncpg.Pool | None = None
        self._waiting: list[tuple[Op[Any], asyncio.Future[Any]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._queued: asyncio.Future[None] | None = None
        """Done when a write joins the queue while the committer waits for more (or it waited
        ``_LINGER_S``)."""
        self._waits_since = 0.0
        """When the committer began its current wait (loop time)."""
        self._linger: asyncio.TimerHandle | None = None
        self._closing = False
        self._readers: list[asyncpg.pool.PoolConnectionProxy] = []
        """Pooled connections kept for reads while no read uses them (``_read``)."""
        self._kept_readers = min(self._KEPT_READERS, self._pool_size - 3)
        self.bell_prefix = f"svantic_events_{zlib.crc32(schema.encode()):08x}_"
        """Where the channels of this schema's event bell start (``bell_of`` names a session's)."""
        self.handoff_channel = f"svantic_handoffs_{zlib.crc32(schema.encode()):08x}"
        """Where the channels that tell a replica a message was handed to it start (a channel per
        replica, ``replica_channel``; the payload names the replica)."""
        self.relay_channel = f"svantic_relay_{zlib.crc32(schema.encode()):08x}"
        """Where the channels that tell a replica a dispatch item was relayed to it start (a channel
        per replica, ``replica_channel``; the payload names the replica)."""
        self.replica_id = ""
        """This replica's name in lease rows (set by ``ownership``)."""
        self.fences: dict[SessionKey, int] = {}
        """The fence of each session this replica leases: its writes there check it (``_pg_leases``)."""

    def event_bell(self) -> PostgresBell:
        return PostgresBell(self._dsn, self.bell_prefix)

    def ownership(self, *, replica_id: str, lease_s: float, renew_s: float) -> PgLeases:
        return PgLeases(self, replica_id=replica_id, lease_s=lease_s, renew_s=renew_s)

    def agent_relay(self, *, replica_id: str, poll_s: float) -> PgRelay:
        return PgRelay(self, replica_id=replica_id, poll_s=poll_s)

    @property
    def dsn(self) -> str:
        return self._dsn

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool (for the lease keeper)."""
        return self._pool_or_fail()

    @property
    def schema(self) -> str:
        return self._schema

    async def connect(self) -> None:
        if self._pool is not None:
            return
        self._closing = False
        try:
            conn = await asyncpg.connect(self._dsn, timeout=10)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise ValueError(f"cannot connect to PostgreSQL at {_redacted(self._dsn)}: {exc}") from None
        try:
            await prepare(conn, self._schema)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=1,
            max_size=self._pool_size,
            server_settings={"search_path": self._schema, "application_name": "svantic-grpc"},
            reset=_keep_session,
        )

    async def close(self) -> None:
        committer = self._committer
        if committer is not None and not committer.done():
            self._closing = True  # the committer stops waiting for more
            self._wake_committer()
            await asyncio.wait([committer])  # writes already accepted are committed first
        pool, self._pool = self._pool, None
        if pool is not None:
            readers, self._readers = self._readers, []
            for conn in readers:
                await pool.release(conn)
            await pool.close()

    # Sessions

    async def create_session(self, session: Session) -> Session:
        return await self._put(_SESSIONS, session, insert=True)

    async def get_session(self, *, tenant_id: str, session_id: str) -> Session | None:
        return await self._get(_SESSIONS, (tenant_id, session_id))

    async def update_session(self, session: Session) -> Session:
        return await self._put(_SESSIONS, session, insert=False)

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
        params: list[Any] = [tenant_id, page_size + 1]  # one more than asked tells whether more follow
        if after is not None:
            params.extend(after)
        bound = " AND (created_at, session_id) < ($3, $4)" if after is not None else ""
        parts: list[str] = []
        for value in values:
            status = ""
            if value is not None:
                params.append(value)
                status = f" AND status = ${len(params)}"
            parts.append(
                f"(SELECT record, created_at, session_id FROM sessions WHERE tenant_id = $1{status}{bound} "
                "ORDER BY created_at DESC, session_id DESC LIMIT $2)"
            )
        sql = (
            f"SELECT record FROM ({' UNION ALL '.join(parts)}) AS page "
            "ORDER BY created_at DESC, session_id DESC LIMIT $2"
        )
        found = await self._all(_SESSIONS, sql, *params)
        page, more = found[:page_size], len(found) > page_size
        last = page[-1] if page else None
        next_cursor = encode_cursor(last.created_at, last.session_id) if more and last else ""
        return SessionPage(tuple(page), next_cursor)

    async def open_sessions(self) -> Sequence[Session]:
        return await self._all(
            _SESSIONS, "SELECT record FROM sessions WHERE status <> 'closed' ORDER BY created_at"
        )

    # Agent registrations

    async def create_agent(self, agent: AgentRegistration) -> AgentRegistration:
        return await self._put(_AGENTS, agent, insert=True)

    async def get_agent(self, *, tenant_id: str, instance_id: str) -> AgentRegistration | None:
        return await self._get(_AGENTS, (tenant_id, instance_id))

    async def update_agent(self, agent: AgentRegistration) -> AgentRegistration:
        return await self._put(_AGENTS, agent, insert=False)

    async def delete_agent(self, *, tenant_id: str, instance_id: str, version: int) -> None:
        key = (tenant_id, instance_id)

        async def delete(conn: asyncpg.Connection) -> None:
            if await conn.fetchval(_AGENTS.delete_sql + " RETURNING 1", *key, version) is None:
                await _raise_lost(conn, _AGENTS, key, version, f"agent instance {instance_id!r}")

        await self._write(delete)

    async def list_agents(self, *, tenant_id: str, agent_type: str = "") -> Sequence[AgentRegistration]:
        query = _Where(tenant_id)
        if agent_type:
            query.add("agent_type = {}", agent_type)
        page, _ = await self._page(_AGENTS, query, "agent_type, instance_id", None)
        return page

    # Messages

    async def create_message(self, message: Message) -> Message:
        return await self._put(_MESSAGES, message, insert=True)

    async def get_message(self, *, tenant_id: str, session_id: str, message_id: str) -> Message | None:
        return await self._get(_MESSAGES, (tenant_id, session_id, message_id))

    async def find_message(self, *, tenant_id: str, message_id: str) -> Message | None:
        sql = f"SELECT record FROM {_MESSAGES.table} WHERE tenant_id = $1 AND message_id = $2 LIMIT 1"
        text = await self._fetchval(sql, tenant_id, message_id)
        return None if text is None else _MESSAGES.decode(_codec.loads(text))

    async def update_message(self, message: Message) -> Message:
        return await self._put(_MESSAGES, message, insert=False)

    async def list_messages(
        self,
        *,
        tenant_id: str,
        session_id: str = "",
        states: Iterable[MessageState] = (),
        page_size: int = 50,
        cursor: str = "",
    ) -> MessagePage:
        query = _Where(tenant_id)
        if session_id:
            query.add("session_id = {}", session_id)
        query.any_of("state", [s.value for s in set(states)])
        if cursor:
            query.add("(created_at, sort_key) > ({}, {})", *decode_cursor(cursor))
        page, more = await self._page(_MESSAGES, query, "created_at, sort_key", page_size)
        last = page[-1] if page else None
        next_cursor = encode_cursor(last.created_at, message_key(last)) if more and last else ""
        return MessagePage(tuple(page), next_cursor)

    async def unfinished_messages(self) -> Sequence[Message]:
        return await self._all(
            _MESSAGES, f"SELECT record FROM messages WHERE {_UNFINISHED} ORDER BY created_at"
        )

    # Input requests and their audit trail

    async def create_input(self, request: InputRequest) -> InputRequest:
        return await self._put(_INPUTS, request, insert=True)

    async def get_input(self, *, tenant_id: str, request_id: str) -> InputRequest | None:
        return await self._get(_INPUTS, (tenant_id, request_id))

    async def update_input(self, request: InputRequest) -> InputRequest:
        return await self._put(_INPUTS, request, insert=False)

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
        query = _Where(tenant_id)
        for column, value in (("session_id", session_id), ("message_id", message_id)):
            if value:
                query.add(f"{column} = {{}}", value)
        query.any_of("state", [s.value for s in set(states)])
        if cursor:
            query.add("(created_at, request_id) > ({}, {})", *decode_cursor(cursor))
        page, more = await self._page(_INPUTS, query, "created_at, request_id", page_size)
        last = page[-1] if page else None
        next_cursor = encode_cursor(last.created_at, last.request_id) if more and last else ""
        return InputPage(tuple(page), next_cursor)

    async def pending_inputs(self) -> Sequence[InputRequest]:
        return await self._all(
            _INPUTS, "SELECT record FROM inputs WHERE state = 'pending' ORDER BY created_at"
        )

    async def untold_outcomes(self, *, tenant_id: str = "", session_id: str = "") -> Sequence[InputRequest]:
        if session_id:
            sql = (
                "SELECT record FROM inputs WHERE untold AND tenant_id = $1 AND session_id = $2 "
                "ORDER BY created_at, request_id"
            )
            return await self._all(_INPUTS, sql, tenant_id, session_id)
        return await self._all(
            _INPUTS, "SELECT record FROM inputs WHERE untold ORDER BY created_at, request_id"
        )

    async def granting_inputs(self) -> Sequence[InputRequest]:
        decisions = [d.value for d in GRANTING_DECISIONS]
        sql = (
            "SELECT record FROM inputs WHERE state = 'resolved' "
            "AND (record::jsonb #>> '{resolution,decision}') = ANY($1::text[]) ORDER BY created_at"
        )
        return await self._all(_INPUTS, sql, decisions)

    async def approved_always(self, *, tenant_id: str, policy: str) -> bool:
        sql = (
            "SELECT 1 FROM inputs WHERE tenant_id = $1 AND state = 'resolved' "
            "AND (record::jsonb #>> '{resolution,decision}') = 'approve_always' "
            "AND (record::jsonb ->> 'policy') = $2 LIMIT 1"
        )
        return await self._fetchval(sql, tenant_id, policy) is not None

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
        conflict = (
            "DO NOTHING"
            if if_absent
            else "DO UPDATE SET value = EXCLUDED.value, tenant_id = EXCLUDED.tenant_id, "
            "session_id = EXCLUDED.session_id"
        )

        async def put(conn: asyncpg.Connection) -> bool:
            status = await conn.execute(
                "INSERT INTO adapter_values (adapter, key, value, tenant_id, session_id) "
                f"VALUES ($1, $2, $3, $4, $5) ON CONFLICT (adapter, key) {conflict}",
                adapter,
                key,
                text,
                tenant_id,
                session_id,
            )
            return bool(status.endswith(" 1"))

        return await self._write(put)

    async def get_adapter_value(self, adapter: str, key: str) -> dict[str, Any] | None:
        sql = "SELECT value FROM adapter_values WHERE adapter = $1 AND key = $2"
        text = await self._fetchval(sql, adapter, key)
        return None if text is None else dict(_codec.loads(text))

    async def delete_adapter_value(self, adapter: str, key: str) -> None:
        async def delete(conn: asyncpg.Connection) -> None:
            await conn.execute("DELETE FROM adapter_values WHERE adapter = $1 AND key = $2", adapter, key)

        await self._write(delete)

    async def purge_expired_adapter_values(self, adapter: str, *, before: float) -> int:
        async def purge(conn: asyncpg.Connection) -> int:
            status = await conn.execute(
                "DELETE FROM adapter_values WHERE adapter = $1 AND CASE "
                "WHEN jsonb_typeof(value::jsonb -> 'expires_at') = 'number' "
                "THEN (value::jsonb ->> 'expires_at')::float8 < $2 ELSE false END",
                adapter,
                before,
            )
            return int(status.split()[-1])

        return await self._write(purge)

    async def append_audit(self, record: AuditRecord) -> AuditRecord:
        (stored,) = await self._write(_audit_op((record,)))
        return stored

    async def list_audit(self, *, tenant_id: str, request_id: str = "") -> Sequence[AuditRecord]:
        if request_id:
            sql = "SELECT record FROM audit WHERE tenant_id = $1 AND request_id = $2 ORDER BY sequence"
            rows = await self._fetch(sql, tenant_id, request_id)
        else:
            sql = "SELECT record FROM audit WHERE tenant_id = $1 ORDER BY sequence"
            rows = await self._fetch(sql, tenant_id)
        return [_codec.decode_audit(_codec.loads(row[0])) for row in rows]

    # Event log

    async def append_events(
        self, *, tenant_id: str, session_id: str, time: float, payloads: Sequence[EventPayload]
    ) -> list[Event]:
        key = (tenant_id, session_id)
        _, op = _logged_op((), key, time, payloads, self.bell_prefix, self._fence(key))
        return await self._write(op)

    async def list_events(
        self, *, tenant_id: str, session_id: str, after_sequence: int = 0, limit: int = 500
    ) -> Sequence[Event]:
        if limit <= 0:
            return []
        sql = (
            "SELECT sequence, time, payload FROM events WHERE tenant_id = $1 AND session_id = $2 "
            "AND sequence > $3 ORDER BY sequence LIMIT $4"
        )
        rows = await self._fetch(sql, tenant_id, session_id, after_sequence, limit)
        return [
            Event(tenant_id, session_id, row[0], row[1], _codec.decode_payload(_codec.loads(row[2])))
            for row in rows
        ]

    # Retention

    async def trim_events(self, *, tenant_id: str, session_id: str, through_sequence: int) -> None:
        async def trim(conn: asyncpg.Connection) -> None:
            # Numbering continues from event_heads, so even the newest event may go.
            await conn.execute(
                "DELETE FROM events WHERE tenant_id = $1 AND session_id = $2 AND sequence <= $3",
                tenant_id,
                session_id,
                through_sequence,
            )

        await self._write(trim)

    async def purge_closed_sessions(self, *, closed_before: float, limit: int) -> int:
        async def purge(conn: asyncpg.Connection) -> int:
            due = await conn.fetch(
                "SELECT tenant_id, session_id FROM sessions WHERE status = 'closed' AND closed_at < $1 "
                "LIMIT $2 FOR UPDATE SKIP LOCKED",
                closed_before,
                max(limit, 0),
            )
            keys = [(row[0], row[1]) for row in due]
            for table in ("events", "event_heads", "inputs", "messages", "adapter_values", "sessions"):
                sql = f"DELETE FROM {table} WHERE tenant_id = $1 AND session_id = $2"
                if table == "inputs":  # an approve_always is the tenant's grant: it outlives its session
                    sql += " AND COALESCE(record::jsonb #>> '{resolution,decision}', '') <> 'approve_always'"
                await conn.executemany(sql, keys)
            return len(keys)

        return await self._write(purge)

    # One atomic write

    async def write(self, change: Change) -> Changed:
        key = (change.tenant_id, change.session_id)
        fence = None if change.hand_off else self._fence(key)  # a hand-off is no owner's work
        if change.events and not change.audit and not change.hand_off:
            # The common writes (a record, or a session and one other record, and their events):
            # one statement, no transaction of its own.
            few = _few_records(change)
            if few is not None:
                return await self._write_logged(change, few, fence)
        ops: list[Op[None]] = []

        def put(kind: RecordKind[R], records: tuple[R, ...]) -> tuple[R, ...]:
            stored: list[R] = []
            for record in records:
                done, op = _put_op(kind, record, insert=record.version == 0)
                stored.append(done)
                ops.append(op)
            return tuple(stored)

        sessions = put(_SESSIONS, change.sessions)
        messages = put(_MESSAGES, change.messages)
        inputs = put(_INPUTS, change.inputs)
        agents = put(_AGENTS, change.agents)
        audit = _audit_op(change.audit) if change.audit else None
        append = (
            _logged_op((), key, change.time, change.events, self.bell_prefix, fence)[1]
            if change.events
            else None
        )
        if fence is not None and append is None:
            owner, number = fence
            ops.insert(0, lambda conn: check_fence(conn, key, owner, number))
        if change.hand_off and (handed := [m.message_id for m in messages if m.version == 1]):
            channel = self.handoff_channel
            ops.append(lambda conn: record_hand_offs(conn, key, handed, channel))

        async def everything(conn: asyncpg.Connection) -> tuple[list[AuditRecord], list[Event]]:
            # The events first: their statement checks the fence, before anything else is written.
            events = await append(conn) if append else []
            for op in ops:
                await op(conn)
            return (await audit(conn) if audit else []), events

        # One op: in the group commit it runs in one savepoint, so it lands whole or not at all.
        numbered, events = await self._write(everything)
        return Changed(sessions, messages, inputs, agents, tuple(numbered), tuple(events))

    async def _write_logged(
        self, change: Change, records: Sequence[tuple[RecordKind[Any], Any]], fence: tuple[str, int] | None
    ) -> Changed:
        stored, logged = _logged_op(
            [(kind, record, record.version == 0) for kind, record in records],
            (change.tenant_id, change.session_id),
            change.time,
            change.events,
            self.bell_prefix,
            fence,
        )
        events = tuple(await self._write(logged))
        written: dict[str, list[Any]] = {"sessions": [], "messages": [], "inputs": [], "agents": []}
        for (kind, _), record in zip(records, stored, strict=True):
            written[kind.table].append(record)  # each table is named as its field of ``Changed``
        return Changed(
            sessions=tuple(written["sessions"]),
            messages=tuple(written["messages"]),
            inputs=tuple(written["inputs"]),
            agents=tuple(written["agents"]),
            events=events,
        )

    def _fence(self, key: SessionKey) -> tuple[str, int] | None:
        """(owner, fence) a write to ``key`` checks when this replica leases the session."""
        fence = self.fences.get(key)
        return None if fence is None else (self.replica_id, fence)

    # Shared by every record kind

    async def _put(self, kind: RecordKind[R], record: R, *, insert: bool) -> R:
        """Insert (at version 1), or replace at the version read; the record as stored."""
        stored, op = _put_op(kind, record, insert=insert)
        await self._write(_OneStatement(op))
        return stored

    async def _get(self, kind: RecordKind[R], key: tuple[str, ...]) -> R | None:
        text = await self._fetchval(kind.get_sql, *key)
        return None if text is None else kind.decode(_codec.loads(text))

    async def _all(self, kind: RecordKind[R], sql: str, *params: Any) -> list[R]:
        rows = await self._fetch(sql, *params)
        return [kind.decode(_codec.loads(row[0])) for row in rows]

    async def _page(
        self, kind: RecordKind[R], where: _Where, order: str, page_size: int | None
    ) -> tuple[list[R], bool]:
        """Records matching ``where`` in ``order``: at most ``page_size``, and whether more follow."""
        sql = f"SELECT record FROM {kind.table} WHERE {where.sql()} ORDER BY {order}"
        params = list(where.params)
        if page_size is not None:
            page_size = max(page_size, 0)
            params.append(page_size + 1)  # one more than asked tells whether a next page exists
            sql += f" LIMIT ${len(params)}"
        records = await self._all(kind, sql, *params)
        if page_size is None:
            return records, False
        return records[:page_size], len(records) > page_size

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._read(lambda conn: conn.fetch(sql, *args))

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        return await self._read(lambda conn: conn.fetchval(sql, *args))

    async def _read(self, read: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run one read statement on a connection kept for reads: taken from the pool once and
        kept while idle (up to ``_KEPT_READERS``), not acquired and released per read. asyncpg's
        release runs in a task of its own (``asyncio.shield``), and acquiring and releasing cost
        ~180,000 instructions and three more event-loop turns per read: a message's routing read
        was the pool's most frequent use. A read that fails or is cancelled gives its connection
        back to the pool, which cleans it up (it waits for a cancelled query to end)."""
        pool = self._pool_or_fail()
        conn = None
        while self._readers:
            kept = self._readers.pop()
            try:
                if not kept.is_closed():
                    conn = kept
                    break
            except asyncpg.InterfaceError:
                continue  # it closed while kept, and asyncpg gave it back to the pool then
            await pool.release(kept)  # closed (a restarted server): the pool replaces it
        if conn is None:
            conn = await pool.acquire()
        try:
            value = await read(conn)
        except BaseException:
            await pool.release(conn)
            raise
        if self._pool is pool and len(self._readers) < self._kept_readers:
            self._readers.append(conn)
        else:
            await pool.release(conn)
        return value

    async def _write(self, op: Op[T]) -> T:
        """Run ``op`` in a transaction; if it raises, nothing it wrote stays.

        The write joins the queue for the next transaction; a committer task takes
        everything queued each time the previous transaction is done, so concurrent
        writers share one commit. A caller that is cancelled while waiting does not
        stop its write. A write PostgreSQL chose as a deadlock's victim (two replicas'
        writes locking one session's rows in opposite orders) or refused on a
        serialization failure wrote nothing: it runs again, a few times.
        """
        for tries in range(_RETRIED_WRITES):
            try:
                return await self._queued_write(op)
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if tries + 1 == _RETRIED_WRITES:
                    raise
                await asyncio.sleep(random.uniform(0, 0.005 * 2**tries))
        raise AssertionError("unreachable")

    async def _queued_write(self, op: Op[T]) -> T:
        self._pool_or_fail()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append((op, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_waiting())
        else:
            self._wake_committer()
        return await future

    def _lingered(self) -> None:
        """The committer's linger timer: it ends the committer's wait once it has waited
        ``_LINGER_S`` for a write, else it is set again for when that will be."""
        self._linger = None
        wait = self._queued
        if wait is None or wait.done():
            return  # the committer is at work: its next wait sets the timer again
        loop = wait.get_loop()
        due = self._waits_since + self._LINGER_S
        if loop.time() < due:
            self._linger = loop.call_at(due, self._lingered)
        else:
            wait.set_result(None)

    def _wake_committer(self) -> None:
        wake = self._queued
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _commit_waiting(self) -> None:
        """Commit queued writes, a batch per transaction, on one connection, until none have come
        for ``_LINGER_S`` (so a replica writing steadily but not in bursts does not start a task
        and take a pooled connection for every write)."""
        me = self._committer
        try:
            async with self._pool_or_fail().acquire() as conn:
                while await self._more_to_commit():
                    if not await self._commit_batch(conn):
                        break  # the connection may be broken: the next committer takes another
        except BaseException as exc:  # no connection: what waits is told
            batch, self._waiting = self._waiting, []
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._committer is me:
                self._committer = None
            if self._waiting and self._committer is None:
                self._committer = asyncio.create_task(self._commit_waiting())

    async def _more_to_commit(self) -> bool:
        if not self._waiting and not self._closing:
            loop = asyncio.get_running_loop()
            self._queued = loop.create_future()
            self._waits_since = loop.time()
            if self._linger is None:  # one timer per linger period, not one per write
                self._linger = loop.call_at(self._waits_since + self._LINGER_S, self._lingered)
            await self._queued
            self._queued = None
        if not self._waiting:
            self._committer = None  # at once: a write from now on starts another committer
            return False
        return True

    async def _commit_batch(self, conn: asyncpg.Connection) -> bool:
        """Commit what is queued; False when the transaction itself failed (not one write)."""
        batch, self._waiting = self._waiting, []
        began = time.perf_counter()
        try:
            outcomes = await self._transaction(conn, [op for op, _ in batch])
        except _Failed as failed:  # the batch's one write failed and was rolled back
            outcomes = [(None, failed.error)]
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
            return False
        self.metrics.store_commit(latency_s=time.perf_counter() - began, batch=len(batch))
        settle(batch, outcomes)
        return True

    async def _transaction(
        self, conn: asyncpg.Connection, ops: Sequence[Op[Any]]
    ) -> list[tuple[Any, Exception | None]]:
        """Run ``ops`` in one transaction (one statement alone: by itself), each op that is not
        one statement in a savepoint when there are several."""
        if len(ops) == 1:
            single = isinstance(ops[0], _OneStatement)
            try:
                async with contextlib.nullcontext() if single else conn.transaction():
                    value = await ops[0](conn)
            except _FAILURES as exc:
                raise _Failed(exc) from None  # the transaction, if any, was rolled back
            return [(value, None)]
        try:
            return await self._batch(conn, ops, savepoints=False)
        except _NeedsSavepoints:  # a statement failed in SQL: the batch again, each op alone
            return await self._batch(conn, ops, savepoints=True)

    @staticmethod
    async def _batch(
        conn: asyncpg.Connection, ops: Sequence[Op[Any]], *, savepoints: bool
    ) -> list[tuple[Any, Exception | None]]:
        """Run ``ops`` in one transaction, each failing alone. An op of one statement that fails
        before SQL does (a version or fence that moved on) wrote nothing, so it needs no
        savepoint; one that fails in SQL aborts the transaction, so (without ``savepoints``)
        the whole batch is taken back with ``_NeedsSavepoints`` to run again with them."""
        outcomes: list[tuple[Any, Exception | None]] = []
        async with conn.transaction():
            for op in ops:
                if savepoints or not isinstance(op, _OneStatement):
                    try:
                        async with conn.transaction():  # a savepoint
                            value = await op(conn)
                    except _FAILURES as exc:
                        outcomes.append((None, exc))
                    else:
                        outcomes.append((value, None))
                    continue
                try:
                    value = await op(conn)
                except (NotFound, Conflict, LeaseLost) as exc:
                    if isinstance(exc.__cause__, asyncpg.PostgresError):
                        raise _NeedsSavepoints from exc
                    outcomes.append((None, exc))
                except _FAILURES as exc:
                    raise _NeedsSavepoints from exc
                else:
                    outcomes.append((value, None))
        return outcomes

    def _pool_or_fail(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(
                f"the PostgreSQL store (schema {self._schema!r}) is not open (connect() it first)"
            )
        return self._pool


def _redacted(dsn: str) -> str:
    """``dsn`` without its password, for messages."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_FAILURES = (asyncpg.PostgresError, NotFound, Conflict, AlreadyExists, LeaseLost)

_RETRIED_WRITES = 5
"""How many times a write that lost to a deadlock or a serialization failure is made in all."""
"""What a write may fail with alone (the others of its batch still land)."""


class _NeedsSavepoints(Exception):
    """A statement of a batch run without savepoints failed in SQL: the transaction is aborted."""


class _Failed(Exception):
    """The one write of a transaction failed: the transaction rolled back, the error is the write's."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Where:
    """A WHERE clause with numbered parameters, starting from the tenant."""

    def __init__(self, tenant_id: str) -> None:
        self.params: list[Any] = [tenant_id]
        self._parts = ["tenant_id = $1"]

    def add(self, template: str, *values: Any) -> None:
        """``template`` with a ``{}`` for each value."""
        numbers = [f"${len(self.params) + n}" for n in range(1, len(values) + 1)]
        self._parts.append(template.format(*numbers))
        self.params.extend(values)

    def any_of(self, column: str, values: list[str]) -> None:
        if values:
            self.add(f"{column} = ANY({{}}::text[])", values)

    def sql(self) -> str:
        return " AND ".join(self._parts)


async def _raise_lost(
    conn: asyncpg.Connection, kind: RecordKind[R], key: tuple[Any, ...], version: int, what: str
) -> None:
    """A conditional write matched no row: the record is missing, or someone else wrote first."""
    stored = await conn.fetchval(kind.version_sql, *key)
    if stored is None:
        raise NotFound(f"{what} not found", reason=kind.not_found)
    raise Conflict(
        f"{what} changed concurrently (version {version} was read, {stored} is stored)",
        metadata={"stored_version": str(stored)},
    )


def _put_op(kind: RecordKind[R], record: R, *, insert: bool) -> tuple[R, Op[None]]:
    """The record as stored and the statement that writes it: an insert (version 1), or a
    conditional update at the version read."""
    stored: R = evolve(detach(record), version=1 if insert else record.version + 1)
    row: tuple[Any, ...] = kind.row(stored)
    text = _codec.dumps(kind.encode(stored))
    if insert:
        exists = kind.exists(record)
        insert_values = (*row, 1, text)

        async def add(conn: asyncpg.Connection) -> None:
            try:
                await conn.execute(kind.insert_sql, *insert_values)
            except asyncpg.UniqueViolationError as exc:
                raise exists from exc

        return stored, add
    key: tuple[Any, ...] = row[: len(kind.keys)]
    update_values = (*row[len(kind.keys) :], stored.version, text, *key, record.version)

    async def update(conn: asyncpg.Connection) -> None:
        if await conn.fetchval(kind.update_sql + " RETURNING 1", *update_values) is None:
            await _raise_lost(conn, kind, key, record.version, kind.what(record))

    return stored, update


def _audit_op(records: Sequence[AuditRecord]) -> Op[list[AuditRecord]]:
    """The statements that append audit records, numbered from the tenant's counter row."""

    async def append(conn: asyncpg.Connection) -> list[AuditRecord]:
        stored: list[AuditRecord] = []
        for record in records:
            sequence = await conn.fetchval(
                "INSERT INTO audit_heads (tenant_id, last_sequence) VALUES ($1, 1) ON CONFLICT (tenant_id) "
                "DO UPDATE SET last_sequence = audit_heads.last_sequence + 1 RETURNING last_sequence",
                record.tenant_id,
            )
            numbered = replace(record, sequence=int(sequence))
            await conn.execute(
                "INSERT INTO audit (tenant_id, sequence, request_id, record) VALUES ($1, $2, $3, $4)",
                numbered.tenant_id,
                numbered.sequence,
                numbered.request_id,
                _codec.dumps(_codec.encode_audit(numbered)),
            )
            stored.append(numbered)
        return stored

    return append


def _few_records(change: Change) -> list[tuple[RecordKind[Any], Any]] | None:
    """The records of a change that one logged statement writes: one record, or a session and one
    other record inserted (a message with its session's activity); else ``None``.

    Only an insert may follow: in one statement every part runs, and an update that matches no
    row (a version moved on) does not undo the session's update before it, whereas an insert that
    fails (the key taken) fails the whole statement. Anything else is a transaction."""
    found = [
        (kind, record)
        for kind, records in (
            (_SESSIONS, change.sessions),
            (_MESSAGES, change.messages),
            (_INPUTS, change.inputs),
            (_AGENTS, change.agents),
        )
        for record in records
    ]
    if len(found) == 1:
        return found
    if (
        len(found) == 2
        and found[0][0] is _SESSIONS
        and found[1][0] is not _SESSIONS
        and found[1][1].version == 0
    ):
        return found
    return None


class _OneStatement(Generic[T]):
    """An op that is one statement: atomic by itself, so alone it needs no transaction (no
    BEGIN and COMMIT round trips), and in a batch no savepoint unless a statement fails in SQL."""

    def __init__(self, op: Op[T]) -> None:
        self._op = op

    def __call__(self, conn: asyncpg.Connection) -> Awaitable[T]:
        return self._op(conn)


@functools.cache
def _logged_sql(record_sqls: tuple[str, ...], first: int, fenced: bool) -> str:
    """One statement that writes records (``record_sqls``, in order, their parameters numbered
    one after the other up to ``first - 1``; or none) and appends events to their session's log,
    and rings the session's bell, all only if every record was written (each one only if those
    before it were) and, for the owner of a leased session, the lease row (read with
    ``FOR KEY SHARE``, as ``check_fence`` does) still holds the owner's fence.

    Events are numbered from the session's counter row, which also serialises appenders on
    other replicas until the transaction ends. The NOTIFY is sent only if it commits.
    Parameters from ``first``: tenant, session, event count, time, payloads, bell channel and
    payload, then (fenced) owner and fence. Returns the last record's rows written, the last
    event number, the bell's (null) result and (fenced) the fence held.
    """
    t, s, count, time, payloads, channel, payload, owner, fence = (f"${first + n}" for n in range(9))
    ctes = []
    guards = []
    if fenced:
        ctes.append(
            f"lease AS (SELECT fence FROM leases WHERE tenant_id = {t} AND session_id = {s} "
            f"AND owner = {owner} FOR KEY SHARE)"
        )
        guards.append(f"EXISTS (SELECT 1 FROM lease WHERE fence = {fence})")
    if not record_sqls:
        ctes.append(f"rec AS (SELECT 1 WHERE {guards[0]})" if guards else "rec AS (SELECT 1)")
    for n, record_sql in enumerate(record_sqls, start=1):
        name = "rec" if n == len(record_sqls) else f"rec{n}"
        where = (" AND " if " WHERE " in record_sql else " WHERE ") + " AND ".join(guards) if guards else ""
        ctes.append(f"{name} AS ({record_sql}{where} RETURNING 1)")
        guards = [f"EXISTS (SELECT 1 FROM {name})"]  # the next record only if this one was written
    ctes.append(
        "head AS (INSERT INTO event_heads (tenant_id, session_id, last_sequence) "
        f"SELECT {t}, {s}, {count} FROM rec ON CONFLICT (tenant_id, session_id) "
        f"DO UPDATE SET last_sequence = event_heads.last_sequence + {count} RETURNING last_sequence)"
    )
    ctes.append(
        "added AS (INSERT INTO events (tenant_id, session_id, sequence, time, payload) "
        f"SELECT {t}, {s}, head.last_sequence - {count} + u.n, {time}, u.p "
        f"FROM head, unnest({payloads}::text[]) WITH ORDINALITY AS u(p, n))"
    )
    results = [
        "(SELECT count(*) FROM rec)",
        "(SELECT last_sequence FROM head)",
        f"(SELECT pg_notify({channel}, {payload}) FROM head)",
    ]
    if fenced:
        results.append("(SELECT fence FROM lease)")
    return f"WITH {', '.join(ctes)} SELECT {', '.join(results)}"


_PARAM = re.compile(r"\$(\d+)")


def _shifted(sql: str, by: int) -> str:
    """``sql`` with each ``$n`` parameter renumbered ``$(n + by)``."""
    return _PARAM.sub(lambda m: f"${int(m.group(1)) + by}", sql) if by else sql


def _logged_op(
    puts: Sequence[tuple[RecordKind[Any], Any, bool]],
    key: SessionKey,
    time: float,
    payloads: Sequence[EventPayload],
    bell_prefix: str,
    fence: tuple[str, int] | None,
) -> tuple[list[Any], _OneStatement[list[Event]]]:
    """Records (``puts``: kind, record, whether inserted; or none) with events appended to their
    session's log, as one statement (``_logged_sql``); the records as stored. A fence that moved
    on is ``LeaseLost``, a record changed or missing is ``Conflict`` or ``NotFound``, a key taken
    is ``AlreadyExists``: then nothing was written."""
    tenant_id, session_id = key
    frozen = [detach(p) for p in payloads]
    encoded = [_codec.dumps(_codec.encode_payload(p)) for p in frozen]
    count = len(frozen)
    stored: list[Any] = []
    record_sqls: list[str] = []
    record_args: tuple[Any, ...] = ()
    record_keys: list[tuple[Any, ...]] = []
    for kind, record, insert in puts:
        done = evolve(detach(record), version=1 if insert else record.version + 1)
        stored.append(done)
        values: tuple[Any, ...] = kind.row(done)
        text = _codec.dumps(kind.encode(done))
        record_keys.append(values[: len(kind.keys)])
        if insert:
            sql = kind.insert_sql.replace(" VALUES (", " SELECT ", 1).removesuffix(")")
            args: tuple[Any, ...] = (*values, 1, text)
        else:
            sql = kind.update_sql
            args = (*values[len(kind.keys) :], done.version, text, *record_keys[-1], record.version)
        record_sqls.append(_shifted(sql, len(record_args)))
        record_args += args
    sql = _logged_sql(tuple(record_sqls), len(record_args) + 1, fence is not None)
    all_args: tuple[Any, ...] = (*record_args, tenant_id, session_id, count, time, encoded)
    all_args += bell_of(bell_prefix, *key)
    if fence is not None:
        all_args += fence

    async def logged(conn: asyncpg.Connection) -> list[Event]:
        try:
            written = await conn.fetchrow(sql, *all_args)
        except asyncpg.UniqueViolationError as exc:
            inserted = [(kind, record) for kind, record, insert in puts if insert]
            if not inserted:
                raise
            kind, record = inserted[-1]
            raise kind.exists(record) from exc
        assert written is not None
        if fence is not None and written[3] != fence[1]:
            raise LeaseLost(
                f"session {session_id!r} is now run by another replica; this one's lease ended",
                metadata={"session_id": session_id},
            )
        if written[1] is None:  # a record was not written: its version moved on, or it is gone
            for (kind, record, insert), record_key in zip(puts, record_keys, strict=True):
                if not insert:
                    stored_version = await conn.fetchval(kind.version_sql, *record_key)
                    if stored_version != record.version:
                        await _raise_lost(conn, kind, record_key, record.version, kind.what(record))
            raise AssertionError("a logged write wrote nothing, yet every record it updates is as read")
        first = int(written[1]) - count + 1
        return [Event(tenant_id, session_id, first + n, time, p) for n, p in enumerate(frozen)]

    return stored, _OneStatement(logged)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection goes back as it is: the store sets nothing on a session (no settings,
    LISTEN, cursors or advisory locks; an unfinished transaction is rolled back by the pool all
    the same), so asyncpg's default reset query would be one more round trip per use, for nothing."""
