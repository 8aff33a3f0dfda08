"""MessageService: each RPC builds the caller, calls the core, converts the result."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from grpc import aio

from svantic_grpc.api import convert
from svantic_grpc.api._context import current_caller
from svantic_grpc.api._event_bytes import SerializedEvents
from svantic_grpc.api.convert_inputs import request_to_pb, resolution_from_pb
from svantic_grpc.api.convert_messages import message_state, message_to_pb, outgoing
from svantic_grpc.api.errors import placed, status_code_for
from svantic_grpc.core.auth import Caller
from svantic_grpc.core.errors import InvalidArgument, MeshError
from svantic_grpc.core.inputs.model import Surface
from svantic_grpc.core.mesh import Mesh
from svantic_grpc.pb import message_service_pb2 as pb
from svantic_grpc.pb import message_service_pb2_grpc as pb_grpc

__all__ = ["MessageServicer"]

_CONVERSE_BUFFER = 16
"""Responses a Converse stream holds for its reader (events are shared bytes, see ``SerializedEvents``);
a reader that stops reading leaves the rest to the session's subscription, which cuts it off
(``SUBSCRIBER_TOO_SLOW``) as it does a ``WatchSession`` reader."""
_CANCEL_INLINE_S = 0.5
"""How long a Converse stream's actions wait for a cancel before the next action is taken: a
cancel of a message another replica runs waits for that replica (up to 30 s), and the stream's
resolves and sends must not wait behind it. Its error, if any, comes when it ends."""
_CANCELS_IN_FLIGHT = 16
"""Cancels a stream may have waiting at once; one more waits for the oldest to end."""


class MessageServicer(pb_grpc.MessageServiceServicer):
    def __init__(self, mesh: Mesh) -> None:
        self._messages = mesh.messages
        self._sessions = mesh.sessions
        self._inputs = mesh.inputs
        self._converted = SerializedEvents(
            lambda event: pb.ConverseResponse(event=convert.event(event)).SerializeToString()
        )

    async def SendMessage(
        self, request: pb.SendMessageRequest, context: aio.ServicerContext
    ) -> pb.SendMessageResponse:
        message = await self._messages.send_and_wait(
            current_caller(), request.session_id, **outgoing(request.message)
        )
        response = pb.SendMessageResponse()
        message_to_pb(message, into=response.message)  # filled in place: no copy of the message
        return response

    async def SendStreamingMessage(
        self, request: pb.SendStreamingMessageRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.SendStreamingMessageResponse]:
        events = await self._messages.send_streaming(
            current_caller(), request.session_id, **outgoing(request.message)
        )
        async for event in events:
            yield pb.SendStreamingMessageResponse(event=convert.event(event))

    async def GetMessage(
        self, request: pb.GetMessageRequest, context: aio.ServicerContext
    ) -> pb.GetMessageResponse:
        message = await self._messages.get(current_caller(), request.session_id, request.message_id)
        return pb.GetMessageResponse(message=message_to_pb(message))

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: aio.ServicerContext
    ) -> pb.ListMessagesResponse:
        states = [message_state(s, f"states[{i}]") for i, s in enumerate(request.states) if s]
        if len(states) < len(request.states):
            states = []  # MESSAGE_STATE_UNSPECIFIED in the filter means any state
        page = await self._messages.list_messages(
            current_caller(),
            session_id=request.session_id,
            states=states,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListMessagesResponse(
            messages=[message_to_pb(m) for m in page.messages], next_page_token=page.next_cursor
        )

    async def CancelMessage(
        self, request: pb.CancelMessageRequest, context: aio.ServicerContext
    ) -> pb.CancelMessageResponse:
        message = await self._messages.cancel(
            current_caller(), request.session_id, request.message_id, reason=request.reason
        )
        return pb.CancelMessageResponse(message=message_to_pb(message))

    async def ListPendingInputs(
        self, request: pb.ListPendingInputsRequest, context: aio.ServicerContext
    ) -> pb.ListPendingInputsResponse:
        page = await self._inputs.list_pending(
            current_caller(),
            session_id=request.session_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListPendingInputsResponse(
            requests=[request_to_pb(r) for r in page.requests], next_page_token=page.next_cursor
        )

    async def ResolveInput(
        self, request: pb.ResolveInputRequest, context: aio.ServicerContext
    ) -> pb.ResolveInputResponse:
        resolved = await self._inputs.resolve_as(
            current_caller(), request.request_id, resolution_from_pb(request.resolution), surface=Surface.GRPC
        )
        return pb.ResolveInputResponse(request=request_to_pb(resolved))

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ConverseResponse | bytes]:
        caller = current_caller()
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            return
        if first.WhichOneof("action") != "open":
            raise InvalidArgument("open", "the first request on Converse must be open (naming the session)")
        session_id = first.open.session_id
        events = await self._sessions.watch(caller, session_id, after_sequence=first.open.after_sequence)
        out: asyncio.Queue[bytes | pb.ConverseResponse | MeshError | None] = asyncio.Queue(_CONVERSE_BUFFER)
        converted = self._converted

        async def pump_events() -> None:
            try:
                async for event in events:
                    await out.put(converted.response(event))
                await out.put(None)  # the session closed
            except MeshError as error:
                await out.put(error)

        async def act(request: pb.ConverseRequest) -> None:
            try:
                await self._converse_action(caller, session_id, request)
            except MeshError as error:
                await out.put(pb.ConverseResponse(error=_converse_error(error, request)))

        cancels: list[asyncio.Task[None]] = []

        async def take_actions() -> None:
            try:
                async for request in requests:
                    if request.WhichOneof("action") != "cancel":
                        await act(request)
                        continue
                    cancels[:] = [task for task in cancels if not task.done()]
                    if len(cancels) >= _CANCELS_IN_FLIGHT:
                        await asyncio.wait(cancels[:1])
                    cancel = asyncio.create_task(act(request))
                    cancels.append(cancel)
                    # In order when the cancel is quick (this replica runs the session); otherwise
                    # the stream goes on and the cancel's outcome arrives when it has one.
                    await asyncio.wait({cancel}, timeout=_CANCEL_INLINE_S)
            except MeshError as error:  # the stream itself is bad (a body that does not decode): end it
                await out.put(error)

        tasks = [asyncio.create_task(pump_events()), asyncio.create_task(take_actions())]
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, MeshError):
                    raise item
                yield item
        finally:
            for task in (*tasks, *cancels):
                task.cancel()
            for task in (*tasks, *cancels):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _converse_action(self, caller: Caller, session_id: str, request: pb.ConverseRequest) -> None:
        action = request.WhichOneof("action")
        if action == "send":
            with placed("message", "send"):
                await self._messages.send(caller, session_id, **outgoing(request.send))
        elif action == "cancel":
            with placed("", "cancel"):
                await self._messages.cancel(
                    caller, session_id, request.cancel.message_id, reason=request.cancel.reason
                )
        elif action == "resolve":
            with placed("", "resolve"):
                await self._inputs.resolve_as(
                    caller,
                    request.resolve.request_id,
                    resolution_from_pb(request.resolve.resolution),
                    surface=Surface.CHAT,
                    session_id=session_id,
                )
        elif action == "open":
            raise InvalidArgument("open", "this stream is already bound to a session")
        else:
            raise InvalidArgument("action", "set one of send, cancel or resolve")


def _converse_error(error: MeshError, request: pb.ConverseRequest) -> pb.ConverseError:
    """The error of one action, naming the action and the id it named, so that a client with
    several actions in flight knows which one failed."""
    action = request.WhichOneof("action") or ""
    subject = {
        "send": request.send.message_id,
        "cancel": request.cancel.message_id,
        "resolve": request.resolve.request_id,
    }.get(action, "")
    return pb.ConverseError(
        code=status_code_for(error).value[0],
        reason=error.reason,
        message=error.message,
        field=getattr(error, "field", ""),
        action=action,
        subject_id=subject,
    )
