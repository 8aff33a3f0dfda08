"""The executor: the session's say in how a route is carried out, as hooks.

Running the dispatch is the core's (``core.dispatch.Dispatches``): the dispatch budget,
fail-over, the signed job, the tool policies, the tool-call budget and the wait for a human
hold whatever these hooks return.
"""

from __future__ import annotations

from collections.abc import Callable

from svantic_grpc.core.agents.base import InternalAgent
from svantic_grpc.core.messages.model import Part
from svantic_grpc.core.models import AgentRegistration

__all__ = ["Executor"]


class Executor(InternalAgent):
    """Ranks the instances that may take a dispatch and shapes what the agent receives.

    Subclass and override either hook; the defaults prefer instances that succeed
    (the learner's knowledge) and send the parts as they are.
    """

    role = "executor"

    def rank(self, skill_id: str) -> Callable[[AgentRegistration], float]:
        """A sort key over the routable instances of the routed agent type; lower goes first.

        Load decides first; this breaks ties.
        """
        return self.scope.services.knowledge.ranker(self.scope.tenant_id, skill_id)

    def shape(self, parts: tuple[Part, ...]) -> tuple[Part, ...]:
        """The parts the agent receives for a message (or plan step) that carries ``parts``.

        The mesh decides by the message as it was sent (its ``yolo_mode``, its target), not
        by what this returns.
        """
        return parts
