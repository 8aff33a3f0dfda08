"""Conversions between protobuf messages and core records. No logic beyond mapping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from svantic_grpc.api._wkt import from_struct, struct, timestamp
from svantic_grpc.api.convert_messages import message_event
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.events import AgentJoined, AgentLeft, Event, StatusChanged
from svantic_grpc.core.models import (
    INTERNAL_AGENTS,
    AgentRegistration,
    AgentStatus,
    DeploymentMode,
    JoinReason,
    Session,
    SessionAgent,
    SessionStatus,
    Skill,
    Tool,
)
from svantic_grpc.core.registry import AgentSpec
from svantic_grpc.pb import agent_types_pb2 as agent_pb
from svantic_grpc.pb import event_types_pb2 as event_pb
from svantic_grpc.pb import registry_service_pb2 as registry_pb
from svantic_grpc.pb import session_types_pb2 as session_pb

E = TypeVar("E")

SESSION_STATUS = {
    SessionStatus.OPENING: session_pb.SESSION_STATUS_OPENING,
    SessionStatus.ACTIVE: session_pb.SESSION_STATUS_ACTIVE,
    SessionStatus.PAUSED: session_pb.SESSION_STATUS_PAUSED,
    SessionStatus.CLOSED: session_pb.SESSION_STATUS_CLOSED,
}
SESSION_STATUS_FROM_PB = {v: k for k, v in SESSION_STATUS.items()}
_SESSION_STATUS_BY_VALUE = {k._value_: v for k, v in SESSION_STATUS.items()}
"""``SESSION_STATUS`` by the status's value: a status as a key hashes in Python (``Enum.__hash__``)."""
JOIN_REASON = {
    JoinReason.AUTO: agent_pb.JOIN_REASON_AUTO,
    JoinReason.SELF: agent_pb.JOIN_REASON_SELF,
    JoinReason.ROUTED: agent_pb.JOIN_REASON_ROUTED,
    JoinReason.INVITED: agent_pb.JOIN_REASON_INVITED,
}
AGENT_STATUS = {
    AgentStatus.AVAILABLE: agent_pb.AGENT_STATUS_AVAILABLE,
    AgentStatus.BUSY: agent_pb.AGENT_STATUS_BUSY,
    AgentStatus.DRAINING: agent_pb.AGENT_STATUS_DRAINING,
    AgentStatus.OFFLINE: agent_pb.AGENT_STATUS_OFFLINE,
    AgentStatus.UNHEALTHY: agent_pb.AGENT_STATUS_UNHEALTHY,
    AgentStatus.UNKNOWN: agent_pb.AGENT_STATUS_UNKNOWN,
}
AGENT_STATUS_FROM_PB = {v: k for k, v in AGENT_STATUS.items()}
DEPLOYMENT_MODE = {
    DeploymentMode.HOSTED: agent_pb.DEPLOYMENT_MODE_HOSTED,
    DeploymentMode.CONNECTED: agent_pb.DEPLOYMENT_MODE_CONNECTED,
}
DEPLOYMENT_MODE_FROM_PB = {v: k for k, v in DEPLOYMENT_MODE.items()}


def session_agent(agent: SessionAgent) -> session_pb.SessionAgent:
    return session_pb.SessionAgent(
        agent_type=agent.agent_type,
        instance_id=agent.instance_id,
        join_reason=JOIN_REASON[agent.join_reason],
        joined_at=timestamp(agent.joined_at),
        internal=agent.internal,
        left_at=timestamp(agent.left_at),
    )


def session(
    record: Session,
    *,
    expires_at: float | None,
    include_agents: bool = True,
    into: session_pb.Session | None = None,
) -> session_pb.Session:
    """The session in protobuf form, written into ``into`` (an empty field of a response) when given.

    Filled in place, each time set by its fields: InitSession answers with the session and its
    seven agents, and building each Timestamp and agent to copy it in was most of its work here.
    """
    message = session_pb.Session() if into is None else into
    message.session_id = record.session_id
    message.status = _SESSION_STATUS_BY_VALUE[record.status._value_]
    # An empty string is what an empty message holds already: not set (each set is a call into
    # protobuf; most sessions have no user_id, an open one no close_reason).
    if record.user_id:
        message.user_id = record.user_id
    if record.created_by:
        message.created_by = record.created_by
    if record.creator_agent_type:
        message.creator_agent_type = record.creator_agent_type
    # The session's times are mostly one or two values (opened: created, updated and last active
    # at once; closed: updated when closed): each converted once (as ``_nanos``, written out), and
    # each Timestamp field read once (every read of it makes its Python wrapper anew).
    created = divmod(round(record.created_at * 1e9), _NANOS_PER_SECOND)
    stamp = message.created_at
    stamp.seconds, stamp.nanos = created
    updated = (
        created
        if record.updated_at == record.created_at
        else divmod(round(record.updated_at * 1e9), _NANOS_PER_SECOND)
    )
    stamp = message.updated_at
    stamp.seconds, stamp.nanos = updated
    active = record.last_activity_at
    stamp = message.last_activity_at
    stamp.seconds, stamp.nanos = (
        created if active == record.created_at else updated if active == record.updated_at else _nanos(active)
    )
    if expires_at is not None:
        stamp = message.expires_at
        stamp.seconds, stamp.nanos = divmod(round(expires_at * 1e9), _NANOS_PER_SECOND)
    closed = None
    if record.closed_at is not None:
        closed = updated if record.closed_at == record.updated_at else _nanos(record.closed_at)
        stamp = message.closed_at
        stamp.seconds, stamp.nanos = closed
    if record.close_reason:
        message.close_reason = record.close_reason
    message.version = record.version
    if include_agents:
        add = message.agents.add
        # The six internal agents (``Session.internal_agents``) straight from the session, without
        # building them: their encoding, merged in at once (``_internal_agents``).
        internal = _internal_agents(message, record.session_id, closed is not None)
        if internal is not None:
            message.MergeFromString(internal)
        else:  # an id too long for the templates: the first set field by field, the others copies
            session_id = record.session_id
            first: session_pb.SessionAgent | None = None
            for agent_type, prefix in INTERNAL_AGENTS:
                target = add()
                if first is None:
                    first = target
                    target.join_reason = agent_pb.JOIN_REASON_AUTO
                    joined_at = target.joined_at
                    joined_at.seconds, joined_at.nanos = created
                    target.internal = True
                    if closed is not None:
                        left_at = target.left_at
                        left_at.seconds, left_at.nanos = closed
                else:
                    target.CopyFrom(first)
                target.agent_type = agent_type
                target.instance_id = prefix + session_id
        # Most agents share the session's few times: each converted once.
        times: dict[float, tuple[int, int]] = {}
        for a in record.agents:
            target = add()
            target.agent_type = a.agent_type
            target.instance_id = a.instance_id
            target.join_reason = JOIN_REASON[a.join_reason]
            joined = times.get(a.joined_at)
            if joined is None:
                joined = times[a.joined_at] = _nanos(a.joined_at)
            target.joined_at.seconds, target.joined_at.nanos = joined
            target.internal = a.internal
            if a.left_at is not None:
                left = times.get(a.left_at)
                if left is None:
                    left = times[a.left_at] = _nanos(a.left_at)
                target.left_at.seconds, target.left_at.nanos = left
    return message


def _internal_agents(message: session_pb.Session, session_id: str, closed: bool) -> bytes | None:
    """The encoding of the session's six internal agents as ``Session.agents`` entries, given its
    ``created_at`` (their ``joined_at``) and, if ``closed``, ``closed_at`` (their ``left_at``) set in
    ``message``; ``None`` for an id too long for the one-byte lengths of ``_template``.

    Built as the field-by-field agents serialize (fields in order), with one bytes formatting on
    a template per id and times length: setting six agents' fields one by one, each a call into
    protobuf, was about half of InitSession's conversion (callgrind: 74K -> 59K instructions for
    its response, serialized).
    """
    sid = session_id.encode()
    joined = message.created_at.SerializeToString()
    common = b"\x18\x01\x22%c%b\x28\x01" % (len(joined), joined)  # join_reason AUTO, joined_at, internal
    if closed:
        left = message.closed_at.SerializeToString()
        common += b"\x32%c%b" % (len(left), left)  # left_at
    key = (len(sid), len(common))
    template = _TEMPLATES.get(key)
    if template is None and key not in _TEMPLATES:
        template = _TEMPLATES[key] = _template(*key)
        if len(_TEMPLATES) > 64:  # ids of many lengths (chosen by callers): keep a few
            _TEMPLATES.clear()
    return template % ((sid, common) * len(INTERNAL_AGENTS)) if template is not None else None


def _template(id_length: int, common_length: int) -> bytes | None:
    """The six internal agents' encoding for a session id and common part of these lengths, with
    ``%b`` for each of them; ``None`` if an agent's length or its instance id's takes two bytes."""
    parts: list[bytes] = []
    for agent_type, prefix in INTERNAL_AGENTS:
        type_bytes, prefix_bytes = agent_type.encode(), prefix.encode()
        instance_length = len(prefix_bytes) + id_length
        size = 2 + len(type_bytes) + 2 + instance_length + common_length
        if size > 127 or len(type_bytes) > 127:
            return None
        literal = b"".join(
            (
                bytes((0x62, size, 0x0A, len(type_bytes))),  # agents entry; agent_type
                type_bytes,
                bytes((0x12, instance_length)),  # instance_id: prefix + session id
                prefix_bytes,
            )
        )
        # (a length byte may be a "%" too) then the session id; join_reason, joined_at, internal (, left_at)
        parts += (literal.replace(b"%", b"%%"), b"%b%b")
    return b"".join(parts)


_TEMPLATES: dict[tuple[int, int], bytes | None] = {}
"""``_template``'s answers by (session id length, common part length): a few in practice."""


_NANOS_PER_SECOND = 1_000_000_000


def _nanos(seconds: float) -> tuple[int, int]:
    """Epoch ``seconds`` as a Timestamp's (seconds, nanos), as ``_wkt.timestamp`` rounds them."""
    return divmod(round(seconds * 1e9), _NANOS_PER_SECOND)


def event(record: Event) -> event_pb.SessionEvent:
    message = event_pb.SessionEvent(
        session_id=record.session_id, sequence=record.sequence, time=timestamp(record.time)
    )
    payload = record.payload
    if isinstance(payload, AgentJoined):
        message.agent_joined.agent.CopyFrom(session_agent(payload.agent))
    elif isinstance(payload, AgentLeft):
        message.agent_left.CopyFrom(
            event_pb.AgentLeft(
                agent_type=payload.agent_type, instance_id=payload.instance_id, reason=payload.reason
            )
        )
    elif isinstance(payload, StatusChanged):
        message.status_changed.CopyFrom(
            event_pb.SessionStatusChanged(
                from_status=SESSION_STATUS[payload.from_status],
                to_status=SESSION_STATUS[payload.to_status],
                reason=payload.reason,
            )
        )
    else:
        message_event(message, payload)
    return message


def agent(record: AgentRegistration, *, status: AgentStatus) -> agent_pb.Agent:
    conn = record.connection
    return agent_pb.Agent(
        agent_type=record.agent_type,
        instance_id=record.instance_id,
        url=record.url,
        deployment_mode=DEPLOYMENT_MODE[record.deployment_mode],
        agent_card=struct(record.agent_card),
        skills=[
            agent_pb.AgentSkill(
                id=s.id,
                name=s.name,
                description=s.description,
                tags=s.tags,
                examples=s.examples,
                input_modes=s.input_modes,
                output_modes=s.output_modes,
            )
            for s in record.skills
        ],
        tools=[
            agent_pb.AgentTool(name=t.name, description=t.description, input_schema=struct(t.input_schema))
            for t in record.tools
        ],
        mcp_servers=struct(record.mcp_servers),
        max_concurrent_sessions=record.max_concurrent_sessions,
        status=AGENT_STATUS[status],
        reported_status=AGENT_STATUS[record.reported_status],
        session_ids=record.session_ids,
        reported_sessions=record.reported_sessions,
        registered_at=timestamp(record.registered_at),
        last_seen_at=timestamp(record.last_seen_at),
        connection=agent_pb.ConnectionState(
            transport=conn.transport,
            connected=conn.connected,
            connected_since=timestamp(conn.connected_since),
            last_dispatch_at=timestamp(conn.last_dispatch_at),
            successes=conn.successes,
            failures=conn.failures,
            last_error=conn.last_error,
            replica=conn.replica if conn.connected else "",
        ),
        version=record.version,
    )


def deployment_mode(value: int) -> DeploymentMode | None:
    """The mode for a wire value; unspecified is ``None``, an unknown number is invalid."""
    if value == agent_pb.DEPLOYMENT_MODE_UNSPECIFIED:
        return None
    return _enum_value(DEPLOYMENT_MODE_FROM_PB, value, "deployment_mode")


def agent_status(value: int, field: str = "status") -> AgentStatus | None:
    """The status for a wire value; unspecified is ``None``, an unknown number is invalid."""
    if value == agent_pb.AGENT_STATUS_UNSPECIFIED:
        return None
    return _enum_value(AGENT_STATUS_FROM_PB, value, field)


def _enum_value(table: Mapping[Any, E], value: int, field: str) -> E:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(field, f"unknown value {value}") from None


def agent_spec(request: registry_pb.RegisterAgentRequest) -> AgentSpec:
    """The core's view of a RegisterAgentRequest. Skills fall back to the agent card's."""
    card = from_struct(request.agent_card, "agent_card")
    skills = tuple(
        Skill(
            id=s.id,
            name=s.name,
            description=s.description,
            tags=tuple(s.tags),
            examples=tuple(s.examples),
            input_modes=tuple(s.input_modes),
            output_modes=tuple(s.output_modes),
        )
        for s in request.skills
    ) or _card_skills(card)
    return AgentSpec(
        agent_type=request.agent_type,
        instance_id=request.instance_id,
        deployment_mode=deployment_mode(request.deployment_mode),
        url=request.url,
        agent_card=card,
        skills=skills,
        tools=tuple(
            Tool(
                name=t.name,
                description=t.description,
                input_schema=from_struct(t.input_schema, f"tools[{i}].input_schema"),
            )
            for i, t in enumerate(request.tools)
        ),
        mcp_servers=from_struct(request.mcp_servers, "mcp_servers"),
        max_concurrent_sessions=request.max_concurrent_sessions,
    )


def _card_skills(card: dict[str, Any]) -> tuple[Skill, ...]:
    skills = card.get("skills")
    if not isinstance(skills, list):
        return ()
    return tuple(
        Skill(
            id=str(s.get("id", "")),
            name=str(s.get("name", "")),
            description=str(s.get("description", "")),
            tags=tuple(str(t) for t in s.get("tags", []) or []),
            examples=tuple(str(e) for e in s.get("examples", []) or []),
            input_modes=tuple(str(m) for m in s.get("inputModes", []) or []),
            output_modes=tuple(str(m) for m in s.get("outputModes", []) or []),
        )
        for s in skills
        if isinstance(s, dict)
    )
