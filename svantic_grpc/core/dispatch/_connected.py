"""Connected-mode agents: the live side of their ``Connect`` streams.

The transport layer (the gRPC servicer) attaches a stream here, drains the
connection's outbox onto the wire and feeds the agent's updates back in. Seen
from the dispatch run, this is just another ``Transport``.

A dropped stream ends what was in flight on it: a dispatch the agent had not
acknowledged yet (no update received) is ``NotDelivered`` and fails over to
another instance; one it was working on fails with the reason.

With several replicas on one store (a ``relay``), an instance whose stream another replica
holds is reached through that replica: the job, the human's answers and a cancel go there, the
agent's updates and the end come back (``_relay``), and the dispatch run sees them as if the
stream were here. If the holder dies, nothing comes back: the dispatch fails once the agent is
connected on another stream, or times out if it never is; it never runs twice. Only a human's
answer the holder was given (relayed, or carried by the job) goes again to the agent where it is
once it is back: an agent that acted on it already sends what it did then instead of acting
again. Without a relay nothing of this costs anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from svantic_grpc.core._mailbox import Mailbox
from svantic_grpc.core.auth import Caller, Scope
from svantic_grpc.core.clock import Clock
from svantic_grpc.core.dispatch._relay import Relay, Relayed, RelayKind
from svantic_grpc.core.dispatch._seam import (
    AgentGone,
    DispatchFailed,
    DispatchJob,
    DispatchUpdate,
    NotDelivered,
    cancel_reason,
    fold,
)
from svantic_grpc.core.errors import Conflict, FailedPrecondition
from svantic_grpc.core.inputs.model import InputRequest
from svantic_grpc.core.messages.model import MessageState
from svantic_grpc.core.models import AgentRegistration, AgentStatus, DeploymentMode
from svantic_grpc.core.registry import Registry
from svantic_grpc.core.stream_quota import StreamQuota

__all__ = ["AgentConnection", "ConnectedAgents", "Outbound"]

_log = logging.getLogger(__name__)

#: States in which a dispatch goes on (input-required waits for the answer on the same stream).
_GOING_ON = (MessageState.SUBMITTED, MessageState.WORKING, MessageState.INPUT_REQUIRED)
_NO_FINAL_STATE = "the agent ended the dispatch without a final state"
_DROPPED_WHILE_ASKING = "the agent's stream dropped while a human decided"


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
    not_delivered: bool = False
    """Relayed from the holder: the agent never took the dispatch (a local stream tells by its acks)."""


_ANSWER_CHECK_S = 1.0
"""How often an owner that heard nothing from the holder of the agent's stream for that long looks
whether that holder (or the agent's stream there) is gone: with an answer it sent, to send it where
the agent is now; with the agent at work, to fail the message instead of waiting out its timeout."""

_CONNECT_RETRY_AFTER_S = 15.0
"""The wait asked of an agent whose ``Connect`` its tenant's stream allowance refused."""

_SILENT_CHECK_MAX_S = 32.0
"""The longest an owner goes without looking whether the agent at work, silent, holds another
stream now (its holder dead): the looks come after 1, 2, 4 ... seconds of silence, then every 32."""


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

    async def take(self, within: float | None = None) -> list[DispatchUpdate | _Dropped]:
        """Everything queued, waiting for the first item when there is none (at most ``within``
        seconds, when given: nothing, then)."""
        if not self.items:
            waiter = self.waiter = asyncio.get_running_loop().create_future()
            try:
                if within is None:
                    await waiter
                else:
                    await asyncio.wait((waiter,), timeout=within)
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


class _Answers:
    """Holder side: the human answers the owner relays for one dispatch."""

    __slots__ = ("asking", "items", "waiter")

    def __init__(self) -> None:
        self.items: list[InputRequest] = []
        self.waiter: asyncio.Event = asyncio.Event()
        self.asking = False
        """The agent asked a human and waits for the answer (``take`` is waiting)."""

    def put(self, answer: InputRequest) -> None:
        self.items.append(answer)
        self.waiter.set()

    async def take(self, lost: asyncio.Event | None) -> InputRequest | None:
        """The next answer, or ``None`` if ``lost`` is set first."""
        self.asking = True
        try:
            return await self._take(lost)
        finally:
            self.asking = False

    async def _take(self, lost: asyncio.Event | None) -> InputRequest | None:
        while not self.items:
            if lost is not None and lost.is_set():
                return None
            waits = [asyncio.ensure_future(self.waiter.wait())]
            if lost is not None:
                waits.append(asyncio.ensure_future(lost.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
            self.waiter.clear()
        return self.items.pop(0)


def _merged(updates: list[DispatchUpdate | _Dropped]) -> list[DispatchUpdate | _Dropped]:
    """Updates that arrived together, folded where they fold (``fold``): the run writes what
    they carry in fewer store writes, the same records and events in the same order."""
    out: list[DispatchUpdate | _Dropped] = []
    for update in updates:
        previous = out[-1] if out else None
        if isinstance(update, DispatchUpdate) and isinstance(previous, DispatchUpdate):
            folded = fold(previous, update)
            if folded is not None:
                out[-1] = folded
                continue
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
    counted: bool = False
    """It holds one of its tenant's places in the ``StreamQuota`` (given back once, on detach; a
    newer stream of the same instance takes its place over)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.agent.tenant_id, self.agent.instance_id)


class ConnectedAgents:
    """The registry of open agent streams, and the transport that uses them."""

    def __init__(self, *, registry: Registry, clock: Clock, quota: StreamQuota | None = None) -> None:
        self._registry = registry
        self._clock = clock
        self._quota = quota if quota is not None else StreamQuota()
        """Agents' streams count with clients' event streams against ``max_streams_per_tenant``."""
        self._live: dict[tuple[str, str], AgentConnection] = {}
        self._awaited: dict[tuple[str, str], list[asyncio.Future[AgentConnection]]] = {}
        """Dispatches waiting for an instance to (re)connect, by (tenant, instance)."""
        self.relay: Relay | None = None
        """Reaches streams other replicas hold (set by the composition root when replicas share the store)."""
        self._remote: dict[str, tuple[_Inbox, DispatchJob]] = {}
        """Owner side: dispatches sent to a stream another replica holds, by dispatch id."""
        self._served: dict[str, tuple[asyncio.Task[None], _Answers, str, DispatchJob]] = {}
        """Holder side: dispatches another replica sent to a stream held here, by dispatch id: their
        task, answers, owner (the sender) and job."""
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False
        """The server is stopping (``begin_stop``): streams end because it goes, not the agents."""

    @property
    def count(self) -> int:
        """Open agent streams in this process."""
        return len(self._live)

    def is_connected(self, tenant_id: str, instance_id: str) -> bool:
        return (tenant_id, instance_id) in self._live

    def held_elsewhere(self, agent: AgentRegistration) -> str:
        """The replica holding the instance's stream, if another one does and the instance still
        shows signs of life (its heartbeats there are stored); '' otherwise."""
        relay = self.relay
        holder = agent.connection.replica
        if relay is None or not agent.connection.connected or holder in ("", relay.replica_id):
            return ""
        if (agent.tenant_id, agent.instance_id) in self._live:
            return ""
        fresh = self._clock.now() - self._registry.last_seen(agent) <= self._registry.heartbeat_timeout_s
        return holder if fresh else ""

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
        if previous is not None and previous.counted:
            previous.counted = False  # the newer stream takes its place: a reconnect is never refused
        else:
            # An agent refused signs in and registers again before its next try: asked to wait
            # longer than a client's stream, as a place seldom frees within a second.
            self._quota.take(agent.tenant_id, retry_after_s=_CONNECT_RETRY_AFTER_S)
        connection.counted = True
        if previous is not None:
            self._drop(previous, "replaced by a newer stream of the same instance")
        self._live[connection.key] = connection
        for waiting in self._awaited.pop(connection.key, ()):
            if not waiting.done():
                waiting.set_result(connection)
        now = self._clock.now()
        held: dict[str, Any] = {"replica": self.relay.replica_id} if self.relay is not None else {}
        try:
            updated = await self._registry.set_connection(
                agent.tenant_id,
                instance_id,
                transport="connect-stream",
                connected=True,
                connected_since=now,
                **held,
            )
        except BaseException:  # the servicer detaches only a stream attach returned
            if self._live.get(connection.key) is connection:
                del self._live[connection.key]
            self._drop(connection, "the agent's stream could not be recorded")
            if connection.counted:  # a newer stream of the instance may have taken its place
                connection.counted = False
                self._quota.give_back(agent.tenant_id)
            raise
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
        if connection.counted:
            connection.counted = False
            self._quota.give_back(connection.agent.tenant_id)
        if self._live.get(connection.key) is connection:
            del self._live[connection.key]
            relay = self.relay
            if relay is None:
                await self._registry.set_connection(*connection.key, connected=False, last_error=reason)
            else:
                # In-flight work ends first: the write below may be cancelled with the handler.
                self._drop(connection, reason)
                await asyncio.shield(self._disconnected(connection.key, relay.replica_id, reason))
        self._drop(connection, reason)

    async def _disconnected(self, key: tuple[str, str], me: str, reason: str) -> None:
        """Store that the stream held here closed (other replicas believe what is stored), unless
        the instance connected to another replica meanwhile; again if another replica's write
        to the record came in between."""
        for _ in range(3):
            with contextlib.suppress(Conflict):
                await self._registry.set_connection(
                    *key,
                    unless=lambda a: a.connection.replica not in ("", me),
                    connected=False,
                    last_error=reason,
                    replica="",
                )
                return

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

    def dispatch(self, job: DispatchJob) -> AsyncGenerator[DispatchUpdate, InputRequest | None]:
        if self.relay is not None and (job.tenant_id, job.agent.instance_id) not in self._live:
            holder = self.held_elsewhere(job.agent)
            if holder:
                return self._dispatch_remote(job, holder)
        return self._dispatch_here(job)

    async def _dispatch_here(self, job: DispatchJob) -> AsyncGenerator[DispatchUpdate, InputRequest | None]:
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
            if not finished and not connection.closed and not self._stopping:
                # The mesh stopped following (cancel, timeout): tell the agent to stop too.
                reason = cancel_reason(job.message.message_id)
                connection.outbox.put_nowait(Outbound(job.dispatch_id, cancel_reason=reason))

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

    def begin_stop(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        """End every stream (server shutdown)."""
        served = [(dispatch_id, owner) for dispatch_id, (_, _, owner, _) in self._served.items()]
        for task, _, _, _ in list(self._served.values()):
            task.cancel()
        if served and self.relay is not None:
            # Their owners are told now, not at the dispatch's timeout (or a human's answer).
            await asyncio.wait([asyncio.create_task(self._tell_lost(*s)) for s in served], timeout=1)
        for connection in list(self._live.values()):
            await self.detach(connection, "the server is shutting down")
        if self._background:
            await asyncio.wait(list(self._background), timeout=1)

    # Streams held by other replicas

    async def _dispatch_remote(
        self, job: DispatchJob, holder: str
    ) -> AsyncGenerator[DispatchUpdate, InputRequest | None]:
        """Owner side: the job goes to the replica holding the stream; its updates come back."""
        relay = self.relay
        assert relay is not None
        me = relay.replica_id
        inbox = _Inbox()
        self._remote[job.dispatch_id] = (inbox, job)
        finished = False
        relayed: InputRequest | None = None
        """An answer sent to the holder that nothing from it has followed yet."""
        carried = job.answer
        """The answer the job carries (the message dispatched again with it), until the holder
        says anything: if the holder died, it goes again to the agent once the agent is back."""
        try:
            await relay.send(holder, Relayed(RelayKind.JOB, job.dispatch_id, me, job=job, token=job.sign()))
            silent_s = _ANSWER_CHECK_S
            """How long the agent at work may be silent before the next look: doubled at each look
            (a long job is mostly silence; one read a second each would load the shared store)."""
            while True:
                watching = relayed is not None or carried is not None
                items = await inbox.take(within=_ANSWER_CHECK_S if watching else silent_s)
                if not items:
                    # The holder has said nothing since the answer went to it: if it died (or the
                    # agent reconnected elsewhere) before it took the answer, nobody will pass it
                    # on there. It goes with the message to the agent where it is now.
                    if relayed is not None and await self._gone_from(holder, job):
                        finished = True
                        raise AgentGone(relayed)
                    # Likewise the answer the job carries, once the agent is back on another stream
                    # (until then the dispatch's timeout runs): an agent that acted on it already
                    # sends what it did then instead of acting again.
                    if carried is not None and await self._reconnected(holder, job):
                        finished = True
                        raise AgentGone(carried)
                    # The agent at work, silent: if it holds another stream now, the one the job
                    # went to is gone with what it was doing (its holder died without a word: a
                    # holder that lives says so). Failed, as a local stream's drop fails it, not
                    # left to the dispatch's timeout; never sent again: it may have run.
                    if not watching:
                        if await self._reconnected(holder, job):
                            # Not ``finished``: a CANCEL goes to the holder all the same, should it
                            # live after all (the agent stops instead of working for nobody).
                            raise DispatchFailed(
                                f"the agent's stream on replica {holder} is gone (the instance "
                                "connected again since): the work it had there was dropped"
                            )
                        silent_s = min(silent_s * 2, _SILENT_CHECK_MAX_S)
                    continue
                relayed = carried = None
                silent_s = _ANSWER_CHECK_S
                for item in _merged(items):
                    if isinstance(item, _Dropped):
                        finished = True
                        if item.not_delivered:
                            raise NotDelivered(f"{item.reason} (on replica {holder})")
                        raise DispatchFailed(f"{item.reason} (on replica {holder})")
                    finished = item.state is not None and item.state not in _GOING_ON
                    answer = yield item
                    if finished:
                        return
                    if answer is not None:  # a human answered what the agent asked: pass it on
                        if await self._gone_from(holder, job):
                            # The replica holding the agent died meanwhile (or the agent reconnected
                            # since): nobody would take the answer there. It goes with the message
                            # to the agent where it is now, as after a restart.
                            finished = True
                            raise AgentGone(answer)
                        await relay.send(
                            holder, Relayed(RelayKind.ANSWER, job.dispatch_id, me, answer=answer)
                        )
                        relayed = answer
        finally:
            self._remote.pop(job.dispatch_id, None)
            if not finished and not self._stopping:  # the mesh stopped following: the holder tells the agent
                self._later(relay.send(holder, Relayed(RelayKind.CANCEL, job.dispatch_id, me)))

    async def _reconnected(self, holder: str, job: DispatchJob) -> bool:
        """Whether the agent holds a stream other than the one ``holder`` held for ``job``."""
        now = await self._registry.read(job.tenant_id, job.agent.instance_id)
        if now is None or not now.connection.connected:
            return False
        connection = now.connection
        return (
            connection.replica != holder or connection.connected_since != job.agent.connection.connected_since
        )

    async def _gone_from(self, holder: str, job: DispatchJob) -> bool:
        """Whether the agent's stream that ``holder`` held for ``job`` is gone: the instance
        reconnected since (a new stream, here or on another replica), or shows no sign of life."""
        now = await self._registry.read(job.tenant_id, job.agent.instance_id)
        if now is None or not now.connection.connected or now.connection.replica != holder:
            return True
        if now.connection.connected_since != job.agent.connection.connected_since:
            return True
        return self._clock.now() - self._registry.last_seen(now) > self._registry.heartbeat_timeout_s

    def relayed(self, item: Relayed) -> None:
        """An item another replica sent this one (the relay calls this, in order)."""
        kind = item.kind
        if kind is RelayKind.JOB:
            answers = _Answers()
            task = asyncio.create_task(self._serve(item, answers), name="svantic-relayed-dispatch")
            assert item.job is not None
            self._served[item.dispatch_id] = (task, answers, item.sender, item.job)
            return
        if kind is RelayKind.ANSWER or kind is RelayKind.CANCEL:
            served = self._served.get(item.dispatch_id)
            if served is not None:
                if kind is RelayKind.CANCEL:
                    served[0].cancel()
                elif item.answer is not None:
                    served[1].put(item.answer)
            return
        remote = self._remote.get(item.dispatch_id)
        if remote is None:
            return  # that dispatch ended here already
        inbox, job = remote
        if kind is RelayKind.UPDATE:
            if item.update is not None:
                inbox.put(item.update)
            return
        inbox.put(_Dropped(item.reason, not_delivered=kind is RelayKind.NOT_DELIVERED))
        if job.lost is not None:
            job.lost.set()  # wakes a wait for a human

    async def _serve(self, item: Relayed, answers: _Answers) -> None:
        """Holder side: run a dispatch another replica sent on the stream held here, telling it
        every update and how it ended."""
        relay = self.relay
        assert relay is not None and item.job is not None
        token = item.token
        job = replace(item.job, sign=lambda: token, lost=asyncio.Event())
        me = relay.replica_id

        async def tell(kind: RelayKind, *, update: DispatchUpdate | None = None, reason: str = "") -> None:
            await relay.send(item.sender, Relayed(kind, job.dispatch_id, me, update=update, reason=reason))

        try:
            if job.deadline < self._clock.now():
                await tell(RelayKind.NOT_DELIVERED, reason="the dispatch arrived after its deadline")
                return
            updates = self._dispatch_here(job)
            async with contextlib.aclosing(updates):
                answer: InputRequest | None = None
                while True:
                    try:
                        update = await updates.asend(answer)
                    except StopAsyncIteration:
                        await tell(
                            RelayKind.FAILED, reason="the agent ended the dispatch without a final state"
                        )
                        return
                    answer = None
                    await tell(RelayKind.UPDATE, update=update)
                    if update.state is MessageState.INPUT_REQUIRED:
                        answer = await answers.take(job.lost)
                        if answer is None:
                            await tell(
                                RelayKind.LOST, reason="the agent's stream dropped while a human decided"
                            )
                            return
                    elif update.state is not None and update.state not in _GOING_ON:  # None: progress
                        return
        except NotDelivered as exc:
            await tell(RelayKind.NOT_DELIVERED, reason=str(exc))
        except DispatchFailed as exc:
            await tell(RelayKind.FAILED, reason=str(exc))
        except asyncio.CancelledError:
            raise  # the owner cancelled (the agent was told) or this replica is stopping
        except Exception as exc:
            _log.exception("relayed dispatch %s failed", job.dispatch_id)
            with contextlib.suppress(Exception):
                await tell(RelayKind.FAILED, reason=f"the replica holding the stream failed: {exc}")
        finally:
            self._served.pop(job.dispatch_id, None)

    async def end_orphaned(
        self,
        owner_of: Callable[[str, str], Awaitable[str | None]],
        ended: Callable[[str, str, str], Awaitable[bool]],
    ) -> int:
        """Holder side: end the dispatches whose owner no longer runs their session (it died or
        stopped; another replica takes the session over, or has): the agent is told to stop, as on
        the owner's cancel, and the session's new owner recovers the message as a restart does
        (what ran is interrupted). A dispatch whose agent waits for a human's answer is left to the
        agent until its message has ended (``ended``): the new owner sends that answer with the
        message again, and an agent may take it up where it asked. Returns how many ended."""
        owners: dict[tuple[str, str], str | None] = {}
        count = 0
        for task, answers, owner, job in list(self._served.values()):
            key = (job.tenant_id, job.session_id)
            if key not in owners:
                owners[key] = await owner_of(*key)
            if owners[key] == owner or task.done():
                continue
            if answers.asking and not await ended(job.tenant_id, job.session_id, job.message.message_id):
                continue
            task.cancel()
            count += 1
        return count

    async def _tell_lost(self, dispatch_id: str, owner: str) -> None:
        relay = self.relay
        assert relay is not None
        reason = f"the replica holding the agent's stream ({relay.replica_id}) is shutting down"
        try:
            await relay.send(owner, Relayed(RelayKind.LOST, dispatch_id, relay.replica_id, reason=reason))
        except Exception:
            _log.exception("could not tell replica %s that dispatch %s was lost", owner, dispatch_id)

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _drop(self, connection: AgentConnection, reason: str) -> None:
        if connection.closed:
            return
        connection.closed = True
        for inbox in connection.pending.values():
            inbox.put(_Dropped(reason))
        if not self._stopping:  # a server that stops is no agent gone: who waits for a human waits on
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
