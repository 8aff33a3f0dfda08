"""The in-memory store: the default, and the reference for the contract suite.

It copies records on the way in and out so callers cannot change stored state
behind its back, exactly as with a database (``detach`` copies only what is
mutable inside the frozen records). Sessions are also indexed in page order
(``_session_index``) and event logs kept compact (``_compact_log``), so that a
page costs the same whatever the total and an idle session costs little memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from svantic_grpc.core.errors import AlreadyExists, Conflict, NotFound
from svantic_grpc.core.events import (
    AgentJoined,
    AgentLeft,
    ArtifactAdded,
    Event,
    EventPayload,
    InternalAgentsJoined,
    InternalAgentsLeft,
    MessageStateChanged,
    StatusChanged,
    TurnAdded,
)
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
from svantic_grpc.stores._compact_log import Appended, CompactLog
from svantic_grpc.stores._copy import detach
from svantic_grpc.stores._cursor import decode_cursor, encode_cursor
from svantic_grpc.stores._session_index import SessionIndex

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Keeps everything in dicts; lost when the process ends."""

    suspends = False  # no call awaits anything: each one runs to the end in one step

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str], Session] = {}
        self._agents: dict[tuple[str, str], AgentRegistration] = {}
        self._tenant_agents: dict[str, set[tuple[str, str]]] = {}
        """Per tenant, the keys of its agents: a listing reads the tenant's, not every tenant's."""
        self._index = SessionIndex()
        self._events: dict[tuple[str, str], CompactLog] = {}
        # Insertion order is creation order, which list_messages pages through.
        self._messages: dict[tuple[str, str, str], Message] = {}
        self._inputs: dict[tuple[str, str], InputRequest] = {}
        self._audit: dict[str, list[AuditRecord]] = {}
        self._adapter_values: dict[tuple[str, str], str] = {}
        """Kept as JSON text: what is read back is a fresh copy, as from a database."""
        self._session_values: dict[tuple[str, str], set[tuple[str, str]]] = {}
        """Per session: the adapter values that belong to it (deleted with it)."""
        self._value_session: dict[tuple[str, str], tuple[str, str]] = {}
        """Per adapter value that belongs to a session: that session (the reverse of the above)."""

    async def create_session(self, session: Session) -> Session:
        exists = AlreadyExists(f"session {session.session_id!r} already exists", reason="SESSION_EXISTS")
        stored = _insert(self._sessions, (session.tenant_id, session.session_id), session, exists)
        self._index.put(None, stored)
        return stored

    async def get_session(self, *, tenant_id: str, session_id: str) -> Session | None:
        return detach(self._sessions.get((tenant_id, session_id)))

    async def update_session(self, session: Session) -> Session:
        key = (session.tenant_id, session.session_id)
        old = self._sessions.get(key)
        stored = _replace(
            self._sessions, key, session, f"session {session.session_id!r}", "SESSION_NOT_FOUND"
        )
        self._index.put(old, stored)
        return stored

    async def create_session_with_events(
        self, session: Session, *, time: float, payloads: Sequence[EventPayload]
    ) -> tuple[Session, Sequence[Event]]:
        # What ``write`` does for one new session and its events, without building the Change it
        # takes and the Changed it returns or going through its four kinds of record: every
        # InitSession is one of these.
        key = (session.tenant_id, session.session_id)
        if key in self._sessions:
            raise _exists(session)
        stored = evolve(session, version=1)  # nothing in a Session is mutable: ``detach`` shares it
        self._index.put(None, stored)
        self._sessions[key] = stored
        return stored, self._append_lazily(stored, time, payloads)

    async def update_session_with_events(
        self,
        session: Session,
        *,
        time: float,
        payloads: Sequence[EventPayload],
        agents: Sequence[AgentRegistration] = (),
    ) -> tuple[Session, Sequence[Event]]:
        if agents or session.version == 0:  # instances bound or released with it: the full write
            return await super().update_session_with_events(
                session, time=time, payloads=payloads, agents=agents
            )
        # As ``write`` does for one session and its events (every close of a session without
        # remote agents, every join and leave of one): checked, then stored, then the events.
        key = (session.tenant_id, session.session_id)
        version = session.version
        current = self._sessions.get(key)
        if current is None or current.version != version:
            _current(self._sessions, key, version, *_missing(session))  # raises, naming it
        stored = evolve(session, version=version + 1)  # shared by ``detach``, as above
        self._index.put(current, stored)
        self._sessions[key] = stored
        return stored, self._append_lazily(stored, time, payloads)

    async def list_sessions(
        self,
        *,
        tenant_id: str,
        statuses: Iterable[SessionStatus] = (),
        page_size: int = 50,
        cursor: str = "",
    ) -> SessionPage:
        after = decode_cursor(cursor) if cursor else None
        keys = self._index.newest_first(tenant_id, statuses, before=after, limit=page_size + 1)
        page = [self._sessions[(tenant_id, session_id)] for _, session_id in keys[:page_size]]
        more = len(keys) > page_size
        next_cursor = encode_cursor(page[-1].created_at, page[-1].session_id) if more and page else ""
        return SessionPage(tuple(detach(page)), next_cursor)

    async def open_sessions(self) -> Sequence[Session]:
        return [detach(s) for s in self._sessions.values() if s.status is not SessionStatus.CLOSED]

    async def create_agent(self, agent: AgentRegistration) -> AgentRegistration:
        exists = AlreadyExists(f"agent instance {agent.instance_id!r} already registered")
        key = (agent.tenant_id, agent.instance_id)
        stored = _insert(self._agents, key, agent, exists)
        self._tenant_agents.setdefault(agent.tenant_id, set()).add(key)
        return stored

    async def get_agent(self, *, tenant_id: str, instance_id: str) -> AgentRegistration | None:
        return detach(self._agents.get((tenant_id, instance_id)))

    async def update_agent(self, agent: AgentRegistration) -> AgentRegistration:
        key = (agent.tenant_id, agent.instance_id)
        return _replace(self._agents, key, agent, f"agent instance {agent.instance_id!r}", "AGENT_NOT_FOUND")

    async def delete_agent(self, *, tenant_id: str, instance_id: str, version: int) -> None:
        key = (tenant_id, instance_id)
        _current(self._agents, key, version, f"agent instance {instance_id!r}", "AGENT_NOT_FOUND")
        del self._agents[key]
        keys = self._tenant_agents[tenant_id]
        keys.discard(key)
        if not keys:
            del self._tenant_agents[tenant_id]

    async def list_agents(self, *, tenant_id: str, agent_type: str = "") -> Sequence[AgentRegistration]:
        agents = self._agents
        rows = [
            a
            for a in (agents[key] for key in self._tenant_agents.get(tenant_id, ()))
            if not agent_type or a.agent_type == agent_type
        ]
        rows.sort(key=lambda a: (a.agent_type, a.instance_id))
        return detach(rows)

    async def create_message(self, message: Message) -> Message:
        exists = AlreadyExists(
            f"message {message.message_id!r} already exists in session {message.session_id!r}",
            reason="MESSAGE_EXISTS",
        )
        key = (message.tenant_id, message.session_id, message.message_id)
        return _insert(self._messages, key, message, exists)

    async def get_message(self, *, tenant_id: str, session_id: str, message_id: str) -> Message | None:
        return detach(self._messages.get((tenant_id, session_id, message_id)))

    async def find_message(self, *, tenant_id: str, message_id: str) -> Message | None:
        for (tenant, _, found_id), message in self._messages.items():
            if found_id == message_id and tenant == tenant_id:
                return detach(message)
        return None

    async def update_message(self, message: Message) -> Message:
        key = (message.tenant_id, message.session_id, message.message_id)
        return _replace(self._messages, key, message, f"message {message.message_id!r}", "MESSAGE_NOT_FOUND")

    async def list_messages(
        self,
        *,
        tenant_id: str,
        session_id: str = "",
        states: Iterable[MessageState] = (),
        page_size: int = 50,
        cursor: str = "",
    ) -> MessagePage:
        wanted = set(states)
        after = decode_cursor(cursor) if cursor else None
        rows = sorted(
            (
                m
                for (tenant, session, _), m in self._messages.items()
                if tenant == tenant_id
                and (not session_id or session == session_id)
                and (not wanted or m.state in wanted)
            ),
            key=lambda m: (m.created_at, f"{m.session_id}/{m.message_id}"),
        )
        if after is not None:
            rows = [m for m in rows if (m.created_at, f"{m.session_id}/{m.message_id}") > after]
        page = rows[:page_size]
        last = page[-1] if page else None
        more = len(rows) > page_size
        next_cursor = (
            encode_cursor(last.created_at, f"{last.session_id}/{last.message_id}") if more and last else ""
        )
        return MessagePage(tuple(detach(page)), next_cursor)

    async def unfinished_messages(self) -> Sequence[Message]:
        return [m for m in self._messages.values() if not m.state.terminal]

    async def create_input(self, request: InputRequest) -> InputRequest:
        exists = AlreadyExists(f"input request {request.request_id!r} already exists")
        return _insert(self._inputs, (request.tenant_id, request.request_id), request, exists)

    async def get_input(self, *, tenant_id: str, request_id: str) -> InputRequest | None:
        return detach(self._inputs.get((tenant_id, request_id)))

    async def update_input(self, request: InputRequest) -> InputRequest:
        key = (request.tenant_id, request.request_id)
        return _replace(
            self._inputs, key, request, f"input request {request.request_id!r}", "INPUT_NOT_FOUND"
        )

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
        wanted = set(states)
        after = decode_cursor(cursor) if cursor else None
        rows = sorted(
            (
                r
                for (tenant, _), r in self._inputs.items()
                if tenant == tenant_id
                and (not session_id or r.session_id == session_id)
                and (not message_id or r.message_id == message_id)
                and (not wanted or r.state in wanted)
            ),
            key=lambda r: (r.created_at, r.request_id),
        )
        if after is not None:
            rows = [r for r in rows if (r.created_at, r.request_id) > after]
        page = rows[:page_size]
        more = len(rows) > page_size
        next_cursor = encode_cursor(page[-1].created_at, page[-1].request_id) if more and page else ""
        return InputPage(tuple(page), next_cursor)

    async def pending_inputs(self) -> Sequence[InputRequest]:
        return [r for r in self._inputs.values() if r.state is InputState.PENDING]

    async def untold_outcomes(self, *, tenant_id: str = "", session_id: str = "") -> Sequence[InputRequest]:
        return sorted(
            (
                r
                for r in self._inputs.values()
                if r.state is not InputState.PENDING
                and not r.outcome_told
                and (not session_id or (r.tenant_id, r.session_id) == (tenant_id, session_id))
            ),
            key=lambda r: (r.created_at, r.request_id),
        )

    async def granting_inputs(self) -> Sequence[InputRequest]:
        return [
            r
            for r in self._inputs.values()
            if r.state is InputState.RESOLVED
            and r.resolution is not None
            and r.resolution.decision in GRANTING_DECISIONS
        ]

    async def approved_always(self, *, tenant_id: str, policy: str) -> bool:
        return any(
            r.tenant_id == tenant_id and r.policy == policy and r.grants_always for r in self._inputs.values()
        )

    async def put_adapter_value(
        self,
        adapter: str,
        key: str,
        value: Mapping[str, Any],
        *,
        session: tuple[str, str] | None = None,
        if_absent: bool = False,
    ) -> bool:
        if if_absent and (adapter, key) in self._adapter_values:
            return False
        self._adapter_values[(adapter, key)] = json.dumps(dict(value))
        self._unlink(adapter, key)  # a value put again belongs to the session it is put with now
        if session is not None:
            self._session_values.setdefault(session, set()).add((adapter, key))
            self._value_session[(adapter, key)] = session
        return True

    def _unlink(self, adapter: str, key: str) -> None:
        session = self._value_session.pop((adapter, key), None)
        if session is not None:
            values = self._session_values[session]
            values.discard((adapter, key))
            if not values:
                del self._session_values[session]

    async def get_adapter_value(self, adapter: str, key: str) -> dict[str, Any] | None:
        text = self._adapter_values.get((adapter, key))
        return None if text is None else dict(json.loads(text))

    async def delete_adapter_value(self, adapter: str, key: str) -> None:
        self._adapter_values.pop((adapter, key), None)
        self._unlink(adapter, key)

    async def purge_expired_adapter_values(self, adapter: str, *, before: float) -> int:
        due = [
            entry
            for entry, text in self._adapter_values.items()
            if entry[0] == adapter and _expired(json.loads(text), before)
        ]
        for entry in due:
            await self.delete_adapter_value(*entry)
        return len(due)

    async def append_audit(self, record: AuditRecord) -> AuditRecord:
        trail = self._audit.setdefault(record.tenant_id, [])
        stored = replace(record, sequence=len(trail) + 1)
        trail.append(stored)
        return stored

    async def list_audit(self, *, tenant_id: str, request_id: str = "") -> Sequence[AuditRecord]:
        return [r for r in self._audit.get(tenant_id, []) if not request_id or r.request_id == request_id]

    async def append_events(
        self, *, tenant_id: str, session_id: str, time: float, payloads: Sequence[EventPayload]
    ) -> Sequence[Event]:
        return self._append(tenant_id, session_id, time, payloads)

    def _append(
        self, tenant_id: str, session_id: str, time: float, payloads: Sequence[EventPayload]
    ) -> list[Event]:
        key = (tenant_id, session_id)
        log = self._events.get(key)
        if log is None:
            log = self._events[key] = CompactLog()
        session = self._sessions.get(key)
        created_at = None if session is None else session.created_at
        sequence = log.next_sequence
        events = []
        for payload in payloads:
            if type(payload) not in _FROZEN_PAYLOADS:
                payload = detach(payload)
            # Set as evolve sets a record: Event's __init__ only assigns, one object.__setattr__
            # per field (a session's open and close append eight events each).
            event = _new_event(Event)
            event.__dict__.update(
                tenant_id=tenant_id, session_id=session_id, sequence=sequence, time=time, payload=payload
            )
            events.append(event)
            log.append(time, payload, session_id=session_id, created_at=created_at)
            sequence += 1
        return events

    def _append_lazily(self, session: Session, time: float, payloads: Sequence[EventPayload]) -> Appended:
        """Append to the log of ``session`` (just stored); its ``Event`` objects are built when read."""
        key = (session.tenant_id, session.session_id)
        log = self._events.get(key)
        if log is None:
            log = self._events[key] = CompactLog()
        first = log.trimmed + len(log.payloads) + 1  # (``next_sequence``, without the property's call)
        # By exact type (which mypy does not narrow by): an isinstance that fails against one of
        # these (a Sequence, so an ABC) runs the ABC's own check in Python.
        rest = payloads.rest if type(payloads) in _INTERNAL_EVENTS else payloads  # type: ignore[attr-defined]
        if not _FROZEN_PAYLOADS.issuperset(map(type, rest)):  # the others copied, as ``_append`` does
            payloads = [p if type(p) in _FROZEN_PAYLOADS else detach(p) for p in payloads]
        entries = log.extend(time, payloads, session_id=session.session_id, created_at=session.created_at)
        return Appended(session.tenant_id, session.session_id, first, time, entries, session.created_at)

    async def write(self, change: Change) -> Changed:
        # Written out for the hot path (every message makes two or three of these): no coroutine
        # per helper, no per-record isinstance chain, nothing built for the empty kinds.
        kinds: tuple[tuple[tuple[Any, ...], dict[Any, Any], Callable[[Any], Any]], ...] = (
            (change.sessions, self._sessions, _session_slot),
            (change.messages, self._messages, _message_slot),
            (change.inputs, self._inputs, _input_slot),
            (change.agents, self._agents, _agent_slot),
        )
        # Every check first, then every change: a refused part leaves nothing behind.
        keys: list[list[Any]] = []
        for records, table, slot in kinds:
            found = []
            for record in records:
                key = slot(record)
                version = record.version
                if version == 0:
                    if key in table:
                        raise _exists(record)
                elif (current := table.get(key)) is None or current.version != version:
                    _current(table, key, version, *_missing(record))  # raises, naming the record
                found.append(key)
            keys.append(found)
        stored_by_kind: list[tuple[Any, ...]] = []
        for (records, table, _), found in zip(kinds, keys, strict=True):
            if not records:
                stored_by_kind.append(())
                continue
            stored = tuple(evolve(detach(record), version=record.version + 1) for record in records)
            for record, key in zip(stored, found, strict=True):
                if table is self._sessions:
                    self._index.put(table.get(key), record)
                elif table is self._agents and key not in table:
                    self._tenant_agents.setdefault(key[0], set()).add(key)
                table[key] = record
            stored_by_kind.append(stored)
        audit = tuple([await self.append_audit(record) for record in change.audit]) if change.audit else ()
        events: tuple[Event, ...] = ()
        if change.events:
            events = tuple(self._append(change.tenant_id, change.session_id, change.time, change.events))
        sessions, messages, inputs, agents = stored_by_kind
        return Changed(sessions, messages, inputs, agents, audit, events)

    async def list_events(
        self, *, tenant_id: str, session_id: str, after_sequence: int = 0, limit: int = 500
    ) -> Sequence[Event]:
        key = (tenant_id, session_id)
        log = self._events.get(key)
        if log is None:
            return []
        session = self._sessions.get(key)
        created_at = None if session is None else session.created_at
        return log.read(tenant_id, session_id, created_at, after=after_sequence, limit=limit)

    async def trim_events(self, *, tenant_id: str, session_id: str, through_sequence: int) -> None:
        log = self._events.get((tenant_id, session_id))
        if log is not None:
            log.trim(through_sequence)

    async def purge_closed_sessions(self, *, closed_before: float, limit: int) -> int:
        due = self._index.closed_before(closed_before, limit)
        if not due:
            return 0
        gone = set(due)
        for key in due:
            self._index.remove(self._sessions.pop(key))
            self._events.pop(key, None)
            for value_key in self._session_values.pop(key, ()):
                self._adapter_values.pop(value_key, None)
                self._value_session.pop(value_key, None)
        # One pass over the messages and requests: a sweep that finds something to purge is
        # rare (once a sweep interval), and per-session indexes would cost every write.
        for message_key in [k for k in self._messages if (k[0], k[1]) in gone]:
            del self._messages[message_key]
        for input_key, r in list(self._inputs.items()):
            if (r.tenant_id, r.session_id) in gone and not r.grants_always:
                del self._inputs[input_key]
        return len(due)


Record = TypeVar("Record", Session, AgentRegistration, Message, InputRequest)

_new_event = object.__new__

_INTERNAL_EVENTS = (InternalAgentsJoined, InternalAgentsLeft)

_FROZEN_PAYLOADS = frozenset(
    {AgentJoined, AgentLeft, StatusChanged, MessageStateChanged, TurnAdded, ArtifactAdded}
)
"""Event payloads with nothing mutable inside (``detach`` returns them as they are: its ``_SHARED``),
kept without asking it: a session's open and close log eight events each."""


def _session_slot(record: Session) -> Any:
    """A record's key in its table."""
    return (record.tenant_id, record.session_id)


def _message_slot(record: Message) -> Any:
    return (record.tenant_id, record.session_id, record.message_id)


def _input_slot(record: InputRequest) -> Any:
    return (record.tenant_id, record.request_id)


def _agent_slot(record: AgentRegistration) -> Any:
    return (record.tenant_id, record.instance_id)


def _missing(record: Session | Message | InputRequest | AgentRegistration) -> tuple[str, str]:
    """How a record is named when it is missing or changed, and its not-found reason."""
    if isinstance(record, Session):
        return f"session {record.session_id!r}", "SESSION_NOT_FOUND"
    if isinstance(record, Message):
        return f"message {record.message_id!r}", "MESSAGE_NOT_FOUND"
    if isinstance(record, InputRequest):
        return f"input request {record.request_id!r}", "INPUT_NOT_FOUND"
    return f"agent instance {record.instance_id!r}", "AGENT_NOT_FOUND"


def _exists(record: Session | Message | InputRequest | AgentRegistration) -> AlreadyExists:
    """The error for inserting a record whose key is taken (as each ``create_*`` says it)."""
    if isinstance(record, Session):
        return AlreadyExists(f"session {record.session_id!r} already exists", reason="SESSION_EXISTS")
    if isinstance(record, Message):
        return AlreadyExists(
            f"message {record.message_id!r} already exists in session {record.session_id!r}",
            reason="MESSAGE_EXISTS",
        )
    if isinstance(record, InputRequest):
        return AlreadyExists(f"input request {record.request_id!r} already exists")
    return AlreadyExists(f"agent instance {record.instance_id!r} already registered")


def _insert(table: dict[Any, Record], key: Any, record: Record, exists: AlreadyExists) -> Record:
    """Store a new record at version 1."""
    if key in table:
        raise exists
    stored = evolve(detach(record), version=1)
    table[key] = stored
    return stored


def _current(table: dict[Any, Record], key: Any, version: int, what: str, not_found: str) -> Record:
    """The stored record, if it is still at ``version`` (the compare of compare-and-set)."""
    current = table.get(key)
    if current is None:
        raise NotFound(f"{what} not found", reason=not_found)
    if current.version != version:
        raise Conflict(
            f"{what} changed concurrently (version {version} was read, {current.version} is stored)",
            metadata={"stored_version": str(current.version)},
        )
    return current


def _replace(table: dict[Any, Record], key: Any, record: Record, what: str, not_found: str) -> Record:
    """Replace a record written at the version it was read; bump the version."""
    current = _current(table, key, record.version, what, not_found)
    stored = evolve(detach(record), version=current.version + 1)
    table[key] = stored
    return stored


def _expired(value: Mapping[str, Any], before: float) -> bool:
    """Whether a kept adapter value holds a number ``expires_at`` earlier than ``before``."""
    expires_at = value.get("expires_at")
    return isinstance(expires_at, int | float) and not isinstance(expires_at, bool) and expires_at < before
