"""A session's running work: its internal agents and the tasks of its messages.

Each message runs in a task owned by its session's runtime. The run routes it
(orchestrator), carries it out (a plan from the planner, signed off when a plan policy
says so; a dispatch by the core's ``Dispatches``; or the chat), reviews it (critic) and
learns from it (learner). Cancelling the task cancels the message; closing the session
cancels them all. A failure in one message, or one session, stays there.

The message's metadata is parsed once, when it is sent (or once when it resumes after a
restart), and travels with the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

from svantic_grpc.core._reads import ReadMemo, forget_reads, message_reads, remember_session
from svantic_grpc.core._tasks import deferring, run_deferred
from svantic_grpc.core.agents import AgentSet, Route, SessionScope
from svantic_grpc.core.dispatch import (
    CANCEL_REASONS,
    Outcome,
    SessionDispatches,
    input_outcome,
    plan_refusal,
    sign_off_plan,
)
from svantic_grpc.core.errors import MeshError, Unavailable
from svantic_grpc.core.inputs.model import InputKind, PlanItem
from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.messages.model import (
    Message,
    MessageMetadata,
    MessageState,
    Part,
    Role,
    parse_metadata,
)
from svantic_grpc.core.messages.writer import MessageWriter
from svantic_grpc.core.models import Session

__all__ = ["SessionRuntime", "WriterFactory"]

WriterFactory = Callable[[Message, Callable[[Message], None] | None], MessageWriter]
"""Makes the writer of a message, with what to call when it stops (``Messages`` holds the one)."""

_log = logging.getLogger(__name__)

_END_ATTEMPTS = 3
"""How many cancels a message's ending outlasts (a close and a CancelMessage may both come)."""

#: The states a waiting sender is released at.
STOPS = frozenset({MessageState.INPUT_REQUIRED}) | {s for s in MessageState if s.terminal}


class SessionRuntime:
    """Runs the messages of one session."""

    def __init__(
        self,
        scope: SessionScope,
        agents: AgentSet,
        *,
        dispatches: SessionDispatches,
        inputs: Inputs,
        writer: WriterFactory,
        critic_retries: int,
    ) -> None:
        self.scope = scope
        self.agents = agents
        self._dispatches = dispatches
        self._inputs = inputs
        self._new_writer = writer
        self._critic_retries = critic_retries
        self._tasks: dict[str, asyncio.Task[Message]] = {}
        self._cancel_reasons: dict[str, str] = {}
        self._stops: dict[str, list[asyncio.Future[Message]]] = {}
        """Per running message that has not stopped yet: the futures of those waiting for it to
        stop (``stopped``), each its own: a waiter that goes away cancels only its own future."""
        self._begun: set[str] = set()
        """Messages whose run has taken its first step."""
        self._canceled_early: set[str] = set()
        """Messages canceled before their run began: it ends them canceled at once."""
        self._closed = False
        self.parking = False
        """The server is stopping: a message cancelled while it waits for a human is left in the
        store as it is (input-required, its request pending), as a crash leaves it, for the next
        start to resume; only work that runs is ended."""

    def start(
        self,
        message: Message,
        metadata: MessageMetadata,
        session: Session | None = None,
        *,
        route: Route | None = None,
        reads: ReadMemo | None = None,
    ) -> asyncio.Task[Message]:
        """Run ``message`` in the background; the task's result is the message where it ended.

        Args:
            session: As stored with the message: read from there by the run's first step.
            route: Where the message was routed as it was sent (it was stored working): the run
                carries it out without routing it again.
            reads: What that routing read, for the run's first step.
        """
        return self._spawn(message, self._run(message, metadata, session, route, reads))

    def resume(self, message: Message) -> asyncio.Task[Message]:
        """After a restart: wait for the human answer the message waits on, then carry on with it."""
        return self._spawn(message, self._resume(message))

    def _spawn(self, message: Message, work: Coroutine[Any, Any, Message]) -> asyncio.Task[Message]:
        message_id = message.message_id
        self._stops[message_id] = []
        context = contextvars.copy_context()
        context.run(CANCEL_REASONS.set, self._cancel_reasons)  # the agent is told why, if cancelled
        task = asyncio.create_task(work, name=f"message-{message_id}", context=context)
        self._tasks[message_id] = task

        def finished(_: object) -> None:
            self._tasks.pop(message_id, None)
            self._begun.discard(message_id)
            self._canceled_early.discard(message_id)
            waiters = self._stops.pop(message_id, ())
            if task.cancelled() or self._closed:  # taken over by another replica, or the server stopping
                error: Exception = Unavailable(
                    f"message {message_id!r} stopped running here before it ended (its session "
                    "moved to another replica, or the server is stopping); GetMessage shows how it ends",
                    reason="MESSAGE_INTERRUPTED",
                    metadata={"message_id": message_id},
                )
            else:
                error = RuntimeError(f"message {message_id} ended without a final state")
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
                    waiter.exception()  # whoever waits on it is told; nobody waiting is no error of its own

        task.add_done_callback(finished)
        return task

    async def stopped(self, message_id: str) -> Message:
        """The message when it first stops: terminal, or waiting for a human (input-required)."""
        waiters = self._stops.get(message_id)
        if waiters is None:
            task = self._tasks.get(message_id)
            if task is None:
                raise RuntimeError(f"message {message_id} is not running here")
            return await asyncio.shield(task)
        # A future of this caller's own, set by ``_stopped``: awaited without a shield (one hop
        # of the event loop fewer per message); cancelling the caller cancels only it.
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        return await waiter

    def _stopped(self, message: Message) -> None:
        for waiter in self._stops.pop(message.message_id, ()):
            if not waiter.done():
                waiter.set_result(message)

    def task(self, message_id: str) -> asyncio.Task[Message] | None:
        return self._tasks.get(message_id)

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def cancel(self, message_id: str, reason: str) -> Message | None:
        """Cancel a running message; ``None`` if it is not running here."""
        task = self._tasks.get(message_id)
        if task is None:
            return None
        self._cancel_reasons[message_id] = reason
        if message_id not in self._begun:
            # Not begun yet: a task cancelled before its first step runs none of its code and
            # would leave the message as it was sent. It ends canceled at its first step instead.
            self._canceled_early.add(message_id)
        else:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await asyncio.shield(task)
        return None

    async def _canceled_before_start(self, message: Message, writer: MessageWriter) -> Message | None:
        """At a run's first step: the message canceled (``cancel``) before it began, else ``None``."""
        message_id = message.message_id
        self._begun.add(message_id)
        if message_id not in self._canceled_early:
            return None
        self._canceled_early.discard(message_id)
        return await writer.state(MessageState.CANCELED, self._cancel_reasons.pop(message_id, "canceled"))

    def park(self) -> None:
        """The server is stopping (see ``parking``)."""
        self.parking = True

    async def close(self, reason: str) -> None:
        """Cancel every running message and close the internal agents; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            for message_id in list(self._tasks):
                try:
                    await self.cancel(message_id, reason)
                except Exception:  # one message's failed last write must not leave the others running
                    _log.exception("message %s did not end cleanly as its session closed", message_id)
        finally:
            await self.agents.close()

    async def abandon(self) -> None:
        """Stop every running message without caring how its last writes fare (another replica
        owns the session now and refuses them), and close the internal agents."""
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.agents.close()

    def _writer(self, message: Message) -> MessageWriter:
        return self._new_writer(message, self._stopped)

    async def _run(
        self,
        message: Message,
        metadata: MessageMetadata,
        session: Session | None,
        routed: Route | None,
        reads: ReadMemo | None,
    ) -> Message:
        writer = self._writer(message)
        if (canceled := await self._canceled_before_start(message, writer)) is not None:
            return canceled

        async def work() -> Outcome:
            route = routed
            if route is None:
                route = await self.agents.orchestrator.route(writer.message, metadata)
                await writer.state(MessageState.WORKING, route.state_reason)
            return await self._carry_out(writer, route, metadata)

        with message_reads(reads):  # what routing reads, the dispatch or the chat does not read again
            if session is not None:
                remember_session(session)
            return await self._guarded(writer, work)

    async def _resume(self, message: Message) -> Message:
        writer = self._writer(message)
        if (canceled := await self._canceled_before_start(message, writer)) is not None:
            return canceled

        async def work() -> Outcome:
            metadata = parse_metadata(message.parts)  # accepted when sent; this process had not read it
            ended = await self._inputs.wait(message.tenant_id, message.input_request_ids[-1])
            settled = input_outcome(ended)
            if not settled.goes_on:
                return Outcome(settled.state, settled.reason)
            if ended.kind is InputKind.PLAN_APPROVAL:
                refused = plan_refusal(ended)
                if refused is not None:
                    return refused
                await writer.state(MessageState.WORKING, f"{settled.reason} (after a restart)")
                return await self._run_plan(writer, metadata, signed_off=True)
            # The message stays input-required until the agent has the answer (the dispatch then
            # marks it working): a crash before that resumes it again instead of failing it.
            return await self._dispatches.run(
                writer,
                agent_type=message.agent_type,
                instance_id=message.instance_id,
                yolo=metadata.yolo_mode,
                resume=ended,
            )

        return await self._guarded(writer, work)

    async def _guarded(self, writer: MessageWriter, work: Callable[[], Awaitable[Outcome]]) -> Message:
        """Run ``work`` and write how the message ended, whatever happens: failures stay in it.
        What the run left for after its end (``core._tasks.after_stop``) runs once it is written,
        behind its sender's answer."""
        pending, token = deferring()
        try:
            message = writer.message
            try:
                outcome = await work()
                state, reason = outcome.state, outcome.reason
            except asyncio.CancelledError:
                if self.parking and writer.message.state is MessageState.INPUT_REQUIRED:
                    raise  # left waiting for its human: the restart resumes it
                reason = self._cancel_reasons.pop(message.message_id, "canceled")
                state = MessageState.CANCELED
            except MeshError as error:
                state, reason = MessageState.FAILED, error.message
            except Exception as error:  # keep the failure inside this message
                _log.exception("message %s failed unexpectedly", message.message_id)
                state, reason = MessageState.FAILED, f"internal error: {type(error).__name__}"
            # A cancel (a close, CancelMessage) that comes while the message is being ended does not
            # cut the ending short, which would leave it working for ever: the ending goes on (each
            # of its steps is a no-op once done; a write cut off has landed, see ``MessageWriter``),
            # and the late cancel finds the message ended. No task of its own: this runs for every
            # message.
            for attempt in range(_END_ATTEMPTS):
                try:
                    ended = await self._end(writer, state, reason)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if attempt == _END_ATTEMPTS - 1 or task is None:
                        raise
                    task.uncancel()
                    continue
                if attempt:
                    self._stopped(ended)  # the cut-off write may have landed before it told the sender
                return ended
            raise AssertionError("unreachable")
        finally:
            run_deferred(pending, token)

    async def _end(self, writer: MessageWriter, state: MessageState, reason: str) -> Message:
        message = writer.message
        if message.input_request_ids:
            await writer.flush()  # what the agent sent with its end comes before the withdrawal
            # Withdraw what nobody answered before the message ends: the message will not use it,
            # and a crash between the two writes never leaves a request pending for an ended message.
            await self._inputs.cancel_for_message(
                message.tenant_id, message.session_id, message.message_id, f"message {state.value}"
            )
        return await writer.state(state, reason)

    async def _carry_out(self, writer: MessageWriter, route: Route, metadata: MessageMetadata) -> Outcome:
        if route.agent_type == "savant:planner":
            return await self._run_plan(writer, metadata)
        return await self._run_route(writer, route, yolo=metadata.yolo_mode)

    async def _run_route(
        self, writer: MessageWriter, route: Route, parts: tuple[Part, ...] = (), *, yolo: bool
    ) -> Outcome:
        if route.internal:
            if route.agent_type != "savant:chat":
                return Outcome(
                    MessageState.REJECTED,
                    f"{route.agent_type} does not take messages; "
                    "target savant:chat or a remote agent, or send a plan",
                )
            chat = self.agents.chat
            await writer.assign(chat.agent_type, chat.instance_id)
            said = await chat.answer(replace(writer.message, parts=parts) if parts else writer.message)
            # Held: written with the message's end (or before the next plan step), one write for both.
            await writer.turn(said, instance_id=chat.instance_id, hold=True)
            return Outcome(MessageState.COMPLETED, "", chat.agent_type, chat.instance_id, said)
        attempts = self._critic_retries + 1
        for attempt in range(attempts):
            # A previous dispatch's last words (a retry, an earlier plan step) are logged before
            # this one starts (its agent joining the session is an event too).
            await writer.flush()
            outcome = await self._dispatches.run(
                writer,
                agent_type=route.agent_type,
                instance_id=route.instance_id,
                skill_id=route.skill.id if route.skill else "",
                yolo=yolo,
                parts=parts,
            )
            forget_reads()  # a retry or the next plan step reads the agents afresh
            await self.agents.learner.learn(outcome, route.skill)
            if outcome.state is not MessageState.COMPLETED:
                return outcome
            verdict = await self.agents.critic.review(outcome, route.skill)
            if verdict.ok:
                return outcome
            if attempt + 1 == attempts:
                return Outcome(MessageState.FAILED, verdict.reason, outcome.agent_type, outcome.instance_id)
            _log.info("retrying message %s: %s", writer.message.message_id, verdict.reason)
        raise AssertionError("unreachable")

    async def _run_plan(
        self, writer: MessageWriter, metadata: MessageMetadata, *, signed_off: bool = False
    ) -> Outcome:
        steps = await self.agents.planner.plan(metadata.action_data)
        if not signed_off:
            plan = tuple(PlanItem(step.text, step.agent_type) for step in steps)
            forget_reads()  # a human may take minutes: the steps read the agents afresh
            refused = await sign_off_plan(self._inputs, writer, plan, yolo=metadata.yolo_mode)
            if refused is not None:
                return refused
        outcome = Outcome(MessageState.COMPLETED)
        for index, step in enumerate(steps, start=1):
            route = await self._step_route(step.agent_type, step.instance_id, step.text)
            outcome = await self._run_route(writer, route, (Part(text=step.text),), yolo=metadata.yolo_mode)
            if outcome.state is not MessageState.COMPLETED:
                reason = f"plan step {index}/{len(steps)} ({step.agent_type}): {outcome.reason}"
                return Outcome(outcome.state, reason, outcome.agent_type, outcome.instance_id)
        return Outcome(
            MessageState.COMPLETED,
            f"plan of {len(steps)} steps done",
            outcome.agent_type,
            outcome.instance_id,
        )

    async def _step_route(self, agent_type: str, instance_id: str, text: str) -> Route:
        step_metadata = MessageMetadata(
            target_agent=f"{agent_type}/{instance_id}" if instance_id else agent_type
        )
        scope = self.scope
        probe = Message(
            scope.tenant_id, scope.session_id, "", Role.USER, (Part(text=text),), MessageState.SUBMITTED, 0, 0
        )
        route = await self.agents.orchestrator.route(probe, step_metadata)
        if route.agent_type != agent_type or (instance_id and route.instance_id != instance_id):
            # The plan, as policies judged it and a human signed it off, names its agents: the
            # orchestrator may find the step's skill, not send the step elsewhere.
            skill = route.skill if route.agent_type == agent_type else None
            return Route(agent_type, instance_id, skill, why="plan step")
        return route
