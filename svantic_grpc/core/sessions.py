"""Sessions: the unit of work, their agents and their lifecycle.

Every change to a session happens under that session's lock and is written with
the version it read, so two writers never silently overwrite each other.

The frequent changes (activity on every message, close) start from the record as
this process last read or wrote it instead of reading the store again: a change
made meanwhile by another process sharing the store fails the version check, and
the change is then made once more from a fresh read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import TypeVar

from svantic_grpc.core._locks import KeyedLock
from svantic_grpc.core._validate import RESERVED_PREFIX, check_id
from svantic_grpc.core.auth import Caller, Scope
from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    session_not_found,
)
from svantic_grpc.core.events import (
    AgentJoined,
    AgentLeft,
    Event,
    EventBus,
    EventPayload,
    InternalAgentsJoined,
    InternalAgentsLeft,
    StatusChanged,
)
from svantic_grpc.core.evolve import evolve
from svantic_grpc.core.inputs.model import InputRequest, InputState
from svantic_grpc.core.models import (
    INTERNAL_AGENTS,
    AgentRegistration,
    JoinReason,
    Session,
    SessionAgent,
    SessionStatus,
)
from svantic_grpc.core.pages import PageScope
from svantic_grpc.core.reaper import IdleReaper
from svantic_grpc.core.registry import Registry
from svantic_grpc.core.store import Change, Changed, SessionPage, Store

__all__ = ["MAX_PAGE_SIZE", "Sessions"]

T = TypeVar("T")

_log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


class Sessions:
    """Opens, changes, watches and closes sessions."""

    def __init__(
        self,
        *,
        store: Store,
        bus: EventBus,
        registry: Registry,
        clock: Clock,
        ids: IdGenerator,
        ttl_s: float,
    ) -> None:
        self._store = store
        self._bus = bus
        self._registry = registry
        self._clock = clock
        self._ids = ids
        self._ttl_s = ttl_s
        self._locks = KeyedLock()
        self._latest: dict[tuple[str, str], Session] = {}
        """Each open session's record as this process last read or wrote it."""
        self.reaper = IdleReaper(clock=clock, close=self._close_idle, load=self._load_for_reaper)
        self._close_hooks: list[Callable[[str, str, str], Awaitable[None]]] = []
        self._close_failed_hooks: list[Callable[[str, str], None]] = []
        self._closed_hooks: list[Callable[[str, str, str], Awaitable[None]]] = []
        self._busy_checks: list[Callable[[str, str], bool]] = []
        self._open_hooks: list[Callable[[str, str], Awaitable[object]]] = []
        self.shared = False
        """Replicas share the store: another process may write a session while this one does
        (set by the composition of the mesh)."""
        registry.on_release(self._agent_released)

    def busy_when(self, check: Callable[[str, str], bool]) -> None:
        """Treat a session as active while ``check(tenant_id, session_id)`` is true (work is running)."""
        self._busy_checks.append(check)

    def on_open(self, hook: Callable[[str, str], Awaitable[object]]) -> None:
        """Call ``hook(tenant_id, session_id)`` once a new session is stored (to take its lease)."""
        self._open_hooks.append(hook)

    def on_close(
        self,
        hook: Callable[[str, str, str], Awaitable[None]],
        failed: Callable[[str, str], None] | None = None,
    ) -> None:
        """Call ``hook(tenant_id, session_id, reason)`` when a session starts closing (to cancel its
        work), and ``failed(tenant_id, session_id)`` if the close is then not written (the session
        stays open: what the hook held back for the close goes on)."""
        self._close_hooks.append(hook)
        if failed is not None:
            self._close_failed_hooks.append(failed)

    def on_closed(self, hook: Callable[[str, str, str], Awaitable[None]]) -> None:
        """Call ``hook(tenant_id, session_id, reason)`` once a close here is written."""
        self._closed_hooks.append(hook)

    @property
    def ttl_s(self) -> float:
        """Idle time after which a session closes; 0 disables."""
        return self._ttl_s

    def expires_at(self, session: Session) -> float | None:
        """When the idle TTL closes the session, or ``None``."""
        if not self._ttl_s or session.status is SessionStatus.CLOSED:
            return None
        return session.last_activity_at + self._ttl_s

    async def init(
        self,
        caller: Caller,
        *,
        session_id: str = "",
        user_id: str = "",
        self_agent_type: str = "",
        self_instance_id: str = "",
    ) -> Session:
        """Create a session with its internal agents and, optionally, the caller."""
        caller.require(Scope.FULL)
        # Each optional id checked only when given (most sessions: none of them).
        if session_id:
            check_id("session_id", session_id)
        if bool(self_agent_type) != bool(self_instance_id):
            missing = "self_instance_id" if self_agent_type else "self_agent_type"
            raise InvalidArgument(missing, "self-join needs both self_agent_type and self_instance_id")
        if self_agent_type:
            check_id("self_agent_type", self_agent_type)
            check_id("self_instance_id", self_instance_id)
        if self_agent_type.startswith(RESERVED_PREFIX):
            raise InvalidArgument("self_agent_type", "internal agents never create sessions")
        if self_instance_id:
            registered = await self._store.get_agent(tenant_id=caller.tenant_id, instance_id=self_instance_id)
            if registered is not None and registered.agent_type != self_agent_type:
                # Else work routed to the made-up type would run on that instance, unchecked by
                # the policies on its own type.
                raise InvalidArgument(
                    "self_instance_id",
                    f"{self_instance_id!r} is a registered {registered.agent_type!r} instance, "
                    f"not a {self_agent_type!r}",
                )
        if len(user_id) > 256:
            raise InvalidArgument("user_id", "is longer than 256 characters")
        session_id = session_id or self._ids.new_id("ses_")
        if self_instance_id and any(self_instance_id == prefix + session_id for _, prefix in INTERNAL_AGENTS):
            raise InvalidArgument("self_instance_id", "is the id of one of the session's internal agents")
        now = self._clock.now()
        # The internal agents are not stored: the session derives them (``Session.internal_agents``).
        agents = (
            (SessionAgent(self_agent_type, self_instance_id, JoinReason.SELF, now),)
            if self_agent_type
            else ()
        )
        # Opening lasts only while the agents attach: stored at once as active (one write).
        active = Session(
            tenant_id=caller.tenant_id,
            session_id=session_id,
            status=SessionStatus.ACTIVE,
            created_at=now,
            updated_at=now,
            last_activity_at=now,
            user_id=user_id,
            # Interned: the same few callers open most sessions; one copy each, not one per session.
            created_by=sys.intern(caller.subject),
            creator_agent_type=sys.intern(caller.agent_type),
            agents=agents,
        )
        opened = StatusChanged(
            SessionStatus.OPENING, SessionStatus.ACTIVE, sys.intern(f"opened by {caller.subject}")
        )
        # The internal agents' joins are built only if read (a live subscriber, a store that
        # writes them out): the memory store keeps them as markers.
        joined = (AgentJoined(agents[0]), opened) if agents else (opened,)  # (a self-join: one agent)
        events = InternalAgentsJoined(session_id, now, joined)
        store, tenant_id = self._store, caller.tenant_id
        if self._bus.atomic:
            # A commit that never suspends (the memory store) is alone while it runs: no session
            # lock to take and let go around it.
            session = await self._bus.commit(
                tenant_id,
                session_id,
                lambda at: store.create_session_with_events(active, time=at, payloads=events),
            )
        else:  # the session's lock keeps its other writes out while this one suspends
            async with self._locks.hold((tenant_id, session_id)):
                session = await self._bus.commit(
                    tenant_id,
                    session_id,
                    lambda at: store.create_session_with_events(active, time=at, payloads=events),
                )
        self._keep(session)
        for hook in self._open_hooks:
            await hook(caller.tenant_id, session_id)
        if self._ttl_s:
            self.reaper.schedule(caller.tenant_id, session_id, now + self._ttl_s)
        return session

    async def get(self, caller: Caller, session_id: str) -> Session:
        """One session of the caller's tenant."""
        caller.require(Scope.READ)
        return await self._get(caller.tenant_id, session_id)

    async def list_sessions(
        self,
        caller: Caller,
        *,
        statuses: Iterable[SessionStatus] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> SessionPage:
        """The tenant's sessions, newest first."""
        caller.require(Scope.READ)
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        statuses = tuple(statuses)
        scope = PageScope("ListSessions", caller.tenant_id, tuple(sorted({s.value for s in statuses})))
        page = await self._store.list_sessions(
            tenant_id=caller.tenant_id,
            statuses=statuses,
            page_size=page_size or DEFAULT_PAGE_SIZE,
            cursor=scope.cursor(page_token),
        )
        return replace(page, next_cursor=scope.token(page.next_cursor))

    async def invite(
        self, caller: Caller, session_id: str, *, agent_type: str, instance_id: str = ""
    ) -> SessionAgent:
        """Bring a registered remote agent into a session (join reason ``invited``)."""
        caller.require(Scope.FULL)
        check_id("agent_type", agent_type)
        check_id("instance_id", instance_id, required=False)
        return await self.add_remote_agent(
            caller.tenant_id,
            session_id,
            agent_type=agent_type,
            instance_id=instance_id,
            reason=JoinReason.INVITED,
        )

    async def add_remote_agent(
        self,
        tenant_id: str,
        session_id: str,
        *,
        agent_type: str,
        instance_id: str,
        reason: JoinReason,
        exclude: Collection[str] = (),
        rank: Callable[[AgentRegistration], float] | None = None,
    ) -> SessionAgent:
        """Bind a remote instance to a session: the given one, one already there, or the least loaded.

        Used by invitation and by routing (``reason`` says which). Instances in
        ``exclude`` (unreachable ones, during fail-over) are neither reused nor picked.
        """
        async with self._locks.hold((tenant_id, session_id)):
            known = self._latest.get((tenant_id, session_id)) if reason is JoinReason.ROUTED else None
            # routing (right after the message recorded activity) to an agent already here
            if known is not None:
                present = self._present(known, agent_type, instance_id, exclude)
                if present is not None:
                    return present
            # Another replica may bind or release the instance between the read and the write (its
            # record changed): then both are read again, checked again and written again.
            return await _again_on_conflict(
                lambda: self._join(tenant_id, session_id, agent_type, instance_id, reason, exclude, rank)
            )

    async def _join(
        self,
        tenant_id: str,
        session_id: str,
        agent_type: str,
        instance_id: str,
        reason: JoinReason,
        exclude: Collection[str],
        rank: Callable[[AgentRegistration], float] | None,
    ) -> SessionAgent:
        session = self._keep(self._require_open(await self._get(tenant_id, session_id)))
        present = self._present(session, agent_type, instance_id, exclude)
        if present is not None:
            return present
        async with self._binding(tenant_id, session_id, agent_type, instance_id, exclude, rank) as agent:
            now = self._clock.now()
            joined = SessionAgent(agent.agent_type, agent.instance_id, reason, now)
            grown = replace(session, agents=(*session.agents, joined), updated_at=now, last_activity_at=now)
            # The agent in the session, its agent_joined event and the instance's binding to the
            # session: one write, so a crash leaves both or neither.
            bound = self._registry.bound(agent, session_id)
            await self._store_update(grown, AgentJoined(joined), agents=(bound,) if bound else ())
        return joined

    @staticmethod
    def _present(
        session: Session, agent_type: str, instance_id: str, exclude: Collection[str]
    ) -> SessionAgent | None:
        """The agent a routing to ``agent_type``/``instance_id`` reuses, if it is in the session."""
        if instance_id:
            present = session.find_agent(instance_id=instance_id)
        else:  # session affinity: reuse the instance of this type already here
            present = next(
                (
                    a
                    for a in session.present_agents()
                    if a.agent_type == agent_type and a.instance_id not in exclude
                ),
                None,
            )
        if present is not None and present.agent_type != agent_type:
            raise InvalidArgument(
                "agent_type", f"instance {instance_id!r} is in the session as {present.agent_type!r}"
            )
        return present

    @contextlib.asynccontextmanager
    async def _binding(
        self,
        tenant_id: str,
        session_id: str,
        agent_type: str,
        instance_id: str,
        exclude: Collection[str] = (),
        rank: Callable[[AgentRegistration], float] | None = None,
    ) -> AsyncIterator[AgentRegistration]:
        """The instance to bind (the given one or the least loaded), checked and held under its
        lock while the caller writes the binding with the session."""
        registry = self._registry
        if not instance_id:
            instance_id = (await registry.pick(tenant_id, agent_type, exclude=exclude, rank=rank)).instance_id
        async with registry.locks.hold((tenant_id, instance_id)):
            # Re-read under the instance lock: the pick above may be stale by now.
            agent = await self._store_agent(tenant_id, instance_id)
            if agent.agent_type != agent_type:
                raise InvalidArgument(
                    "agent_type", f"instance {instance_id!r} is a {agent.agent_type!r}, not {agent_type!r}"
                )
            if not registry.is_routable(agent):
                status = registry.effective_status(agent).value
                raise Unavailable(
                    f"instance {instance_id!r} is {status} and cannot join a session now",
                    reason="AGENT_NOT_ROUTABLE",
                    metadata={"instance_id": instance_id, "status": status},
                )
            yield agent

    async def _store_agent(self, tenant_id: str, instance_id: str) -> AgentRegistration:
        agent = await self._store.get_agent(tenant_id=tenant_id, instance_id=instance_id)
        if agent is None:
            raise NotFound(f"agent instance {instance_id!r} not found", reason="AGENT_NOT_FOUND")
        return agent

    async def agents(
        self, caller: Caller, session_id: str, *, include_departed: bool = False
    ) -> tuple[SessionAgent, ...]:
        """The session's agents, internal ones first; those that left too with ``include_departed``."""
        caller.require(Scope.READ)
        session = await self._get(caller.tenant_id, session_id)
        return session.all_agents(include_departed=include_departed)

    async def close(self, caller: Caller, session_id: str, *, reason: str = "") -> tuple[Session, bool]:
        """Close a session; returns it and whether this call closed it."""
        caller.require(Scope.FULL)
        check_id("session_id", session_id)
        if len(reason) > 1024:
            raise InvalidArgument("reason", "is longer than 1024 characters")
        return await self._close(
            caller.tenant_id, session_id, reason or sys.intern(f"closed by {caller.subject}")
        )

    async def _close(self, tenant_id: str, session_id: str, reason: str) -> tuple[Session, bool]:
        """Close a session whose id is checked (``close``) or known (the idle TTL)."""
        # Cancel running work first, outside the session lock: cancellation writes to the session.
        # The hooks do nothing for a session without work (closed, unknown, another tenant's).
        key = (tenant_id, session_id)
        try:
            for hook in self._close_hooks:
                await hook(tenant_id, session_id, reason)
            async with self._locks.hold(key):
                closed, now = await self._changing(tenant_id, session_id, partial(self._end, reason=reason))
            if now:
                for after in self._closed_hooks:
                    await after(tenant_id, session_id, reason)
            return closed, now
        except BaseException:  # cancelled too (what the hooks withdrew left the session as it says)
            for failed in self._close_failed_hooks:
                failed(tenant_id, session_id)
            raise

    async def closed_elsewhere(self, tenant_id: str, session_id: str) -> None:
        """The session was closed by another process while this one ran its work: that work ends
        here as it does on a close here (the close hooks), and nothing here keeps it open."""
        for hook in self._close_hooks:
            await hook(tenant_id, session_id, "closed on another replica")
        self._forget(tenant_id, session_id)
        self.reaper.forget(tenant_id, session_id)

    async def _end(self, session: Session, *, reason: str) -> tuple[Session, bool]:
        """Write ``session`` closed, its agents gone; ``False`` if it was closed already."""
        tenant_id, session_id = session.tenant_id, session.session_id
        if session.status is SessionStatus.CLOSED:
            return session, False
        now = self._clock.now()
        changed = StatusChanged(session.status, SessionStatus.CLOSED, reason)
        agents = session.agents
        if agents:
            present = session.present_agents()
            agents = tuple(a if a.left_at is not None else replace(a, left_at=now) for a in agents)
            leaving: tuple[EventPayload, ...] = (
                *(AgentLeft(a.agent_type, a.instance_id, "released: session closed") for a in present),
                changed,
            )
            released = sorted(a.instance_id for a in present if a.join_reason is not JoinReason.SELF)
        else:  # no agent from outside (most sessions): none to leave or release
            leaving, released = (changed,), []
        # The internal agents leave by their type and instance, built only if read (as they join).
        events = InternalAgentsLeft(session_id, "session closed", leaving)
        ended = evolve(
            session,
            status=SessionStatus.CLOSED,
            agents=agents,
            closed_at=now,
            close_reason=reason,
            updated_at=now,
        )
        if released:
            async with contextlib.AsyncExitStack() as held:
                unbound: list[AgentRegistration] = []
                for instance_id in released:  # in one order, so two closes never wait on each other
                    await held.enter_async_context(self._registry.locks.hold((tenant_id, instance_id)))
                    registration = await self._store.get_agent(tenant_id=tenant_id, instance_id=instance_id)
                    change = self._registry.released(registration, session_id) if registration else None
                    if change is not None:
                        unbound.append(change)
                closed = await self._write_end(ended, events, unbound)
        else:  # most sessions: no instance to release, no stack of instance locks to hold for them
            closed = await self._write_end(ended, events, ())
        self._latest.pop((tenant_id, session_id), None)  # (``_forget``)
        self.reaper.forget(tenant_id, session_id)
        return closed, True

    async def _write_end(
        self, ended: Session, events: InternalAgentsLeft, unbound: Sequence[AgentRegistration]
    ) -> Session:
        """Write the session closed with its events and its instances released: one write."""
        tenant_id, session_id = ended.tenant_id, ended.session_id
        # Forgotten before the write: even if this task is cancelled while the write is queued
        # (it still lands), nothing here goes on believing the session open.
        self._latest.pop((tenant_id, session_id), None)
        store = self._store
        return await self._bus.commit(
            tenant_id,
            session_id,
            lambda at: store.update_session_with_events(ended, time=at, payloads=events, agents=unbound),
        )

    async def watch(
        self, caller: Caller, session_id: str, *, after_sequence: int = 0
    ) -> AsyncIterator[Event]:
        """The session's events after ``after_sequence``, then live ones until it closes."""
        caller.require(Scope.READ)
        if after_sequence < 0:
            raise InvalidArgument("after_sequence", "must not be negative")
        session = await self._get(caller.tenant_id, session_id)
        follow = session.status is not SessionStatus.CLOSED
        return self._bus.replay_then_follow(
            caller.tenant_id, session_id, after_sequence=after_sequence, follow=follow
        )

    async def write_inputs(
        self, change: Change, reason: str, *, landed: Callable[[Changed], None] | None = None
    ) -> Changed:
        """Write a change to the session's input requests together with the session's status.

        In the same store write, the session becomes paused when a request of it is pending
        afterwards and active when none is (``reason`` goes with the status change), so the
        two never disagree, even after a crash. A new pending request in a closed session is
        refused (``FailedPrecondition``). ``landed`` is told what was stored as soon as it is,
        even if the caller is cancelled meanwhile (the write lands all the same).
        """
        tenant_id, session_id = change.tenant_id, change.session_id
        async with self._locks.hold((tenant_id, session_id)):
            for tries in range(_CONFLICT_TRIES):
                try:
                    return await self._write_inputs(change, reason, landed)
                except Conflict:
                    # With replicas, another one may have written the session meanwhile (its
                    # status, its activity): read again and decide again, unless what lost the
                    # race is a request this change ends (someone else ended it first).
                    if tries + 1 == _CONFLICT_TRIES or not self.shared or not await self._as_read(change):
                        raise
                    await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** min(tries, 5))))
            raise AssertionError("unreachable")

    async def _write_inputs(
        self, change: Change, reason: str, landed: Callable[[Changed], None] | None
    ) -> Changed:
        tenant_id, session_id = change.tenant_id, change.session_id
        session = await self._store.get_session(tenant_id=tenant_id, session_id=session_id)
        is_open = session is not None and session.status is not SessionStatus.CLOSED
        raising = any(r.state is InputState.PENDING for r in change.inputs)
        answering = any(r.state is InputState.RESOLVED for r in change.inputs)
        if (raising or answering) and not is_open:
            # (answering: with replicas, a request raised on the owner just before the close on
            # another replica may still be pending for a moment; what it asked must not be done)
            raise FailedPrecondition(f"session {session_id!r} is closed", reason="SESSION_CLOSED")
        if session is not None and is_open:
            paused = raising or await self._still_pending(change)
            # Even for a close (a paused session's requests withdrawn before it is written closed):
            # the session is active once nothing in it is pending, in the write that ends the last
            # request, as the store must show at any crash point (the crash test found a kill
            # between that write and the close's leaving it paused with nothing pending).
            target = SessionStatus.PAUSED if paused else SessionStatus.ACTIVE
            if session.status is not target:
                now = self._clock.now()
                moved = replace(session, status=target, updated_at=now, last_activity_at=now)
                change = replace(
                    change,
                    sessions=(*change.sessions, moved),
                    events=(*change.events, StatusChanged(session.status, target, reason)),
                )
            elif self.shared and change.inputs and not change.sessions:
                # Written as read (its version moves on): two replicas each ending one of the
                # session's last two requests cannot both see the other pending and leave it
                # paused with nothing pending; one of them loses the race and decides again.
                change = replace(change, sessions=(session,))
        if not (change.sessions or change.inputs or change.audit or change.events):
            return Changed()
        store = self._store

        async def write(now: float) -> tuple[Changed, Sequence[Event]]:
            written = await store.write(replace(change, time=now))
            if landed is not None:
                landed(written)
            return written, written.events

        try:
            written = await self._bus.commit(tenant_id, session_id, write)
        except BaseException:
            self._forget(tenant_id, session_id)
            raise
        for stored in written.sessions:
            self._keep(stored)
        return written

    async def _as_read(self, change: Change) -> bool:
        """Whether every request ``change`` replaces is still stored at the version it was read."""
        for request in change.inputs:
            if request.version == 0:
                continue
            stored = await self._store.get_input(tenant_id=request.tenant_id, request_id=request.request_id)
            if stored is None or stored.version != request.version:
                return False
        return True

    async def _still_pending(self, change: Change) -> bool:
        """Whether a request of the session other than those ``change`` ends stays pending."""
        ending = {r.request_id for r in change.inputs}
        page = await self._store.list_inputs(
            tenant_id=change.tenant_id,
            session_id=change.session_id,
            states=(InputState.PENDING,),
            page_size=len(ending) + 1,
        )
        return any(r.request_id not in ending for r in page.requests)

    async def settle_status(self, tenant_id: str, session_id: str, reason: str) -> None:
        """Make the session paused or active as what is pending in it says (start-up recovery)."""
        await self.write_inputs(Change(tenant_id, session_id), reason)

    async def settle_statuses(
        self, *, sessions: Sequence[Session] | None = None, pending: Sequence[InputRequest] | None = None
    ) -> int:
        """At start-up, once input requests are recovered: every open session (of ``sessions``, when
        given with what is ``pending`` in them) paused exactly when something in it is pending.
        Returns how many sessions changed."""
        if pending is None:
            pending = await self._store.pending_inputs()
        waiting = {(r.tenant_id, r.session_id) for r in pending}
        changed = 0
        for session in await self._store.open_sessions() if sessions is None else sessions:
            waits = (session.tenant_id, session.session_id) in waiting
            if (session.status is SessionStatus.PAUSED) != waits:
                reason = "at start-up: waiting for a human" if waits else "at start-up: nothing is pending"
                await self.settle_status(session.tenant_id, session.session_id, reason)
                changed += 1
        return changed

    async def recover(self, *, sessions: Sequence[Session] | None = None) -> int:
        """Arm the idle TTL of every open session in the store (of ``sessions``, when given: those
        this process takes over)."""
        if sessions is None:
            sessions = await self._store.open_sessions()
        if self._ttl_s:
            for session in sessions:
                self.reaper.schedule(
                    session.tenant_id, session.session_id, session.last_activity_at + self._ttl_s
                )
        return len(sessions)

    async def _agent_released(self, session_id: str, agent: AgentRegistration, reason: str) -> None:
        """An instance was deregistered: it leaves the session."""
        await self.remove_agent(agent.tenant_id, session_id, agent.instance_id, reason=reason, unbind=False)

    async def remove_agent(
        self, tenant_id: str, session_id: str, instance_id: str, *, reason: str, unbind: bool = True
    ) -> None:
        """A remote instance leaves an open session (unreachable, deregistered)."""
        async with self._locks.hold((tenant_id, session_id)):
            # The session or the instance may change on another replica between read and write.
            await _again_on_conflict(
                lambda: self._remove(tenant_id, session_id, instance_id, reason=reason, unbind=unbind)
            )

    async def _remove(
        self, tenant_id: str, session_id: str, instance_id: str, *, reason: str, unbind: bool
    ) -> None:
        session = await self._store.get_session(tenant_id=tenant_id, session_id=session_id)
        if session is None or session.status is SessionStatus.CLOSED:
            return
        present = session.find_agent(instance_id=instance_id)
        if present is None or present.internal:
            return
        now = self._clock.now()
        agents = tuple(replace(a, left_at=now) if a is present else a for a in session.agents)
        left = AgentLeft(present.agent_type, instance_id, reason)
        async with self._registry.locks.hold((tenant_id, instance_id)):
            registration = (
                await self._store.get_agent(tenant_id=tenant_id, instance_id=instance_id) if unbind else None
            )
            released = self._registry.released(registration, session_id) if registration else None
            # The agent gone from the session, its agent_left event and the instance released:
            # one write.
            await self._store_update(
                replace(session, agents=agents, updated_at=now),
                left,
                agents=(released,) if released else (),
            )

    async def open_record(self, tenant_id: str, session_id: str) -> Session:
        """The open session as this process last knew it (read when it knows none): ``NotFound``,
        or ``FailedPrecondition`` when it is closed. The write that follows checks the version."""
        known = self._latest.get((tenant_id, session_id))
        if known is not None:
            return known
        return self._keep(self._require_open(await self._get(tenant_id, session_id)))

    async def with_activity(
        self, tenant_id: str, session_id: str, write: Callable[[Session], Awaitable[tuple[Session, T]]]
    ) -> T:
        """Run ``write(session)`` with the open session's activity moved to now: ``write`` stores
        that session (at the version read) with its own records in one store write and returns
        the session as stored. A session changed meanwhile by another process is read again and
        written once more; a closed one is ``FailedPrecondition``.

        This is how a message records activity: in the message's own write, not one of its own.
        """

        async def change(session: Session) -> T:
            now = self._clock.now()
            active = evolve(self._require_open(session), last_activity_at=now, updated_at=now)
            try:
                stored, result = await write(active)
            except BaseException:
                self._forget(tenant_id, session_id)
                raise
            self._keep(stored)
            return result

        async with self._locks.hold((tenant_id, session_id)):
            return await self._changing(tenant_id, session_id, change)

    async def _changing(
        self, tenant_id: str, session_id: str, change: Callable[[Session], Awaitable[T]]
    ) -> T:
        """``change(session)`` from the record last known here; once more from a fresh read if the
        store says it changed meanwhile (another process). Call under the session's lock."""
        known = self._latest.get((tenant_id, session_id))
        if known is not None:
            try:
                return await change(known)
            except Conflict:
                self._forget(tenant_id, session_id)

        async def fresh() -> T:
            try:
                return await change(self._keep(await self._get(tenant_id, session_id)))
            except Conflict:  # e.g. an instance it releases was bound meanwhile on another replica
                self._forget(tenant_id, session_id)
                raise

        return await _again_on_conflict(fresh)

    async def _store_update(
        self, session: Session, *events: EventPayload, agents: Sequence[AgentRegistration] = ()
    ) -> Session:
        """Write a changed session (at the version it was read), with ``events`` and ``agents``
        in the same write, and remember what was stored."""
        try:
            if not events and not agents:
                return self._keep(await self._store.update_session(session))
            store = self._store
            return self._keep(
                await self._bus.commit(
                    session.tenant_id,
                    session.session_id,
                    lambda now: store.update_session_with_events(
                        session, time=now, payloads=events, agents=agents
                    ),
                )
            )
        except BaseException:
            self._forget(session.tenant_id, session.session_id)
            raise

    def _keep(self, session: Session) -> Session:
        """Remember the record of an open session (a closed one is forgotten)."""
        key = (session.tenant_id, session.session_id)
        if session.status is SessionStatus.CLOSED:
            self._latest.pop(key, None)
        else:
            self._latest[key] = session
        return session

    def _forget(self, tenant_id: str, session_id: str) -> None:
        self._latest.pop((tenant_id, session_id), None)

    async def _load_for_reaper(self, tenant_id: str, session_id: str) -> float | None:
        session = await self._store.get_session(tenant_id=tenant_id, session_id=session_id)
        if session is None or session.status is SessionStatus.CLOSED:
            self._forget(tenant_id, session_id)  # e.g. closed by another process
        if session is None:
            return None
        if any(check(tenant_id, session_id) for check in self._busy_checks):
            # A message still running is activity: look again one TTL from now.
            return self._clock.now() + self._ttl_s
        return self.expires_at(session)

    async def _close_idle(self, tenant_id: str, session_id: str) -> None:
        await self._close(tenant_id, session_id, "idle ttl")

    async def _get(self, tenant_id: str, session_id: str) -> Session:
        check_id("session_id", session_id)
        session = await self._store.get_session(tenant_id=tenant_id, session_id=session_id)
        if session is None:
            raise session_not_found(session_id)
        return session

    @staticmethod
    def _require_open(session: Session) -> Session:
        if session.status is SessionStatus.CLOSED:
            raise FailedPrecondition(
                f"session {session.session_id!r} is closed ({session.close_reason})",
                reason="SESSION_CLOSED",
            )
        return session


_CONFLICT_TRIES = 20
"""Times a change of a session with the instances it binds or releases is read and written again
when another replica changed one of them in between (each instance's record holds its bindings:
with many sessions of several replicas joining one instance at once, a write may lose a few times)."""


async def _again_on_conflict(attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()``, once more after a random wait each time it loses a race (``Conflict``), at most
    ``_CONFLICT_TRIES`` times; the waits grow (2 ms, 4 ms ... at most 50 ms) so that replicas racing
    for one record do not race again in step."""
    for tries in range(_CONFLICT_TRIES - 1):
        try:
            return await attempt()
        except Conflict:
            await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** min(tries, 5))))
    return await attempt()
