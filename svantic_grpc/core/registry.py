"""The registry: remote agent instances that declared themselves available.

Status is derived, never stored stale: an instance's effective status is the
one it reported, made ``unhealthy`` when the mesh has not seen it alive for the
heartbeat timeout and ``busy`` when its sessions reach ``max_concurrent_sessions``.
"Seen alive" is a registration, a heartbeat or a connection change (stored), or,
kept in this process only so that serving traffic costs no store write, a
successful dispatch or a successful probe of a hosted agent's card (``saw``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlparse

from svantic_grpc.core._locks import KeyedLock
from svantic_grpc.core._validate import (
    check_agent_type,
    check_id,
    check_json_depth,
    json_bytes,
)
from svantic_grpc.core.auth import Caller, Scope
from svantic_grpc.core.clock import Clock
from svantic_grpc.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from svantic_grpc.core.evolve import evolve
from svantic_grpc.core.models import (
    AgentRegistration,
    AgentStatus,
    ConnectionStats,
    DeploymentMode,
    Skill,
    Tool,
)
from svantic_grpc.core.pages import PageScope
from svantic_grpc.core.store import Store, fitting

__all__ = ["ROUTABLE", "AgentSpec", "Registry"]

#: Only these effective statuses are picked by routing and invitation.
ROUTABLE = frozenset({AgentStatus.AVAILABLE, AgentStatus.UNKNOWN})

ReleaseHook = Callable[[str, AgentRegistration, str], Awaitable[None]]


@dataclass(frozen=True)
class AgentSpec:
    """What an agent declares when it registers."""

    agent_type: str
    instance_id: str
    deployment_mode: DeploymentMode | None = None
    """``None``: hosted when a URL is given, else connected."""
    url: str = ""
    agent_card: dict[str, Any] = field(default_factory=dict)
    skills: tuple[Skill, ...] = ()
    tools: tuple[Tool, ...] = ()
    mcp_servers: dict[str, Any] = field(default_factory=dict)
    max_concurrent_sessions: int = 0


class Registry:
    """Registers, tracks and picks remote agent instances, per tenant."""

    def __init__(self, *, store: Store, clock: Clock, heartbeat_timeout_s: float) -> None:
        self._store = store
        self._clock = clock
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self.locks = KeyedLock()
        """Held per (tenant, instance) around every change of a registration."""
        self._release_hooks: list[ReleaseHook] = []
        self._dispatch_counts: dict[tuple[str, str], ConnectionStats] = {}
        self._seen: dict[tuple[str, str], float] = {}
        """When this process last saw an instance working (successful dispatch or probe)."""
        self.on_registered: Callable[[AgentRegistration], None] = lambda agent: None
        """Told of each registration (set by the composition root: hosted liveness probes)."""
        self.is_live: Callable[[str, str], bool] = lambda tenant_id, instance_id: False
        """Whether this process holds the instance's open stream (set by the composition root).
        The stored ``connected`` flag can be stale after a crash; this never is."""
        self.held_elsewhere: Callable[[AgentRegistration], str] = lambda agent: ""
        """The other replica holding the instance's open stream, '' if none (set by the
        composition root when replicas share the store)."""
        self.protocol_for: Callable[[AgentRegistration], str] = lambda agent: ""
        """The wire protocol the mesh uses (or will use) to reach an instance, '' when not known
        (set by the composition root from the dispatcher); fills ``connection.transport``."""

    @property
    def heartbeat_timeout_s(self) -> float:
        return self._heartbeat_timeout_s

    def on_release(self, hook: ReleaseHook) -> None:
        """Call ``hook(session_id, agent, reason)`` for each session an instance leaves on deregistration."""
        self._release_hooks.append(hook)

    def effective_status(self, agent: AgentRegistration) -> AgentStatus:
        """The status routing sees now."""
        reported = agent.reported_status
        if reported in (AgentStatus.DRAINING, AgentStatus.OFFLINE, AgentStatus.UNHEALTHY):
            return reported
        alive = self.is_live(agent.tenant_id, agent.instance_id) or (
            self._clock.now() - self.last_seen(agent) <= self._heartbeat_timeout_s
        )
        if not alive:
            return AgentStatus.UNHEALTHY
        if agent.max_concurrent_sessions and agent.load >= agent.max_concurrent_sessions:
            return AgentStatus.BUSY
        return reported

    def is_routable(self, agent: AgentRegistration) -> bool:
        return self.effective_status(agent) in ROUTABLE

    def saw(self, tenant_id: str, instance_id: str) -> None:
        """The mesh saw the instance working just now (kept in memory: no store write)."""
        self._seen[(tenant_id, instance_id)] = self._clock.now()

    def seen_at(self, tenant_id: str, instance_id: str) -> float:
        """When this process last saw the instance working (0 if never); no store read."""
        return self._seen.get((tenant_id, instance_id), 0.0)

    def last_seen(self, agent: AgentRegistration) -> float:
        """The latest sign of life: stored (register, heartbeat, connection) or seen in this process."""
        return max(agent.last_seen_at, self.seen_at(agent.tenant_id, agent.instance_id))

    async def register(self, caller: Caller, spec: AgentSpec) -> tuple[AgentRegistration, bool]:
        """Register or update an instance; returns it and whether it is new."""
        caller.require(Scope.FULL)
        spec = _validated(spec)
        mode = spec.deployment_mode or (DeploymentMode.HOSTED if spec.url else DeploymentMode.CONNECTED)
        now = self._clock.now()
        async with self.locks.hold((caller.tenant_id, spec.instance_id)):
            current = await self._store.get_agent(tenant_id=caller.tenant_id, instance_id=spec.instance_id)
            if current is None:
                agent = AgentRegistration(
                    tenant_id=caller.tenant_id,
                    agent_type=spec.agent_type,
                    instance_id=spec.instance_id,
                    deployment_mode=mode,
                    registered_at=now,
                    last_seen_at=now,
                    **_declared(spec),
                )
                created = self.with_counters(await self._store.create_agent(agent))
                self.on_registered(created)
                return created, True
            if current.deployment_mode is not mode:
                raise FailedPrecondition(
                    f"instance {spec.instance_id!r} is registered as {current.deployment_mode.value}; "
                    f"deregister it before registering it as {mode.value}",
                    reason="DEPLOYMENT_MODE_CONFLICT",
                )
            if current.agent_type != spec.agent_type:
                raise FailedPrecondition(
                    f"instance {spec.instance_id!r} is registered as agent type {current.agent_type!r}; "
                    "deregister it before reusing its id for another type",
                    reason="AGENT_TYPE_CONFLICT",
                )
            updated = replace(
                current,
                **_declared(spec),
                last_seen_at=now,
                # Registering again declares the instance available afresh (e.g. after a restart).
                reported_status=AgentStatus.UNKNOWN,
            )
            stored = self.with_counters(await self._store.update_agent(updated))
            self.on_registered(stored)
            return stored, False

    async def heartbeat(
        self, caller: Caller, instance_id: str, *, status: AgentStatus | None, current_sessions: int
    ) -> AgentRegistration:
        """Record that an instance is alive, with its status and load."""
        caller.require(Scope.FULL)
        check_id("instance_id", instance_id)
        if current_sessions < 0:
            raise InvalidArgument("current_sessions", "must not be negative")
        async with self.locks.hold((caller.tenant_id, instance_id)):
            current = await self.get(caller, instance_id)
            updated = replace(
                current,
                reported_status=status or current.reported_status,
                reported_sessions=current_sessions,
                last_seen_at=self._clock.now(),
            )
            return self.with_counters(await self._store.update_agent(updated))

    async def deregister(self, caller: Caller, instance_id: str) -> tuple[str, ...]:
        """Remove an instance; returns the sessions it left."""
        caller.require(Scope.FULL)
        check_id("instance_id", instance_id)
        async with self.locks.hold((caller.tenant_id, instance_id)):
            current = await self.get(caller, instance_id)
            await self._store.delete_agent(
                tenant_id=caller.tenant_id, instance_id=instance_id, version=current.version
            )
            self._dispatch_counts.pop((caller.tenant_id, instance_id), None)
            self._seen.pop((caller.tenant_id, instance_id), None)
        for session_id in current.session_ids:
            for hook in self._release_hooks:
                await hook(session_id, current, "deregistered")
        return current.session_ids

    async def read(self, tenant_id: str, instance_id: str) -> AgentRegistration | None:
        """The instance as stored now: the mesh's own read (no caller to check)."""
        return await self._store.get_agent(tenant_id=tenant_id, instance_id=instance_id)

    async def get(self, caller: Caller, instance_id: str) -> AgentRegistration:
        """One instance of the caller's tenant."""
        caller.require(Scope.READ)
        check_id("instance_id", instance_id)
        agent = await self._store.get_agent(tenant_id=caller.tenant_id, instance_id=instance_id)
        if agent is None:
            raise NotFound(f"agent instance {instance_id!r} not found", reason="AGENT_NOT_FOUND")
        return self.with_counters(agent)

    async def list_agents(
        self, caller: Caller, *, agent_type: str = "", routable_only: bool = False
    ) -> Sequence[AgentRegistration]:
        """The tenant's instances."""
        caller.require(Scope.READ)
        agents = await self._store.list_agents(tenant_id=caller.tenant_id, agent_type=agent_type)
        return [self.with_counters(a) for a in agents if not routable_only or self.is_routable(a)]

    async def page_of_agents(
        self,
        caller: Caller,
        *,
        agent_type: str = "",
        routable_only: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[Sequence[AgentRegistration], str]:
        """A page of the tenant's instances, by agent type then instance id, and the token of the
        next page (empty on the last). A page ends early once it carries ``PAGE_MAX_BYTES``."""
        if page_size < 0 or page_size > 500:
            raise InvalidArgument("page_size", "must be between 0 and 500")
        scope = PageScope("ListAgents", caller.tenant_id, (agent_type, str(routable_only)))
        after = _after(scope.cursor(page_token))
        agents = sorted(
            (
                a
                for a in await self.list_agents(caller, agent_type=agent_type, routable_only=routable_only)
                if after is None or (a.agent_type, a.instance_id) > after
            ),
            key=lambda a: (a.agent_type, a.instance_id),
        )
        page = agents[: page_size or 500]
        page = page[: fitting(page, lambda agent: declared_bytes(agent) + _AGENT_OVERHEAD)]
        if len(page) == len(agents):
            return page, ""
        last = page[-1]
        return page, scope.token(_token((last.agent_type, last.instance_id)))

    async def pick(
        self,
        tenant_id: str,
        agent_type: str,
        *,
        exclude: Collection[str] = (),
        rank: Callable[[AgentRegistration], float] | None = None,
    ) -> AgentRegistration:
        """The least-loaded routable instance of ``agent_type``, not in ``exclude``.

        Ties go to the better ``rank`` (lower; the learner's success record), then
        to the instance seen most recently, then to the lowest id, so the choice
        is stable.

        Raises:
            Unavailable: no instance of that type can take a session now.
        """
        agents = [
            a
            for a in await self._store.list_agents(tenant_id=tenant_id, agent_type=agent_type)
            if a.instance_id not in exclude
        ]
        routable = [a for a in agents if self.is_routable(a)]
        if not routable:
            if not agents:
                detail = "none is registered"
            else:
                counts: dict[str, int] = {}
                for a in agents:
                    status = self.effective_status(a).value
                    counts[status] = counts.get(status, 0) + 1
                detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            raise Unavailable(
                f"no available instance of agent type {agent_type!r} ({detail})",
                reason="NO_AGENT_AVAILABLE",
                metadata={"agent_type": agent_type},
            )
        score = rank or (lambda _: 0.0)
        return min(routable, key=lambda a: (a.load, score(a), -a.last_seen_at, a.instance_id))

    @staticmethod
    def bound(agent: AgentRegistration, session_id: str) -> AgentRegistration | None:
        """``agent`` serving ``session_id`` too, to be written with the session's join (under
        ``locks`` for the instance); ``None`` when it already serves it."""
        if session_id in agent.session_ids:
            return None
        return replace(agent, session_ids=(*agent.session_ids, session_id))

    @staticmethod
    def released(agent: AgentRegistration, session_id: str) -> AgentRegistration | None:
        """``agent`` no longer serving ``session_id``, to be written with the session's change;
        ``None`` when it does not serve it."""
        if session_id not in agent.session_ids:
            return None
        return replace(agent, session_ids=tuple(s for s in agent.session_ids if s != session_id))

    def record_dispatch(self, tenant_id: str, instance_id: str, *, ok: bool, error: str = "") -> None:
        """Count a dispatch outcome on the instance's connection state (GetAgent shows it).

        Counters live in this process (they would cost a store write per message);
        they start again from zero after a restart. A success is a sign of life (``saw``).
        """
        key = (tenant_id, instance_id)
        if ok:
            self.saw(tenant_id, instance_id)
        counts = self._dispatch_counts.get(key, ConnectionStats())
        self._dispatch_counts[key] = evolve(
            counts,
            last_dispatch_at=self._clock.now(),
            successes=counts.successes + ok,
            failures=counts.failures + (not ok),
            last_error=counts.last_error if ok else error,
        )

    def with_counters(self, agent: AgentRegistration) -> AgentRegistration:
        """``agent`` with this process's dispatch counters in its connection state, and its
        ``last_seen_at`` at the latest sign of life."""
        seen = self.seen_at(agent.tenant_id, agent.instance_id)
        if seen > agent.last_seen_at:
            agent = replace(agent, last_seen_at=seen)
        counts = self._dispatch_counts.get((agent.tenant_id, agent.instance_id))
        live = self.is_live(agent.tenant_id, agent.instance_id) or bool(self.held_elsewhere(agent))
        transport = agent.connection.transport or self.protocol_for(agent)
        if counts is None:
            if live == agent.connection.connected and transport == agent.connection.transport:
                return agent
            return replace(agent, connection=replace(agent.connection, connected=live, transport=transport))
        connection = replace(
            agent.connection,
            transport=transport,
            connected=live,
            last_dispatch_at=counts.last_dispatch_at,
            successes=counts.successes,
            failures=counts.failures,
            last_error=counts.last_error or agent.connection.last_error,
        )
        return replace(agent, connection=connection)

    async def set_connection(
        self,
        tenant_id: str,
        instance_id: str,
        *,
        unless: Callable[[AgentRegistration], bool] | None = None,
        **changes: Any,
    ) -> AgentRegistration | None:
        """Update an instance's connection state (transport, connected, connected_since, replica),
        unless the stored instance meets ``unless``."""
        async with self.locks.hold((tenant_id, instance_id)):
            agent = await self._store.get_agent(tenant_id=tenant_id, instance_id=instance_id)
            if agent is None or (unless is not None and unless(agent)):
                return None
            now = self._clock.now()
            return await self._store.update_agent(
                replace(agent, connection=replace(agent.connection, **changes), last_seen_at=now)
            )

    def probe_failed(self, tenant_id: str, instance_id: str, error: str) -> None:
        """A probe of the instance failed: GetAgent shows why (its liveness is not refreshed)."""
        key = (tenant_id, instance_id)
        counts = self._dispatch_counts.get(key, ConnectionStats())
        self._dispatch_counts[key] = evolve(counts, last_error=f"probe: {error}")

    def next_heartbeat_before(self, agent: AgentRegistration) -> float:
        """When the instance turns unhealthy without another heartbeat."""
        return self.last_seen(agent) + self._heartbeat_timeout_s


MAX_SKILLS = 200
MAX_TOOLS = 500
MAX_DECLARED_BYTES = 256 * 1024
"""What one registration declares at most, its card, skills, tools and MCP servers together: the
answers that carry registrations (``GetAgent``, a page of ``ListAgents``, the chat's list of what
agents can do) stay readable by a client with gRPC's default 4 MB receive limit."""


def declared_bytes(agent: AgentSpec | AgentRegistration) -> int:
    """About the bytes of what ``agent`` declared (as ``MAX_DECLARED_BYTES`` counts them)."""
    return sum(_declared_sizes(agent).values())


def _declared_sizes(agent: AgentSpec | AgentRegistration) -> dict[str, int]:
    skills = sum(
        json_bytes((s.id, s.name, s.description, s.tags, s.examples, s.input_modes, s.output_modes))
        for s in agent.skills
    )
    tools = sum(json_bytes((t.name, t.description)) + json_bytes(t.input_schema) for t in agent.tools)
    return {
        "agent_card": json_bytes(agent.agent_card),
        "skills": skills,
        "tools": tools,
        "mcp_servers": json_bytes(agent.mcp_servers),
    }


_AGENT_OVERHEAD = 1024
"""What an instance's answer carries beside what it declared (ids, URL, status, connection)."""


def _token(after: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(after).encode()).decode()


def _after(token: str) -> tuple[str, str] | None:
    """The (agent type, instance id) a page token says the next page starts after."""
    if not token:
        return None
    try:
        agent_type, instance_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        if isinstance(agent_type, str) and isinstance(instance_id, str):
            return agent_type, instance_id
    except (ValueError, TypeError):
        pass
    raise InvalidArgument("page_token", "is not a token a ListAgents page gave")


_DECLARED = ("url", "agent_card", "skills", "tools", "mcp_servers", "max_concurrent_sessions")
"""The fields of ``AgentSpec`` a registration takes as declared, each time the agent registers."""


def _declared(spec: AgentSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in _DECLARED}


def _validated(spec: AgentSpec) -> AgentSpec:
    check_agent_type("agent_type", spec.agent_type)
    check_id("instance_id", spec.instance_id)
    if spec.max_concurrent_sessions < 0:
        raise InvalidArgument("max_concurrent_sessions", "must be 0 (unlimited) or positive")
    if spec.url:
        parsed = urlparse(spec.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidArgument("url", f"{spec.url!r} is not an http(s) URL")
    if spec.deployment_mode is DeploymentMode.HOSTED and not spec.url:
        raise InvalidArgument("url", "is required for a hosted agent (the A2A endpoint the mesh calls)")
    seen: set[str] = set()
    for index, skill in enumerate(spec.skills):
        if not skill.id:
            raise InvalidArgument(f"skills[{index}].id", "is required")
        if skill.id in seen:
            raise InvalidArgument(f"skills[{index}].id", f"duplicate skill id {skill.id!r}")
        seen.add(skill.id)
    for index, tool in enumerate(spec.tools):
        if not tool.name:
            raise InvalidArgument(f"tools[{index}].name", "is required")
        check_json_depth(f"tools[{index}].input_schema", tool.input_schema)
    check_json_depth("agent_card", spec.agent_card)
    check_json_depth("mcp_servers", spec.mcp_servers)
    if len(spec.skills) > MAX_SKILLS:
        raise InvalidArgument("skills", f"declares {len(spec.skills)} skills; at most {MAX_SKILLS}")
    if len(spec.tools) > MAX_TOOLS:
        raise InvalidArgument("tools", f"declares {len(spec.tools)} tools; at most {MAX_TOOLS}")
    sizes = _declared_sizes(spec)
    if sum(sizes.values()) > MAX_DECLARED_BYTES:
        largest = max(sizes, key=lambda name: sizes[name])
        raise InvalidArgument(
            largest,
            f"carries about {sizes[largest]} bytes, and the registration {sum(sizes.values())} in all "
            f"(agent card, skills, tools and MCP servers); a registration declares at most "
            f"{MAX_DECLARED_BYTES} bytes",
        )
    return spec
