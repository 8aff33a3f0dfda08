"""Per-session internal agents: small pluggable classes, one per role, that make choices.

Settings (``internal_agents``) may name another class for a role as
``"package.module:ClassName"``; it must subclass the role's base class here. Each role
answers one question (where a message goes, what a plan's steps are, which instance ranks
first, whether a result fits, what to learn, what the chat says); the rules that hold while
work runs (tool and plan policies, budgets, approvals, timeouts, fail-over) are the core's
(``core.dispatch``), and no class named here can switch one off.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass

from svantic_grpc.core.agents.base import AgentServices, InternalAgent, SessionScope, StoreReads
from svantic_grpc.core.agents.chat import CapabilitiesChat, Chat
from svantic_grpc.core.agents.critic import Critic, OutputModeCritic, Verdict
from svantic_grpc.core.agents.executor import Executor
from svantic_grpc.core.agents.learner import Learner, OutcomeLearner
from svantic_grpc.core.agents.orchestrator import KeywordOrchestrator, Orchestrator, Route
from svantic_grpc.core.agents.planner import Planner, PlanStep, SequentialPlanner, parse_plan
from svantic_grpc.core.dispatch import Outcome

__all__ = [
    "DEFAULT_CLASSES",
    "ROLE_BASES",
    "AgentServices",
    "AgentSet",
    "Chat",
    "Critic",
    "Executor",
    "InternalAgent",
    "Learner",
    "Orchestrator",
    "Outcome",
    "PlanStep",
    "Planner",
    "Route",
    "SessionScope",
    "StoreReads",
    "Verdict",
    "load_agent_classes",
    "parse_plan",
]

ROLE_BASES: dict[str, type[InternalAgent]] = {
    "orchestrator": Orchestrator,
    "executor": Executor,
    "planner": Planner,
    "chat": Chat,
    "critic": Critic,
    "learner": Learner,
}
DEFAULT_CLASSES: dict[str, type[InternalAgent]] = {
    "orchestrator": KeywordOrchestrator,
    "executor": Executor,
    "planner": SequentialPlanner,
    "chat": CapabilitiesChat,
    "critic": OutputModeCritic,
    "learner": OutcomeLearner,
}


def load_agent_classes(overrides: Mapping[str, str]) -> dict[str, type[InternalAgent]]:
    """The class per role: defaults, with ``overrides`` (role -> ``module:Class``) applied.

    Raises:
        ValueError: unknown role, unimportable class, or a class of the wrong kind.
    """
    classes = dict(DEFAULT_CLASSES)
    for role, path in overrides.items():
        if role not in ROLE_BASES:
            raise ValueError(f"unknown internal agent role {role!r}; roles: {', '.join(ROLE_BASES)}")
        module_name, _, class_name = path.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"{role}: cannot load {path!r}: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, ROLE_BASES[role])):
            raise ValueError(f"{role}: {path!r} is not a subclass of {ROLE_BASES[role].__name__}")
        classes[role] = cls
    return classes


@dataclass(frozen=True)
class AgentSet:
    """One session's internal agents."""

    orchestrator: Orchestrator
    executor: Executor
    planner: Planner
    chat: Chat
    critic: Critic
    learner: Learner

    @classmethod
    def create(cls, scope: SessionScope, classes: Mapping[str, type[InternalAgent]]) -> AgentSet:
        return cls(**{role: classes[role](scope) for role in ROLE_BASES})  # type: ignore[arg-type]

    async def close(self) -> None:
        for role in ROLE_BASES:
            agent: InternalAgent = getattr(self, role)
            await agent.close()
