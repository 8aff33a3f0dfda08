"""The tracing seam: spans the core opens around its own work, without knowing the tracer.

``Tracing`` makes no span (tracing off, the default); the composition root hands the mesh
an OpenTelemetry-backed subclass (``svantic_grpc.tracing``) when the environment asks
for traces. A dispatch's span is current while the dispatch runs, so the human input it
waits for and the log lines it writes belong to it, and its W3C headers travel to the agent.
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


NO_TRACING = Tracing()
"""The default: tracing off."""
