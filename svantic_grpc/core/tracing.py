"""The tracing seam: spans the core opens around its own work, without knowing the tracer.

``Tracing`` makes no span (tracing off, the default); the composition root hands the mesh
an OpenTelemetry-backed subclass (``svantic_grpc.tracing``) when the environment asks
for traces. A dispatch's span is current while the dispatch runs, so the human input it
waits for and the log lines it writes belong to it, and its W3C headers travel to the agent.

A human's part reads in the same trace: an input request's span runs from the moment it is
raised (a child of the dispatch that asked) until it ends, and the resolution that answers
it is a child of that span, linked to the call that carried the answer (a ``ResolveInput``
RPC, a webhook POST, a Slack click), so client → mesh → agent → mesh → human → agent is one
trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext

__all__ = ["NO_TRACING", "Tracing"]


class Tracing:
    """Opens the core's spans; this base opens none."""

    def dispatch(self, *, agent_type: str, instance_id: str) -> AbstractContextManager[Mapping[str, str]]:
        """A span around one dispatch, current inside; yields the W3C trace headers to send the agent."""
        return nullcontext({})

    def input_raised(self, *, request_id: str, kind: str, session_id: str) -> None:
        """Start the span of a pending input request (a child of the current span); it stays
        open, not current, until ``input_ended``."""

    def input_ended(self, *, request_id: str, outcome: str, surface: str) -> None:
        """End the span ``input_raised`` started (nothing when this process did not raise it)."""

    def resolution(self, *, request_id: str, surface: str) -> AbstractContextManager[None]:
        """A span around answering ``request_id``: a child of the request's span, linked to the
        current span (the call that carried the answer), current inside."""
        return nullcontext()


NO_TRACING = Tracing()
"""The default: tracing off."""
