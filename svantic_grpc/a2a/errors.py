"""The mesh's errors as A2A protocol errors: one table, applied by the request handler.

Each binding (JSON-RPC, REST, gRPC) turns an ``A2AError`` into its own wire form
(a JSON-RPC error code, an HTTP status, a gRPC status), so the handler only has to
raise the right one. ``data`` carries the mesh's machine-readable reason and facts
(the offending ``field`` of invalid input; who answered an input request first).
"""

from __future__ import annotations

from typing import Any

from a2a.utils.errors import (
    A2AError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)

from svantic_grpc.core.errors import (
    AlreadyExists,
    AlreadyResolved,
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unauthenticated,
)

__all__ = ["to_a2a_error"]

_BY_TYPE: tuple[tuple[type[MeshError], type[A2AError]], ...] = (
    (InvalidArgument, InvalidParamsError),
    (AlreadyExists, InvalidParamsError),
    (OutOfRange, InvalidParamsError),
    (AlreadyResolved, UnsupportedOperationError),
    (FailedPrecondition, UnsupportedOperationError),
    (PermissionDenied, InvalidRequestError),
    (Unauthenticated, InvalidRequestError),
)
"""The first matching row wins (``AlreadyResolved`` before its base class)."""


def to_a2a_error(error: MeshError, *, task_field: str = "id") -> A2AError:
    """``error`` as the A2A error a client of any binding understands.

    Args:
        error: What the core raised.
        task_field: The request field holding the task id, named when a task is not found.
    """
    data: dict[str, Any] = {"reason": error.reason, **error.metadata}
    if isinstance(error, InvalidArgument):  # a field violation every binding shows (gRPC: BadRequest)
        data["errors"] = [{"field": error.field, "message": error.description}]
    if isinstance(error, NotFound):
        if error.reason == "MESSAGE_NOT_FOUND":
            return TaskNotFoundError(error.message, data={**data, "field": task_field})
        # a session (context) or an input request: the caller named something that is not there
        return InvalidParamsError(error.message, data=data)
    if error.reason == "MESSAGE_TERMINAL":
        return TaskNotCancelableError(error.message, data=data)
    for mesh_type, a2a_type in _BY_TYPE:
        if isinstance(error, mesh_type):
            return a2a_type(error.message, data=data)
    return InternalError(error.message, data=data)
