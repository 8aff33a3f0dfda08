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
        for agent in registered:
            skills = by_type.setdefault(agent.agent_type, [])
            skills.extend(s.id for s in agent.skills if s.id not in skills)
        lines = ["No agent's skill matched your message, so here is what this session can do."]
        if present:
            lines.append(
                "In this session: " + ", ".join(f"{a.agent_type} ({a.instance_id})" for a in present) + "."
            )
        if by_type:
            lines.append("Registered agents:")
            lines += [f"- {t}: {', '.join(s) or 'no declared skills'}" for t, s in sorted(by_type.items())]
        else:
            lines.append("No remote agents are registered yet.")
        lines.append("Name a skill in your message, or set target_agent in a data part to pick an agent.")
        capabilities = {
            "agents_in_session": [a.instance_id for a in present],
            "agent_types": {t: s for t, s in sorted(by_type.items())},
        }
        return (Part(text="\n".join(lines)), Part(data={"capabilities": capabilities}))
