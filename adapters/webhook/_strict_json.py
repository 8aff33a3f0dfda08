"""Strict JSON for inbound bodies: one object, only real JSON numbers, 64-bit integers, bounded nesting.

What the receiver accepts is stored and later read by every client, so it must be
JSON any of them can keep as it came: no ``NaN`` or ``Infinity`` (Python's json
module takes them), no integer beyond 64 bits, and no nesting deeper than
``MAX_BODY_DEPTH`` (protobuf decoders stop at about 100 levels).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_BODY_DEPTH", "MalformedJson", "parse_object"]

MAX_BODY_DEPTH = 16
"""How deeply an inbound body may nest objects and arrays (the body itself is level 1)."""


class MalformedJson(ValueError):
    """The body is not a JSON object the mesh can keep; the message says why."""


def parse_object(raw: bytes) -> tuple[str, dict[str, Any]]:
    """The body's text (what a signature covers) and its object.

    Raises:
        MalformedJson: not UTF-8, not JSON, not an object, a constant or integer JSON has not,
            or nested too deeply.
    """
    too_deep = MalformedJson(f"body must nest at most {MAX_BODY_DEPTH} levels")
    try:
        text = raw.decode()
        body = json.loads(text, parse_constant=_no_constant, parse_int=_int64)
    except RecursionError:
        raise too_deep from None
    except _NotStrict as exc:
        raise MalformedJson(f"body must be a JSON object: {exc.args[0]}") from None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        raise MalformedJson("body must be a JSON object") from None
    if not isinstance(body, dict):
        raise MalformedJson("body must be a JSON object")
    if _depth(body) > MAX_BODY_DEPTH:
        raise too_deep
    return text, body


def _depth(value: Any) -> int:
    """How deeply ``value`` nests objects and arrays (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


class _NotStrict(ValueError):
    """Valid to Python's json module, but not JSON the mesh can keep as it came."""


def _no_constant(name: str) -> Any:
    raise _NotStrict(f"{name} is not a JSON number")


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise _NotStrict(f"the integer {text} does not fit in 64 bits")
    return value
