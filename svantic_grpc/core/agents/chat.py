"""Chat: the fallback when no agent's skill matches."""

from __future__ import annotations

from svantic_grpc.core.agents.base import InternalAgent
from svantic_grpc.core.messages.model import Message, Part

__all__ = ["CapabilitiesChat", "Chat"]


class Chat(InternalAgent):
    """Answers messages nobody else takes. Subclass and override ``answer``."""

    role = "chat"

    async def answer(self, message: Message) -> tuple[Part, ...]:
        raise NotImplementedError


class CapabilitiesChat(Chat):
    """Until a model backend exists: says what the session can do."""

    async def answer(self, message: Message) -> tuple[Part, ...]:
        services = self.scope.services
        session = await services.store.get_session(
            tenant_id=self.scope.tenant_id, session_id=self.scope.session_id
        )
        present = [a for a in session.present_agents() if not a.internal] if session else []
        registered = await services.store.list_agents(tenant_id=self.scope.tenant_id)
        by_type: dict[str, list[str]] = {}
        for agent in sorted(registered, key=lambda a: (a.agent_type, a.instance_id)):
            skills = by_type.setdefault(agent.agent_type, [])
            skills.extend(s.id for s in agent.skills if s.id not in skills)
        by_type, left_out = _within(by_type, LISTED_BYTES)
        lines = ["No agent's skill matched your message, so here is what this session can do."]
        if present:
            lines.append(
                "In this session: " + ", ".join(f"{a.agent_type} ({a.instance_id})" for a in present) + "."
            )
        if by_type:
            lines.append("Registered agents:")
            lines += [f"- {t}: {', '.join(s) or 'no declared skills'}" for t, s in sorted(by_type.items())]
            if left_out:
                lines.append(f"...and {left_out} more skills (ListAgents lists every agent).")
        else:
            lines.append("No remote agents are registered yet.")
        lines.append("Name a skill in your message, or set target_agent in a data part to pick an agent.")
        capabilities = {
            "agents_in_session": [a.instance_id for a in present],
            "agent_types": {t: s for t, s in sorted(by_type.items())},
        }
        return (Part(text="\n".join(lines)), Part(data={"capabilities": capabilities}))


LISTED_BYTES = 64 * 1024
"""About how much of the registered agents' skill ids the answer lists (its text and its data each)."""


def _within(by_type: dict[str, list[str]], limit: int) -> tuple[dict[str, list[str]], int]:
    """``by_type`` cut to about ``limit`` bytes of names, in order; and how many skills were left out."""
    kept: dict[str, list[str]] = {}
    used = left_out = 0
    for agent_type, skills in by_type.items():
        used += len(agent_type) + 8
        if used > limit:
            left_out += max(len(skills), 1)
            continue
        kept[agent_type] = []
        for skill in skills:
            used += len(skill) + 4
            if used > limit:
                left_out += 1
            else:
                kept[agent_type].append(skill)
    return kept, left_out
