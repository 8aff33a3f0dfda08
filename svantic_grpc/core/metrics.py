"""The metrics seam: what the core reports as it works, without knowing who counts it.

The core calls a ``Metrics`` at the few points where something worth counting ends (a
dispatch, a message, an input request, a store commit). ``Metrics`` itself records
nothing, so a core built without a metrics backend pays one method call per event;
the composition root hands the mesh a subclass that feeds Prometheus
(``svantic_grpc.metrics``). Every label value passed here is bounded (an agent
type, a transport, a state, a surface): never a session, message or request id.

Levels (sessions by state, connected agents, pending requests, subscribers) are not
reported here: they are read from the mesh when scraped (``Mesh.levels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["NO_METRICS", "Levels", "Metrics"]


class Metrics:
    """Receives the core's events; this base records nothing (metrics off)."""

    def dispatch_done(self, *, agent_type: str, transport: str, outcome: str, latency_s: float) -> None:
        """A dispatch ended: ``outcome`` is the message state it ended in, or ``not-delivered``."""

    def message_done(self, *, state: str, latency_s: float) -> None:
        """A message reached a terminal state ``latency_s`` after it was sent."""

    def input_ended(self, *, surface: str, outcome: str, latency_s: float) -> None:
        """An input request ended (``outcome``: its state, e.g. resolved or expired) after ``latency_s``."""

    def store_commit(self, *, latency_s: float, batch: int) -> None:
        """The store committed ``batch`` writes in one transaction that took ``latency_s``."""

    def lease_changes(self, *, change: str, count: int) -> None:
        """Sessions whose lease changed hands on this replica: ``taken_over`` (their owner's lease
        expired and this replica took them) or ``lost`` (another replica took them from this one)."""

    def event_from_replica(self, *, delay_s: float) -> None:
        """An event another process (a replica sharing the store) wrote reached this process's
        subscribers ``delay_s`` after it was stamped."""


NO_METRICS = Metrics()
"""The default: metrics off."""


@dataclass(frozen=True)
class Levels:
    """How much of each thing the mesh holds now, read when metrics are scraped."""

    sessions: dict[str, int] = field(default_factory=dict)
    """Open sessions by status."""
    messages: dict[str, int] = field(default_factory=dict)
    """Unfinished messages by state."""
    connected_agents: int = 0
    """Agents with an open Connect stream to this process."""
    inputs_pending: int = 0
    """Input requests waiting for a human."""
    subscribers: int = 0
    """Live event-stream subscribers in this process."""
    subscriber_lag: int = 0
    """Events the slowest live subscriber in this process has yet to read."""
