"""The record kinds the SQL stores (SQLite, PostgreSQL) share.

A kind is one versioned table: its key and indexed columns, how a record maps to a
row and to JSON, how a clash or a miss is named to the caller, and its statements,
written once for the placeholder style of the driver (``?`` or ``$n``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from svantic_grpc.core.errors import AlreadyExists
from svantic_grpc.core.inputs.model import InputRequest, InputState
from svantic_grpc.core.messages.model import Message
from svantic_grpc.core.models import AgentRegistration, Session
from svantic_grpc.stores import _codec

__all__ = ["Kinds", "RecordKind", "message_key"]

R = TypeVar("R", Session, AgentRegistration, Message, InputRequest)
Placeholder = Callable[[int], str]
"""The text of the n-th parameter (from 1) in the driver's style."""


class RecordKind(Generic[R]):
    """A versioned record kind: its table, key and indexed columns, codec, errors and SQL."""

    def __init__(
        self,
        table: str,
        keys: tuple[str, ...],
        columns: tuple[str, ...],
        row: Callable[[R], tuple[Any, ...]],
        encode: Callable[[R], dict[str, Any]],
        decode: Callable[[dict[str, Any]], R],
        exists: Callable[[R], AlreadyExists],
        what: Callable[[R], str],
        not_found: str,
        *,
        param: Placeholder,
    ) -> None:
        self.table = table
        self.keys = keys
        self.row: Callable[[R], tuple[Any, ...]] = row
        """Values of ``keys + columns`` for a record; ``columns`` are rewritten on every update."""
        self.encode: Callable[[R], dict[str, Any]] = encode
        self.decode: Callable[[dict[str, Any]], R] = decode
        self.exists: Callable[[R], AlreadyExists] = exists
        """The error for inserting a record whose key is taken."""
        self.what: Callable[[R], str] = what
        """How a record is named in errors (``session 's1'``)."""
        self.not_found = not_found
        """The reason of the error for a record that is not there."""
        names = (*keys, *columns, "version", "record")
        settable = names[len(keys) :]
        after = len(settable)
        # Parameters of an update: the new values, then the key, then the version read.
        match = " AND ".join(f"{k} = {param(after + n)}" for n, k in enumerate(keys, start=1))
        plain = " AND ".join(f"{k} = {param(n)}" for n, k in enumerate(keys, start=1))
        values = ", ".join(param(n) for n in range(1, len(names) + 1))
        self.insert_sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({values})"
        sets = ", ".join(f"{c} = {param(n)}" for n, c in enumerate(settable, start=1))
        self.update_sql = (
            f"UPDATE {table} SET {sets} WHERE {match} AND version = {param(after + len(keys) + 1)}"
        )
        self.delete_sql = f"DELETE FROM {table} WHERE {plain} AND version = {param(len(keys) + 1)}"
        self.get_sql = f"SELECT record FROM {table} WHERE {plain}"
        self.version_sql = f"SELECT version FROM {table} WHERE {plain}"


def message_key(m: Message) -> str:
    """The tie-breaker after ``created_at`` in message order and cursors (as in the memory store)."""
    return f"{m.session_id}/{m.message_id}"


class Kinds:
    """The four record kinds in one driver's placeholder style.

    Args:
        param: The placeholder style.
        closed_at_column: Sessions keep ``closed_at`` in a column of their own (PostgreSQL);
            SQLite indexes it inside the record instead.
    """

    def __init__(self, param: Placeholder, *, closed_at_column: bool = False) -> None:
        session_columns: tuple[str, ...] = ("status", "created_at", "closed_at")
        if not closed_at_column:
            session_columns = session_columns[:2]
        width = 2 + len(session_columns)
        self.sessions = RecordKind[Session](
            "sessions",
            ("tenant_id", "session_id"),
            session_columns,
            lambda s: (s.tenant_id, s.session_id, s.status.value, s.created_at, s.closed_at)[:width],
            _codec.encode_session,
            _codec.decode_session,
            lambda s: AlreadyExists(f"session {s.session_id!r} already exists", reason="SESSION_EXISTS"),
            lambda s: f"session {s.session_id!r}",
            "SESSION_NOT_FOUND",
            param=param,
        )
        self.agents = RecordKind[AgentRegistration](
            "agents",
            ("tenant_id", "instance_id"),
            ("agent_type",),
            lambda a: (a.tenant_id, a.instance_id, a.agent_type),
            _codec.encode_agent,
            _codec.decode_agent,
            lambda a: AlreadyExists(f"agent instance {a.instance_id!r} already registered"),
            lambda a: f"agent instance {a.instance_id!r}",
            "AGENT_NOT_FOUND",
            param=param,
        )
        self.messages = RecordKind[Message](
            "messages",
            ("tenant_id", "session_id", "message_id"),
            ("state", "created_at", "sort_key"),
            lambda m: (m.tenant_id, m.session_id, m.message_id, m.state.value, m.created_at, message_key(m)),
            _codec.encode_message,
            _codec.decode_message,
            lambda m: AlreadyExists(
                f"message {m.message_id!r} already exists in session {m.session_id!r}",
                reason="MESSAGE_EXISTS",
            ),
            lambda m: f"message {m.message_id!r}",
            "MESSAGE_NOT_FOUND",
            param=param,
        )
        self.inputs = RecordKind[InputRequest](
            "inputs",
            ("tenant_id", "request_id"),
            ("session_id", "message_id", "state", "created_at", "untold"),
            lambda r: (
                r.tenant_id,
                r.request_id,
                r.session_id,
                r.message_id,
                r.state.value,
                r.created_at,
                r.state is not InputState.PENDING and not r.outcome_told,
            ),
            _codec.encode_input,
            _codec.decode_input,
            lambda r: AlreadyExists(f"input request {r.request_id!r} already exists"),
            lambda r: f"input request {r.request_id!r}",
            "INPUT_NOT_FOUND",
            param=param,
        )
