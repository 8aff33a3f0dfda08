"""The orchestrator: decides which agent handles a message.

An explicit ``target_agent`` wins; then a multi-step ``action_data.plan`` goes to
the planner; then the best skill match among the tenant's registered agents;
otherwise ``savant:chat``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from svantic_grpc.core.agents.base import InternalAgent
from svantic_grpc.core.messages.model import Message, MessageMetadata
from svantic_grpc.core.models import Skill

__all__ = ["KeywordOrchestrator", "Orchestrator", "Route"]

_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = frozenset(
    {"a", "an", "and", "the", "to", "of", "for", "in", "on", "with", "please", "me", "my", "is"}
)


@dataclass(frozen=True)
class Route:
    """Where a message goes."""

    agent_type: str
    instance_id: str = ""
    """A specific instance (``target_agent`` of the form ``type/instance``)."""
    skill: Skill | None = None
    """The matched skill, for the critic and the learner."""
    why: str = ""

    @property
    def internal(self) -> bool:
        return self.agent_type.startswith("savant:")

    @property
    def state_reason(self) -> str:
        """Why the message is working, once routed here."""
        return f"routed to {self.agent_type} ({self.why})"


class Orchestrator(InternalAgent):
    """Routes messages. Subclass and override ``route`` to change the policy."""

    role = "orchestrator"

    routes_at_once: ClassVar[bool] = False
    """Set when ``route`` is quick (a lookup, no model call): a message is then routed as it is
    sent and stored already working, its route in the same write (one store write fewer). Left
    unset, a message is stored first and routed by its run, however long routing takes."""

    async def route(self, message: Message, metadata: MessageMetadata) -> Route:
        raise NotImplementedError


class KeywordOrchestrator(Orchestrator):
    """Explicit target, then plan, then skill keywords, then chat."""

    routes_at_once = True  # a read of the registered agents at most

    async def route(self, message: Message, metadata: MessageMetadata) -> Route:
        if metadata.target_agent:
            agent_type, _, instance_id = metadata.target_agent.partition("/")
            skill = (
                None
                if agent_type.startswith("savant:")
                else await self._skill_of(agent_type, message, instance_id)
            )
            return Route(agent_type, instance_id, skill, why="target_agent")
        if "plan" in metadata.action_data:
            return Route("savant:planner", why="action_data.plan")
        matched = await self._best_skill(message)
        if matched is not None:
            agent_type, skill = matched
            return Route(agent_type, skill=skill, why=f"skill {skill.id}")
        return Route("savant:chat", why="no skill matched")

    async def _candidates(self, agent_type: str = "") -> list[tuple[str, Skill]]:
        services = self.scope.services
        agents = await services.store.list_agents(tenant_id=self.scope.tenant_id, agent_type=agent_type)
        seen: set[tuple[str, str]] = set()
        found: list[tuple[str, Skill]] = []
        for agent in agents:
            for skill in agent.skills:
                if (agent.agent_type, skill.id) not in seen:
                    seen.add((agent.agent_type, skill.id))
                    found.append((agent.agent_type, skill))
        return found

    async def _best_skill(self, message: Message) -> tuple[str, Skill] | None:
        words = _words(message.text)
        if not words:
            return None
        best: tuple[int, str, Skill] | None = None
        for agent_type, skill in await self._candidates():
            score = len(words & _skill_words(skill))
            if score and (best is None or score > best[0]):
                best = (score, agent_type, skill)
        return None if best is None else (best[1], best[2])

    async def _skill_of(self, agent_type: str, message: Message, instance_id: str = "") -> Skill | None:
        if instance_id:  # that instance takes the message: its skills, one read (the dispatch reuses it)
            store = self.scope.services.store
            agent = await store.get_agent(tenant_id=self.scope.tenant_id, instance_id=instance_id)
            skills = list(agent.skills) if agent is not None and agent.agent_type == agent_type else []
        else:
            skills = [s for _, s in await self._candidates(agent_type)]
        if len(skills) <= 1:  # the one skill is the match, whatever the words; none, no match
            return skills[0] if skills else None
        words = _words(message.text)
        scored = sorted(skills, key=lambda s: -len(words & _skill_words(s)))
        return scored[0] if scored and words & _skill_words(scored[0]) else None


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP_WORDS}


def _skill_words(skill: Skill) -> set[str]:
    text = " ".join((skill.id, skill.name, *skill.tags))
    return _words(text.replace("_", " ").replace("-", " "))
