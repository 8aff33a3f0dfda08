"""Strict JSON for inbound bodies: one object, under the mesh's one rule for JSON it keeps.

What the receiver accepts is stored and later read by every client, so it must be
JSON any of them can keep as it came: no ``NaN`` or ``Infinity``, no integer beyond
64 bits, and no nesting deeper than ``MAX_BODY_DEPTH`` (the rule is the mesh's,
``svantic_grpc.adapter.strict_json``; the depth is this receiver's).
"""

from __future__ import annotations

from typing import Any

from svantic_grpc.adapter import strict_json

__all__ = ["MAX_BODY_DEPTH", "MalformedJson", "parse_object"]

MAX_BODY_DEPTH = 16
"""How deeply an inbound body may nest objects and arrays (the body itself is level 1)."""


class MalformedJson(ValueError):
    """The body is not a JSON object the mesh can keep; the message says why."""


def parse_object(raw: bytes) -> tuple[str, dict[str, Any]]:
    """The body's text (what a signature covers) and its object.

    Raises:
        MalformedJson: not UTF-8, not strict JSON, not an object, or nested too deeply.
    """
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise MalformedJson("body must be UTF-8 JSON") from None
    try:
        body = strict_json(text, max_depth=MAX_BODY_DEPTH)
    except ValueError as exc:
        raise MalformedJson(f"body {exc}") from None
    if not isinstance(body, dict):
        raise MalformedJson("body must be a JSON object")
    return text, body
