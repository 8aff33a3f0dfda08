"""What every per-session internal agent is given, and the base class they share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.dispatch import Dispatcher
from svantic_grpc.core.dispatch_tokens import DispatchTokens
from svantic_grpc.core.events import EventBus
from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.knowledge import Knowledge
from svantic_grpc.core.registry import Registry
from svantic_grpc.core.store import Store

if TYPE_CHECKING:
    from svantic_grpc.core.sessions import Sessions

__all__ = ["InternalAgent", "MeshServices", "MessageOptions", "SessionScope"]


@dataclass(frozen=True)
class MessageOptions:
    """Tunables of message handling, from settings."""

    dispatch_timeout_s: float = 60.0
    """How long one dispatch may take before the message fails."""
    max_dispatches_per_session: int = 1000
    """Guardrail budget per session; 0 is unlimited."""
    failover_attempts: int = 2
    """Other instances tried when a dispatch could not be delivered."""
    critic_retries: int = 1
    """Re-dispatches when a result does not fit the skill's declared output."""


@dataclass(frozen=True)
class MeshServices:
    """The core services internal agents work with."""

    store: Store
    bus: EventBus
    registry: Registry
    sessions: Sessions
    dispatcher: Dispatcher
    dispatch_tokens: DispatchTokens
    knowledge: Knowledge
    inputs: Inputs
    clock: Clock
    ids: IdGenerator
    options: MessageOptions
    serving: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the mesh serves (its port bound): agents can reach it only from then on."""


@dataclass(frozen=True)
class SessionScope:
    """One session, as seen by its internal agents."""

    tenant_id: str
    session_id: str
    services: MeshServices


class InternalAgent:
    """A per-session internal agent. Each session has its own instance of each role.

    Subclass the role's base class (``Orchestrator``, ``Executor``, ...) to plug
    in another implementation through settings (``internal_agents``).
    """

    role: ClassVar[str] = ""

    def __init__(self, scope: SessionScope) -> None:
        self.scope = scope

    @property
    def agent_type(self) -> str:
        return f"savant:{self.role}"

    @property
    def instance_id(self) -> str:
        return f"{self.role}-{self.scope.session_id}"

    async def close(self) -> None:
        """Release what the agent holds when its session closes."""
