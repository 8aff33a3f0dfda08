"""Agents that need a human, for the input-required tests.

Connected handlers (run them with ``tests.agents_connected.running_agent``):

- ``ToolAgent``: asks approval (``reply.ask_approval``) for each tool call listed in
  the message's ``{"calls": [{"tool": ..., "arguments": {...}}]}`` data part, reports
  each outcome as an artifact (``"<tool>: approved"`` or ``"<tool>: denied (<reason>)"``)
  and completes. It records what it got back for each ask.
- ``FormAgent``: asks a form (``reply.ask_form``), reports the values as JSON.
- ``QuestionAgent``: asks a free-text question (``reply.input_required``), reports the answer.
- ``ConfirmAgent``: asks to confirm a tool call (``reply.request_input``, kind confirmation).

Each records whether its handler was cancelled (the mesh withdrew the dispatch).

A hosted a2a-sdk agent (``hosted_input_agents``) goes ``input-required`` with a data
part ``{"input_request": {...}}`` (or, without one, a plain question), then reads the
mesh's ``{"input_resolution": {...}}`` on the same task and reports it as an artifact.

The rest is what a person does, bounded by ``WAIT``: read the approval queue
(``pending``), answer (``resolve``; ``refused`` for a call that must fail, with
``error_info``'s code, ErrorInfo reason and metadata, and BadRequest field), watch the
session (``watching``, ``replay``) and talk in its chat (``chatting``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from a2a.helpers import new_data_part, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, Task
from a2a.utils.constants import TransportProtocol
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.core.store import AuditRecord
from svantic_grpc.pb import (
    agent_types_pb2,
    event_types_pb2,
    message_service_pb2,
    message_types_pb2,
    registry_service_pb2,
    session_service_pb2,
    session_types_pb2,
)
from tests._support import Client
from tests.agents_a2a import _bearer, _Keys, _listening_socket, serve_a2a
from tests.agents_connected import WAIT

pb = message_types_pb2

__all__ = [
    "Answer",
    "Chat",
    "ConfirmAgent",
    "FormAgent",
    "HostedInputAgent",
    "HostedInputAgents",
    "QuestionAgent",
    "ToolAgent",
    "Watch",
    "artifact_texts",
    "audit",
    "cancel_message",
    "chatting",
    "close_session",
    "error_info",
    "get_session",
    "hosted_input_agents",
    "is_state",
    "pending",
    "pending_ids",
    "refused",
    "replay",
    "resolution",
    "resolve",
    "resolved_event",
    "seconds",
    "settle",
    "struct",
    "view",
    "watching",
]


@dataclass(frozen=True)
class Answer:
    """What an agent got back for one ask, as it saw it on its stream."""

    request_id: str
    kind: int
    state: int
    decision: int
    reason: str
    resolved_by: str
    surface: int
    values: dict[str, Any]
    confirmed: bool
    payload: dict[str, Any]

    @staticmethod
    def of(request: message_types_pb2.InputRequest) -> Answer:
        resolution = request.resolution
        return Answer(
            request_id=request.request_id,
            kind=request.kind,
            state=request.state,
            decision=resolution.decision,
            reason=resolution.reason,
            resolved_by=resolution.resolved_by,
            surface=resolution.surface,
            values=json_format.MessageToDict(resolution.values),
            confirmed=resolution.confirmed,
            payload=json_format.MessageToDict(resolution.payload),
        )


class _Recording:
    """Bookkeeping shared by the handlers: dispatches, answers, asks in flight, cancellation."""

    def __init__(self) -> None:
        self.dispatches: list[Dispatch] = []
        self.answers: list[Answer] = []
        self.asked = asyncio.Event()
        """Set when the handler sent an ask (it now waits for the answer)."""
        self.cancelled = asyncio.Event()
        """Set when the mesh withdrew a dispatch while the handler ran."""

    def _spy(self, reply: Reply) -> list[Answer]:
        """Record every answer ``reply.request_input`` returns (the helpers all go through it).

        Returns the answers of this dispatch alone (``answers`` has those of every dispatch).
        """
        original = reply.request_input
        mine: list[Answer] = []

        async def request_input(
            request: message_types_pb2.InputRequest, *, say: Any = None
        ) -> message_types_pb2.InputRequest:
            self.asked.set()
            answer = await original(request, say=say)
            mine.append(Answer.of(answer))
            self.answers.append(mine[-1])
            return answer

        reply.request_input = request_input  # type: ignore[method-assign]
        return mine


class ToolAgent(_Recording):
    """Asks approval for each tool call of the message, reports each outcome, completes."""

    def __init__(self) -> None:
        super().__init__()
        self.approved: list[bool] = []
        """What ``reply.ask_approval`` returned, per ask."""

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        self.dispatches.append(dispatch)
        mine = self._spy(reply)
        calls: list[dict[str, Any]] = next((d["calls"] for d in dispatch.data if "calls" in d), [])
        try:
            for call in calls:
                ok = await reply.ask_approval(call["tool"], call.get("arguments") or {})
                self.approved.append(ok)
                outcome = "approved" if ok else f"denied ({mine[-1].reason})"
                await reply.artifact(f"{call['tool']}: {outcome}", name="decision")
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        await reply.complete(f"done with {len(calls)} tool calls")


class FormAgent(_Recording):
    """Asks a form and reports the values (JSON, keys sorted); ``no values`` when none came."""

    def __init__(self, title: str, fields: Iterable[message_types_pb2.FormField]) -> None:
        super().__init__()
        self.title = title
        self.fields = list(fields)
        self.values: list[dict[str, Any] | None] = []

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        self.dispatches.append(dispatch)
        self._spy(reply)
        try:
            values = await reply.ask_form(self.title, self.fields)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.values.append(values)
        report = "no values" if values is None else json.dumps(values, sort_keys=True)
        await reply.artifact(report, name="form")
        await reply.complete()


class QuestionAgent(_Recording):
    """Asks a free-text question and reports ``answer: <text>``."""

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question
        self.replies: list[str | None] = []

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        self.dispatches.append(dispatch)
        self._spy(reply)
        try:
            answer = await reply.input_required(self.question)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.replies.append(answer)
        await reply.artifact(f"answer: {answer}", name="answer")
        await reply.complete()


class ConfirmAgent(_Recording):
    """Asks to confirm a tool call; reports ``confirmed`` / ``not confirmed`` and the payload."""

    def __init__(self, tool: str, arguments: dict[str, Any]) -> None:
        super().__init__()
        self.tool = tool
        self.arguments = arguments

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        self.dispatches.append(dispatch)
        self._spy(reply)
        request = message_types_pb2.InputRequest(
            kind=message_types_pb2.INPUT_KIND_CONFIRMATION,
            tool_call=message_types_pb2.ToolCall(tool_name=self.tool),
        )
        request.tool_call.arguments.update(self.arguments)
        try:
            answer = Answer.of(await reply.request_input(request, say=f"confirm {self.tool}?"))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        outcome = "confirmed" if answer.confirmed else "not confirmed"
        await reply.artifact(f"{outcome} {json.dumps(answer.payload, sort_keys=True)}", name="confirmation")
        await reply.complete()


# --- a hosted (A2A) agent that asks a human ----------------------------------------------------


@dataclass(frozen=True)
class HostedInputAgent:
    """A hosted agent that asks ``ask`` (an ``input_request`` object) or, when ``None``, ``question``."""

    instance_id: str
    agent_type: str = "hosted-crm"
    ask: dict[str, Any] | None = None
    question: str = "What is your name?"


class _InputExecutor(AgentExecutor):
    """First turn: input-required; second turn: report the ``input_resolution`` and complete."""

    def __init__(self, spec: HostedInputAgent, keys: _Keys, url: str) -> None:
        self.spec = spec
        self.url = url
        self._keys = keys
        self.resolutions: list[dict[str, Any]] = []
        """The ``input_resolution`` objects the agent received, in order."""
        self.answer_texts: list[str] = []
        """The text of each answering turn."""
        self.token_errors: list[str] = []
        self.traceparents: list[str] = []
        """The W3C ``traceparent`` header of each turn (empty when none came)."""
        self.card = AgentCard(
            name=spec.instance_id,
            description=f"asks a human ({spec.agent_type})",
            version="1.0.0",
            supported_interfaces=[
                AgentInterface(url=url, protocol_binding=TransportProtocol.JSONRPC, protocol_version="1.0")
            ],
            capabilities=AgentCapabilities(streaming=True, push_notifications=False),
            default_input_modes=["text/plain"],
            default_output_modes=["text/plain"],
            skills=[AgentSkill(id="crm", name="crm", description="crm", tags=["crm"])],
        )

    def registration(self) -> registry_service_pb2.RegisterAgentRequest:
        return registry_service_pb2.RegisterAgentRequest(
            agent_type=self.spec.agent_type,
            instance_id=self.spec.instance_id,
            url=self.url,
            deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_HOSTED,
        )

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        first_turn = context.current_task is None
        task: Task | None = context.current_task
        if task is None:
            assert context.message is not None
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        headers = (context.call_context.state.get("headers") or {}) if context.call_context else {}
        self.traceparents.append(headers.get("traceparent", ""))
        try:
            await self._keys.verify(_bearer(context), self.spec.instance_id)
        except Exception as exc:
            self.token_errors.append(str(exc))
            await updater.reject(updater.new_agent_message([new_text_part(f"bad token: {exc}")]))
            return
        say = updater.new_agent_message
        if first_turn:
            parts = [new_text_part(self.spec.question)]
            if self.spec.ask is not None:
                parts.append(new_data_part({"input_request": self.spec.ask}))
            await updater.requires_input(say(parts))
            return
        assert context.message is not None
        self.answer_texts.append(context.get_user_input())
        resolution: dict[str, Any] = {}
        for part in context.message.parts:
            if part.WhichOneof("content") == "data":
                value = json_format.MessageToDict(part.data)
                if isinstance(value, dict) and "input_resolution" in value:
                    resolution = value["input_resolution"]
        self.resolutions.append(resolution)
        if self.spec.ask is None:
            report = f"Nice to meet you, {resolution.get('values', {}).get('answer', '?')}"
        elif resolution.get("approved"):
            report = f"approved by {resolution.get('resolved_by')}"
        else:
            report = f"denied: {resolution.get('reason') or resolution.get('state')}"
        await updater.add_artifact([new_text_part(report)], name="decision")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, context.task_id or "", context.context_id or "")
        await updater.cancel(updater.new_agent_message([new_text_part("canceled on request")]))


@dataclass
class HostedInputAgents:
    agents: dict[str, _InputExecutor] = field(default_factory=dict)

    def __getitem__(self, instance_id: str) -> _InputExecutor:
        return self.agents[instance_id]


@contextlib.asynccontextmanager
async def hosted_input_agents(
    mesh_channel: aio.Channel, *specs: HostedInputAgent
) -> AsyncIterator[HostedInputAgents]:
    """Serve ``specs`` on one loopback port (uvicorn in this loop); each verifies dispatch tokens."""
    keys = _Keys(mesh_channel)
    sock = _listening_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    served = HostedInputAgents()
    for spec in specs:
        served.agents[spec.instance_id] = _InputExecutor(spec, keys, f"{base}/{spec.instance_id}")
    async with serve_a2a(sock, [(i, agent, agent.card) for i, agent in served.agents.items()]):
        yield served


# --- what a person does: the approval queue, answers, errors, events ----------------------------


async def pending(
    client: Client,
    session_id: str = "",
    *,
    client_id: str = "acme-full",
    page_size: int = 0,
    page_token: str = "",
) -> message_service_pb2.ListPendingInputsResponse:
    response: message_service_pb2.ListPendingInputsResponse = await client.messages.ListPendingInputs(
        message_service_pb2.ListPendingInputsRequest(
            session_id=session_id, page_size=page_size, page_token=page_token
        ),
        metadata=await client.md(client_id),
        timeout=WAIT,
    )
    return response


async def pending_ids(client: Client, session_id: str = "", *, client_id: str = "acme-full") -> list[str]:
    return [r.request_id for r in (await pending(client, session_id, client_id=client_id)).requests]


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def resolution(
    decision: int = 0,
    reason: str = "",
    values: dict[str, Any] | None = None,
    confirmed: bool = False,
    payload: dict[str, Any] | None = None,
) -> pb.Resolution:
    return pb.Resolution(
        decision=decision,  # type: ignore[arg-type]
        reason=reason,
        values=struct(values or {}),
        confirmed=confirmed,
        payload=struct(payload or {}),
    )


async def resolve(
    client: Client, request_id: str, *, client_id: str = "acme-full", **answer: Any
) -> pb.InputRequest:
    response: message_service_pb2.ResolveInputResponse = await client.messages.ResolveInput(
        message_service_pb2.ResolveInputRequest(request_id=request_id, resolution=resolution(**answer)),
        metadata=await client.md(client_id),
        timeout=WAIT,
    )
    return response.request


def error_info(error: BaseException) -> tuple[grpc.StatusCode, str, dict[str, str], str]:
    """(code, ErrorInfo.reason, ErrorInfo.metadata, BadRequest field or "") of a failed call."""
    assert isinstance(error, aio.AioRpcError), error
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, f"no rich status details on {error.code()}: {error.details()}"
    status = status_pb2.Status.FromString(raw)
    reason, metadata, field = "", {}, ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field = bad.field_violations[0].field
    return error.code(), reason, metadata, field


async def refused(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str], str]:
    """Await a call that must fail; its error details."""
    with pytest.raises(aio.AioRpcError) as excinfo:
        await call
    return error_info(excinfo.value)


async def get_session(client: Client, session_id: str) -> session_types_pb2.Session:
    response: session_service_pb2.GetSessionResponse = await client.sessions.GetSession(
        session_service_pb2.GetSessionRequest(session_id=session_id), metadata=await client.md(), timeout=WAIT
    )
    return response.session


async def close_session(client: Client, session_id: str) -> None:
    await client.sessions.CloseSession(
        session_service_pb2.CloseSessionRequest(session_id=session_id),
        metadata=await client.md(),
        timeout=WAIT,
    )


async def cancel_message(client: Client, session_id: str, message_id: str, reason: str = "") -> pb.Message:
    response: message_service_pb2.CancelMessageResponse = await client.messages.CancelMessage(
        message_service_pb2.CancelMessageRequest(session_id=session_id, message_id=message_id, reason=reason),
        metadata=await client.md(),
        timeout=WAIT,
    )
    return response.message


async def audit(client: Client, request_id: str = "", tenant_id: str = "acme") -> list[AuditRecord]:
    return list(await client.server.mesh.store.list_audit(tenant_id=tenant_id, request_id=request_id))


def artifact_texts(message: pb.Message) -> list[str]:
    return [p.text for a in message.artifacts for p in a.parts]


def seconds(timestamp: Any) -> float:
    return float(timestamp.ToNanoseconds()) / 1e9


def view(event: event_types_pb2.SessionEvent) -> tuple[Any, ...]:
    """A compact, comparable view of an event."""
    which = event.WhichOneof("event")
    if which == "input_required":
        return ("input_required", event.input_required.request.request_id)
    if which == "input_resolved":
        request = event.input_resolved.request
        return ("input_resolved", request.request_id, request.state)
    if which == "status_changed":
        return ("status", event.status_changed.from_status, event.status_changed.to_status)
    if which == "message_state_changed":
        change = event.message_state_changed
        return ("state", change.message_id, change.to_state)
    return (which,)


def is_state(message_id: str, *states: int) -> Callable[[event_types_pb2.SessionEvent], bool]:
    return lambda e: view(e)[:2] == ("state", message_id) and view(e)[2] in states


def resolved_event(request_id: str) -> Callable[[event_types_pb2.SessionEvent], bool]:
    return lambda e: view(e)[:2] == ("input_resolved", request_id)


class Watch:
    """A live WatchSession stream; ``until`` reads (bounded) until an event matches."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.events: list[event_types_pb2.SessionEvent] = []

    async def until(
        self, match: Callable[[event_types_pb2.SessionEvent], bool]
    ) -> event_types_pb2.SessionEvent:
        for event in self.events:
            if match(event):
                return event
        async with asyncio.timeout(WAIT):
            while True:
                response = await self.call.read()
                assert response is not aio.EOF, "the session's event stream ended early"
                latest: event_types_pb2.SessionEvent = response.event
                self.events.append(latest)
                if match(latest):
                    return latest

    @property
    def views(self) -> list[tuple[Any, ...]]:
        return [view(e) for e in self.events]


@contextlib.asynccontextmanager
async def watching(client: Client, session_id: str) -> AsyncIterator[Watch]:
    call = client.sessions.WatchSession(
        session_service_pb2.WatchSessionRequest(session_id=session_id), metadata=await client.md()
    )
    try:
        yield Watch(call)
    finally:
        call.cancel()


async def replay(client: Client, session_id: str) -> list[event_types_pb2.SessionEvent]:
    """The whole event log of a closed session (the stream ends after it)."""
    call = client.sessions.WatchSession(
        session_service_pb2.WatchSessionRequest(session_id=session_id), metadata=await client.md()
    )
    events = []

    async def read_all() -> None:
        while (response := await call.read()) is not aio.EOF:
            events.append(response.event)

    await asyncio.wait_for(read_all(), WAIT)
    return events


class Chat:
    """A Converse stream fed from a queue."""

    def __init__(self, client: Client, md: Any) -> None:
        self._requests: asyncio.Queue[message_service_pb2.ConverseRequest | None] = asyncio.Queue()
        self.call = client.messages.Converse(self._iterate(), metadata=md)
        self.responses: list[message_service_pb2.ConverseResponse] = []

    async def _iterate(self) -> AsyncIterator[message_service_pb2.ConverseRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def open(self, session_id: str) -> None:
        self._requests.put_nowait(
            message_service_pb2.ConverseRequest(open=message_service_pb2.ConverseOpen(session_id=session_id))
        )

    def resolve(self, request_id: str, **answer: Any) -> None:
        resolve = message_service_pb2.ConverseResolve(request_id=request_id, resolution=resolution(**answer))
        self._requests.put_nowait(message_service_pb2.ConverseRequest(resolve=resolve))

    def cancel(self, message_id: str, reason: str = "") -> None:
        cancel = message_service_pb2.ConverseCancel(message_id=message_id, reason=reason)
        self._requests.put_nowait(message_service_pb2.ConverseRequest(cancel=cancel))

    async def next(self) -> message_service_pb2.ConverseResponse:
        response = await asyncio.wait_for(self.call.read(), WAIT)
        assert response is not aio.EOF, "the Converse stream ended early"
        self.responses.append(response)
        return response  # type: ignore[no-any-return]

    async def until_event(
        self, match: Callable[[event_types_pb2.SessionEvent], bool]
    ) -> event_types_pb2.SessionEvent:
        while True:
            response = await self.next()
            if response.WhichOneof("payload") == "event" and match(response.event):
                return response.event

    async def error(self) -> message_service_pb2.ConverseError:
        while True:
            response = await self.next()
            if response.WhichOneof("payload") == "error":
                return response.error

    def close(self) -> None:
        self._requests.put_nowait(None)
        self.call.cancel()


@contextlib.asynccontextmanager
async def chatting(client: Client, session_id: str, client_id: str = "acme-full") -> AsyncIterator[Chat]:
    chat = Chat(client, await client.md(client_id))
    chat.open(session_id)
    try:
        yield chat
    finally:
        chat.close()


async def settle(
    chat: Chat, start: int, request_id: str, attempts: int
) -> tuple[pb.Resolution, list[message_service_pb2.ConverseError]]:
    """Read the chat until the request's resolution event and the error of every losing chat attempt."""
    while True:
        new = chat.responses[start:]
        ended = [
            r.event for r in new if r.WhichOneof("payload") == "event" and resolved_event(request_id)(r.event)
        ]
        errors = [r.error for r in new if r.WhichOneof("payload") == "error"]
        if ended:
            winner = ended[0].input_resolved.request.resolution
            if len(errors) >= attempts - (1 if winner.surface == pb.SURFACE_CHAT else 0):
                return winner, errors
        await chat.next()
