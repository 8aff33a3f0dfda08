"""Well-known protobuf types (Timestamp, Struct) to and from Python values."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from svantic_grpc.core.errors import InvalidArgument

__all__ = ["from_struct", "struct", "timestamp"]


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


def from_struct(message: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """The Struct as JSON-like Python values; ``field`` names it in the error for a number JSON
    cannot hold (NaN, an infinity)."""
    try:
        result: dict[str, Any] = json_format.MessageToDict(message)
    except ValueError as exc:
        raise InvalidArgument(field, f"numbers must be finite ({exc})") from None
    return result
