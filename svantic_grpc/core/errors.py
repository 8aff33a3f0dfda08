"""Domain errors. Each maps to one gRPC status in ``svantic_grpc.api.errors``.

Every error carries a machine-readable ``reason`` (UPPER_SNAKE, published as
``google.rpc.ErrorInfo.reason``) and a message a person can act on.

Field paths (``InvalidArgument.field``) are built here in the core, once, where every
ingress passes (gRPC, the adapters, agents' reports from any transport): the offending
value is known only here. They use the contract's (svantic.v1) field names, rooted as
the unary request roots the value the core was given: ``session_id``,
``message.parts[1].data``, ``resolution.decision``, ``update.turn.parts[0]`` (an agent's
report, as the Connect stream names it). The api passes them through and builds paths
itself only for what exists on the wire alone (``*_json`` twins, enum numbers, oneof
cases), in the same roots; where a request holds the value under another name
(Converse's ``send`` and ``resolve``) it moves the root with ``api.errors.placed``,
the one place a path is changed.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "AlreadyResolved",
    "Conflict",
    "FailedPrecondition",
    "InvalidArgument",
    "MeshError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "session_not_found",
]


class MeshError(Exception):
    """Base of every error the mesh reports to a caller.

    Args:
        message: What went wrong, for a person.
        reason: Machine-readable reason; defaults to the class's ``default_reason``.
        metadata: Extra machine-readable facts (ids, counts), all strings.
    """

    default_reason = "MESH_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgument(MeshError):
    """The request is malformed; ``field`` names the offending field."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, *, reason: str | None = None):
        super().__init__(f"{field}: {message}", reason=reason, metadata={"field": field})
        self.field = field
        self.description = message


class NotFound(MeshError):
    """The thing does not exist, or belongs to another tenant."""

    default_reason = "NOT_FOUND"


def session_not_found(session_id: str) -> NotFound:
    """The one error for a session that is not there (or is another tenant's)."""
    return NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND")


class AlreadyExists(MeshError):
    """Creating something whose id is taken."""

    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(MeshError):
    """The thing is in the wrong state for the request."""

    default_reason = "FAILED_PRECONDITION"


class Conflict(MeshError):
    """A concurrent writer won the race; nothing was overwritten."""

    default_reason = "VERSION_CONFLICT"


class AlreadyResolved(Conflict):
    """An input request ended before this answer; the message names who answered, how and when."""

    default_reason = "INPUT_ALREADY_RESOLVED"


class PermissionDenied(MeshError):
    """The caller is known but lacks the scope for this."""

    default_reason = "PERMISSION_DENIED"


class Unauthenticated(MeshError):
    """No valid credential or token."""

    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(MeshError):
    """A limit was reached (budget, buffer, capacity).

    ``retry_after_s``, when given, is how long the caller should wait before trying
    again (sent as ``google.rpc.RetryInfo``).
    """

    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_s = retry_after_s


class OutOfRange(MeshError):
    """A position outside what is kept (e.g. resuming from events that retention let go)."""

    default_reason = "OUT_OF_RANGE"


class Unavailable(MeshError):
    """No agent (or other resource) can take this now; trying later may work."""

    default_reason = "UNAVAILABLE"


class Unimplemented(MeshError):
    """The RPC is part of the contract but not served yet."""

    default_reason = "UNIMPLEMENTED"
