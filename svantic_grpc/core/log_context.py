"""What a log line knows about the work it is part of: the session, carried by a context variable.

Set where work for one session starts (a gRPC call naming a session, a dispatch); every
log record made below it in the same task, or in tasks it starts, carries that session id
(``svantic_grpc.logs`` writes it into each JSON line). Plain contextvars: no logging setup
is needed in the core.
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["SESSION_ID"]

SESSION_ID: ContextVar[str] = ContextVar("svantic_session_id", default="")
"""The session the current task works for; empty when none."""
