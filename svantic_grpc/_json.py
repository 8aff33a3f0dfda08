"""Exact JSON for the contract: text that keeps integers integers, and the rule for Structs.

``google.protobuf.Struct`` holds every number as a double, so ``[1, 2]`` reads back as
``[1.0, 2.0]`` and an id above 2**53 loses digits. The contract therefore carries JSON
values twice: the Struct (for clients that like it) and the exact JSON text beside it
(``ToolCall.arguments_json``, ``Resolution.values_json`` and ``payload_json``,
``FormField.default_value_json``, ``Part.data_json``). The mesh fills both on output;
on input the text wins when set, and a Struct alone is read with :func:`whole`: a
finite, whole-valued double within ±2**53 is the integer a JSON, JS or Go client meant.

Integers must fit in 64 bits (what every common JSON library and the stores write), and
``NaN``/``Infinity`` are not JSON. Used by the servicers, the connected-agent helper, the
CLI, the A2A transport and (through ``svantic_grpc.adapter.strict_json``) the adapters
alike: one rule everywhere.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from google.protobuf import struct_pb2

from svantic_grpc.core._validate import MAX_JSON_DEPTH, nests_deeper_than

__all__ = [
    "EXACT_INT",
    "JsonTextError",
    "dumps",
    "exact_object",
    "exact_value",
    "loads",
    "lone_surrogate",
    "whole",
]

EXACT_INT = 2**53
"""Beyond this a double no longer holds every integer."""
MAX_DEPTH = MAX_JSON_DEPTH
"""Deepest nesting of objects and arrays accepted in JSON text: the same limit as for
Structs at the door (``core._validate.MAX_JSON_DEPTH`` says why it is what it is)."""


def _too_deep(limit: int) -> str:
    return f"nests objects and arrays more than {limit} levels deep (at most {limit} are accepted)"


class JsonTextError(ValueError):
    """The text is not strict JSON (the message says why, for a person)."""


def dumps(value: Any) -> str:
    """Compact JSON text for ``value``, keys in their order."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits (orjson cannot write it; json can)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def loads(text: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """The value of strict JSON ``text``.

    Raises:
        JsonTextError: not JSON, ``NaN``/``Infinity``, a number beyond a double's range,
            an integer beyond 64 bits, or nested deeper than ``max_depth``.
    """
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_int=_int64, parse_float=_finite)
    except JsonTextError:
        raise
    except RecursionError:
        raise JsonTextError(_too_deep(max_depth)) from None
    except ValueError as exc:
        raise JsonTextError(f"is not valid JSON ({exc})") from None
    if nests_deeper_than(value, max_depth):
        raise JsonTextError(_too_deep(max_depth))
    # A lone surrogate can only come from a ``\\uD800``-``\\uDFFF`` escape: text that is valid
    # UTF-8 (all a protobuf string can be) holds none. Kept, it would fail every later encoding
    # of the value (the responses, the stores' JSON, the console), for every reader.
    if "\\u" in text and (where := lone_surrogate(value)) is not None:
        raise JsonTextError(f"holds a lone surrogate escape in {where}, which is not a Unicode character")
    return value


def lone_surrogate(value: Any) -> str | None:
    """Where in ``value`` a string (or key) holds a lone surrogate: ``a string``/``a key``; else ``None``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not _encodes(item):
                return "a string"
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _encodes(key):
                    return "a key"
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _encodes(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate); ASCII text is known to be at once."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def exact_object(struct: struct_pb2.Struct, text: str) -> dict[str, Any]:
    """The JSON object carried as ``text`` when set, else as ``struct`` (read with :func:`whole`).

    Raises:
        JsonTextError: ``text`` is not strict JSON, or not an object.
        ValueError: the Struct holds a number JSON cannot (NaN, an infinity).
    """
    value = exact_value(struct, text)
    if not isinstance(value, dict):
        raise JsonTextError("must be a JSON object")
    return value


def exact_value(message: struct_pb2.Struct | struct_pb2.Value | None, text: str) -> Any:
    """Any JSON value carried as ``text`` when set, else as ``message`` (``None`` if neither).

    Raises:
        JsonTextError: ``text`` is not strict JSON.
        ValueError: the message holds a number JSON cannot (NaN, an infinity).
    """
    if text:
        return loads(text)
    if message is None:
        return None
    if isinstance(message, struct_pb2.Struct):
        return _struct(message)
    return _value(message)


def _struct(message: struct_pb2.Struct) -> dict[str, Any]:
    """What ``whole(json_format.MessageToDict(message))`` gives, read directly (a few times faster)."""
    return {key: _value(item) for key, item in message.fields.items()}


def _value(message: struct_pb2.Value) -> Any:
    kind = message.WhichOneof("kind")
    if kind == "string_value":
        return message.string_value
    if kind == "number_value":
        number = message.number_value
        if not math.isfinite(number):  # refused as MessageToDict refuses them
            name = "NaN" if math.isnan(number) else "Infinity"
            raise ValueError(
                f"Fail to serialize {name} for Value.number_value, which would parse as string_value"
            )
        return int(number) if number.is_integer() and abs(number) <= EXACT_INT else number
    if kind == "bool_value":
        return message.bool_value
    if kind == "struct_value":
        return _struct(message.struct_value)
    if kind == "list_value":
        return [_value(item) for item in message.list_value.values]
    return None  # null_value, or no kind set


def whole(value: Any) -> Any:
    """``value`` (JSON-like, as read from a Struct) with whole-valued doubles within ±2**53
    as ints; other values unchanged."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= EXACT_INT:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole(v) for v in value]
    return value


def _no_constant(name: str) -> Any:
    raise JsonTextError(f"holds {name}, which is not a JSON number")


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise JsonTextError(f"holds the integer {text[:40]}, which does not fit in 64 bits")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonTextError(f"holds the number {text[:40]}, beyond a double's range")
    return value
