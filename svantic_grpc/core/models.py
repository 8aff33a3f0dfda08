"""Plain domain records shared by the core and the stores.

Records are frozen dataclasses, and the JSON they hold is read-only
(``core.frozen``), so a record can be shared freely: a change is a new record
(``dataclasses.replace``) with ``version`` bumped by the store, so a lost race can
always be detected.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field
from typing import Any

from svantic_grpc.core.frozen import freeze

__all__ = [
    "INTERNAL_AGENTS",
    "INTERNAL_ROLES",
    "AgentRegistration",
    "AgentStatus",
    "ConnectionStats",
    "DeploymentMode",
    "JoinReason",
    "Session",
    "SessionAgent",
    "SessionStatus",
    "Skill",
    "Tool",
]


class SessionStatus(enum.Enum):
    """A session's lifecycle phase: opening -> active <-> paused -> closed."""

    OPENING = "opening"
    ACTIVE = "active"
    PAUSED = "paused"
    CLOSED = "closed"


class JoinReason(enum.Enum):
    """How an agent came to be in a session."""

    AUTO = "auto"
    SELF = "self"
    ROUTED = "routed"
    INVITED = "invited"


class DeploymentMode(enum.Enum):
    """How the mesh reaches a remote agent."""

    HOSTED = "hosted"
    CONNECTED = "connected"

    __hash__ = object.__hash__  # by identity, as MessageState's: looked up per dispatch


class AgentStatus(enum.Enum):
    """An instance's availability."""

    AVAILABLE = "available"
    BUSY = "busy"
    DRAINING = "draining"
    OFFLINE = "offline"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


#: The per-session internal agents, in the order they are created.
INTERNAL_ROLES: tuple[str, ...] = ("orchestrator", "executor", "planner", "chat", "critic", "learner")

#: Per internal role: its agent type and the prefix of its instance id (the session id follows).
INTERNAL_AGENTS: tuple[tuple[str, str], ...] = tuple(
    (sys.intern(f"savant:{role}"), sys.intern(f"{role}-")) for role in INTERNAL_ROLES
)


# Records are slotted: at 100,000 open sessions, a dict per record was a third of the memory.
@dataclass(frozen=True, slots=True)
class SessionAgent:
    """One agent's participation in a session."""

    agent_type: str
    instance_id: str
    join_reason: JoinReason
    joined_at: float
    internal: bool = False
    left_at: float | None = None
    """Set when the agent left; ``None`` while present."""


@dataclass(frozen=True, slots=True)
class Session:
    """A session: the unit of work, owned by one tenant.

    Its internal agents are the same six for every session, joined when it was created and
    gone when it closed, so they are not stored: ``agents`` holds the agents that joined
    from outside (self-joined, routed, invited) and ``internal_agents`` derives the six.
    """

    tenant_id: str
    session_id: str
    status: SessionStatus
    created_at: float
    updated_at: float
    last_activity_at: float
    user_id: str = ""
    created_by: str = ""
    creator_agent_type: str = ""
    closed_at: float | None = None
    close_reason: str = ""
    agents: tuple[SessionAgent, ...] = ()
    """The remote agents that joined (never the internal ones), in the order they joined."""
    version: int = 0
    """0 before the store has it; the store sets 1 on create and bumps it on update."""

    @property
    def internal_agents(self) -> tuple[SessionAgent, ...]:
        """The six internal agents: joined when the session was created, left when it closed."""
        session_id, joined, left = self.session_id, self.created_at, self.closed_at
        return tuple(
            SessionAgent(agent_type, prefix + session_id, JoinReason.AUTO, joined, True, left)
            for agent_type, prefix in INTERNAL_AGENTS
        )

    def all_agents(self, *, include_departed: bool = True) -> tuple[SessionAgent, ...]:
        """Every agent of the session, internal ones first (the order they joined in)."""
        agents = (*self.internal_agents, *self.agents)
        return agents if include_departed else tuple(a for a in agents if a.left_at is None)

    def present_agents(self) -> tuple[SessionAgent, ...]:
        """Remote agents that have not left."""
        return tuple(a for a in self.agents if a.left_at is None)

    def find_agent(self, *, instance_id: str) -> SessionAgent | None:
        """The present remote agent with this instance id, if any."""
        return next((a for a in self.present_agents() if a.instance_id == instance_id), None)


@dataclass(frozen=True)
class Skill:
    """A declared skill (as in an A2A agent card)."""

    id: str
    name: str = ""
    description: str = ""
    tags: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    input_modes: tuple[str, ...] = ()
    output_modes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tool:
    """A declared tool; policies match on its name."""

    name: str
    description: str = ""
    input_schema: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_schema", freeze(self.input_schema))


@dataclass(frozen=True)
class ConnectionStats:
    """How the mesh reaches an instance and how that went."""

    transport: str = ""
    connected: bool = False
    connected_since: float | None = None
    last_dispatch_at: float | None = None
    successes: int = 0
    failures: int = 0
    last_error: str = ""
    replica: str = ""
    """The replica holding the instance's ``Connect`` stream, when replicas share the store."""


@dataclass(frozen=True)
class AgentRegistration:
    """A registered remote agent instance, owned by one tenant."""

    tenant_id: str
    agent_type: str
    instance_id: str
    deployment_mode: DeploymentMode
    registered_at: float
    last_seen_at: float
    url: str = ""
    agent_card: dict[str, Any] = field(default_factory=dict)
    skills: tuple[Skill, ...] = ()
    tools: tuple[Tool, ...] = ()
    mcp_servers: dict[str, Any] = field(default_factory=dict)
    max_concurrent_sessions: int = 0
    """0 is unlimited."""
    reported_status: AgentStatus = AgentStatus.UNKNOWN
    reported_sessions: int = 0
    session_ids: tuple[str, ...] = ()
    """Sessions this instance is bound to."""
    connection: ConnectionStats = field(default_factory=ConnectionStats)
    version: int = 0

    def __post_init__(self) -> None:
        # JSON fields are made read-only so a registration can be shared, never copied.
        object.__setattr__(self, "agent_card", freeze(self.agent_card))
        object.__setattr__(self, "mcp_servers", freeze(self.mcp_servers))

    @property
    def load(self) -> int:
        """Sessions it serves: the larger of the mesh's count and its own."""
        return max(len(self.session_ids), self.reported_sessions)
