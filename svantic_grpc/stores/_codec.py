"""Records to JSON-able dicts and back, and their JSON text, for the durable stores (SQLite,
PostgreSQL).

One small explicit pair of functions per record type, so what lands on disk is
plain to read and a field added to a record without updating its codec fails
``tests/stores/test_sqlite.py`` instead of being dropped silently. Enums are
stored by value, tuples as lists, ``bytes`` as base64, and JSON fields as they
are; decoding goes through each record's constructor, which freezes its JSON
again. Every key is always written, so a record comes back equal to the one
that was stored.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson

from svantic_grpc.core.events import (
    AgentJoined,
    AgentLeft,
    ArtifactAdded,
    EventPayload,
    InputEnded,
    InputRaised,
    MessageStateChanged,
    StatusChanged,
    TurnAdded,
)
from svantic_grpc.core.inputs.model import (
    Decision,
    Form,
    FormField,
    InputAsk,
    InputKind,
    InputRequest,
    InputState,
    PlanItem,
    Resolution,
    Surface,
    ToolCall,
)
from svantic_grpc.core.messages.model import Artifact, FilePart, Message, MessageState, Part, Role, Turn
from svantic_grpc.core.models import (
    AgentRegistration,
    AgentStatus,
    ConnectionStats,
    DeploymentMode,
    JoinReason,
    Session,
    SessionAgent,
    SessionStatus,
    Skill,
    Tool,
)
from svantic_grpc.core.store import AuditRecord

__all__ = [
    "decode_agent",
    "decode_audit",
    "decode_input",
    "decode_message",
    "decode_payload",
    "decode_session",
    "dumps",
    "encode_agent",
    "encode_audit",
    "encode_input",
    "encode_message",
    "encode_payload",
    "encode_session",
    "loads",
]


def dumps(value: dict[str, Any]) -> str:
    """A record's JSON text, as the durable stores keep it (orjson: several times faster than
    ``json``, and this is a store's main cost on the event loop)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # what orjson cannot write (an integer beyond 64 bits) json can
        return json.dumps(value, separators=(",", ":"))


def loads(text: str | bytes) -> Any:
    """A record's JSON text read back."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # written by json (before orjson, or by the fallback above)
        return json.loads(text)


JSON = dict[str, Any]

# Sessions


def _encode_session_agent(a: SessionAgent) -> JSON:
    return {
        "agent_type": a.agent_type,
        "instance_id": a.instance_id,
        "join_reason": a.join_reason.value,
        "joined_at": a.joined_at,
        "internal": a.internal,
        "left_at": a.left_at,
    }


def _decode_session_agent(d: JSON) -> SessionAgent:
    return SessionAgent(
        agent_type=d["agent_type"],
        instance_id=d["instance_id"],
        join_reason=JoinReason(d["join_reason"]),
        joined_at=d["joined_at"],
        internal=d["internal"],
        left_at=d["left_at"],
    )


def encode_session(s: Session) -> JSON:
    return {
        "tenant_id": s.tenant_id,
        "session_id": s.session_id,
        "status": s.status.value,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
        "last_activity_at": s.last_activity_at,
        "user_id": s.user_id,
        "created_by": s.created_by,
        "creator_agent_type": s.creator_agent_type,
        "closed_at": s.closed_at,
        "close_reason": s.close_reason,
        "agents": [_encode_session_agent(a) for a in s.agents],
        "version": s.version,
    }


def decode_session(d: JSON) -> Session:
    return Session(
        tenant_id=d["tenant_id"],
        session_id=d["session_id"],
        status=SessionStatus(d["status"]),
        created_at=d["created_at"],
        updated_at=d["updated_at"],
        last_activity_at=d["last_activity_at"],
        user_id=d["user_id"],
        created_by=d["created_by"],
        creator_agent_type=d["creator_agent_type"],
        closed_at=d["closed_at"],
        close_reason=d["close_reason"],
        # Records written before the internal agents were derived (``Session.internal_agents``)
        # list them too: they are left out here.
        agents=tuple(
            _decode_session_agent(a)
            for a in d["agents"]
            if not (a["internal"] and a["join_reason"] == "auto")
        ),
        version=d["version"],
    )


# Agent registrations


def _encode_skill(s: Skill) -> JSON:
    return {
        "id": s.id,
        "name": s.name,
        "description": s.description,
        "tags": list(s.tags),
        "examples": list(s.examples),
        "input_modes": list(s.input_modes),
        "output_modes": list(s.output_modes),
    }


def _decode_skill(d: JSON) -> Skill:
    return Skill(
        id=d["id"],
        name=d["name"],
        description=d["description"],
        tags=tuple(d["tags"]),
        examples=tuple(d["examples"]),
        input_modes=tuple(d["input_modes"]),
        output_modes=tuple(d["output_modes"]),
    )


def _encode_tool(t: Tool) -> JSON:
    return {"name": t.name, "description": t.description, "input_schema": t.input_schema}


def _decode_tool(d: JSON) -> Tool:
    return Tool(name=d["name"], description=d["description"], input_schema=d["input_schema"])


def _encode_connection(c: ConnectionStats) -> JSON:
    return {
        "transport": c.transport,
        "connected": c.connected,
        "connected_since": c.connected_since,
        "last_dispatch_at": c.last_dispatch_at,
        "successes": c.successes,
        "failures": c.failures,
        "last_error": c.last_error,
        "replica": c.replica,
    }


def _decode_connection(d: JSON) -> ConnectionStats:
    return ConnectionStats(
        transport=d["transport"],
        connected=d["connected"],
        connected_since=d["connected_since"],
        last_dispatch_at=d["last_dispatch_at"],
        successes=d["successes"],
        failures=d["failures"],
        last_error=d["last_error"],
        replica=d.get("replica", ""),
    )


def encode_agent(a: AgentRegistration) -> JSON:
    return {
        "tenant_id": a.tenant_id,
        "agent_type": a.agent_type,
        "instance_id": a.instance_id,
        "deployment_mode": a.deployment_mode.value,
        "registered_at": a.registered_at,
        "last_seen_at": a.last_seen_at,
        "url": a.url,
        "agent_card": a.agent_card,
        "skills": [_encode_skill(s) for s in a.skills],
        "tools": [_encode_tool(t) for t in a.tools],
        "mcp_servers": a.mcp_servers,
        "max_concurrent_sessions": a.max_concurrent_sessions,
        "reported_status": a.reported_status.value,
        "reported_sessions": a.reported_sessions,
        "session_ids": list(a.session_ids),
        "connection": _encode_connection(a.connection),
        "version": a.version,
    }


def decode_agent(d: JSON) -> AgentRegistration:
    return AgentRegistration(
        tenant_id=d["tenant_id"],
        agent_type=d["agent_type"],
        instance_id=d["instance_id"],
        deployment_mode=DeploymentMode(d["deployment_mode"]),
        registered_at=d["registered_at"],
        last_seen_at=d["last_seen_at"],
        url=d["url"],
        agent_card=d["agent_card"],
        skills=tuple(_decode_skill(s) for s in d["skills"]),
        tools=tuple(_decode_tool(t) for t in d["tools"]),
        mcp_servers=d["mcp_servers"],
        max_concurrent_sessions=d["max_concurrent_sessions"],
        reported_status=AgentStatus(d["reported_status"]),
        reported_sessions=d["reported_sessions"],
        session_ids=tuple(d["session_ids"]),
        connection=_decode_connection(d["connection"]),
        version=d["version"],
    )


# Messages


def _encode_file(f: FilePart) -> JSON:
    return {
        "name": f.name,
        "media_type": f.media_type,
        "data": None if f.data is None else base64.b64encode(f.data).decode("ascii"),
        "uri": f.uri,
    }


def _decode_file(d: JSON) -> FilePart:
    data = d["data"]
    return FilePart(
        name=d["name"],
        media_type=d["media_type"],
        data=None if data is None else base64.b64decode(data),
        uri=d["uri"],
    )


def _encode_part(p: Part) -> JSON:
    return {"text": p.text, "data": p.data, "file": None if p.file is None else _encode_file(p.file)}


def _decode_part(d: JSON) -> Part:
    file = d["file"]
    return Part(text=d["text"], data=d["data"], file=None if file is None else _decode_file(file))


def _encode_turn(t: Turn) -> JSON:
    return {
        "role": t.role.value,
        "parts": [_encode_part(p) for p in t.parts],
        "time": t.time,
        "instance_id": t.instance_id,
    }


def _decode_turn(d: JSON) -> Turn:
    return Turn(
        role=Role(d["role"]),
        parts=tuple(_decode_part(p) for p in d["parts"]),
        time=d["time"],
        instance_id=d["instance_id"],
    )


def _encode_artifact(a: Artifact) -> JSON:
    return {"artifact_id": a.artifact_id, "parts": [_encode_part(p) for p in a.parts], "name": a.name}


def _decode_artifact(d: JSON) -> Artifact:
    return Artifact(
        artifact_id=d["artifact_id"], parts=tuple(_decode_part(p) for p in d["parts"]), name=d["name"]
    )


def encode_message(m: Message) -> JSON:
    return {
        "tenant_id": m.tenant_id,
        "session_id": m.session_id,
        "message_id": m.message_id,
        "role": m.role.value,
        "parts": [_encode_part(p) for p in m.parts],
        "state": m.state.value,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "sender": m.sender,
        "state_reason": m.state_reason,
        "history": [_encode_turn(t) for t in m.history],
        "artifacts": [_encode_artifact(a) for a in m.artifacts],
        "agent_type": m.agent_type,
        "instance_id": m.instance_id,
        "input_request_ids": list(m.input_request_ids),
        "remote_task_id": m.remote_task_id,
        "version": m.version,
    }


def decode_message(d: JSON) -> Message:
    return Message(
        tenant_id=d["tenant_id"],
        session_id=d["session_id"],
        message_id=d["message_id"],
        role=Role(d["role"]),
        parts=tuple(_decode_part(p) for p in d["parts"]),
        state=MessageState(d["state"]),
        created_at=d["created_at"],
        updated_at=d["updated_at"],
        sender=d["sender"],
        state_reason=d["state_reason"],
        history=tuple(_decode_turn(t) for t in d["history"]),
        artifacts=tuple(_decode_artifact(a) for a in d["artifacts"]),
        agent_type=d["agent_type"],
        instance_id=d["instance_id"],
        input_request_ids=tuple(d["input_request_ids"]),
        remote_task_id=d["remote_task_id"],
        version=d["version"],
    )


# Input requests


def _encode_tool_call(t: ToolCall) -> JSON:
    return {
        "tool_name": t.tool_name,
        "arguments": t.arguments,
        "agent_type": t.agent_type,
        "instance_id": t.instance_id,
    }


def _decode_tool_call(d: JSON) -> ToolCall:
    return ToolCall(
        tool_name=d["tool_name"],
        arguments=d["arguments"],
        agent_type=d["agent_type"],
        instance_id=d["instance_id"],
    )


def _encode_field(f: FormField) -> JSON:
    return {
        "name": f.name,
        "type": f.type,
        "label": f.label,
        "required": f.required,
        "sensitive": f.sensitive,
        "options": list(f.options),
        "default": f.default,
    }


def _decode_field(d: JSON) -> FormField:
    return FormField(
        name=d["name"],
        type=d["type"],
        label=d["label"],
        required=d["required"],
        sensitive=d["sensitive"],
        options=tuple(d["options"]),
        default=d["default"],
    )


def _encode_form(f: Form) -> JSON:
    return {"title": f.title, "description": f.description, "fields": [_encode_field(x) for x in f.fields]}


def _decode_form(d: JSON) -> Form:
    return Form(
        title=d["title"], description=d["description"], fields=tuple(_decode_field(x) for x in d["fields"])
    )


def _encode_plan_item(p: PlanItem) -> JSON:
    return {"description": p.description, "agent_type": p.agent_type, "tool_name": p.tool_name}


def _decode_plan_item(d: JSON) -> PlanItem:
    return PlanItem(description=d["description"], agent_type=d["agent_type"], tool_name=d["tool_name"])


def encode_ask(a: InputAsk) -> JSON:
    """What an agent asks a human for (relayed between replicas with its update)."""
    return {
        "kind": a.kind.value,
        "tool_call": None if a.tool_call is None else _encode_tool_call(a.tool_call),
        "form": None if a.form is None else _encode_form(a.form),
        "plan": [_encode_plan_item(p) for p in a.plan],
        "allowed_responders": list(a.allowed_responders),
    }


def decode_ask(d: JSON) -> InputAsk:
    tool_call, form = d["tool_call"], d["form"]
    return InputAsk(
        kind=InputKind(d["kind"]),
        tool_call=None if tool_call is None else _decode_tool_call(tool_call),
        form=None if form is None else _decode_form(form),
        plan=tuple(_decode_plan_item(p) for p in d["plan"]),
        allowed_responders=tuple(d["allowed_responders"]),
    )


encode_part = _encode_part
decode_part = _decode_part
encode_artifact = _encode_artifact
decode_artifact = _decode_artifact


def _encode_resolution(r: Resolution) -> JSON:
    return {
        "decision": None if r.decision is None else r.decision.value,
        "reason": r.reason,
        "values": r.values,
        "confirmed": r.confirmed,
        "payload": r.payload,
        "resolved_by": r.resolved_by,
        "surface": r.surface.value,
        "resolved_at": r.resolved_at,
    }


def _decode_resolution(d: JSON) -> Resolution:
    decision = d["decision"]
    return Resolution(
        decision=None if decision is None else Decision(decision),
        reason=d["reason"],
        values=d["values"],
        confirmed=d["confirmed"],
        payload=d["payload"],
        resolved_by=d["resolved_by"],
        surface=Surface(d["surface"]),
        resolved_at=d["resolved_at"],
    )


def encode_input(r: InputRequest) -> JSON:
    return {
        "tenant_id": r.tenant_id,
        "request_id": r.request_id,
        "session_id": r.session_id,
        "message_id": r.message_id,
        "kind": r.kind.value,
        "created_at": r.created_at,
        "expires_at": r.expires_at,
        "tool_call": None if r.tool_call is None else _encode_tool_call(r.tool_call),
        "form": None if r.form is None else _encode_form(r.form),
        "plan": [_encode_plan_item(p) for p in r.plan],
        "allowed_decisions": [d.value for d in r.allowed_decisions],
        "allowed_responders": list(r.allowed_responders),
        "policy": r.policy,
        "state": r.state.value,
        "resolution": None if r.resolution is None else _encode_resolution(r.resolution),
        "outcome_reason": r.outcome_reason,
        "outcome_told": r.outcome_told,
        "version": r.version,
    }


def decode_input(d: JSON) -> InputRequest:
    tool_call, form, resolution = d["tool_call"], d["form"], d["resolution"]
    return InputRequest(
        tenant_id=d["tenant_id"],
        request_id=d["request_id"],
        session_id=d["session_id"],
        message_id=d["message_id"],
        kind=InputKind(d["kind"]),
        created_at=d["created_at"],
        expires_at=d["expires_at"],
        tool_call=None if tool_call is None else _decode_tool_call(tool_call),
        form=None if form is None else _decode_form(form),
        plan=tuple(_decode_plan_item(p) for p in d["plan"]),
        allowed_decisions=tuple(Decision(x) for x in d["allowed_decisions"]),
        allowed_responders=tuple(d["allowed_responders"]),
        policy=d["policy"],
        state=InputState(d["state"]),
        resolution=None if resolution is None else _decode_resolution(resolution),
        outcome_reason=d["outcome_reason"],
        # Written before outcomes were marked told: taken as told (never told again).
        outcome_told=d.get("outcome_told", True),
        version=d["version"],
    )


# Audit trail


def encode_audit(r: AuditRecord) -> JSON:
    return {
        "tenant_id": r.tenant_id,
        "request_id": r.request_id,
        "session_id": r.session_id,
        "message_id": r.message_id,
        "kind": r.kind,
        "outcome": r.outcome,
        "actor": r.actor,
        "surface": r.surface,
        "time": r.time,
        "sequence": r.sequence,
    }


def decode_audit(d: JSON) -> AuditRecord:
    return AuditRecord(
        tenant_id=d["tenant_id"],
        request_id=d["request_id"],
        session_id=d["session_id"],
        message_id=d["message_id"],
        kind=d["kind"],
        outcome=d["outcome"],
        actor=d["actor"],
        surface=d["surface"],
        time=d["time"],
        sequence=d["sequence"],
    )


# Event payloads: tagged by "type" so the log can hold any of them.


def encode_payload(p: EventPayload) -> JSON:
    if isinstance(p, AgentJoined):
        return {"type": "agent_joined", "agent": _encode_session_agent(p.agent)}
    if isinstance(p, AgentLeft):
        return {
            "type": "agent_left",
            "agent_type": p.agent_type,
            "instance_id": p.instance_id,
            "reason": p.reason,
        }
    if isinstance(p, StatusChanged):
        return {
            "type": "status_changed",
            "from_status": p.from_status.value,
            "to_status": p.to_status.value,
            "reason": p.reason,
        }
    if isinstance(p, MessageStateChanged):
        return {
            "type": "message_state_changed",
            "message_id": p.message_id,
            "from_state": None if p.from_state is None else p.from_state.value,
            "to_state": p.to_state.value,
            "reason": p.reason,
            "message": None if p.message is None else encode_message(p.message),
        }
    if isinstance(p, TurnAdded):
        return {"type": "turn_added", "message_id": p.message_id, "turn": _encode_turn(p.turn)}
    if isinstance(p, ArtifactAdded):
        return {
            "type": "artifact_added",
            "message_id": p.message_id,
            "artifact": _encode_artifact(p.artifact),
        }
    if isinstance(p, InputRaised):
        return {"type": "input_raised", "request": encode_input(p.request)}
    if isinstance(p, InputEnded):
        return {"type": "input_ended", "request": encode_input(p.request)}
    raise TypeError(f"no codec for event payload {type(p).__name__}")


def decode_payload(d: JSON) -> EventPayload:
    kind = d["type"]
    if kind == "agent_joined":
        return AgentJoined(agent=_decode_session_agent(d["agent"]))
    if kind == "agent_left":
        return AgentLeft(agent_type=d["agent_type"], instance_id=d["instance_id"], reason=d["reason"])
    if kind == "status_changed":
        return StatusChanged(
            from_status=SessionStatus(d["from_status"]),
            to_status=SessionStatus(d["to_status"]),
            reason=d["reason"],
        )
    if kind == "message_state_changed":
        from_state, message = d["from_state"], d["message"]
        return MessageStateChanged(
            message_id=d["message_id"],
            from_state=None if from_state is None else MessageState(from_state),
            to_state=MessageState(d["to_state"]),
            reason=d["reason"],
            message=None if message is None else decode_message(message),
        )
    if kind == "turn_added":
        return TurnAdded(message_id=d["message_id"], turn=_decode_turn(d["turn"]))
    if kind == "artifact_added":
        return ArtifactAdded(message_id=d["message_id"], artifact=_decode_artifact(d["artifact"]))
    if kind == "input_raised":
        return InputRaised(request=decode_input(d["request"]))
    if kind == "input_ended":
        return InputEnded(request=decode_input(d["request"]))
    raise ValueError(f"unknown event payload type {kind!r} in the store")
