"""Connected-mode agents: the live side of their ``Connect`` streams.

The transport layer (the gRPC servicer) attaches a stream here, drains the
connection's outbox onto the wire and feeds the agent's updates back in. Seen
from the dispatch run, this is just another ``Transport``.

A dropped stream ends what was in flight on it: a dispatch the agent had not
acknowledged yet (no update received) is ``NotDelivered`` and fails over to
another instance; one it was working on fails with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from svantic_grpc.core._mailbox import Mailbox
from svantic_grpc.core.auth import Caller, Scope
from svantic_grpc.core.clock import Clock
from svantic_grpc.core.dispatch._seam import DispatchFailed, DispatchJob, DispatchUpdate, NotDelivered
from svantic_grpc.core.errors import FailedPrecondition
from svantic_grpc.core.inputs.model import InputRequest
from svantic_grpc.core.messages.model import MessageState
from svantic_grpc.core.models import AgentRegistration, AgentStatus, DeploymentMode
from svantic_grpc.core.registry import Registry

__all__ = ["AgentConnection", "ConnectedAgents", "Outbound"]

_log = logging.getLogger(__name__)

#: States in which a dispatch goes on (input-required waits for the answer on the same stream).
_GOING_ON = (MessageState.SUBMITTED, MessageState.WORKING, MessageState.INPUT_REQUIRED)
_PROGRESS = (None, MessageState.SUBMITTED, MessageState.WORKING)


@dataclass(frozen=True)
class Outbound:
    """Something to send to the agent: a dispatch, the cancel of one, or a human's answer."""

    dispatch_id: str
    job: DispatchJob | None = None
    cancel_reason: str = ""
    answer: InputRequest | None = None


@dataclass(frozen=True)
class _Dropped:
    reason: str


class _Inbox:
    """What the agent sent for one dispatch, taken all at once by the dispatch it is for.

    Lighter than an ``asyncio.Queue`` (one per dispatch): a list and, while the dispatch
    waits, one future.
    """

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[DispatchUpdate | _Dropped] = []
        self.waiter: asyncio.Future[None] | None = None

    def put(self, item: DispatchUpdate | _Dropped) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[DispatchUpdate | _Dropped]:
        """Everything queued, waiting for the first item when there is none."""
        if not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


def _merged(updates: list[DispatchUpdate | _Dropped]) -> list[DispatchUpdate | _Dropped]:
    """Updates that arrived together, with each one that only says "working" and carries
    nothing, or that only carries outputs before a bare change of state (no turn, no outputs,
    no question), folded into the next.

    The run then writes what they carry in fewer store writes: the same records and the
    same events, in the same order (an agent's ack, its artifact and its completion become
    one update).
    """
    out: list[DispatchUpdate | _Dropped] = []
    for update in updates:
        previous = out[-1] if out else None
        if (
            isinstance(update, DispatchUpdate)
            and isinstance(previous, DispatchUpdate)
            and previous.state in _PROGRESS
            and previous.ask is None
            and not previous.parts
            and (not previous.artifacts or not (update.parts or update.artifacts or update.ask))
        ):
            out[-1] = DispatchUpdate(
                update.state,
                update.parts,
                previous.artifacts + update.artifacts,
                update.reason,
                update.ask,
                update.task_ref or previous.task_ref,
            )
        else:
            out.append(update)
    return out


@dataclass(eq=False)
class AgentConnection:
    """One open ``Connect`` stream of one instance."""

    caller: Caller
    agent: AgentRegistration
    outbox: Mailbox[Outbound | None] = field(default_factory=Mailbox)
    """What the stream writer sends; ``None`` tells it to stop."""
    pending: dict[str, _Inbox] = field(default_factory=dict)
    jobs: dict[str, DispatchJob] = field(default_factory=dict)
    acknowledged: set[str] = field(default_factory=set)
    closed: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.agent.tenant_id, self.agent.instance_id)


class ConnectedAgents:
    """The registry of open agent streams, and the transport that uses them."""

    def __init__(self, *, registry: Registry, clock: Clock) -> None:
        self._registry = registry
        self._clock = clock
        self._live: dict[tuple[str, str], AgentConnection] = {}
        self._awaited: dict[tuple[str, str], list[asyncio.Future[AgentConnection]]] = {}
        """Dispatches waiting for an instance to (re)connect, by (tenant, instance)."""

    @property
    def count(self) -> int:
        """Open agent streams in this process."""
        return len(self._live)

    def is_connected(self, tenant_id: str, instance_id: str) -> bool:
        return (tenant_id, instance_id) in self._live

    def protocol_for(self, agent: AgentRegistration) -> str:
        return "connect-stream"  # a connected agent is only ever reached over its own stream

    async def attach(self, caller: Caller, instance_id: str) -> AgentConnection:
        """Open an instance's stream (its hello). A newer stream replaces an older one."""
        caller.require(Scope.FULL)
        agent = await self._registry.get(caller, instance_id)
        if agent.deployment_mode is not DeploymentMode.CONNECTED:
            raise FailedPrecondition(
                f"instance {instance_id!r} is registered as {agent.deployment_mode.value}; register it as "
                "connected to use Connect",
                reason="NOT_A_CONNECTED_AGENT",
            )
        connection = AgentConnection(caller, agent)
        previous = self._live.get(connection.key)
        if previous is not None:
            self._drop(previous, "replaced by a newer stream of the same instance")
        self._live[connection.key] = connection
        for waiting in self._awaited.pop(connection.key, ()):
            if not waiting.done():
                waiting.set_result(connection)
        now = self._clock.now()
        updated = await self._registry.set_connection(
            agent.tenant_id, instance_id, transport="connect-stream", connected=True, connected_since=now
        )
        connection.agent = updated or agent
        _log.info(
            "agent connected: %s/%s (tenant %s)",
            agent.agent_type,
            instance_id,
            agent.tenant_id,
            extra={"agent_type": agent.agent_type, "instance_id": instance_id},
        )
        return connection

    async def detach(self, connection: AgentConnection, reason: str) -> None:
        """The stream ended: fail or release what was in flight; safe to call twice."""
        if self._live.get(connection.key) is connection:
            del self._live[connection.key]
            await self._registry.set_connection(*connection.key, connected=False, last_error=reason)
        self._drop(connection, reason)

    def receive(self, connection: AgentConnection, dispatch_id: str, update: DispatchUpdate) -> bool:
        """An update from the agent; ``False`` if no dispatch with that id is in flight."""
        inbox = connection.pending.get(dispatch_id)
        if inbox is None:
            return False
        connection.acknowledged.add(dispatch_id)
        inbox.put(update)
        return True

    async def heartbeat(
        self, connection: AgentConnection, *, status: AgentStatus | None, current_sessions: int
    ) -> AgentRegistration:
        return await self._registry.heartbeat(
            connection.caller, connection.agent.instance_id, status=status, current_sessions=current_sessions
        )

    async def dispatch(self, job: DispatchJob) -> AsyncGenerator[DispatchUpdate, InputRequest | None]:
        key = (job.tenant_id, job.agent.instance_id)
        connection = self._live.get(key)
        if (connection is None or connection.closed) and job.answer is not None:
            # A human's answer from before a restart: the agent has yet to reconnect. It waits for
            # it (the caller's dispatch timeout bounds the wait) rather than failing the work.
            connection = await self._arrival(key)
        if connection is None or connection.closed:
            raise NotDelivered("the agent is not connected")
        inbox = _Inbox()
        connection.pending[job.dispatch_id] = inbox
        connection.jobs[job.dispatch_id] = job
        connection.outbox.put_nowait(Outbound(job.dispatch_id, job))
        finished = False
        try:
            while True:
                for item in _merged(await inbox.take()):
                    if isinstance(item, _Dropped):
                        finished = True
                        if job.dispatch_id in connection.acknowledged:
                            raise DispatchFailed(f"the agent's stream dropped mid-dispatch ({item.reason})")
                        raise NotDelivered(
                            f"the agent's stream dropped before it took the dispatch ({item.reason})"
                        )
                    # Mark the end before yielding: the caller stops reading (and closes this
                    # generator) at a final update, and a finished dispatch must not be cancelled.
                    finished = item.state is not None and item.state not in _GOING_ON
                    answer = yield item
                    if finished:
                        return
                    if answer is not None:  # a human answered what the agent asked: pass it on
                        connection.outbox.put_nowait(Outbound(job.dispatch_id, answer=answer))
        finally:
            connection.pending.pop(job.dispatch_id, None)
            connection.jobs.pop(job.dispatch_id, None)
            connection.acknowledged.discard(job.dispatch_id)
            if not finished and not connection.closed:
                # The mesh stopped following (cancel, timeout): tell the agent to stop too.
                connection.outbox.put_nowait(Outbound(job.dispatch_id, cancel_reason="canceled by the mesh"))

    async def _arrival(self, key: tuple[str, str]) -> AgentConnection:
        """The next stream the instance opens."""
        arrival: asyncio.Future[AgentConnection] = asyncio.get_running_loop().create_future()
        self._awaited.setdefault(key, []).append(arrival)
        try:
            return await arrival
        finally:
            waiting = self._awaited.get(key)
            if waiting is not None and arrival in waiting:
                waiting.remove(arrival)
                if not waiting:
                    del self._awaited[key]

    async def close(self) -> None:
        """End every stream (server shutdown)."""
        for connection in list(self._live.values()):
            await self.detach(connection, "the server is shutting down")

    def _drop(self, connection: AgentConnection, reason: str) -> None:
        if connection.closed:
            return
        connection.closed = True
        for inbox in connection.pending.values():
            inbox.put(_Dropped(reason))
        for job in connection.jobs.values():
            if job.lost is not None:
                job.lost.set()
        connection.outbox.put_nowait(None)
        agent = connection.agent
        _log.info(
            "agent left: %s/%s (tenant %s): %s",
            agent.agent_type,
            agent.instance_id,
            agent.tenant_id,
            reason,
            extra={"agent_type": agent.agent_type, "instance_id": agent.instance_id},
        )
