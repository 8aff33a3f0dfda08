"""ProtoJSON into a2a-sdk's protobuf types through protobuf's own constructors.

``json_format.ParseDict`` (what a2a-sdk's ``parse_lenient`` calls) walks each JSON value in
Python, field by field, and parses timestamps with ``strptime``: ~60-90 us per A2A event,
several events per hosted message. The same JSON, renamed to field names and handed to the
message's constructor, is built by protobuf's C code in a fraction of that.

``parse`` does that for what A2A events hold: strings, numbers, booleans, enums (by name or
number), nested and repeated messages, ``Struct`` (metadata), ``Value`` holding an object
(data parts), and timestamps in RFC 3339 UTC (``...Z``). Anything else (bytes, maps, nulls,
other well-known types, 64-bit integers written as strings, other timestamp forms, a value of
an unexpected type, a key the message does not have, two members of one oneof) makes it
give up and hand the whole object to ``parse_lenient``, so the result is always what
a2a-sdk's own parser gives.
"""

from __future__ import annotations

import datetime
import functools
import re
from typing import Any, TypeVar, cast

from a2a.utils.proto_utils import parse_lenient
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["parse"]

_M = TypeVar("_M", bound=Message)

_SCALAR, _MESSAGE, _REPEATED, _STRUCT, _VALUE, _TIMESTAMP = range(6)
_TYPES: dict[int, tuple[type, ...]] = {
    FieldDescriptor.CPPTYPE_STRING: (str,),
    FieldDescriptor.CPPTYPE_BOOL: (bool,),
    FieldDescriptor.CPPTYPE_INT32: (int,),
    FieldDescriptor.CPPTYPE_INT64: (int,),
    FieldDescriptor.CPPTYPE_UINT32: (int,),
    FieldDescriptor.CPPTYPE_UINT64: (int,),
    FieldDescriptor.CPPTYPE_DOUBLE: (int, float),
    FieldDescriptor.CPPTYPE_FLOAT: (int, float),
    FieldDescriptor.CPPTYPE_ENUM: (str, int),
}
_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?Z")
_EPOCH = datetime.datetime(1970, 1, 1)


class _Slow(Exception):
    """What the fast path does not handle exactly as ``json_format`` would."""


def parse(data: dict[str, Any], message: type[_M]) -> _M:
    """``data`` (decoded ProtoJSON) as a new ``message``, unknown fields ignored, exactly as
    ``parse_lenient(data, message())``."""
    try:
        return message(**_fields(data, cast("Descriptor", message.DESCRIPTOR)))
    except (_Slow, TypeError, ValueError):
        return parse_lenient(data, message())


Step = tuple[str, int, Any, str | None]


@functools.cache
def _plan(descriptor: Descriptor) -> dict[str, Step]:
    """Per JSON key (its JSON name and its field name): field name, kind, what the kind needs,
    and its oneof. Fields the fast path does not take are left out."""
    plan: dict[str, Step] = {}
    for field in descriptor.fields:
        repeated = field.is_repeated
        sub = field.message_type
        oneof = field.containing_oneof.name if field.containing_oneof else None
        step: Step
        if sub is None:
            if field.type == FieldDescriptor.TYPE_BYTES:
                continue
            step = (field.name, _SCALAR, (repeated, _TYPES[field.cpp_type]), oneof)
        elif sub.GetOptions().map_entry:
            continue
        elif sub.full_name == "google.protobuf.Struct" and not repeated:
            step = (field.name, _STRUCT, None, oneof)
        elif sub.full_name == "google.protobuf.Value" and not repeated:
            step = (field.name, _VALUE, None, oneof)
        elif sub.full_name == "google.protobuf.Timestamp" and not repeated:
            step = (field.name, _TIMESTAMP, None, oneof)
        elif sub.full_name.startswith("google.protobuf."):
            continue
        else:
            step = (field.name, _REPEATED if repeated else _MESSAGE, sub, oneof)
        plan[field.json_name] = plan[field.name] = step
    return plan


def _fields(data: Any, descriptor: Descriptor) -> dict[str, Any]:
    if type(data) is not dict:
        raise _Slow
    plan = _plan(descriptor)
    fields: dict[str, Any] = {}
    oneofs: set[str] = set()
    for key, value in data.items():
        step = plan.get(key)
        if step is None or value is None:
            raise _Slow
        name, kind, need, oneof = step
        if name in fields:
            raise _Slow  # given under both its names
        if oneof is not None:
            if oneof in oneofs:
                raise _Slow
            oneofs.add(oneof)
        if kind == _SCALAR:
            repeated, types = need
            if repeated and type(value) is not list:
                raise _Slow
            for item in value if repeated else (value,):
                if type(item) not in types:
                    raise _Slow
            fields[name] = value
        elif kind == _MESSAGE:
            fields[name] = _fields(value, need)
        elif kind == _REPEATED:
            if type(value) is not list:
                raise _Slow
            fields[name] = [_fields(item, need) for item in value]
        elif kind == _STRUCT:
            if type(value) is not dict:
                raise _Slow
            fields[name] = value
        elif kind == _VALUE:
            if type(value) is not dict:
                raise _Slow
            fields[name] = {"struct_value": value}
        else:
            fields[name] = _timestamp(value)
    return fields


def _timestamp(value: Any) -> dict[str, int]:
    """RFC 3339 in UTC as ``Timestamp`` fields, computed as ``Timestamp.FromJsonString`` does."""
    match = _TIME.fullmatch(value) if type(value) is str else None
    if match is None:
        raise _Slow
    year, month, day, hour, minute, second, fraction = match.groups()
    moment = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    delta = moment - _EPOCH
    nanos = round(float("0." + fraction) * 1e9) if fraction else 0
    return {"seconds": delta.seconds + delta.days * 86400, "nanos": nanos}
