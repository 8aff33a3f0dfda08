"""A message's core events as the A2A events of its task (``message/stream``, ``tasks/resubscribe``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace

from a2a.server.events.event_queue import Event as A2AEvent
from a2a.types import TaskArtifactUpdateEvent, TaskStatus, TaskStatusUpdateEvent

from svantic_grpc.a2a.convert import TASK_STATE, artifact_to_a2a, status_of, task_of, timestamp, turn_to_a2a
from svantic_grpc.core.events import ArtifactAdded, Event, MessageStateChanged, TurnAdded
from svantic_grpc.core.inputs.model import InputRequest
from svantic_grpc.core.messages.model import Message, MessageState, Role

__all__ = ["task_events"]


async def task_events(
    message: Message,
    events: AsyncIterator[Event],
    requests: Callable[[Message], Awaitable[Sequence[InputRequest]]],
    *,
    stop_at_input: bool,
    replay: bool = False,
    answered: bool = False,
) -> AsyncIterator[A2AEvent]:
    """``message``'s events among ``events`` as A2A events, until it ends (or, with ``stop_at_input``,
    waits for a human).

    Args:
        message: The message (any snapshot: its id, session and first turn are used).
        events: The session's events (live, or replayed from the log then live).
        requests: What a message snapshot waits on, for an input-required status.
        stop_at_input: End at input-required (``message/stream``) or follow through it.
        replay: The events start at the message's creation: yield the task as it was created.
        answered: The events follow an answer to what the message waits on: those before it leaves
            input-required are from before the answer (a replica that does not own the session may
            hear of the question itself after the answer was given) and are left out.
    """
    task_id, context_id = message.message_id, message.session_id
    state = TASK_STATE[message.state]
    async for event in events:
        if event.message_id != task_id:
            continue
        payload = event.payload
        if answered:
            if (
                not isinstance(payload, MessageStateChanged)
                or payload.from_state is not MessageState.INPUT_REQUIRED
            ):
                continue
            answered = False
        if isinstance(payload, MessageStateChanged):
            state = TASK_STATE[payload.to_state]
            if payload.from_state is None:
                if replay:
                    created = replace(message, state=MessageState.SUBMITTED, history=message.history[:1])
                    yield task_of(replace(created, artifacts=(), updated_at=event.time))
                continue
            snapshot = payload.message
            if snapshot is not None:
                status = status_of(snapshot, await requests(snapshot))
            else:
                status = TaskStatus(state=state, timestamp=timestamp(event.time))
            yield TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=status)
            if payload.to_state.terminal:
                return
            if payload.to_state is MessageState.INPUT_REQUIRED and stop_at_input:
                return
        elif isinstance(payload, ArtifactAdded):
            yield TaskArtifactUpdateEvent(
                task_id=task_id,
                context_id=context_id,
                artifact=artifact_to_a2a(payload.artifact),
                last_chunk=True,
            )
        elif isinstance(payload, TurnAdded) and payload.turn.role is Role.AGENT:
            said = turn_to_a2a(payload.turn, task_id, context_id, event.sequence)
            status = TaskStatus(state=state, message=said, timestamp=timestamp(event.time))
            yield TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=status)
