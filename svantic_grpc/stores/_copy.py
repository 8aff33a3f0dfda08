"""Copies of stored records that share every immutable part.

The core's records are frozen dataclasses whose JSON is read-only, so they are
returned as is; ``detach`` copies only plain mutable containers that a caller
might still hand in (a dict or list that is not frozen), rebuilding just the
paths that lead to them. That keeps the in-memory store's "copy on read and
write" promise at almost no cost on the hot path.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, TypeVar

from svantic_grpc.core.events import (
    AgentJoined,
    AgentLeft,
    ArtifactAdded,
    MessageStateChanged,
    StatusChanged,
    TurnAdded,
)
from svantic_grpc.core.frozen import FrozenDict, FrozenList
from svantic_grpc.core.inputs.model import InputRequest
from svantic_grpc.core.messages.model import Artifact, FilePart, Message, Part, Turn
from svantic_grpc.core.models import AgentRegistration, ConnectionStats, Session, SessionAgent, Skill, Tool
from svantic_grpc.core.store import AuditRecord

__all__ = ["detach"]

T = TypeVar("T")

# Atoms, read-only JSON, and records with nothing mutable anywhere inside (their JSON is
# frozen on construction; tests/stores checks this): returned as is.
_SHARED = (
    FrozenDict,
    FrozenList,
    Message,
    Turn,
    Part,
    Artifact,
    FilePart,
    AgentRegistration,
    Tool,
    Skill,
    ConnectionStats,
    InputRequest,
    AuditRecord,
    MessageStateChanged,
    TurnAdded,
    ArtifactAdded,
    str,
    int,
    float,
    bool,
    bytes,
    type(None),
    enum.Enum,
    Session,
    SessionAgent,
    AgentJoined,
    AgentLeft,
    StatusChanged,
)
_FIELDS: dict[type, tuple[str, ...]] = {}


def detach(value: T) -> T:
    """A copy of ``value`` that shares nothing mutable with it."""
    return _detach(value)  # type: ignore[no-any-return]


def _detach(value: Any) -> Any:
    if isinstance(value, _SHARED):
        return value
    if isinstance(value, dict):
        return {key: _detach(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_detach(item) for item in value]
    if isinstance(value, tuple):
        items = tuple(_detach(item) for item in value)
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    cls = type(value)
    names = _FIELDS.get(cls)
    if names is None:
        if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise TypeError(f"cannot detach a {cls.__name__}")
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    changes = {}
    for name in names:
        current = getattr(value, name)
        copied = _detach(current)
        if copied is not current:
            changes[name] = copied
    return dataclasses.replace(value, **changes) if changes else value
