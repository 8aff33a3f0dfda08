"""The mesh as one A2A agent: a2a-sdk's ``RequestHandler`` backed by the mesh core.

Every binding (JSON-RPC 0.3 and 1.0, REST, gRPC) calls this one handler. It keeps
no task store of its own: a task is a mesh message, read from and written to the
core, so answers given on any surface (Slack, webhooks, gRPC, chat) are seen here.

- The session is ``configuration.sessionId`` (the product's form, kept by the HTTP
  bindings in ``state[SESSION_HINT]``), else ``metadata.sessionId`` of the request,
  else the message's ``contextId``; with none, a new session is opened for the
  caller (self-joined, like ``InitSession``) and its id returned as ``contextId``.
- The caller is the mesh's own bearer token, verified by the binding
  (``state[CALLER]``): the same scopes and tenancy as over gRPC.
- A message carrying the ``taskId`` of a task waiting for a human answers it
  (surface ``a2a``; the first answer on any surface wins).
- ``tasks/resubscribe`` replays the task's events from the session log, then follows them
  live until the task ends (through any wait for a human, answered on any surface).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event as A2AEvent
from a2a.server.request_handlers.request_handler import RequestHandler, validate_request_params
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
)
from a2a.types import Message as A2AMessage
from a2a.types import Role as A2ARole
from a2a.utils.errors import A2AError, InvalidRequestError, UnsupportedOperationError
from google.protobuf import json_format

from svantic_grpc.a2a._events import task_events
from svantic_grpc.a2a.answers import answer_from
from svantic_grpc.a2a.convert import (
    TASK_STATE,
    parts_from_a2a,
    task_of,
)
from svantic_grpc.a2a.errors import to_a2a_error
from svantic_grpc.core._validate import json_bytes
from svantic_grpc.core.auth import Caller
from svantic_grpc.core.errors import InvalidArgument, MeshError, NotFound
from svantic_grpc.core.events import Event, MessageStateChanged
from svantic_grpc.core.inputs.model import InputRequest, InputState, Surface
from svantic_grpc.core.mesh import Mesh
from svantic_grpc.core.messages.model import Message, MessageState, Role
from svantic_grpc.core.messages.runtime import STOPS

__all__ = ["CALLER", "SESSION_HINT", "MeshRequestHandler"]

CALLER = "svantic.caller"
"""``ServerCallContext.state`` key of the verified ``Caller``, set by each binding."""
SESSION_HINT = "svantic.session_id"
"""``ServerCallContext.state`` key of ``configuration.sessionId`` from the raw JSON body."""
_CARD_MAX_BYTES = 2 * 1024 * 1024
"""The extended card lists the registered agents' skills up to about this many bytes."""
_INDEX = "a2a"
"""Namespace of the task id -> session index in the store's key-value seam: A2A names a task by
its id alone, the mesh a message by session and id. Written once per message sent over A2A."""

_NO_PUSH = (
    "push notifications are not supported by this agent; follow a task with message/stream "
    "or tasks/resubscribe instead"
)


class MeshRequestHandler(RequestHandler):
    """A2A requests, carried out by the mesh core.

    Args:
        mesh: The core.
        card: The public agent card as it is now (its URLs are known once the ports are bound).
    """

    def __init__(self, mesh: Mesh, card: Callable[[], AgentCard]) -> None:
        self._mesh = mesh
        self._card = card

    # Sending

    @validate_request_params
    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Task | A2AMessage:
        caller = _caller(context)
        _refuse_push(params)
        history = _history_length(params.configuration, "history_length")
        with _mapped():
            if params.message.task_id:
                message = await self._follow_up(caller, params, context)
                # subscribed before answering, so no state the answer leads to is missed
                follow = self._mesh.bus.subscribe(caller.tenant_id, message.session_id)
                try:
                    await self._answer(caller, message, params.message)
                    if params.configuration.return_immediately:
                        return await self._task(caller, await self._get(caller, message), history)
                    # Until the message leaves input-required, a state change is one from before the
                    # answer (on a replica that does not own the session, the bell of the question
                    # itself may ring after this subscription began).
                    left = False
                    while True:
                        event = await follow.next()
                        payload = event.payload
                        if (
                            not isinstance(payload, MessageStateChanged)
                            or payload.message_id != message.message_id
                        ):
                            continue
                        left = left or payload.from_state is MessageState.INPUT_REQUIRED
                        if left and payload.to_state in STOPS:
                            break
                finally:
                    follow.close()
                return await self._task(caller, await self._get(caller, message), history)
            session_id, field = await self._session_for(caller, params, context)
            message, task = await self._send(caller, session_id, field, params.message)
            if not params.configuration.return_immediately:
                message = await self._mesh.messages.first_stop(message, task)
            return await self._task(caller, message, history)

    @validate_request_params
    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[A2AEvent]:
        caller = _caller(context)
        _refuse_push(params)
        with _mapped():
            if params.message.task_id:
                message = await self._follow_up(caller, params, context)
                subscription = self._mesh.bus.subscribe(caller.tenant_id, message.session_id, for_client=True)
                try:
                    await self._answer(caller, message, params.message)
                except BaseException:
                    subscription.close()
                    raise
                first: Message | None = None
            else:
                session_id, field = await self._session_for(caller, params, context)
                subscription = self._mesh.bus.subscribe(caller.tenant_id, session_id, for_client=True)
                try:
                    message, _ = await self._send(caller, session_id, field, params.message)
                except BaseException:
                    subscription.close()
                    raise
                first = message
        try:
            if first is not None:
                yield task_of(first, history_length=None)

            async def live() -> AsyncIterator[Event]:
                while True:
                    yield await subscription.next()

            with _mapped():  # a stream cut off (server shutdown, too slow a reader) ends as an A2A error
                async for event in task_events(
                    message, live(), self._requests, stop_at_input=True, answered=first is None
                ):
                    yield event
        finally:
            subscription.close()

    # Reading and following

    @validate_request_params
    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        caller = _caller(context)
        history = _history_length(params, "history_length")
        with _mapped():
            message = await self._locate(caller, params.id)
            return await self._task(caller, message, history)

    @validate_request_params
    async def on_list_tasks(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        caller = _caller(context)
        states = [s for s, a in TASK_STATE.items() if a == params.status] if params.status else []
        if params.status and not states:  # a state no mesh message is ever in: none has it
            return ListTasksResponse(tasks=[], next_page_token="", page_size=0)
        with _mapped():
            try:
                page = await self._mesh.messages.list_messages(
                    caller,
                    session_id=params.context_id,
                    states=states,
                    page_size=params.page_size,
                    page_token=params.page_token,
                )
            except NotFound:  # a context that is not there (or another tenant's) has no tasks
                return ListTasksResponse(tasks=[], next_page_token="", page_size=0)
        history = _history_length(params, "history_length")
        return ListTasksResponse(
            tasks=[task_of(m, history_length=history) for m in page.messages],
            next_page_token=page.next_cursor,
            page_size=len(page.messages),
        )

    @validate_request_params
    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[A2AEvent]:
        caller = _caller(context)
        with _mapped():
            message = await self._locate(caller, params.id)
            events = await self._mesh.sessions.watch(caller, message.session_id)

        # Unlike message/stream, a wait for a human does not end it: whoever answers, on any
        # surface, the subscriber sees the task go on, until it ends.
        with _mapped():
            async for event in task_events(message, events, self._requests, stop_at_input=False, replay=True):
                yield event

    @validate_request_params
    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task | None:
        caller = _caller(context)
        with _mapped():
            message = await self._locate(caller, params.id)
            canceled = await self._mesh.messages.cancel(caller, message.session_id, message.message_id)
            return await self._task(caller, canceled, None)

    # Cards

    async def on_get_extended_agent_card(
        self, params: GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> AgentCard:
        """The public card plus the skills of the caller's tenant's registered agents."""
        caller = _caller(context)
        card = AgentCard()
        card.CopyFrom(self._card())
        with _mapped():
            agents = await self._mesh.registry.list_agents(caller)
        seen: set[str] = set()
        carried = card.ByteSize()
        for agent in sorted(agents, key=lambda a: (a.agent_type, a.instance_id)):
            for skill in agent.skills:
                skill_id = f"{agent.agent_type}/{skill.id}"
                if skill_id in seen:
                    continue
                seen.add(skill_id)
                carried += json_bytes(skill) + len(skill_id)
                if carried > _CARD_MAX_BYTES:
                    return card  # readable with gRPC's default 4 MB receive limit, as every answer
                card.skills.add(
                    id=skill_id,
                    name=skill.name or skill.id,
                    description=skill.description or f"{skill.name or skill.id} ({agent.agent_type})",
                    tags=[agent.agent_type, *skill.tags],
                    examples=list(skill.examples),
                    input_modes=list(skill.input_modes),
                    output_modes=list(skill.output_modes),
                )
        return card

    # Push notifications: refused, never a crash

    async def on_create_task_push_notification_config(
        self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        raise UnsupportedOperationError(_NO_PUSH)

    async def on_get_task_push_notification_config(
        self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        raise UnsupportedOperationError(_NO_PUSH)

    async def on_list_task_push_notification_configs(
        self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> ListTaskPushNotificationConfigsResponse:
        raise UnsupportedOperationError(_NO_PUSH)

    async def on_delete_task_push_notification_config(
        self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        raise UnsupportedOperationError(_NO_PUSH)

    # Helpers

    async def _session_for(
        self, caller: Caller, params: SendMessageRequest, context: ServerCallContext
    ) -> tuple[str, str]:
        """The session to send in, and the request field that named it ("" for a new one)."""
        named = _named_session(params, context)
        if named is not None:
            return named
        session = await self._mesh.sessions.init(
            caller,
            self_agent_type=caller.agent_type or "a2a-client",
            self_instance_id=f"a2a-{caller.subject}",
        )
        return session.session_id, ""

    async def _send(
        self, caller: Caller, session_id: str, field: str, sent: A2AMessage
    ) -> tuple[Message, Any]:
        role = Role.AGENT if sent.role == A2ARole.ROLE_AGENT else Role.USER
        if sent.message_id:
            # Its id becomes the task's, which A2A names alone (tasks/get, a follow-up without a
            # context): one task per id in the tenant, never two in two contexts.
            indexed = await self._mesh.store.get_adapter_value(_INDEX, _index_key(caller, sent.message_id))
            if indexed is not None and indexed.get("session_id") != session_id:
                raise InvalidArgument(
                    "message.message_id",
                    f"{sent.message_id!r} is already the id of a task in another context; "
                    "give each message its own id",
                )
        try:
            result = await self._mesh.messages.send(
                caller,
                session_id,
                message_id=sent.message_id,
                role=role,
                parts=parts_from_a2a(sent.parts),
            )
        except InvalidArgument as error:
            if error.field == "session_id":  # named as the caller named it
                raise InvalidArgument(field, error.description) from None
            raise
        except NotFound as error:
            if error.reason == "SESSION_NOT_FOUND":
                raise InvalidArgument(
                    field or "message.context_id", f"session {session_id!r} not found"
                ) from None
            raise
        await self._mesh.store.put_adapter_value(
            _INDEX,
            _index_key(caller, result[0].message_id),
            {"session_id": session_id},
            session=(caller.tenant_id, session_id),
        )
        return result

    async def _follow_up(
        self, caller: Caller, params: SendMessageRequest, context: ServerCallContext
    ) -> Message:
        """The task a message with a ``taskId`` continues. A session the request also names must be
        the task's: an answer meant for another conversation is refused, never given here."""
        task_id = params.message.task_id
        named = _named_session(params, context)
        if named is None:
            return await self._locate(caller, task_id, field="message.task_id")
        # Within the context it names: a message id may repeat in another session (over gRPC), and
        # an answer must reach the request of the conversation the human saw.
        session_id, field = named
        try:
            return await self._mesh.messages.get(caller, session_id, task_id)
        except NotFound:
            elsewhere = await self._locate(caller, task_id, field="message.task_id")
            raise InvalidArgument(
                field,
                f"task {task_id!r} belongs to context {elsewhere.session_id!r}, not {session_id!r}",
            ) from None

    async def _locate(self, caller: Caller, task_id: str, *, field: str = "id") -> Message:
        if not task_id:
            raise InvalidArgument(field, "is required")
        found = await self._mesh.store.get_adapter_value(_INDEX, _index_key(caller, task_id))
        if found:
            return await self._mesh.messages.get(caller, str(found["session_id"]), task_id)
        # Not sent over A2A (a gRPC client's message, listed by ListTasks all the same): by its id.
        message = await self._mesh.store.find_message(tenant_id=caller.tenant_id, message_id=task_id)
        if message is None:
            raise NotFound(f"task {task_id!r} not found", reason="MESSAGE_NOT_FOUND")
        return await self._mesh.messages.get(caller, message.session_id, task_id)

    async def _get(self, caller: Caller, message: Message) -> Message:
        return await self._mesh.messages.get(caller, message.session_id, message.message_id)

    async def _requests(self, message: Message) -> list[InputRequest]:
        found = []
        for request_id in message.input_request_ids:
            with contextlib.suppress(NotFound):
                found.append(await self._mesh.inputs.get(message.tenant_id, request_id))
        return found

    async def _task(self, caller: Caller, message: Message, history: int | None) -> Task:
        requests = await self._requests(message) if message.state is MessageState.INPUT_REQUIRED else []
        return task_of(message, requests, history_length=history)

    async def _answer(self, caller: Caller, message: Message, sent: A2AMessage) -> InputRequest:
        """Answer what ``message`` waits on with the follow-up ``sent`` (surface ``a2a``)."""
        requests = await self._requests(message)
        if not requests:
            raise UnsupportedOperationError(
                f"task {message.message_id!r} is {message.state.value} and waits for no input: "
                "send a new message (without taskId) instead"
            )
        parts = parts_from_a2a(sent.parts)
        pending = [r for r in requests if r.state is InputState.PENDING]
        request_id, resolution = answer_from(parts, pending[0] if pending else requests[-1], requests)
        return await self._mesh.inputs.resolve_as(
            caller, request_id, resolution, surface=Surface.A2A, session_id=message.session_id
        )


def _named_session(params: SendMessageRequest, context: ServerCallContext) -> tuple[str, str] | None:
    """The session a send names, and the field that names it; ``None`` when it names none."""
    hint = context.state.get(SESSION_HINT)
    if isinstance(hint, str) and hint:
        return hint, "configuration.sessionId"
    metadata = json_format.MessageToDict(params.metadata) if params.HasField("metadata") else {}
    if isinstance(metadata.get("sessionId"), str) and metadata["sessionId"]:
        return str(metadata["sessionId"]), "metadata.sessionId"
    if params.message.context_id:
        return params.message.context_id, "message.context_id"
    return None


def _index_key(caller: Caller, task_id: str) -> str:
    # "|" is in no id (core._validate.check_id), so tenant and task cannot run into each other
    return f"{caller.tenant_id}|{task_id}"


def _caller(context: ServerCallContext) -> Caller:
    caller = context.state.get(CALLER)
    if not isinstance(caller, Caller):
        raise InvalidRequestError("this call needs an Authorization: Bearer <token> header")
    return caller


def _refuse_push(params: SendMessageRequest) -> None:
    if params.configuration.HasField("task_push_notification_config"):
        raise UnsupportedOperationError(_NO_PUSH)


def _history_length(params: Any, field: str) -> int | None:
    if not params.HasField(field):
        return None
    value = int(getattr(params, field))
    if value < 0:
        raise to_a2a_error(InvalidArgument(field, "must not be negative"))
    return value


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """The core's errors as A2A errors (A2A errors raised here pass as they are)."""
    try:
        yield
    except A2AError:
        raise
    except MeshError as error:
        raise to_a2a_error(error) from None
