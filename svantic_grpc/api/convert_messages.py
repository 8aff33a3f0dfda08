"""Conversions for messages, their parts and events, and connected-agent dispatches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from svantic_grpc.api._wkt import exact_object, json_text, struct, timestamp
from svantic_grpc.api.convert_inputs import ask_from_pb, request_to_pb
from svantic_grpc.core.dispatch import DispatchJob, DispatchUpdate
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.events import (
    ArtifactAdded,
    EventPayload,
    InputEnded,
    InputRaised,
    MessageStateChanged,
    TurnAdded,
)
from svantic_grpc.core.messages.model import Artifact, FilePart, Message, MessageState, Part, Role, Turn
from svantic_grpc.pb import event_types_pb2 as event_pb
from svantic_grpc.pb import message_service_pb2 as service_pb
from svantic_grpc.pb import message_types_pb2 as pb
from svantic_grpc.pb import registry_service_pb2 as registry_pb

MESSAGE_STATE = {
    MessageState.SUBMITTED: pb.MESSAGE_STATE_SUBMITTED,
    MessageState.WORKING: pb.MESSAGE_STATE_WORKING,
    MessageState.INPUT_REQUIRED: pb.MESSAGE_STATE_INPUT_REQUIRED,
    MessageState.COMPLETED: pb.MESSAGE_STATE_COMPLETED,
    MessageState.FAILED: pb.MESSAGE_STATE_FAILED,
    MessageState.CANCELED: pb.MESSAGE_STATE_CANCELED,
    MessageState.REJECTED: pb.MESSAGE_STATE_REJECTED,
}
MESSAGE_STATE_FROM_PB: dict[int, MessageState] = {int(v): k for k, v in MESSAGE_STATE.items()}
ROLE = {Role.USER: pb.ROLE_USER, Role.AGENT: pb.ROLE_AGENT}


def message_state(value: int, field: str) -> MessageState:
    try:
        return MESSAGE_STATE_FROM_PB[value]
    except KeyError:
        raise InvalidArgument(field, f"unknown message state {value}") from None


def role_from_pb(value: int, field: str) -> Role:
    if value in (pb.ROLE_UNSPECIFIED, pb.ROLE_USER):
        return Role.USER
    if value == pb.ROLE_AGENT:
        return Role.AGENT
    raise InvalidArgument(field, f"unknown role {value}")


def part_to_pb(part: Part) -> pb.Part:
    if part.text is not None:
        return pb.Part(text=part.text)
    if part.data is not None:
        return pb.Part(data=struct(part.data), data_json=json_text(part.data))
    file = part.file
    assert file is not None
    if file.data is not None:
        return pb.Part(file=pb.FilePart(name=file.name, media_type=file.media_type, bytes=file.data))
    return pb.Part(file=pb.FilePart(name=file.name, media_type=file.media_type, uri=file.uri))


def part_from_pb(part: pb.Part, field: str) -> Part:
    """The part as sent; its shape is checked by the core (``check_parts``), whichever door it came by."""
    kind = part.WhichOneof("content")
    if part.data_json and kind not in (None, "data"):
        raise InvalidArgument(f"{field}.data_json", f"belongs to a data part, not a {kind} part")
    if part.data_json or kind == "data":  # the exact text alone makes a data part
        return Part(data=exact_object(part.data, part.data_json, f"{field}.data"))
    if kind == "text":
        return Part(text=part.text)
    if kind == "file":
        file = part.file
        data = file.bytes if file.WhichOneof("content") == "bytes" else None
        return Part(file=FilePart(file.name, file.media_type, data=data, uri=file.uri))
    return Part()


def parts_from_pb(parts: Iterable[pb.Part], field: str) -> tuple[Part, ...]:
    return tuple(part_from_pb(p, f"{field}[{i}]") for i, p in enumerate(parts))


def turn_to_pb(turn: Turn) -> pb.Turn:
    return pb.Turn(
        role=ROLE[turn.role],
        parts=[part_to_pb(p) for p in turn.parts],
        time=timestamp(turn.time),
        instance_id=turn.instance_id,
    )


def artifact_to_pb(artifact: Artifact) -> pb.Artifact:
    return pb.Artifact(
        artifact_id=artifact.artifact_id, name=artifact.name, parts=[part_to_pb(p) for p in artifact.parts]
    )


def message_to_pb(message: Message) -> pb.Message:
    return pb.Message(
        message_id=message.message_id,
        session_id=message.session_id,
        role=ROLE[message.role],
        parts=[part_to_pb(p) for p in message.parts],
        state=MESSAGE_STATE[message.state],
        state_reason=message.state_reason,
        history=[turn_to_pb(t) for t in message.history],
        artifacts=[artifact_to_pb(a) for a in message.artifacts],
        agent_type=message.agent_type,
        instance_id=message.instance_id,
        sender=message.sender,
        created_at=timestamp(message.created_at),
        updated_at=timestamp(message.updated_at),
        input_request_ids=message.input_request_ids,
    )


def outgoing(message: service_pb.OutgoingMessage) -> dict[str, Any]:
    """Keyword arguments for ``Messages.send`` from an OutgoingMessage."""
    return {
        "message_id": message.message_id,
        "role": role_from_pb(message.role, "message.role"),
        "parts": parts_from_pb(message.parts, "message.parts"),
    }


def message_event(target: event_pb.SessionEvent, payload: EventPayload) -> None:
    """Fill ``target`` for the message-related payloads."""
    if isinstance(payload, MessageStateChanged):
        target.message_state_changed.CopyFrom(
            event_pb.MessageStateChanged(
                message_id=payload.message_id,
                from_state=MESSAGE_STATE[payload.from_state]
                if payload.from_state
                else pb.MESSAGE_STATE_UNSPECIFIED,
                to_state=MESSAGE_STATE[payload.to_state],
                reason=payload.reason,
                message=message_to_pb(payload.message) if payload.message else None,
            )
        )
    elif isinstance(payload, TurnAdded):
        target.turn_added.CopyFrom(
            event_pb.TurnAdded(message_id=payload.message_id, turn=turn_to_pb(payload.turn))
        )
    elif isinstance(payload, InputRaised):
        target.input_required.request.CopyFrom(request_to_pb(payload.request))
    elif isinstance(payload, InputEnded):
        target.input_resolved.request.CopyFrom(request_to_pb(payload.request))
    elif isinstance(payload, ArtifactAdded):
        target.artifact_added.CopyFrom(
            event_pb.ArtifactAdded(message_id=payload.message_id, artifact=artifact_to_pb(payload.artifact))
        )


def dispatch_to_pb(job: DispatchJob, *, token: bool) -> registry_pb.Dispatch:
    """The dispatch for a connected agent; signed only when ``token`` (the agent asked)."""
    return registry_pb.Dispatch(
        dispatch_id=job.dispatch_id,
        session_id=job.session_id,
        message=message_to_pb(job.message),
        dispatch_token=job.sign() if token else "",
        deadline=timestamp(job.deadline),
        trace_context=job.trace_context,
    )


def update_from_pb(update: registry_pb.DispatchUpdate) -> DispatchUpdate:
    state = None
    if update.state != pb.MESSAGE_STATE_UNSPECIFIED:
        state = message_state(update.state, "update.state")
    parts = parts_from_pb(update.turn.parts, "update.turn.parts") if update.HasField("turn") else ()
    artifacts = tuple(
        Artifact(a.artifact_id, parts_from_pb(a.parts, f"update.artifacts[{i}].parts"), a.name)
        for i, a in enumerate(update.artifacts)
    )
    ask = ask_from_pb(update.input_request) if update.HasField("input_request") else None
    if ask is not None and state is None:
        state = MessageState.INPUT_REQUIRED
    return DispatchUpdate(state, parts, artifacts, update.reason, ask)
