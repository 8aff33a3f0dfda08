"""The learner: records how each dispatch went, for routing to learn from."""

from __future__ import annotations

from svantic_grpc.core.agents.base import InternalAgent
from svantic_grpc.core.dispatch import Outcome
from svantic_grpc.core.messages.model import MessageState
from svantic_grpc.core.models import Skill

__all__ = ["Learner", "OutcomeLearner"]


class Learner(InternalAgent):
    """Learns from outcomes. Subclass and override ``learn``."""

    role = "learner"

    async def learn(self, outcome: Outcome, skill: Skill | None) -> None:
        raise NotImplementedError


class OutcomeLearner(Learner):
    """Counts successes, failures and latency per instance and skill in the tenant's knowledge."""

    async def learn(self, outcome: Outcome, skill: Skill | None) -> None:
        if not outcome.instance_id:
            return
        self.scope.services.knowledge.record(
            self.scope.tenant_id,
            outcome.instance_id,
            skill.id if skill else "",
            ok=outcome.state is MessageState.COMPLETED,
            latency_s=outcome.latency_s,
        )
