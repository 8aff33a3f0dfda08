"""The message service: send, follow, read and cancel messages."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace

from svantic_grpc.core._reads import MessageReads, ReadMemo, message_reads
from svantic_grpc.core._subscriptions import Subscription
from svantic_grpc.core._validate import check_id, check_reason
from svantic_grpc.core.agents import AgentServices, AgentSet, InternalAgent, Route, SessionScope, parse_plan
from svantic_grpc.core.auth import Caller, Scope
from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.dispatch import Dispatches
from svantic_grpc.core.dispatch._relay import Relay, Relayed, RelayKind
from svantic_grpc.core.errors import FailedPrecondition, InvalidArgument, MeshError, NotFound, Unavailable
from svantic_grpc.core.events import Event, EventBus, MessageStateChanged
from svantic_grpc.core.evolve import evolve
from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.messages.model import (
    Message,
    MessageMetadata,
    MessageState,
    Part,
    Role,
    Turn,
    check_parts,
    message_bytes,
    parse_metadata,
)
from svantic_grpc.core.messages.runtime import STOPS, SessionRuntime
from svantic_grpc.core.messages.writer import MessageWriter
from svantic_grpc.core.metrics import NO_METRICS, Metrics
from svantic_grpc.core.models import Session
from svantic_grpc.core.ownership import HandOff, LeaseLost, Ownership, SoleOwner
from svantic_grpc.core.pages import PageScope
from svantic_grpc.core.sessions import Sessions
from svantic_grpc.core.store import Change, Changed, MessagePage, Store, fitting

__all__ = ["MAX_PARTS", "MAX_TOTAL_BYTES", "Messages"]

MAX_PARTS = 64
_log = logging.getLogger(__name__)
_AWAY = "handed-off-"
"""Name prefix of the task that follows a message run by another replica."""
MAX_TOTAL_BYTES = 1024 * 1024
"""What a sent message's parts may carry: they are kept twice (the parts and the first turn of the
history), and the agent's outputs need room too, within ``MAX_MESSAGE_BYTES``."""
_CLOSING_S = 60.0
"""How long a session being closed is remembered as closing (``Messages._closing``)."""
_CANCEL_WAIT_S = 30.0
"""How long ``CancelMessage`` on a replica that does not own the session waits for the owner."""
_CANCEL_RECHECK_S = 0.5
"""How often that wait reads the message and the lease again (an owner that died, a missed event)."""
_CANCEL_RESEND_S = 2.0
_CLOSE_WAIT_S = 5.0
"""How long a close on a replica that does not own the session waits for the owner to cancel the
session's running messages (``Messages._end_at_owner``)."""
_UNFINISHED = tuple(s for s in MessageState if not s.terminal)


class Messages:
    """Messages of every session in this process, and the runtimes that run them."""

    def __init__(
        self,
        *,
        store: Store,
        bus: EventBus,
        sessions: Sessions,
        inputs: Inputs,
        dispatches: Dispatches,
        clock: Clock,
        ids: IdGenerator,
        agent_services: AgentServices,
        agent_classes: Mapping[str, type[InternalAgent]],
        critic_retries: int,
        metrics: Metrics = NO_METRICS,
        ownership: Ownership | None = None,
    ) -> None:
        self._metrics = metrics
        self._ownership = ownership or SoleOwner()
        self._away: set[asyncio.Task[Message]] = set()
        """Waits for messages handed to the replica that owns their session."""
        self._parking = False
        """The server is stopping (``begin_stop``)."""
        self._store = store
        self._bus = bus
        self._sessions = sessions
        self._inputs = inputs
        self._dispatches = dispatches
        self._clock = clock
        self._ids = ids
        # The internal agents' reads are made once per step of a message's run (core._reads).
        self._agent_services = replace(agent_services, store=MessageReads(agent_services.store))
        self._classes = dict(agent_classes)
        self._critic_retries = critic_retries
        self._runtimes: dict[tuple[str, str], SessionRuntime] = {}
        self._closing: dict[tuple[str, str], tuple[str, float]] = {}
        """Sessions being closed here, with the reason and until when (the event loop's clock) they
        are remembered (see ``_session_closing``)."""
        self._closing_order: deque[tuple[float, tuple[str, str]]] = deque()
        """``_closing``'s entries by when they are let go, oldest first (an entry replaced or let go
        meanwhile stays here until its time, and then lets nothing go)."""
        self.relay: Relay | None = None
        """With replicas: carries a cancel to the replica that owns the session (``cancel``)."""
        self._cancels: set[asyncio.Task[None]] = set()
        """Cancels other replicas asked this one (the owner) to make."""
        sessions.on_close(self._session_closing, failed=self._close_failed)
        sessions.busy_when(self._has_running_work)

    def _writer(self, message: Message, on_stop: Callable[[Message], None] | None = None) -> MessageWriter:
        """The writer of ``message``: the one place writers are made."""
        return MessageWriter(
            message,
            store=self._store,
            bus=self._bus,
            clock=self._clock,
            ids=self._ids,
            on_stop=on_stop,
            metrics=self._metrics,
        )

    def _has_running_work(self, tenant_id: str, session_id: str) -> bool:
        runtime = self._runtimes.get((tenant_id, session_id))
        return runtime is not None and runtime.running > 0

    def runtime(self, tenant_id: str, session_id: str) -> SessionRuntime:
        """The session's runtime, created with its internal agents on first use."""
        key = (tenant_id, session_id)
        runtime = self._runtimes.get(key)
        if runtime is None:
            scope = SessionScope(tenant_id, session_id, self._agent_services)
            agents = AgentSet.create(scope, self._classes)
            runtime = SessionRuntime(
                scope,
                agents,
                dispatches=self._dispatches.session(tenant_id, session_id, agents.executor),
                inputs=self._inputs,
                writer=self._writer,
                critic_retries=self._critic_retries,
            )
            if self._parking:
                runtime.park()
            self._runtimes[key] = runtime
        return runtime

    async def send(
        self,
        caller: Caller,
        session_id: str,
        *,
        message_id: str = "",
        role: Role = Role.USER,
        parts: tuple[Part, ...],
    ) -> tuple[Message, asyncio.Task[Message]]:
        """Accept a message and start running it; returns it (submitted) and its task."""
        caller.require(Scope.FULL)
        check_id("session_id", session_id)
        check_id("message.message_id", message_id, required=False)
        _check_parts(parts)
        metadata = parse_metadata(parts)
        if "plan" in metadata.action_data:
            parse_plan(metadata.action_data, field="message.action_data")
        if metadata.target_agent:
            check_id("message.target_agent", metadata.target_agent.partition("/")[0])
        # NotFound, or closed; the activity is written with the message (``_create``).
        await self._sessions.open_record(caller.tenant_id, session_id)
        now = self._clock.now()
        message = Message(
            tenant_id=caller.tenant_id,
            session_id=session_id,
            message_id=message_id or self._ids.new_id("msg_"),
            role=role,
            parts=parts,
            state=MessageState.SUBMITTED,
            created_at=now,
            updated_at=now,
            sender=caller.subject,
            history=(Turn(role, parts, now),),
        )
        submitted = (MessageStateChanged(message.message_id, None, MessageState.SUBMITTED),)
        here = self._ownership.sole or await self._ownership.runs_here(caller.tenant_id, session_id)
        if not here:
            return await self._hand_off(message, submitted)
        runtime = self._runtimes.get((caller.tenant_id, session_id))
        route, reads = None, ReadMemo()
        if runtime is not None and runtime.agents.orchestrator.routes_at_once:
            route = await self._route_now(runtime, message, metadata, reads)
        try:
            stored, session = await self._create(message, submitted, route=route)
        except LeaseLost:  # another replica took the session over meanwhile: it runs the message
            self._ownership.lost(caller.tenant_id, session_id)
            if await self._ownership.runs_here(caller.tenant_id, session_id):
                raise
            return await self._hand_off(message, submitted)
        closing = self._closing_reason(caller.tenant_id, session_id)
        if closing is not None:
            # Written just before the session's close: it does not start in a session that is
            # closing (it would run on after the close, or be left submitted), it ends canceled.
            return stored, asyncio.create_task(
                self._end_in_closing(stored, closing), name=f"{_AWAY}{message.message_id}"
            )
        runtime = self.runtime(caller.tenant_id, session_id)
        return stored, runtime.start(stored, metadata, session, route=route, reads=reads)

    async def _end_in_closing(self, message: Message, reason: str) -> Message:
        return await self._writer(message).state(MessageState.CANCELED, f"session closed ({reason})")

    @staticmethod
    async def _route_now(
        runtime: SessionRuntime, message: Message, metadata: MessageMetadata, reads: ReadMemo
    ) -> Route | None:
        """Where ``message`` goes, found as it is sent (the orchestrator ``routes_at_once``);
        ``None`` if routing failed: the run routes it again and ends it there, as it would have."""
        try:
            with message_reads(reads):
                return await runtime.agents.orchestrator.route(message, metadata)
        except Exception:
            return None

    async def _hand_off(
        self, message: Message, submitted: tuple[MessageStateChanged]
    ) -> tuple[Message, asyncio.Task[Message]]:
        """Write ``message`` handed to the replica that owns its session; the task follows it there
        through the session's events until it first stops."""
        tenant_id, session_id, message_id = message.tenant_id, message.session_id, message.message_id
        subscription = self._bus.subscribe(tenant_id, session_id)  # before the write: no event missed
        try:
            stored, _ = await self._create(message, submitted, hand_off=True)
        except BaseException:
            subscription.close()
            raise

        async def follow() -> Message:
            try:
                while True:
                    payload = (await subscription.next()).payload
                    if (
                        isinstance(payload, MessageStateChanged)
                        and payload.message_id == message_id
                        and payload.to_state in STOPS
                    ):
                        return payload.message or await self._stored(tenant_id, session_id, message_id)
            finally:
                subscription.close()

        task = asyncio.create_task(follow(), name=f"{_AWAY}{message_id}")
        self._away.add(task)
        task.add_done_callback(self._away.discard)
        return stored, task

    async def _create(
        self,
        message: Message,
        submitted: tuple[MessageStateChanged],
        *,
        hand_off: bool = False,
        route: Route | None = None,
    ) -> tuple[Message, Session]:
        """Insert ``message`` with its events and the session's activity (which pushes back its
        idle TTL): one store write (``hand_off``: run by the replica that owns the session).
        With ``route`` (routed as sent) it is stored working, both its state changes logged.
        Returns both as stored."""
        tenant_id, session_id = message.tenant_id, message.session_id
        store = self._store
        inserted = message if message.version == 0 else evolve(message, version=0)  # (records are immutable)
        events: tuple[MessageStateChanged, ...] = submitted
        if route is not None:
            reason = route.state_reason
            inserted = evolve(inserted, state=MessageState.WORKING, state_reason=reason)
            working = MessageStateChanged(
                message.message_id, MessageState.SUBMITTED, MessageState.WORKING, reason
            )
            events = (*submitted, working)

        async def write(session: Session) -> tuple[Session, tuple[Message, Session]]:
            async def commit(now: float) -> tuple[Changed, Sequence[Event]]:
                change = Change(
                    tenant_id,
                    session_id,
                    now,
                    sessions=(session,),
                    messages=(inserted,),
                    events=events,
                    hand_off=hand_off,
                )
                written = await store.write(change)
                return written, written.events

            written = await self._bus.commit(tenant_id, session_id, commit)
            return written.sessions[0], (written.messages[0], written.sessions[0])

        return await self._sessions.with_activity(tenant_id, session_id, write)

    async def _stored(self, tenant_id: str, session_id: str, message_id: str) -> Message:
        message = await self._store.get_message(
            tenant_id=tenant_id, session_id=session_id, message_id=message_id
        )
        assert message is not None
        return message

    async def run_handed(self, hand_off: HandOff) -> None:
        """Run a message another replica accepted for a session this one owns."""
        message = await self._store.get_message(
            tenant_id=hand_off.tenant_id, session_id=hand_off.session_id, message_id=hand_off.message_id
        )
        if message is None or message.state is not MessageState.SUBMITTED:
            return
        closing = self._closing_reason(message.tenant_id, message.session_id)
        if closing is not None:
            await self._end_in_closing(message, closing)
            return
        self.runtime(message.tenant_id, message.session_id).start(message, parse_metadata(message.parts))

    async def send_and_wait(
        self,
        caller: Caller,
        session_id: str,
        *,
        message_id: str = "",
        role: Role = Role.USER,
        parts: tuple[Part, ...],
    ) -> Message:
        """Send, then wait until the message is terminal or waits for a human (input-required).

        The caller going away does not cancel the message (use ``cancel``).
        """
        message, task = await self.send(caller, session_id, message_id=message_id, role=role, parts=parts)
        return await self.first_stop(message, task)

    async def first_stop(self, message: Message, task: asyncio.Task[Message]) -> Message:
        """``message`` (with the task ``send`` returned) when it first stops: terminal, or waiting
        for a human; wherever it runs."""
        if task.get_name().startswith(_AWAY):  # not run by a runtime here: its own task follows it
            # (handed to the owner, or ended at once as its session closes)
            return await asyncio.shield(task)
        return await self.runtime(message.tenant_id, message.session_id).stopped(message.message_id)

    async def send_streaming(
        self,
        caller: Caller,
        session_id: str,
        *,
        message_id: str = "",
        role: Role = Role.USER,
        parts: tuple[Part, ...],
    ) -> AsyncIterator[Event]:
        """Send, then yield the message's events until it is terminal or input-required."""
        caller.require(Scope.FULL)
        subscription = self._bus.subscribe(caller.tenant_id, session_id, for_client=True)
        try:
            message, _ = await self.send(caller, session_id, message_id=message_id, role=role, parts=parts)
        except BaseException:
            subscription.close()
            raise

        async def follow() -> AsyncIterator[Event]:
            try:
                while True:
                    event = await subscription.next()
                    if event.message_id != message.message_id:
                        continue
                    yield event
                    payload = event.payload
                    if isinstance(payload, MessageStateChanged) and payload.to_state in STOPS:
                        return
            finally:
                subscription.close()

        return follow()

    async def get(self, caller: Caller, session_id: str, message_id: str) -> Message:
        caller.require(Scope.READ)
        check_id("session_id", session_id)
        check_id("message_id", message_id)
        message = await self._store.get_message(
            tenant_id=caller.tenant_id, session_id=session_id, message_id=message_id
        )
        if message is None:
            raise NotFound(
                f"message {message_id!r} not found in session {session_id!r}", reason="MESSAGE_NOT_FOUND"
            )
        return message

    async def list_messages(
        self,
        caller: Caller,
        *,
        session_id: str = "",
        states: Iterable[MessageState] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> MessagePage:
        caller.require(Scope.READ)
        if session_id:
            await self._sessions.get(caller, session_id)  # NOT_FOUND for a session not there, as elsewhere
        if page_size < 0 or page_size > 500:
            raise InvalidArgument("page_size", "must be between 0 and 500")
        states = tuple(states)
        scope = PageScope("ListMessages", caller.tenant_id, (session_id, *sorted({s.value for s in states})))
        cursor = scope.cursor(page_token)
        page = await self._store.list_messages(
            tenant_id=caller.tenant_id,
            session_id=session_id,
            states=states,
            page_size=page_size or 50,
            cursor=cursor,
        )
        fit = fitting(page.messages, message_bytes)
        if fit != len(page.messages):
            # The page ends early (the store's cursor for the shorter page).
            page = await self._store.list_messages(
                tenant_id=caller.tenant_id, session_id=session_id, states=states, page_size=fit, cursor=cursor
            )
        return replace(page, next_cursor=scope.token(page.next_cursor))

    async def cancel(self, caller: Caller, session_id: str, message_id: str, *, reason: str = "") -> Message:
        """Cancel a message that has not ended; a terminal one is ``FailedPrecondition``."""
        caller.require(Scope.FULL)
        check_reason("reason", reason, limit=1024)  # as CloseSession's
        message = await self.get(caller, session_id, message_id)
        reason = reason or f"canceled by {caller.subject}"
        if message.state.terminal:
            raise FailedPrecondition(
                f"message {message_id!r} is already {message.state.value} and cannot be canceled",
                reason="MESSAGE_TERMINAL",
                metadata={"state": message.state.value},
            )
        tenant_id = caller.tenant_id
        if (
            self._ownership.sole
            or self.relay is None
            or await self._ownership.runs_here(tenant_id, session_id)
        ):
            ended = await self._cancel_here(tenant_id, session_id, message_id, reason)
        else:
            ended = await self._cancel_at_owner(tenant_id, session_id, message_id, reason)
        if ended.state is not MessageState.CANCELED:
            # It ended otherwise first (an answer let it complete while the cancel was on its way):
            # the caller is told so, never OK for a cancel that did nothing.
            raise FailedPrecondition(
                f"message {message_id!r} ended {ended.state.value} before the cancel took effect "
                "and cannot be canceled",
                reason="MESSAGE_TERMINAL",
                metadata={"state": ended.state.value},
            )
        return ended

    async def _cancel_here(self, tenant_id: str, session_id: str, message_id: str, reason: str) -> Message:
        """Cancel a message of a session this replica runs: its running work stops (the agent is
        told), or, not running (waiting for input), it ends here."""
        runtime = self._runtimes.get((tenant_id, session_id))
        canceled = await runtime.cancel(message_id, reason) if runtime else None
        if canceled is not None:
            return canceled
        current = await self._stored(tenant_id, session_id, message_id)
        if current.state.terminal:
            return current
        if current.input_request_ids:  # withdrawn first: a pending request never outlives its message
            await self._inputs.cancel_for_message(tenant_id, session_id, message_id, "message canceled")
        return await self._writer(current).state(MessageState.CANCELED, reason)

    async def _cancel_at_owner(
        self, tenant_id: str, session_id: str, message_id: str, reason: str, *, closing: bool = False
    ) -> Message:
        """Ask the replica that owns the session to cancel the message (through the relay) and
        answer with the message once it ended there. An owner that dies meanwhile is replaced by
        the next one (asked again), or by this replica if it takes the lease."""
        relay = self.relay
        assert relay is not None
        loop = asyncio.get_running_loop()
        subscription = self._bus.subscribe(tenant_id, session_id)  # before asking: no event missed
        try:
            deadline = loop.time() + _CANCEL_WAIT_S
            asked, asked_at = "", 0.0
            while True:
                current = await self._stored(tenant_id, session_id, message_id)
                if current.state.terminal:
                    return current
                if await self._ownership.runs_here(tenant_id, session_id):
                    return await self._cancel_here(tenant_id, session_id, message_id, reason)
                owner = await self._ownership.owner_of(tenant_id, session_id)
                if owner and (owner != asked or loop.time() >= asked_at + _CANCEL_RESEND_S):
                    item = Relayed(
                        RelayKind.END_FOR_CLOSE if closing else RelayKind.CANCEL_MESSAGE,
                        "",
                        relay.replica_id,
                        reason=reason,
                        tenant_id=tenant_id,
                        session_id=session_id,
                        message_id=message_id,
                    )
                    await relay.send(owner, item)
                    asked, asked_at = owner, loop.time()
                left = deadline - loop.time()
                if left <= 0:
                    raise Unavailable(
                        f"the replica running session {session_id!r} did not end message {message_id!r} "
                        "in time; it may still end it",
                        reason="CANCEL_NOT_CONFIRMED",
                        metadata={"session_id": session_id, "message_id": message_id},
                    )
                ended = await self._ended(subscription, message_id, min(left, _CANCEL_RECHECK_S))
                if ended is not None:
                    return ended
        finally:
            subscription.close()

    async def _ended(self, subscription: Subscription, message_id: str, within_s: float) -> Message | None:
        """The message once an event says it ended, within ``within_s``; ``None`` otherwise."""
        try:
            async with asyncio.timeout(within_s):
                while True:
                    event = await subscription.next()
                    payload = event.payload
                    if (
                        isinstance(payload, MessageStateChanged)
                        and payload.message_id == message_id
                        and payload.to_state.terminal
                    ):
                        return payload.message or await self._stored(
                            event.tenant_id, event.session_id, message_id
                        )
        except TimeoutError:
            return None
        except MeshError:  # cut off (too far behind) or ended: the store is read instead
            await asyncio.sleep(within_s)
            return None

    def cancel_asked(self, item: Relayed) -> None:
        """Another replica was asked to cancel a message of a session this one owns (the relay
        calls this): cancel it here, where it runs."""
        task = asyncio.create_task(self._cancel_asked(item), name="svantic-cancel-asked")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel_asked(self, item: Relayed) -> None:
        tenant_id, session_id, message_id = item.tenant_id, item.session_id, item.message_id
        try:
            if not await self._ownership.runs_here(tenant_id, session_id):
                return  # moved on: the asking replica asks the new owner
            await self._cancel_here(tenant_id, session_id, message_id, item.reason)
        except MeshError:
            return  # ended meanwhile, or gone: the asking replica reads what happened
        except Exception:  # the store unreachable, a bug: logged; the asking replica asks again
            _log.exception("cancel of message %s asked by replica %s failed", message_id, item.sender)

    async def recover(
        self,
        *,
        messages: Sequence[Message] | None = None,
        handed: Collection[tuple[str, str, str]] = (),
    ) -> tuple[int, int]:
        """At start-up (or on taking sessions over: their unfinished ``messages``): fail what was
        running when the server stopped; go on waiting where a human was asked; run what was
        ``handed`` to the former owner and not started yet. Returns (interrupted, resumed)."""
        interrupted = resumed = 0
        for message in await self._store.unfinished_messages() if messages is None else messages:
            key = (message.tenant_id, message.session_id, message.message_id)
            if message.state is MessageState.SUBMITTED and key in handed:
                self.runtime(message.tenant_id, message.session_id).start(
                    message, parse_metadata(message.parts)
                )
                continue
            if message.state is MessageState.INPUT_REQUIRED and message.input_request_ids:
                self.runtime(message.tenant_id, message.session_id).resume(message)
                resumed += 1
                continue
            if message.input_request_ids:  # what it asked a human is withdrawn before it fails
                await self._inputs.cancel_for_message(
                    message.tenant_id, message.session_id, message.message_id, "message failed"
                )
            await self._writer(message).state(
                MessageState.FAILED, "interrupted: the server stopped while this message ran"
            )
            interrupted += 1
        return interrupted, resumed

    async def abandon(self, tenant_id: str, session_id: str) -> None:
        """Another replica took the session over: its work here stops (what it still tries to
        write is refused, the new owner recovers the messages)."""
        runtime = self._runtimes.pop((tenant_id, session_id), None)
        if runtime is not None:
            await runtime.abandon()

    def begin_stop(self) -> None:
        """The server is stopping: messages waiting for a human stay as they are (see
        ``SessionRuntime.parking``); what runs is cancelled by ``close``."""
        self._parking = True
        for runtime in self._runtimes.values():
            runtime.park()

    async def close(self, reason: str = "the server is shutting down") -> None:
        """Cancel all running work (server shutdown)."""
        for task in list(self._away):
            task.cancel()
        for cancel in list(self._cancels):
            cancel.cancel()
        for key in list(self._runtimes):
            runtime = self._runtimes.pop(key)
            try:
                await runtime.close(reason)
            except LeaseLost:  # taken over before this replica noticed: the new owner ends its messages
                self._ownership.lost(*key)
                await runtime.abandon()

    async def _session_closing(self, tenant_id: str, session_id: str, reason: str) -> None:
        key = (tenant_id, session_id)
        # A message sent while the close goes on (written before the session is) ends canceled
        # instead of starting (``send``); remembered for a minute, well past the close's write.
        # Those remembered longer go as the next close comes (no timer per close).
        # Taken from a deque's head, not the dict's first key: a dict whose oldest keys were deleted
        # skips over their empty slots on every look at its first one (until it is resized), and
        # under steady churn a minute's closes are ~60,000 keys.
        now = asyncio.get_running_loop().time()
        closing, order = self._closing, self._closing_order
        while order and order[0][0] <= now:
            until, oldest = order.popleft()
            entry = closing.get(oldest)
            if entry is not None and entry[1] == until:  # not closed again since
                del closing[oldest]
        until = now + _CLOSING_S
        closing[key] = (reason, until)
        order.append((until, key))
        runtime = self._runtimes.pop(key, None)
        if runtime is not None:
            await runtime.close(f"session closed ({reason})")
        elif self.relay is not None:
            owner = await self._ownership.owner_of(tenant_id, session_id)
            if owner and owner != self.relay.replica_id:
                await self._end_at_owner(tenant_id, session_id, f"session closed ({reason})")

    def _closing_reason(self, tenant_id: str, session_id: str) -> str | None:
        """Why the session is being closed here, if it is (within the last ``_CLOSING_S``)."""
        entry = self._closing.get((tenant_id, session_id))
        if entry is None or entry[1] <= asyncio.get_running_loop().time():
            return None
        return entry[0]

    def _close_failed(self, tenant_id: str, session_id: str) -> None:
        """The close was not written (the session is open): messages sent to it start again."""
        self._closing.pop((tenant_id, session_id), None)

    async def _end_at_owner(self, tenant_id: str, session_id: str, reason: str) -> None:
        """A close on a replica that does not own the session: the owner cancels the session's
        unfinished messages (through the relay, as ``CancelMessage`` here would) before the close
        is written, so none of them runs on after the close. An owner that does not answer within
        ``_CLOSE_WAIT_S`` ends them when it sees the session closed (at its next renewal)."""
        page = await self._store.list_messages(
            tenant_id=tenant_id, session_id=session_id, states=_UNFINISHED, page_size=500
        )
        if not page.messages:
            return
        cancels = [
            self._cancel_at_owner(tenant_id, session_id, m.message_id, reason, closing=True)
            for m in page.messages
        ]
        try:
            async with asyncio.timeout(_CLOSE_WAIT_S):
                await asyncio.gather(*cancels, return_exceptions=True)
        except TimeoutError:
            _log.warning(
                "the owner of session %s did not end its messages within %gs of its close here; "
                "it ends them at its next renewal",
                session_id,
                _CLOSE_WAIT_S,
            )


def _check_parts(parts: tuple[Part, ...]) -> None:
    if not parts:
        raise InvalidArgument("message.parts", "needs at least one part")
    if len(parts) > MAX_PARTS:
        raise InvalidArgument("message.parts", f"has {len(parts)} parts; at most {MAX_PARTS}")
    total = check_parts(parts, "message.parts")
    if total > MAX_TOTAL_BYTES:
        raise InvalidArgument("message.parts", f"carry {total} bytes; at most {MAX_TOTAL_BYTES}")
