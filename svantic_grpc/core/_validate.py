"""Shared checks for what callers and agents send: ids and names, JSON values."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.frozen import FrozenDict

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_REASON_CHARS",
    "RESERVED_PREFIX",
    "check_agent_type",
    "check_id",
    "check_json_depth",
    "check_reason",
    "json_bytes",
    "nests_deeper_than",
]

MAX_JSON_DEPTH = 24
"""How deep a JSON value (a data part, tool arguments, form values, an agent card) may nest
objects and arrays; ``{"a": [1]}`` nests 2.

What the mesh stores it sends back inside envelopes (a Converse response wraps an event,
which wraps the message, which wraps a turn, which wraps the part: 6 messages), and on the
wire each JSON level costs protobuf up to 3 nested messages (Struct, its map entry, Value).
Protobuf's decoders refuse more than 100 nested messages by default (Python, C++ and Java
alike): 6 + 3 x 24 = 78 leaves room for wrappers such as the ``input_resolution`` part
an agent gets, so whatever is accepted can be read back by every client and agent."""

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
"""Matched whole (``fullmatch``): with ``$``, an id ending in one newline would pass as another id."""


def check_id(field: str, value: str, *, required: bool = True) -> str:
    """Return ``value`` if it is a usable id, else raise ``InvalidArgument`` naming ``field``.

    Ids are 1-128 characters: letters, digits and ``. _ : @ / -``, starting with
    a letter or digit.
    """
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return value
    if not _ID.fullmatch(value):
        raise InvalidArgument(
            field,
            f"{value[:40]!r} is not a valid id: use 1-128 letters, digits and . _ : @ / -, "
            "starting with a letter or digit",
        )
    return value


RESERVED_PREFIX = "savant:"
"""The agent types of the mesh's own per-session agents: no caller or registration takes one."""


def check_agent_type(field: str, value: str) -> str:
    """``check_id`` for an agent type a caller gives itself, refusing the internal agents' prefix."""
    check_id(field, value)
    if value.startswith(RESERVED_PREFIX):
        raise InvalidArgument(field, f"the {RESERVED_PREFIX!r} prefix is reserved for internal agents")
    return value


def check_json_depth(field: str, value: Any, *, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise ``InvalidArgument`` naming ``field`` if ``value`` nests deeper than ``limit``."""
    if nests_deeper_than(value, limit):
        raise InvalidArgument(
            field,
            f"nests objects and arrays more than {limit} levels deep (at most {limit} are accepted)",
        )


def nests_deeper_than(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if ``value`` nests objects and arrays more than ``limit`` levels (a scalar is 0).

    Iterative, and stops at the first level too deep, so a hostile value cannot exhaust the
    stack or the time while it is measured.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


_OBJECTS = (dict, FrozenDict)
_SCALARS = (int, float, bool, type(None))


def json_bytes(value: Any) -> int:
    """About the bytes ``value`` takes as compact JSON (strings counted by characters, numbers as 8;
    a dataclass as an object of its fields): what size limits hold a value to, without encoding it.
    Iterative, like ``nests_deeper_than``."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:  # the JSON types first, by exact type (none of them is a record)
            total += len(item) + 2
        elif kind in _OBJECTS:
            total += 2
            for key, child in item.items():
                total += len(key) + 4
                stack.append(child)
        elif kind in _SCALARS:
            total += 8
        elif is_dataclass(item) and not isinstance(item, type):  # a record: its fields, as an object
            total += 2
            stack.extend(getattr(item, f.name) for f in fields(item))
        elif isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, Mapping):
            total += 2
            for key, child in item.items():
                total += len(key) + 4
                stack.append(child)
        elif isinstance(item, list | tuple):
            total += 2 + len(item)
            stack.extend(item)
        else:
            total += 8
    return total


MAX_REASON_CHARS = 4096
"""A reason a person or an agent gives (a denial, a failure): it is stored, sent to the agent and to
every watcher, and quoted in the error a later answer gets, which must fit gRPC's 16 KB metadata."""


def check_reason(field: str, reason: str, *, limit: int = MAX_REASON_CHARS) -> str:
    """``reason`` if it is at most ``limit`` characters of Unicode text, else ``InvalidArgument``
    naming ``field``."""
    if len(reason) > limit:
        raise InvalidArgument(field, f"is {len(reason)} characters long; at most {limit}")
    return check_unicode(field, reason)


def check_unicode(field: str, text: str) -> str:
    """``text`` if it is Unicode text, else ``InvalidArgument`` naming ``field``: a lone surrogate
    (what a ``\\uD800`` escape in JSON read by a lenient parser gives) cannot be encoded, so kept
    it would fail every later answer, event and stream that carries it. ASCII costs nothing."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise InvalidArgument(field, "holds a lone surrogate, which is not a Unicode character") from None
    return text
