"""Well-known protobuf types (Timestamp, Struct) to and from Python values, and the exact
JSON text the contract carries beside each Struct (the rule: ``svantic_grpc/_json.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from svantic_grpc import _json
from svantic_grpc.core.errors import InvalidArgument

__all__ = ["exact_object", "exact_value", "from_struct", "json_text", "struct", "timestamp", "value"]


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for epoch seconds; ``None`` stays unset."""
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def value(content: Any) -> struct_pb2.Value:
    """A Value for any JSON value."""
    return struct({"v": content}).fields["v"]


def json_text(content: Any) -> str:
    """The exact JSON text sent beside a Struct or Value (``*_json`` fields)."""
    return _json.dumps(content)


def from_struct(message: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """The Struct as JSON-like Python values, whole numbers within ±2**53 as ints; ``field``
    names it in the error for a number JSON cannot hold (NaN, an infinity)."""
    return exact_object(message, "", field)


def exact_object(message: struct_pb2.Struct, text: str, field: str) -> dict[str, Any]:
    """The JSON object a client sent: the ``<field>_json`` text when set, else the Struct."""
    result: dict[str, Any] = _exact(_json.exact_object, message, text, field)
    return result


def exact_value(message: struct_pb2.Value | None, text: str, field: str) -> Any:
    """The JSON value a client sent: the ``<field>_json`` text when set, else the Value
    (``None`` when neither is)."""
    return _exact(_json.exact_value, message, text, field)


def _exact(read: Callable[[Any, str], Any], message: Any, text: str, field: str) -> Any:
    try:
        return read(message, text)
    except _json.JsonTextError as exc:
        raise InvalidArgument(f"{field}_json", str(exc)) from None
    except ValueError as exc:
        raise InvalidArgument(field, f"numbers must be finite ({exc})") from None
