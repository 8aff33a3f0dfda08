"""What every per-session internal agent is given, and the base class they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.knowledge import Knowledge
from svantic_grpc.core.models import AgentRegistration, Session

__all__ = ["AgentServices", "InternalAgent", "SessionScope", "StoreReads"]


class StoreReads(Protocol):
    """What internal agents may read from the store (the store itself, typed down to its reads)."""

    async def get_session(self, *, tenant_id: str, session_id: str) -> Session | None: ...

    async def get_agent(self, *, tenant_id: str, instance_id: str) -> AgentRegistration | None: ...

    async def list_agents(self, *, tenant_id: str, agent_type: str = "") -> Sequence[AgentRegistration]: ...


@dataclass(frozen=True)
class AgentServices:
    """What internal agents read to make their choices.

    Not the dispatcher, the dispatch tokens or the inputs: the rules that run work and ask
    humans are the core's (``core.dispatch``), and an agent only answers what it is asked.
    """

    store: StoreReads
    knowledge: Knowledge
    clock: Clock
    ids: IdGenerator


@dataclass(frozen=True)
class SessionScope:
    """One session, as seen by its internal agents."""

    tenant_id: str
    session_id: str
    services: AgentServices


class InternalAgent:
    """A per-session internal agent. Each session has its own instance of each role.

    Subclass the role's base class (``Orchestrator``, ``Executor``, ...) to plug
    in another implementation through settings (``internal_agents``). An agent makes
    choices (where a message goes, which instance takes it, what a plan is); the rules
    (policies, budgets, approvals, timeouts) are the core's and hold whatever it chooses.
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
