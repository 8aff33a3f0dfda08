"""Messages: one interaction inside a session (A2A calls it a task), their parts and the
metadata those carry; ``check_parts`` is the one check of a part's shape."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from svantic_grpc.core._validate import check_json_depth, json_bytes
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.frozen import freeze

__all__ = [
    "MAX_MESSAGE_BYTES",
    "TERMINAL_STATES",
    "Artifact",
    "FilePart",
    "Message",
    "MessageMetadata",
    "MessageState",
    "Part",
    "Role",
    "Turn",
    "check_parts",
    "message_bytes",
    "parse_metadata",
    "parts_bytes",
]


class MessageState(enum.Enum):
    """Aligned with A2A task states."""

    SUBMITTED = "submitted"
    WORKING = "working"
    INPUT_REQUIRED = "input-required"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    REJECTED = "rejected"

    # Members are singletons compared by identity: hash them by identity too. Enum's own
    # ``__hash__`` is Python code (hash of the name), and states are looked up in sets and
    # dicts many times per message.
    __hash__ = object.__hash__

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {MessageState.COMPLETED, MessageState.FAILED, MessageState.CANCELED, MessageState.REJECTED}
)


class Role(enum.Enum):
    USER = "user"
    AGENT = "agent"

    __hash__ = object.__hash__  # as MessageState's


@dataclass(frozen=True)
class FilePart:
    """A file, inline (``data``) or by reference (``uri``)."""

    name: str = ""
    media_type: str = ""
    data: bytes | None = None
    uri: str = ""


@dataclass(frozen=True)
class Part:
    """One piece of content: exactly one of text, data or file. ``data`` is made read-only."""

    text: str | None = None
    data: dict[str, Any] | None = None
    file: FilePart | None = None

    def __post_init__(self) -> None:
        if self.data is not None:
            object.__setattr__(self, "data", freeze(self.data))

    @property
    def media_type(self) -> str:
        if self.text is not None:
            return "text/plain"
        if self.data is not None:
            return "application/json"
        return self.file.media_type if self.file is not None else ""


MAX_MESSAGE_BYTES = 3 * 1024 * 1024
"""What one message may carry in all (its parts, the turns of its history and its artifacts), so
that it, and every answer and event that carries it, stays readable by a client with gRPC's
default 4 MB receive limit. An agent whose outputs would pass it fails the message."""


def _bytes_of(part: Part) -> int:
    if part.text is not None:
        return len(part.text)
    if part.data is not None:  # twice: it goes out as a Struct and as exact JSON text beside it
        return 2 * json_bytes(part.data)
    return len(part.file.data or b"") if part.file is not None else 0


_COUNTED: dict[int, tuple[tuple[Part, ...], int]] = {}
"""Bytes of small parts tuples counted lately, by identity (the tuple is held, so its id is not
reused). A message's parts are one tuple for its whole run, and its first turn shares it: they are
counted as they are sent (``check_parts``) and again before the agent's outputs are added (the
writer). At most ``_COUNTED_MAX`` tuples of at most ``_COUNTED_BYTES`` each are held (~4 MB)."""
_COUNTED_MAX = 256
_COUNTED_BYTES = 16 * 1024


def _counted(parts: tuple[Part, ...], total: int) -> int:
    if total <= _COUNTED_BYTES:
        if len(_COUNTED) >= _COUNTED_MAX:
            _COUNTED.clear()
        _COUNTED[id(parts)] = (parts, total)
    return total


def parts_bytes(parts: Iterable[Part]) -> int:
    """The bytes parts carry (text, file contents, data twice: as a Struct and as JSON text), as
    ``check_parts`` counts them."""
    if type(parts) is not tuple:
        return sum(_bytes_of(p) for p in parts)
    known = _COUNTED.get(id(parts))
    if known is not None and known[0] is parts:  # parts are immutable: counted once
        return known[1]
    return _counted(parts, sum(_bytes_of(p) for p in parts))


def message_bytes(message: Message) -> int:
    """The bytes a message carries in all: its parts, its history's and its artifacts'."""
    return (
        parts_bytes(message.parts)
        + sum(parts_bytes(t.parts) for t in message.history)
        + sum(parts_bytes(a.parts) for a in message.artifacts)
    )


def check_parts(parts: tuple[Part, ...], field: str) -> int:
    """Hold parts to the shape every ingress must meet; returns the bytes they carry.

    Each part has exactly one of text, data or file; a file exactly one of bytes or uri;
    data nests no deeper than ``MAX_JSON_DEPTH``. The one check of a part's shape, in the
    core, where messages from every door and updates from every transport pass.

    Raises:
        InvalidArgument: naming the part as ``{field}[index]``.
    """
    total = 0
    for index, part in enumerate(parts):
        text, data, file = part.text, part.data, part.file
        if text is not None and data is None and file is None:  # the common part: nothing more to check
            total += len(text)
            continue
        where = f"{field}[{index}]"  # named only when needed: this runs for every part of every message
        if (text is not None) + (data is not None) + (file is not None) != 1:
            raise InvalidArgument(where, "must have exactly one of text, data or file")
        if data is not None:
            check_json_depth(f"{where}.data", data)
        if file is not None and (file.data is None) == (not file.uri):
            raise InvalidArgument(f"{where}.file", "needs exactly one of bytes or uri")
        total += _bytes_of(part)
    return _counted(parts, total) if type(parts) is tuple else total


@dataclass(frozen=True)
class Turn:
    """One entry of a message's history."""

    role: Role
    parts: tuple[Part, ...]
    time: float
    instance_id: str = ""


@dataclass(frozen=True)
class Artifact:
    """An output an agent produced."""

    artifact_id: str
    parts: tuple[Part, ...]
    name: str = ""


@dataclass(frozen=True)
class Message:
    """A message and everything that happened to it."""

    tenant_id: str
    session_id: str
    message_id: str
    role: Role
    parts: tuple[Part, ...]
    state: MessageState
    created_at: float
    updated_at: float
    sender: str = ""
    state_reason: str = ""
    history: tuple[Turn, ...] = ()
    artifacts: tuple[Artifact, ...] = ()
    agent_type: str = ""
    instance_id: str = ""
    input_request_ids: tuple[str, ...] = ()
    remote_task_id: str = ""
    """The agent's own id for this work (an A2A task id), to continue it after a restart."""
    version: int = 0

    @property
    def text(self) -> str:
        """The message's text parts joined by newlines."""
        return "\n".join(p.text for p in self.parts if p.text is not None)


METADATA_KEYS = ("target_agent", "yolo_mode", "context", "files", "action_data")


@dataclass(frozen=True)
class MessageMetadata:
    """Metadata carried in data parts (a data part whose object has one of the keys)."""

    target_agent: str = ""
    yolo_mode: bool = False
    context: dict[str, Any] = field(default_factory=dict)
    files: tuple[dict[str, Any], ...] = ()
    action_data: dict[str, Any] = field(default_factory=dict)


_METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "target_agent": (str,),
    "yolo_mode": (bool,),
    "context": (dict,),
    "files": (list,),
    "action_data": (dict,),
}


def parse_metadata(parts: tuple[Part, ...]) -> MessageMetadata:
    """Collect the metadata keys from data parts; wrong types name the part and key."""
    found: dict[str, Any] = {}
    for index, part in enumerate(parts):
        if part.data is None:
            continue
        for key in METADATA_KEYS:
            if key in part.data:
                found[key] = (index, part.data[key])
    result: dict[str, Any] = {}
    for key, (index, value) in found.items():
        if not isinstance(value, _METADATA_TYPES[key]):
            kind = _METADATA_TYPES[key][0].__name__.replace("dict", "object").replace("list", "array")
            raise InvalidArgument(f"message.parts[{index}].data.{key}", f"must be a {kind}")
        result[key] = tuple(value) if isinstance(value, list) else value
    return MessageMetadata(**result)
