"""What the mesh reads of an A2A event: its kind, state, words, artifacts and task id.

An agent's stream carries ``StreamResponse`` events. The mesh needs little of each (``Seen``)
and can read it from a2a-sdk's protobuf (``seen_in``: every binding, every a2a-sdk client) or,
on the mesh's own JSON-RPC streaming call, straight from the event's decoded ProtoJSON
(``seen_in_json``), without building the protobuf first: ~3 events per hosted message,
each parsed into protobuf objects only to be read back out.

``seen_in_json`` takes only what it reads exactly as ``seen_in(parse_lenient(...))`` would,
with every other field it meets checked as a2a-sdk's parser checks it (type, enum name,
timestamp). Anything else (bytes parts, field names in snake case, enums as numbers, a null,
a key the event cannot have, two members of a oneof, values nested deeper than
``_DEEPEST``, numbers JSON cannot write) gives ``None``: the caller then reads the event
through a2a-sdk's parser, so the outcome is always what it gives.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from a2a.types import Artifact as A2AArtifact
from a2a.types import Role, StreamResponse, TaskState
from google.protobuf import json_format

from svantic_grpc._json import EXACT_INT, whole
from svantic_grpc.core.messages.model import Artifact, FilePart, MessageState, Part
from svantic_grpc.dispatch import _protojson

__all__ = ["STATES", "Seen", "seen_in", "seen_in_json"]

STATES = {
    TaskState.TASK_STATE_SUBMITTED: None,
    TaskState.TASK_STATE_WORKING: MessageState.WORKING,
    TaskState.TASK_STATE_COMPLETED: MessageState.COMPLETED,
    TaskState.TASK_STATE_FAILED: MessageState.FAILED,
    TaskState.TASK_STATE_CANCELED: MessageState.CANCELED,
    TaskState.TASK_STATE_INPUT_REQUIRED: MessageState.INPUT_REQUIRED,
    TaskState.TASK_STATE_REJECTED: MessageState.REJECTED,
    TaskState.TASK_STATE_AUTH_REQUIRED: MessageState.INPUT_REQUIRED,
}
"""An A2A task state as the message's state (``None``: no change)."""


class Seen(NamedTuple):
    """What the mesh reads of one A2A event."""

    kind: str
    """``task``, ``message``, ``status``, ``artifact``, or '' (an event with no payload)."""
    state: MessageState | None = None
    said: tuple[Part, ...] = ()
    """The words of a message, or of a status's message."""
    artifacts: tuple[Artifact, ...] = ()
    task_id: str = ""
    """A task's id, or the task id a status update names."""


_NOTHING = Seen("")


def seen_in(event: StreamResponse) -> Seen:
    """What ``event`` (a2a-sdk's protobuf) says."""
    kind = event.WhichOneof("payload")
    if kind == "message":
        return Seen("message", said=_parts_from(event.message.parts))
    if kind == "task":
        task = event.task
        status = task.status
        said = _parts_from(status.message.parts) if status.HasField("message") else ()
        artifacts = tuple(_artifact_from(a) for a in task.artifacts)
        return Seen("task", STATES.get(status.state), said, artifacts, task.id)
    if kind == "status_update":
        update = event.status_update
        status = update.status
        said = _parts_from(status.message.parts) if status.HasField("message") else ()
        return Seen("status", STATES.get(status.state), said, (), update.task_id)
    if kind == "artifact_update":
        return Seen("artifact", artifacts=(_artifact_from(event.artifact_update.artifact),))
    return _NOTHING


def _parts_from(parts: Any) -> tuple[Part, ...]:
    result = []
    for part in parts:
        kind = part.WhichOneof("content")
        if kind == "text":
            result.append(Part(text=part.text))
        elif kind == "data":
            # a2a-sdk holds data as a protobuf Value (doubles): whole numbers back to ints
            value = whole(json_format.MessageToDict(part.data))
            result.append(Part(data=value if isinstance(value, dict) else {"value": value}))
        elif kind == "raw":
            result.append(Part(file=FilePart(part.filename, part.media_type, data=part.raw)))
        elif kind == "url":
            result.append(Part(file=FilePart(part.filename, part.media_type, uri=part.url)))
    return tuple(result)


def _artifact_from(artifact: A2AArtifact) -> Artifact:
    return Artifact(artifact.artifact_id, _parts_from(artifact.parts), artifact.name)


# --- the same, from the event's JSON ---------------------------------------------------------


class _Unusual(Exception):
    """What ``seen_in_json`` leaves to a2a-sdk's parser."""


_DEEPEST = 32
"""Deepest nesting of a JSON value (data, metadata) read here; protobuf's parser stops at 100
levels of messages, and the mesh takes 24 (``MAX_JSON_DEPTH``): deeper goes the slow way."""

# What a field the mesh does not read must be for a2a-sdk's parser to take it.
_STR, _BOOL, _STRUCT, _STRS, _TIME, _ROLE, _READ = range(7)
_STATUS_UPDATE = {"taskId": _READ, "contextId": _STR, "status": _READ, "metadata": _STRUCT}
_ARTIFACT_UPDATE = {
    "taskId": _STR,
    "contextId": _STR,
    "artifact": _READ,
    "append": _BOOL,
    "lastChunk": _BOOL,
    "metadata": _STRUCT,
}
_TASK = {
    "id": _READ,
    "contextId": _STR,
    "status": _READ,
    "artifacts": _READ,
    "history": _READ,
    "metadata": _STRUCT,
}
_STATUS = {"state": _READ, "message": _READ, "timestamp": _TIME}
_MESSAGE = {
    "messageId": _STR,
    "contextId": _STR,
    "taskId": _STR,
    "role": _ROLE,
    "parts": _READ,
    "metadata": _STRUCT,
    "extensions": _STRS,
    "referenceTaskIds": _STRS,
}
_ARTIFACT = {
    "artifactId": _READ,
    "name": _READ,
    "description": _STR,
    "parts": _READ,
    "metadata": _STRUCT,
    "extensions": _STRS,
}
_PART = {"text": _READ, "url": _READ, "data": _READ, "metadata": _STRUCT, "filename": _STR, "mediaType": _STR}
_ROLES = frozenset(Role.keys())
_STATE_NAMES = {
    TaskState.Name(TaskState.TASK_STATE_UNSPECIFIED): None,
    **{TaskState.Name(state): meaning for state, meaning in STATES.items()},
}


def seen_in_json(result: Any) -> Seen | None:
    """What the ``result`` of one JSON-RPC response (a ``StreamResponse`` as decoded ProtoJSON)
    says, exactly as ``seen_in`` reads a2a-sdk's parse of it; ``None`` for anything unusual."""
    if type(result) is not dict or len(result) != 1:
        return None
    ((key, value),) = result.items()
    try:
        if key == "statusUpdate":
            _check(value, _STATUS_UPDATE)
            state, said = _status(value.get("status"))
            return Seen("status", state, said, (), _text(value.get("taskId", "")))
        if key == "artifactUpdate":
            _check(value, _ARTIFACT_UPDATE)
            return Seen("artifact", artifacts=(_artifact(value.get("artifact", {})),))
        if key == "task":
            _check(value, _TASK)
            state, said = _status(value.get("status"))
            if value.get("history", []) != []:
                raise _Unusual  # the mesh asks for none (historyLength 0) and reads none
            artifacts = tuple(_artifact(a) for a in _list(value.get("artifacts", [])))
            return Seen("task", state, said, artifacts, _text(value.get("id", "")))
        if key == "message":
            return Seen("message", said=_message(value))
    except (_Unusual, _protojson._Slow, ValueError, OverflowError):
        return None
    return None


def _check(value: Any, fields: dict[str, int]) -> None:
    """``value`` is an object with only ``fields``, and those not read are what the parser takes."""
    if type(value) is not dict:
        raise _Unusual
    for key, item in value.items():
        kind = fields.get(key)
        if kind is None or item is None:
            raise _Unusual  # a key it cannot have, or a null
        if kind == _READ:
            continue
        if kind == _STR:
            ok = type(item) is str
        elif kind == _STRUCT:
            ok = type(item) is dict and _json_value(item, 1) is not None
        elif kind == _TIME:
            _protojson._timestamp(item)  # raises for what the fast path does not take
            ok = True
        elif kind == _ROLE:
            ok = type(item) is str and item in _ROLES
        elif kind == _BOOL:
            ok = type(item) is bool
        else:  # _STRS
            ok = type(item) is list and all(type(s) is str for s in item)
        if not ok:
            raise _Unusual


def _text(value: Any) -> str:
    if type(value) is not str:
        raise _Unusual
    return value


def _list(value: Any) -> list[Any]:
    if type(value) is not list:
        raise _Unusual
    return value


def _status(status: Any) -> tuple[MessageState | None, tuple[Part, ...]]:
    if status is None:  # absent: the default status (no state, no message)
        return None, ()
    _check(status, _STATUS)
    name = status.get("state", "TASK_STATE_UNSPECIFIED")
    if type(name) is not str or name not in _STATE_NAMES:
        raise _Unusual
    message = status.get("message")
    return _STATE_NAMES[name], _message(message) if message is not None else ()


def _message(message: Any) -> tuple[Part, ...]:
    _check(message, _MESSAGE)
    return _parts(message.get("parts", []))


def _artifact(artifact: Any) -> Artifact:
    _check(artifact, _ARTIFACT)
    return Artifact(
        _text(artifact.get("artifactId", "")),
        _parts(artifact.get("parts", [])),
        _text(artifact.get("name", "")),
    )


def _parts(parts: Any) -> tuple[Part, ...]:
    result = []
    for part in _list(parts):
        _check(part, _PART)
        text = part.get("text")
        url = part.get("url")
        data = part.get("data")  # no nulls here (``_check``): None is absent
        if (text is not None) + (url is not None) + (data is not None) > 1:
            raise _Unusual  # two members of the oneof: the parser refuses it
        if text is not None:
            result.append(Part(text=_text(text)))
        elif url is not None:
            file = FilePart(_text(part.get("filename", "")), _text(part.get("mediaType", "")), uri=_text(url))
            result.append(Part(file=file))
        elif data is not None:
            value = _json_value(data, 1)
            result.append(Part(data=value if type(value) is dict else {"value": value}))
    return tuple(result)


def _json_value(value: Any, depth: int) -> Any:
    """``value`` as a protobuf ``Value`` read back with ``whole`` gives it: numbers are doubles
    (a whole one within 2**53 an int again)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if -EXACT_INT <= value <= EXACT_INT:
            return value
        return whole(float(value))  # held as a double: digits beyond 2**53 are lost there too
    if kind is float:
        if not math.isfinite(value):
            raise _Unusual  # not JSON: MessageToDict refuses it
        return whole(value)
    if depth > _DEEPEST:
        raise _Unusual
    if kind is dict:
        return {key: _json_value(item, depth + 1) for key, item in value.items()}
    if kind is list:
        return [_json_value(item, depth + 1) for item in value]
    raise _Unusual
