"""An internal agent plugged in through settings (``internal_agents``) by the tests."""

from __future__ import annotations

from svantic_grpc.core.agents import Chat
from svantic_grpc.core.messages.model import Message, Part


class ShoutingChat(Chat):
    """Answers every message in capitals."""

    async def answer(self, message: Message) -> tuple[Part, ...]:
        return (Part(text=message.text.upper()),)


class NotAnAgent:
    """Not a subclass of any role's base class."""
