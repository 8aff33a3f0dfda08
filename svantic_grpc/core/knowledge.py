"""The tenant's shared knowledge of how agents perform, written by the learner.

Routing reads it to prefer instances that succeed (and answer fast) when load
alone does not decide. It lives in the process: a restart forgets it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from svantic_grpc.core.models import AgentRegistration

__all__ = ["Knowledge", "Outcomes"]


@dataclass
class Outcomes:
    """Dispatch outcomes of one instance (or one skill of it)."""

    successes: int = 0
    failures: int = 0
    total_latency_s: float = 0.0

    @property
    def success_rate(self) -> float:
        """Laplace-smoothed, so an unknown instance scores 0.5."""
        return (self.successes + 1) / (self.successes + self.failures + 2)

    @property
    def mean_latency_s(self) -> float:
        done = self.successes + self.failures
        return self.total_latency_s / done if done else 0.0


class Knowledge:
    """Per-tenant outcomes by instance and by (instance, skill)."""

    def __init__(self) -> None:
        self._by_instance: dict[tuple[str, str], Outcomes] = {}
        self._by_skill: dict[tuple[str, str, str], Outcomes] = {}

    def record(self, tenant_id: str, instance_id: str, skill_id: str, *, ok: bool, latency_s: float) -> None:
        keys: list[Outcomes] = [self._by_instance.setdefault((tenant_id, instance_id), Outcomes())]
        if skill_id:
            keys.append(self._by_skill.setdefault((tenant_id, instance_id, skill_id), Outcomes()))
        for outcomes in keys:
            if ok:
                outcomes.successes += 1
            else:
                outcomes.failures += 1
            outcomes.total_latency_s += latency_s

    def outcomes(self, tenant_id: str, instance_id: str, skill_id: str = "") -> Outcomes:
        if skill_id:
            return self._by_skill.get((tenant_id, instance_id, skill_id), Outcomes())
        return self._by_instance.get((tenant_id, instance_id), Outcomes())

    def ranker(self, tenant_id: str, skill_id: str = "") -> Callable[[AgentRegistration], float]:
        """A sort key (lower is better) preferring instances that succeed for this skill."""

        def rank(agent: AgentRegistration) -> float:
            return -self.outcomes(tenant_id, agent.instance_id, skill_id).success_rate

        return rank
