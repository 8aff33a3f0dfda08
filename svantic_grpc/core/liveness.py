"""Liveness of hosted agents, from what the mesh sees of them.

An off-the-shelf A2A agent cannot heartbeat. Its successful dispatches are signs
of life (``Registry.record_dispatch``); when it has been idle for ``idle_s``, a
light probe (a GET of its agent card, supplied by the hosted transport) stands in
for one. A probe that answers refreshes its liveness; one that fails does not, so
an agent whose server is gone turns ``unhealthy`` when the heartbeat timeout
passes, and comes back as soon as a later probe or a heartbeat answers.

Like the idle reaper, one deadline per hosted agent sits in a ``DeadlineHeap`` and
activity never touches it: when an entry comes due, the agent's last sign of life is read
from memory and the entry pushed again if it moved. So an agent that serves
traffic costs a heap entry per ``idle_s`` and no I/O; only idle agents are read
from the store and probed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from svantic_grpc.core.clock import Clock
from svantic_grpc.core.deadlines import DeadlineHeap
from svantic_grpc.core.models import AgentRegistration, DeploymentMode
from svantic_grpc.core.registry import Registry
from svantic_grpc.core.store import Store

__all__ = ["HostedLiveness", "Probe"]

_log = logging.getLogger(__name__)

Probe = Callable[[AgentRegistration], Awaitable[None]]
"""Checks that a hosted agent answers; raises (any exception) when it does not."""

_Key = tuple[str, str]


class HostedLiveness:
    """Probes hosted agents that have been idle, so an agent that answers stays routable.

    Args:
        registry: Where signs of life are kept (``saw``) and read (``last_seen``).
        store: Where hosted agents are looked up when their probe is due.
        clock: Time source.
        probe: The check (the hosted transport's ``probe``), bounded in time by its owner.
        idle_s: Idle time after which an agent is probed; keep it well under the
            heartbeat timeout so a failed probe is tried again before the agent turns
            unhealthy.
        concurrency: Probes in flight at once.
        max_sleep_s: Longest sleep between checks, a guard against clock jumps.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        store: Store,
        clock: Clock,
        probe: Probe,
        idle_s: float,
        concurrency: int = 32,
        max_sleep_s: float = 60.0,
    ) -> None:
        self._registry = registry
        self._store = store
        self._clock = clock
        self._probe = probe
        self._idle_s = idle_s
        self._slots = asyncio.Semaphore(concurrency)
        self._due: DeadlineHeap[_Key] = DeadlineHeap(
            clock=clock, name="svantic-hosted-liveness", max_sleep_s=max_sleep_s
        )

    def __len__(self) -> int:
        """Hosted agents being followed."""
        return len(self._due)

    def track(self, agent: AgentRegistration) -> None:
        """Follow a hosted agent (registered, or found at start-up); others are ignored."""
        if agent.deployment_mode is DeploymentMode.HOSTED:
            self._schedule(
                (agent.tenant_id, agent.instance_id), self._registry.last_seen(agent) + self._idle_s
            )

    async def recover(self, tenant_ids: Iterable[str]) -> int:
        """Follow every hosted agent of ``tenant_ids`` in the store (at start-up)."""
        found = 0
        for tenant_id in sorted(set(tenant_ids)):
            for agent in await self._store.list_agents(tenant_id=tenant_id):
                if agent.deployment_mode is DeploymentMode.HOSTED:
                    self.track(agent)
                    found += 1
        return found

    async def run_once(self) -> int:
        """Probe every hosted agent that is due and idle; returns how many were probed."""
        now = self._clock.now()
        idle: list[_Key] = []
        for key, _ in self._due.pop_due(now):
            seen = self._registry.seen_at(*key)
            if seen + self._idle_s > now:  # it served traffic meanwhile: no I/O
                self._schedule(key, seen + self._idle_s)
            else:
                idle.append(key)
        probed = await asyncio.gather(*(self._check(key, now) for key in idle))
        return sum(probed)

    async def _check(self, key: _Key, now: float) -> bool:
        try:
            agent = await self._store.get_agent(tenant_id=key[0], instance_id=key[1])
        except Exception:  # a store hiccup: look again after another idle period
            _log.exception("cannot read hosted agent %s/%s for its probe", *key)
            self._schedule(key, now + self._idle_s)
            return False
        if agent is None or agent.deployment_mode is not DeploymentMode.HOSTED:
            return False  # deregistered (a new registration tracks it again)
        last = self._registry.last_seen(agent)
        if last + self._idle_s > now:  # a heartbeat or a registration meanwhile
            self._schedule(key, last + self._idle_s)
            return False
        try:
            async with self._slots:
                await self._probe(agent)
        except Exception as exc:  # the agent did not answer: it is left to turn unhealthy
            _log.debug("probe of hosted agent %s/%s failed: %s", *key, exc)
            # The same words whatever failed: the details would map the network for a registrant.
            self._registry.probe_failed(*key, "the agent did not serve its agent card")
        else:
            self._registry.saw(*key)
        # Probe again after another idle period either way: an agent that comes back is seen.
        self._schedule(key, self._clock.now() + self._idle_s)
        return True

    def _schedule(self, key: _Key, due: float) -> None:
        self._due.schedule(key, due)

    def start(self) -> None:
        """Run in the background until ``stop``."""
        self._due.start(self.run_once)

    async def stop(self) -> None:
        """Stop the background task; safe to call twice."""
        await self._due.stop()
