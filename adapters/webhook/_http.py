"""How the webhook receiver answers: a refusal as JSON with a reason, domain errors as HTTP statuses."""

from __future__ import annotations

from starlette.responses import JSONResponse

from svantic_grpc.core.errors import (
    AlreadyResolved,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = ["Refused", "error", "mesh_error"]


class Refused(Exception):
    """An inbound call refused before it reached the mesh."""

    def __init__(self, status: int, reason: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.field = status, reason, message, field


# Domain errors -> HTTP status; the first matching class wins (subclasses first).
_HTTP_STATUS: tuple[tuple[type[MeshError], int], ...] = (
    (AlreadyResolved, 409),
    (NotFound, 404),
    (PermissionDenied, 403),
    (InvalidArgument, 422),
    (Unauthenticated, 401),
    (Conflict, 409),
    (FailedPrecondition, 409),
    (ResourceExhausted, 429),
    (Unavailable, 503),
)


def error(status: int, reason: str, message: str, field: str = "") -> JSONResponse:
    """A refusal: ``{"status": "refused", "error": {"reason", "message", "field"?}}``."""
    body: dict[str, str] = {"reason": reason, "message": message}
    if field:
        body["field"] = field
    return JSONResponse({"status": "refused", "error": body}, status_code=status)


def mesh_error(exc: MeshError) -> JSONResponse:
    """A domain error as the HTTP status a caller expects (409 for a request answered already, ...)."""
    status = next((code for cls, code in _HTTP_STATUS if isinstance(exc, cls)), 400)
    return error(status, exc.reason, exc.message, exc.field if isinstance(exc, InvalidArgument) else "")
