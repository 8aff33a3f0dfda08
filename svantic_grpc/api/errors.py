"""The one table that maps domain errors to gRPC statuses with rich details.

Each status carries a ``google.rpc.ErrorInfo`` (reason, domain, metadata) and,
for invalid input, a ``google.rpc.BadRequest`` naming the offending field, in
the standard ``grpc-status-details-bin`` trailer. A limit that says when to try
again adds a ``google.rpc.RetryInfo`` and gRPC's own ``grpc-retry-pushback-ms``
trailer (which a client's retry policy honours).

Field paths are built in the core (``svantic_grpc.core.errors`` says how and why) and
passed through as they are, except where a request holds the value the core checked
under another name than the unary RPC does: Converse's ``send`` is SendMessage's
``message``, its ``resolve`` is a ResolveInput request. ``placed`` moves the path there,
the one place a path is changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from svantic_grpc.core import errors

__all__ = ["DOMAIN", "STATUS_BY_ERROR", "placed", "status_code_for", "to_grpc_status"]

DOMAIN = "svantic.v1"

STATUS_BY_ERROR: dict[type[errors.MeshError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}


def status_code_for(error: errors.MeshError) -> grpc.StatusCode:
    """The gRPC code for ``error`` (its nearest class in the table)."""
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


def to_grpc_status(error: errors.MeshError) -> grpc.Status:
    """A ``grpc.Status`` with ErrorInfo (and BadRequest for invalid input) attached."""
    code = status_code_for(error)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    details = [_pack(info)]
    if isinstance(error, errors.InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.description
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    retry_after_s = error.retry_after_s if isinstance(error, errors.ResourceExhausted) else None
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(math.ceil(retry_after_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message, details=details)
    converted = rpc_status.to_status(status)
    if retry_after_s is None:
        return converted
    pushback = ("grpc-retry-pushback-ms", str(math.ceil(retry_after_s * 1000)))
    return _Status(converted.code, converted.details, (*converted.trailing_metadata, pushback))


@contextmanager
def placed(root: str, at: str) -> Iterator[None]:
    """Name the field of an ``InvalidArgument`` raised inside where this request holds the value.

    The core's path starts at ``root`` (``""``: the unary request itself); it is moved
    under ``at``: ``placed("message", "send")`` turns ``message.parts[1]`` into
    ``send.parts[1]``, ``placed("", "resolve")`` turns ``resolution.reason`` into
    ``resolve.resolution.reason``. Paths outside ``root`` are left as they are.
    """
    try:
        yield
    except errors.InvalidArgument as error:
        field = error.field
        if root and not (field == root or field.startswith((f"{root}.", f"{root}["))):
            raise
        rest = field[len(root) :]
        moved = f"{at}{rest}" if root else f"{at}.{rest}"
        raise errors.InvalidArgument(moved, error.description, reason=error.reason) from None


class _Status(grpc.Status):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]):
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def _pack(detail: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed
