"""How a dispatch ended, and how an ended input request leaves the message that asked it."""

from __future__ import annotations

from dataclasses import dataclass

from svantic_grpc.core.inputs.model import InputRequest, InputState
from svantic_grpc.core.messages.model import Artifact, MessageState, Part

__all__ = ["InputOutcome", "Outcome", "input_outcome"]


@dataclass(frozen=True)
class Outcome:
    """How one dispatch ended (the message's state is written by the caller)."""

    state: MessageState
    reason: str = ""
    agent_type: str = ""
    instance_id: str = ""
    parts: tuple[Part, ...] = ()
    """Everything the agent said during the dispatch."""
    artifacts: tuple[Artifact, ...] = ()
    latency_s: float = 0.0


@dataclass(frozen=True)
class InputOutcome:
    """How an ended input request leaves its message."""

    state: MessageState
    """``working`` when it was resolved (the message goes on with the answer), ``failed`` when it
    expired, ``canceled`` when it was withdrawn or canceled."""
    verdict: str
    """``approved`` or ``denied`` when resolved, else how the request ended (``expired``, ``canceled``)."""
    reason: str
    """The message's state reason."""

    @property
    def goes_on(self) -> bool:
        """Whether the message carries on (the request was resolved)."""
        return self.state is MessageState.WORKING


def input_outcome(request: InputRequest) -> InputOutcome:
    """How the message that asked ``request`` goes on now that the request has ended.

    The one place this is decided: the dispatch run (after an answer, and after a restart), the
    runtime (a plan's sign-off after a restart) and the A2A transport (the line it tells the agent)
    all read it here.
    """
    resolution = request.resolution
    if request.state is InputState.RESOLVED and resolution is not None:
        verdict = "approved" if resolution.approved else "denied"
        return InputOutcome(
            MessageState.WORKING, verdict, f"{request.summary}: {verdict} by {resolution.resolved_by}"
        )
    if request.state is InputState.EXPIRED:
        return InputOutcome(
            MessageState.FAILED, request.state.value, f"expired: nobody answered '{request.summary}' in time"
        )
    return InputOutcome(
        MessageState.CANCELED, request.state.value, request.outcome_reason or "input request canceled"
    )
