"""Conversions for messages, their parts and events, and connected-agent dispatches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from svantic_grpc.api._wkt import exact_object, json_text
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
from svantic_grpc.core.messages.model import (
    Artifact,
    FilePart,
    Message,
    MessageState,
    Part,
    Role,
    Turn,
    parts_bytes,
)
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
    target = pb.Part()
    _fill_part(target, part)
    return target


def _fill_part(target: pb.Part, part: Part) -> None:
    """Write ``part`` into an empty ``target`` (filled in place: no copy of a built message)."""
    if part.text is not None:
        target.text = part.text
    elif part.data is not None:
        target.data.update(part.data)
        target.data_json = json_text(part.data)
    else:
        file = part.file
        assert file is not None
        target.file.name = file.name
        target.file.media_type = file.media_type
        if file.data is not None:
            target.file.bytes = file.data
        else:
            target.file.uri = file.uri


def _fill_parts(target: Any, parts: tuple[Part, ...]) -> None:
    for part in parts:
        _fill_part(target.add(), part)


def _set_time(target: Any, seconds: float) -> None:
    """Set a Timestamp field to epoch ``seconds`` (as ``_wkt.timestamp``, without building one)."""
    target.seconds, target.nanos = divmod(round(seconds * 1e9), 1_000_000_000)


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


def parts_from_pb(parts: Iterable[pb.Part], field: str, within: int | None = None) -> tuple[Part, ...]:
    """``within``: the parts of ``field[within]`` (an artifact's): named so in an error, the name
    made only then."""
    converted = []
    for index, part in enumerate(parts):
        if part.WhichOneof("content") == "text" and not part.data_json:  # the common part, as part_from_pb
            converted.append(Part(text=part.text))
        else:
            name = f"{field}[{index}]" if within is None else f"{field}[{within}].parts[{index}]"
            converted.append(part_from_pb(part, name))
    return tuple(converted)


def turn_to_pb(turn: Turn) -> pb.Turn:
    target = pb.Turn()
    _fill_turn(target, turn)
    return target


def _fill_turn(target: pb.Turn, turn: Turn, converted: Any = None) -> None:
    """``converted``: the same parts already in protobuf form (copied, not converted again)."""
    target.role = ROLE[turn.role]
    if converted is not None:
        target.parts.extend(converted)
    else:
        _fill_parts(target.parts, turn.parts)
    _set_time(target.time, turn.time)
    if turn.instance_id:  # (an empty target: a field left at its default costs no write)
        target.instance_id = turn.instance_id


def artifact_to_pb(artifact: Artifact) -> pb.Artifact:
    target = pb.Artifact()
    _fill_artifact(target, artifact)
    return target


def _fill_artifact(target: pb.Artifact, artifact: Artifact) -> None:
    target.artifact_id = artifact.artifact_id
    target.name = artifact.name
    _fill_parts(target.parts, artifact.parts)


_PREFIXES: dict[int, tuple[tuple[Part, ...], Turn | None, str, str, Role, str, float, bytes]] = {}
"""What does not change in a message while it runs (its ids, role, parts, first turn, sender and
creation time), in protobuf form, for messages converted lately: by the identity of the parts tuple
(held, so its id is not reused), with the rest compared as it is used. A message is converted at each
step someone sees: in the dispatch to a connected agent, in the answer to ``SendMessage``, in the
snapshot of each event that stops it. Its parts and first turn (the message as sent) are the same
objects every time: converted once (Python code, a data part's Struct most of it), then merged from
bytes (C). At most ``_PREFIXES_MAX`` messages whose parts carry at most ``_PREFIX_BYTES``."""
_PREFIXES_MAX = 256
_PREFIX_BYTES = 4 * 1024


def message_to_pb(message: Message, into: pb.Message | None = None) -> pb.Message:
    """The message in protobuf form, written into ``into`` (an empty field of a response) when given."""
    target = pb.Message() if into is None else into
    parts, history = message.parts, message.history
    first = history[0] if history else None
    known = _PREFIXES.get(id(parts))
    if (
        known is not None
        and known[0] is parts
        and known[1] is first
        and known[2] == message.message_id
        and known[3] == message.session_id
        and known[4] is message.role
        and known[5] == message.sender
        and known[6] == message.created_at
    ):
        target.MergeFromString(known[7])
    else:
        _fill_prefix(target, message, first)
        if (
            type(parts) is tuple  # (immutable: what is held cannot change under its id)
            and (first is None or first.parts is parts)
            and parts_bytes(parts) <= _PREFIX_BYTES
        ):
            if len(_PREFIXES) >= _PREFIXES_MAX:
                del _PREFIXES[next(iter(_PREFIXES))]  # the oldest
            _PREFIXES[id(parts)] = (
                parts,
                first,
                message.message_id,
                message.session_id,
                message.role,
                message.sender,
                message.created_at,
                target.SerializeToString(),  # (``target`` holds the prefix alone so far)
            )
    target.state = MESSAGE_STATE[message.state]
    # ``target`` is empty: fields left at their default (empty) are not written (each write of a
    # protobuf field from Python costs about as much as a small function call).
    if message.state_reason:
        target.state_reason = message.state_reason
    if len(history) > 1:
        turns = target.history
        for turn in history[1:]:
            _fill_turn(turns.add(), turn)
    if message.artifacts:
        artifacts = target.artifacts
        for artifact in message.artifacts:
            _fill_artifact(artifacts.add(), artifact)
    if message.agent_type:
        target.agent_type = message.agent_type
    if message.instance_id:
        target.instance_id = message.instance_id
    _set_time(target.updated_at, message.updated_at)
    if message.input_request_ids:
        target.input_request_ids.extend(message.input_request_ids)
    return target


def _fill_prefix(target: pb.Message, message: Message, first: Turn | None) -> None:
    """The fields of ``_PREFIXES`` (the first turn only of the history) into an empty ``target``."""
    target.message_id = message.message_id
    target.session_id = message.session_id
    target.role = ROLE[message.role]
    _fill_parts(target.parts, message.parts)
    if first is not None:
        # The first turn is the message as sent: its parts are the message's own, converted above.
        _fill_turn(target.history.add(), first, target.parts if first.parts is message.parts else None)
    if message.sender:
        target.sender = message.sender
    _set_time(target.created_at, message.created_at)


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


def dispatch_to_pb(
    job: DispatchJob, *, token: bool, into: registry_pb.Dispatch | None = None
) -> registry_pb.Dispatch:
    """The dispatch for a connected agent; signed only when ``token`` (the agent asked)."""
    target = registry_pb.Dispatch() if into is None else into
    target.dispatch_id = job.dispatch_id
    target.session_id = job.session_id
    message_to_pb(job.message, into=target.message)
    if token:
        target.dispatch_token = job.sign()
    _set_time(target.deadline, job.deadline)
    if job.trace_context:  # (tracing off: none)
        trace_context = target.trace_context
        for key, value in job.trace_context.items():  # (the map's update() is Python: 3x the time)
            trace_context[key] = value
    return target


def update_from_pb(update: registry_pb.DispatchUpdate) -> DispatchUpdate:
    value = update.state
    state = None
    if value:  # MESSAGE_STATE_UNSPECIFIED: progress
        state = MESSAGE_STATE_FROM_PB.get(value) or message_state(value, "update.state")
    parts = parts_from_pb(update.turn.parts, "update.turn.parts") if update.HasField("turn") else ()
    artifacts: tuple[Artifact, ...] = ()
    if listed := update.artifacts:  # (each access of a repeated field makes a wrapper: once)
        artifacts = tuple(
            Artifact(a.artifact_id, parts_from_pb(a.parts, "update.artifacts", i), a.name)
            for i, a in enumerate(listed)
        )
    ask = ask_from_pb(update.input_request) if update.HasField("input_request") else None
    if ask is not None and state is None:
        state = MessageState.INPUT_REQUIRED
    return DispatchUpdate(state, parts, artifacts, update.reason, ask)
