"""A session's event log as the in-memory store keeps it: small enough for 100,000 idle sessions.

An ``Event`` object per entry repeats what the log already knows (tenant, session, a
sequence that is the position) and cost most of an idle session's memory: opening one
appends an ``agent_joined`` per internal agent, each naming an instance made up of the
role and the session id. The log keeps each entry's time and payload in two lists,
and an internal agent's join or leave as a shared marker of its role, rebuilt on read
exactly as it was appended (the agent joined when the session was created).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from svantic_grpc.core.events import (
    AgentJoined,
    AgentLeft,
    Event,
    EventPayload,
    InternalAgentsJoined,
    InternalAgentsLeft,
)
from svantic_grpc.core.models import INTERNAL_ROLES, JoinReason, SessionAgent

__all__ = ["Appended", "CompactLog"]


class _Joined:
    """An internal agent of this role joined when the session was created."""

    __slots__ = ("role",)

    def __init__(self, role: int) -> None:
        self.role = role


class _Left:
    """An internal agent of this role left, for this reason."""

    __slots__ = ("reason", "role")

    def __init__(self, role: int, reason: str) -> None:
        self.role = role
        self.reason = reason


_JOINED = tuple(_Joined(n) for n in range(len(INTERNAL_ROLES)))
_LEFT: dict[tuple[int, str], _Left] = {}
_LEFT_ALL: dict[str, tuple[_Left, ...]] = {}
"""Per reason: every internal role's leave marker (the six a close appends), when all are kept."""
_MAX_LEFT_REASONS = 64
"""Leave markers kept for sharing; an unusual reason beyond these is stored as it came."""
_ROLE_OF = {f"savant:{role}": n for n, role in enumerate(INTERNAL_ROLES)}

Entry = EventPayload | _Joined | _Left


class CompactLog:
    """One session's retained events, oldest first; ``trimmed`` of the oldest were let go."""

    __slots__ = ("payloads", "times", "trimmed")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.payloads: list[Entry] = []
        self.trimmed = 0

    def __len__(self) -> int:
        return len(self.payloads)

    def append(
        self, time: float, payload: EventPayload, *, session_id: str, created_at: float | None
    ) -> None:
        """Add one event; ``created_at`` is the session's (``None`` when the store has no such session)."""
        self.times.append(time)
        self.payloads.append(_compact(payload, session_id, created_at))

    def extend(
        self, time: float, payloads: Sequence[EventPayload], *, session_id: str, created_at: float | None
    ) -> list[Entry]:
        """Add events at one ``time``; returns their entries. The internal agents' joins or leaves of
        ``InternalAgentsJoined`` / ``InternalAgentsLeft`` go in as markers without being built."""
        entries: list[Entry]
        rest: Sequence[EventPayload] = payloads
        if type(payloads) is InternalAgentsJoined and payloads.session_id == session_id:
            if payloads.joined_at == created_at:  # as ``_expand`` gives them back
                entries, rest = list(_JOINED), payloads.rest
            else:
                entries = []
        elif type(payloads) is InternalAgentsLeft and payloads.session_id == session_id:
            markers = _LEFT_ALL.get(payloads.reason)
            if markers is None:
                found = [_left(role, payloads.reason) for role in range(len(INTERNAL_ROLES))]
                if all(found):
                    markers = _LEFT_ALL[payloads.reason] = tuple(found)  # type: ignore[arg-type]
            entries = []
            if markers is not None:
                entries, rest = list(markers), payloads.rest
        else:
            entries = []
        for payload in rest:  # (a session's open and close: one status change each)
            entries.append(
                _compact(payload, session_id, created_at) if type(payload) in _AGENT_EVENTS else payload
            )
        self.times.extend([time] * len(entries))
        self.payloads.extend(entries)
        return entries

    def read(
        self, tenant_id: str, session_id: str, created_at: float | None, *, after: int, limit: int
    ) -> list[Event]:
        """Up to ``limit`` events with a sequence above ``after``, in order."""
        start = max(after - self.trimmed, 0)
        stop = start + max(limit, 0)
        first = self.trimmed + start + 1
        return [
            Event(tenant_id, session_id, first + n, time, _expand(entry, session_id, created_at))
            for n, (time, entry) in enumerate(
                zip(self.times[start:stop], self.payloads[start:stop], strict=True)
            )
        ]

    def trim(self, through_sequence: int) -> None:
        """Let go of the events up to ``through_sequence``."""
        drop = min(through_sequence - self.trimmed, len(self.payloads))
        if drop > 0:
            del self.times[:drop]
            del self.payloads[:drop]
            self.trimmed += drop

    @property
    def next_sequence(self) -> int:
        return self.trimmed + len(self.payloads) + 1


_AGENT_EVENTS = frozenset((AgentJoined, AgentLeft))
"""What ``_compact`` may make a marker of (by exact type: no class derives from either); anything
else is kept as it is."""


def _compact(payload: EventPayload, session_id: str, created_at: float | None) -> Entry:
    """A shared marker when ``payload`` is an internal agent's join or leave as the session makes
    it (so ``_expand`` gives it back equal), else ``payload`` itself."""
    if isinstance(payload, AgentJoined):
        agent = payload.agent
        role = _ROLE_OF.get(agent.agent_type)
        if (
            role is not None
            and agent.internal
            and agent.join_reason is JoinReason.AUTO
            and agent.left_at is None
            and agent.joined_at == created_at
            and agent.instance_id == f"{INTERNAL_ROLES[role]}-{session_id}"
        ):
            return _JOINED[role]
    elif isinstance(payload, AgentLeft):
        role = _ROLE_OF.get(payload.agent_type)
        if role is not None and payload.instance_id == f"{INTERNAL_ROLES[role]}-{session_id}":
            marker = _left(role, payload.reason)
            if marker is not None:
                return marker
    return payload


def _left(role: int, reason: str) -> _Left | None:
    """The shared leave marker of this role and reason (``None`` past ``_MAX_LEFT_REASONS``)."""
    marker = _LEFT.get((role, reason))
    if marker is None and len(_LEFT) < _MAX_LEFT_REASONS:
        marker = _LEFT[(role, reason)] = _Left(role, reason)
    return marker


def _expand(entry: Entry, session_id: str, created_at: float | None) -> EventPayload:
    if isinstance(entry, _Joined):
        assert created_at is not None  # a marker is only made for a session the store has
        role = INTERNAL_ROLES[entry.role]
        agent = SessionAgent(f"savant:{role}", f"{role}-{session_id}", JoinReason.AUTO, created_at, True)
        return AgentJoined(agent)
    if isinstance(entry, _Left):
        role = INTERNAL_ROLES[entry.role]
        return AgentLeft(f"savant:{role}", f"{role}-{session_id}", entry.reason)
    return entry


_new_event = object.__new__


class Appended(Sequence[Event]):
    """The events one write appended (``entries``, numbered from ``first``), each ``Event`` built
    when first read: with no live subscriber, the bus reads none of them (it trims by ``first``)."""

    __slots__ = ("_built", "created_at", "entries", "first", "last", "session_id", "tenant_id", "time")

    def __init__(
        self,
        tenant_id: str,
        session_id: str,
        first: int,
        time: float,
        entries: list[Entry],
        created_at: float | None,
    ) -> None:
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.first = first
        self.last = first + len(entries) - 1
        """The last one's sequence (``first - 1`` when none): the bus reads it to trim, without asking
        this Sequence's length through its Python ``__len__``."""
        self.time = time
        self.entries = entries
        self.created_at = created_at
        self._built: list[Event | None] = [None] * len(entries)

    def __len__(self) -> int:
        return len(self.entries)

    @overload
    def __getitem__(self, index: int) -> Event: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Event]: ...

    def __getitem__(self, index: int | slice) -> Event | Sequence[Event]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self.entries)))]
        event = self._built[index]  # IndexError past either end, as a list
        if event is None:
            if index < 0:
                index += len(self.entries)
            entry = self.entries[index]
            payload = _expand(entry, self.session_id, self.created_at)
            # Set as the memory store sets an appended event (Event's __init__ only assigns).
            event = _new_event(Event)
            event.__dict__.update(
                tenant_id=self.tenant_id,
                session_id=self.session_id,
                sequence=self.first + index,
                time=self.time,
                payload=payload,
            )
            self._built[index] = event
        return event

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to a list of the same events, as a list
