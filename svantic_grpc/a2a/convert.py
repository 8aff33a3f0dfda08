"""The mesh's messages as A2A tasks, and A2A parts as the mesh's parts.

A task is a mesh message: its id is the message id, its context id the session id,
its state the message state, its history the message's turns and its artifacts the
message's artifacts. A message waiting for a human is ``input-required`` with what
is asked in a data part ``{"input_request": {...}}`` (tool, arguments, form fields,
plan; never a sensitive field's value).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from a2a.helpers import new_data_part
from a2a.types import Artifact as A2AArtifact
from a2a.types import Message as A2AMessage
from a2a.types import Part as A2APart
from a2a.types import Role as A2ARole
from a2a.types import Task, TaskState, TaskStatus
from google.protobuf import json_format, timestamp_pb2

from svantic_grpc._json import whole
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.inputs.model import InputRequest, InputState
from svantic_grpc.core.messages.model import Artifact, FilePart, Message, MessageState, Part, Role, Turn

__all__ = [
    "TASK_STATE",
    "artifact_to_a2a",
    "input_request_json",
    "parts_from_a2a",
    "status_of",
    "task_of",
    "timestamp",
    "turn_to_a2a",
]

TASK_STATE = {
    MessageState.SUBMITTED: TaskState.TASK_STATE_SUBMITTED,
    MessageState.WORKING: TaskState.TASK_STATE_WORKING,
    MessageState.INPUT_REQUIRED: TaskState.TASK_STATE_INPUT_REQUIRED,
    MessageState.COMPLETED: TaskState.TASK_STATE_COMPLETED,
    MessageState.FAILED: TaskState.TASK_STATE_FAILED,
    MessageState.CANCELED: TaskState.TASK_STATE_CANCELED,
    MessageState.REJECTED: TaskState.TASK_STATE_REJECTED,
}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def part_to_a2a(part: Part) -> A2APart:
    if part.text is not None:
        return A2APart(text=part.text)
    if part.data is not None:
        return new_data_part(dict(part.data))
    file = part.file
    assert file is not None
    if file.data is not None:
        return A2APart(raw=file.data, media_type=file.media_type, filename=file.name)
    return A2APart(url=file.uri, media_type=file.media_type, filename=file.name)


def parts_from_a2a(parts: Iterable[A2APart], field: str = "message.parts") -> tuple[Part, ...]:
    """A2A parts as the mesh's; a part with no content is refused, naming it."""
    result = []
    for index, part in enumerate(parts):
        kind = part.WhichOneof("content")
        if kind == "text":
            result.append(Part(text=part.text))
        elif kind == "data":
            # a2a-sdk holds data as a protobuf Value (doubles): whole numbers back to ints
            value = whole(json_format.MessageToDict(part.data))
            if not isinstance(value, dict):
                raise InvalidArgument(f"{field}[{index}].data", "must be a JSON object")
            result.append(Part(data=value))
        elif kind == "raw":
            result.append(Part(file=FilePart(part.filename, part.media_type, data=part.raw)))
        elif kind == "url":
            result.append(Part(file=FilePart(part.filename, part.media_type, uri=part.url)))
        else:
            raise InvalidArgument(f"{field}[{index}]", "needs one of text, data, raw or url")
    return tuple(result)


def turn_to_a2a(turn: Turn, task_id: str, context_id: str, index: int) -> A2AMessage:
    return A2AMessage(
        message_id=f"{task_id}/{index}",
        context_id=context_id,
        task_id=task_id,
        role=A2ARole.ROLE_USER if turn.role is Role.USER else A2ARole.ROLE_AGENT,
        parts=[part_to_a2a(p) for p in turn.parts],
    )


def artifact_to_a2a(artifact: Artifact) -> A2AArtifact:
    return A2AArtifact(
        artifact_id=artifact.artifact_id,
        name=artifact.name,
        parts=[part_to_a2a(p) for p in artifact.parts],
    )


def input_request_json(request: InputRequest) -> dict[str, Any]:
    """What a pending request asks, for an A2A client: never a sensitive field's value."""
    asked: dict[str, Any] = {
        "request_id": request.request_id,
        "kind": request.kind.value,
        "summary": request.summary,
        "allowed_decisions": [d.value for d in request.allowed_decisions],
        "expires_at": request.expires_at,
    }
    if request.tool_call is not None:
        asked["tool_call"] = {
            "tool_name": request.tool_call.tool_name,
            "arguments": dict(request.tool_call.arguments),
            "agent_type": request.tool_call.agent_type,
        }
    if request.form is not None:
        fields = []
        for f in request.form.fields:
            entry: dict[str, Any] = {
                "name": f.name,
                "type": f.type,
                "label": f.label,
                "required": f.required,
                "sensitive": f.private,
            }
            if f.options:
                entry["options"] = list(f.options)
            if f.default is not None and not f.private:
                entry["default"] = f.default
            fields.append(entry)
        asked["form"] = {
            "title": request.form.title,
            "description": request.form.description,
            "fields": fields,
        }
    if request.plan:
        asked["plan"] = [
            {"description": p.description, "agent_type": p.agent_type, "tool_name": p.tool_name}
            for p in request.plan
        ]
    if request.allowed_responders:
        asked["allowed_responders"] = list(request.allowed_responders)
    return asked


def status_of(message: Message, requests: Sequence[InputRequest] = ()) -> TaskStatus:
    """The task status of ``message``; ``requests`` are what it waits on when input-required."""
    status = TaskStatus(state=TASK_STATE[message.state], timestamp=timestamp(message.updated_at))
    said: list[A2APart] = []
    if message.state is MessageState.INPUT_REQUIRED:
        for request in requests:
            if request.state is InputState.PENDING:
                said += [
                    A2APart(text=request.summary),
                    new_data_part({"input_request": input_request_json(request)}),
                ]
    elif message.state.terminal and message.state_reason:
        said.append(A2APart(text=message.state_reason))
    if said:
        status.message.CopyFrom(
            A2AMessage(
                message_id=f"{message.message_id}/status/{message.version}",
                context_id=message.session_id,
                task_id=message.message_id,
                role=A2ARole.ROLE_AGENT,
                parts=said,
            )
        )
    return status


def task_of(
    message: Message, requests: Sequence[InputRequest] = (), *, history_length: int | None = None
) -> Task:
    """``message`` as an A2A task (``history_length`` keeps the newest turns; 0 keeps none)."""
    turns = list(enumerate(message.history))
    if history_length is not None:
        turns = turns[len(turns) - history_length :] if history_length > 0 else []
    return Task(
        id=message.message_id,
        context_id=message.session_id,
        status=status_of(message, requests),
        artifacts=[artifact_to_a2a(a) for a in message.artifacts],
        history=[turn_to_a2a(t, message.message_id, message.session_id, i) for i, t in turns],
    )
