"""The store seam, owned by the core: one async interface the core writes against.

Implementations live in ``svantic_grpc.stores`` (in-memory, SQLite) and depend on
the core, never the other way round; all pass the contract suite in ``tests/stores``.
Writers pass the version they read; a store refuses an update whose version is stale with ``Conflict`` and
never overwrites silently. Changes that belong together (records, audit records,
events) go in one ``write``: all of them land, or none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from svantic_grpc.core.events import Event, EventBell, EventPayload
from svantic_grpc.core.evolve import evolve
from svantic_grpc.core.inputs.model import InputRequest, InputState
from svantic_grpc.core.messages.model import Message, MessageState
from svantic_grpc.core.metrics import NO_METRICS, Metrics
from svantic_grpc.core.models import AgentRegistration, Session, SessionStatus
from svantic_grpc.core.ownership import Ownership, SoleOwner

if TYPE_CHECKING:
    from svantic_grpc.core.dispatch._relay import Relay

__all__ = [
    "PAGE_MAX_BYTES",
    "AuditRecord",
    "Change",
    "Changed",
    "InputPage",
    "MessagePage",
    "SessionPage",
    "Store",
    "as_stored",
    "fitting",
]

_R = TypeVar("_R", Session, Message, InputRequest, AgentRegistration)
_T = TypeVar("_T")


@dataclass(frozen=True)
class SessionPage:
    """One page of sessions, newest first."""

    sessions: tuple[Session, ...]
    next_cursor: str
    """Opaque; empty on the last page."""


@dataclass(frozen=True)
class MessagePage:
    """One page of messages, oldest first."""

    messages: tuple[Message, ...]
    next_cursor: str
    """Opaque; empty on the last page."""


@dataclass(frozen=True)
class InputPage:
    """One page of input requests, oldest first."""

    requests: tuple[InputRequest, ...]
    next_cursor: str


@dataclass(frozen=True)
class AuditRecord:
    """One resolution of an input request: who, through which surface, when, and what."""

    tenant_id: str
    request_id: str
    session_id: str
    message_id: str
    kind: str
    outcome: str
    """``approve``, ``deny: <reason>``, ``form submitted``, ``confirmed``, ``expired``, ``canceled``..."""
    actor: str
    surface: str
    time: float
    sequence: int = 0
    """Set by the store: order within the tenant."""


@dataclass(frozen=True)
class Change:
    """Changes that belong together: the store writes all of them or none (one transaction).

    A record put at ``version`` 0 is inserted (``AlreadyExists`` if its key is taken); one at
    version ``n`` replaces the stored record at version ``n`` (``NotFound``, ``Conflict``).
    ``events`` are appended to the log of ``session_id``, after the records, at ``time``.
    """

    tenant_id: str
    session_id: str
    """The session whose log ``events`` go to."""
    time: float = 0.0
    """When ``events`` happened."""
    sessions: tuple[Session, ...] = ()
    messages: tuple[Message, ...] = ()
    inputs: tuple[InputRequest, ...] = ()
    agents: tuple[AgentRegistration, ...] = ()
    audit: tuple[AuditRecord, ...] = ()
    """Appended to the tenant's audit trail; the store numbers them."""
    events: tuple[EventPayload, ...] = ()
    hand_off: bool = False
    """The messages inserted here run on the replica that owns the session, not on this one: the
    store records them as handed to it, in the same transaction (``core.ownership``)."""


@dataclass(frozen=True)
class Changed:
    """What ``Store.write`` stored: each record with its new version, audit and events numbered."""

    sessions: tuple[Session, ...] = ()
    messages: tuple[Message, ...] = ()
    inputs: tuple[InputRequest, ...] = ()
    agents: tuple[AgentRegistration, ...] = ()
    audit: tuple[AuditRecord, ...] = ()
    events: tuple[Event, ...] = ()


PAGE_MAX_BYTES = 2 * 1024 * 1024
"""What one page of a listing carries at most (one item alone may carry more): a page ends early,
so it stays readable by a client with gRPC's default 4 MB receive limit."""


def fitting(items: Sequence[_T], size: Callable[[_T], int], limit: int = PAGE_MAX_BYTES) -> int:
    """How many of ``items``, in order, fit in ``limit`` bytes by ``size`` (at least one)."""
    carried = 0
    for index, item in enumerate(items):
        carried += size(item)
        if carried > limit and index > 0:
            return index
    return len(items)


def as_stored(record: _R) -> _R:
    """``record`` as ``Store.write`` stores it: version 1 when inserted, else one above."""
    return evolve(record, version=record.version + 1)


class Store(ABC):
    """Durable state of the mesh, partitioned by tenant.

    Every read takes the tenant id, and a record of another tenant is
    indistinguishable from a missing one.
    """

    suspends: bool = True
    """Whether a call may give up the event loop before it is done (I/O, a thread): a caller
    cancelled then may find its write landed anyway. ``False`` for a store whose calls run to
    the end at once."""

    metrics: Metrics = NO_METRICS
    """Told of each commit (its duration and how many writes it carried); set by the mesh."""

    # Sessions

    @abstractmethod
    async def create_session(self, session: Session) -> Session:
        """Insert a new session; returns it with ``version`` 1.

        Raises:
            AlreadyExists: the tenant already has a session with this id.
        """

    @abstractmethod
    async def get_session(self, *, tenant_id: str, session_id: str) -> Session | None:
        """The session, or ``None``."""

    @abstractmethod
    async def update_session(self, session: Session) -> Session:
        """Replace a session whose stored version equals ``session.version``.

        Returns it with the version bumped.

        Raises:
            NotFound: no such session.
            Conflict: the stored version differs (someone else wrote first).
        """

    @abstractmethod
    async def list_sessions(
        self,
        *,
        tenant_id: str,
        statuses: Iterable[SessionStatus] = (),
        page_size: int = 50,
        cursor: str = "",
    ) -> SessionPage:
        """The tenant's sessions, newest first, optionally filtered by status."""

    @abstractmethod
    async def open_sessions(self) -> Sequence[Session]:
        """Every session of every tenant that is not closed (for start-up recovery)."""

    # Agent registrations

    @abstractmethod
    async def create_agent(self, agent: AgentRegistration) -> AgentRegistration:
        """Insert a registration; returns it with ``version`` 1.

        Raises:
            AlreadyExists: the tenant already has this instance id.
        """

    @abstractmethod
    async def get_agent(self, *, tenant_id: str, instance_id: str) -> AgentRegistration | None:
        """The registration, or ``None``."""

    @abstractmethod
    async def update_agent(self, agent: AgentRegistration) -> AgentRegistration:
        """Replace a registration whose stored version equals ``agent.version``.

        Raises:
            NotFound: no such instance.
            Conflict: the stored version differs.
        """

    @abstractmethod
    async def delete_agent(self, *, tenant_id: str, instance_id: str, version: int) -> None:
        """Remove a registration at ``version``.

        Raises:
            NotFound: no such instance.
            Conflict: the stored version differs.
        """

    @abstractmethod
    async def list_agents(self, *, tenant_id: str, agent_type: str = "") -> Sequence[AgentRegistration]:
        """The tenant's registrations, by agent type then instance id."""

    # Messages

    @abstractmethod
    async def create_message(self, message: Message) -> Message:
        """Insert a message; returns it with ``version`` 1.

        Raises:
            AlreadyExists: the session already has a message with this id.
        """

    @abstractmethod
    async def get_message(self, *, tenant_id: str, session_id: str, message_id: str) -> Message | None:
        """The message, or ``None``."""

    @abstractmethod
    async def find_message(self, *, tenant_id: str, message_id: str) -> Message | None:
        """The tenant's message with this id, whichever session holds it (``None`` if none).

        For a caller that knows a message by its id alone (an A2A task); it may read through
        the tenant's messages, so nothing on the message path uses it."""

    @abstractmethod
    async def update_message(self, message: Message) -> Message:
        """Replace a message whose stored version equals ``message.version``.

        Raises:
            NotFound: no such message.
            Conflict: the stored version differs.
        """

    @abstractmethod
    async def list_messages(
        self,
        *,
        tenant_id: str,
        session_id: str = "",
        states: Iterable[MessageState] = (),
        page_size: int = 50,
        cursor: str = "",
    ) -> MessagePage:
        """The tenant's messages (of one session, if given), oldest first, optionally by state."""

    @abstractmethod
    async def unfinished_messages(self) -> Sequence[Message]:
        """Every message of every tenant that is not terminal (for start-up recovery)."""

    # Input requests and their audit trail

    @abstractmethod
    async def create_input(self, request: InputRequest) -> InputRequest:
        """Insert a request; returns it with ``version`` 1 (``AlreadyExists`` on a taken id)."""

    @abstractmethod
    async def get_input(self, *, tenant_id: str, request_id: str) -> InputRequest | None:
        """The request, or ``None``."""

    @abstractmethod
    async def update_input(self, request: InputRequest) -> InputRequest:
        """Replace a request whose stored version equals ``request.version``: the compare-and-set
        that makes the first resolution win.

        Raises:
            NotFound: no such request.
            Conflict: the stored version differs.
        """

    @abstractmethod
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
        """The tenant's requests (of one session or message, if given), oldest first."""

    @abstractmethod
    async def pending_inputs(self) -> Sequence[InputRequest]:
        """Every pending request of every tenant (for start-up recovery of expiries)."""

    @abstractmethod
    async def untold_outcomes(self, *, tenant_id: str = "", session_id: str = "") -> Sequence[InputRequest]:
        """Ended requests whose outcome the adapters were not told yet (``outcome_told`` false), of
        every tenant, or of one session when both are given; oldest first."""

    @abstractmethod
    async def granting_inputs(self) -> Sequence[InputRequest]:
        """Every tenant's tool approvals answered ``approve_for_session`` or ``approve_always``,
        oldest first: the answers that outlive their request (for start-up recovery)."""

    @abstractmethod
    async def approved_always(self, *, tenant_id: str, policy: str) -> bool:
        """Whether a request of the tenant under ``policy`` was answered ``approve_always`` (by any
        process sharing the store)."""

    # Adapters' own values

    @abstractmethod
    async def put_adapter_value(
        self,
        adapter: str,
        key: str,
        value: Mapping[str, Any],
        *,
        session: tuple[str, str] | None = None,
        if_absent: bool = False,
    ) -> bool:
        """Keep a small JSON object for ``adapter`` under ``key`` (replacing what was there, unless
        ``if_absent``: then only if nothing is there, decided in the store, so two processes cannot
        both think they put it). Returns whether it was put. With ``session`` (tenant id, session id)
        it belongs to that session: ``purge_closed_sessions`` deletes it with the session."""

    @abstractmethod
    async def get_adapter_value(self, adapter: str, key: str) -> dict[str, Any] | None:
        """What ``put_adapter_value`` kept, or ``None``."""

    @abstractmethod
    async def delete_adapter_value(self, adapter: str, key: str) -> None:
        """Drop a kept value; nothing happens if there is none."""

    @abstractmethod
    async def purge_expired_adapter_values(self, adapter: str, *, before: float) -> int:
        """Delete ``adapter``'s values whose ``expires_at`` (a number in the value) is earlier
        than ``before``; values without one stay. Returns how many went."""

    @abstractmethod
    async def append_audit(self, record: AuditRecord) -> AuditRecord:
        """Add to the tenant's audit trail; returns it with its sequence."""

    @abstractmethod
    async def list_audit(self, *, tenant_id: str, request_id: str = "") -> Sequence[AuditRecord]:
        """The tenant's audit trail (of one request, if given), oldest first."""

    # Event log

    async def append_event(
        self, *, tenant_id: str, session_id: str, time: float, payload: EventPayload
    ) -> Event:
        """Append to the session's log; the event gets the next sequence number (from 1)."""
        (event,) = await self.append_events(
            tenant_id=tenant_id, session_id=session_id, time=time, payloads=(payload,)
        )
        return event

    @abstractmethod
    async def write(self, change: Change) -> Changed:
        """Apply every record put, audit record and event of ``change`` in one transaction.

        Either all of it is stored or, when any part fails (``AlreadyExists``, ``NotFound``,
        ``Conflict``, an I/O error), none of it.
        """

    async def create_session_with_events(
        self, session: Session, *, time: float, payloads: Sequence[EventPayload]
    ) -> tuple[Session, Sequence[Event]]:
        """Insert a session and append events to its log in one write."""
        change = Change(
            session.tenant_id,
            session.session_id,
            time,
            sessions=(session if session.version == 0 else evolve(session, version=0),),
            events=tuple(payloads),
        )
        written = await self.write(change)
        return written.sessions[0], written.events

    async def update_session_with_events(
        self,
        session: Session,
        *,
        time: float,
        payloads: Sequence[EventPayload],
        agents: Sequence[AgentRegistration] = (),
    ) -> tuple[Session, Sequence[Event]]:
        """Replace a session (at its version) and append events to its log in one write, with
        ``agents`` (each at its version: the instances bound to it or released from it)."""
        written = await self.write(
            Change(
                session.tenant_id,
                session.session_id,
                time,
                sessions=(session,),
                agents=tuple(agents),
                events=tuple(payloads),
            )
        )
        return written.sessions[0], written.events

    async def create_message_with_events(
        self, message: Message, *, time: float, payloads: Sequence[EventPayload], hand_off: bool = False
    ) -> tuple[Message, Sequence[Event]]:
        """Insert a message and append events to its session's log in one write (with ``hand_off``,
        recorded as handed to the replica that owns the session)."""
        change = Change(
            message.tenant_id,
            message.session_id,
            time,
            messages=(evolve(message, version=0),),
            events=tuple(payloads),
            hand_off=hand_off,
        )
        written = await self.write(change)
        return written.messages[0], written.events

    async def update_message_with_events(
        self, message: Message, *, time: float, payloads: Callable[[Message], Sequence[EventPayload]]
    ) -> tuple[Message, Sequence[Event]]:
        """Replace a message (at its version) and append events to its session's log in one write.

        ``payloads`` is given the message as it will be stored (its version bumped).
        """
        events = tuple(payloads(as_stored(message)))
        written = await self.write(
            Change(message.tenant_id, message.session_id, time, messages=(message,), events=events)
        )
        return written.messages[0], written.events

    @abstractmethod
    async def append_events(
        self, *, tenant_id: str, session_id: str, time: float, payloads: Sequence[EventPayload]
    ) -> Sequence[Event]:
        """Append events to the session's log in one write, numbered consecutively after the last."""

    @abstractmethod
    async def list_events(
        self, *, tenant_id: str, session_id: str, after_sequence: int = 0, limit: int = 500
    ) -> Sequence[Event]:
        """Events with a sequence above ``after_sequence``, in order, at most ``limit``.

        Events trimmed by ``trim_events`` are gone: the first event returned may then
        have a sequence above ``after_sequence + 1``.
        """

    # Retention

    @abstractmethod
    async def trim_events(self, *, tenant_id: str, session_id: str, through_sequence: int) -> None:
        """Forget the session's events up to and including ``through_sequence``.

        Later events keep their sequence numbers, and new ones continue after them.
        """

    @abstractmethod
    async def purge_closed_sessions(self, *, closed_before: float, limit: int) -> int:
        """Delete up to ``limit`` sessions closed before ``closed_before``, with their messages,
        input requests and event logs, in one write; returns how many sessions went.

        The audit trail stays: it is the record of who decided what. So does a request answered
        ``approve_always`` (``InputRequest.grants_always``): it is the tenant's grant, read back at
        start-up, not the session's.
        """

    # Other processes sharing the store

    def event_bell(self) -> EventBell | None:
        """What tells this process that another one appended events (``None``: only this
        process writes, as with the memory store, or nothing rings, as with SQLite)."""
        return None

    def ownership(self, *, replica_id: str, lease_s: float, renew_s: float) -> Ownership:
        """Which sessions this process runs; by default all of them (no other process writes)."""
        return SoleOwner(replica_id)

    def agent_relay(self, *, replica_id: str, poll_s: float) -> Relay | None:
        """What carries dispatches to connected agents whose stream another process holds
        (``None``: no other process shares the store)."""
        return None

    # Lifecycle

    async def connect(self) -> None:  # noqa: B027 - optional hook
        """Open files or connections and prepare the schema; the server calls it before use."""

    async def close(self) -> None:  # noqa: B027 - optional hook, idempotent
        """Release resources. Safe to call twice."""
