"""RegistryService: each RPC builds the caller, calls one core method, converts the result."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from grpc import aio

from svantic_grpc.api import _wkt, convert
from svantic_grpc.api._context import current_caller
from svantic_grpc.api.convert_inputs import request_to_pb
from svantic_grpc.api.convert_messages import dispatch_to_pb, update_from_pb
from svantic_grpc.api.interceptors import drain_refused
from svantic_grpc.core.dispatch import AgentConnection, DispatchUpdate, Outbound
from svantic_grpc.core.errors import InvalidArgument, MeshError
from svantic_grpc.core.mesh import Mesh
from svantic_grpc.core.messages.model import MessageState
from svantic_grpc.core.models import AgentRegistration
from svantic_grpc.pb import agent_types_pb2
from svantic_grpc.pb import registry_service_pb2 as pb
from svantic_grpc.pb import registry_service_pb2_grpc as pb_grpc

__all__ = ["RegistryServicer"]

_log = logging.getLogger(__name__)


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(self, mesh: Mesh) -> None:
        self._registry = mesh.registry
        self._connections = mesh.connections

    def _agent(self, record: AgentRegistration) -> agent_types_pb2.Agent:
        return convert.agent(record, status=self._registry.effective_status(record))

    async def RegisterAgent(
        self, request: pb.RegisterAgentRequest, context: aio.ServicerContext
    ) -> pb.RegisterAgentResponse:
        agent, created = await self._registry.register(current_caller(), convert.agent_spec(request))
        return pb.RegisterAgentResponse(agent=self._agent(agent), created=created)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        agent = await self._registry.heartbeat(
            current_caller(),
            request.instance_id,
            status=convert.agent_status(request.status),
            current_sessions=request.current_sessions,
        )
        return pb.HeartbeatResponse(
            agent=self._agent(agent),
            next_heartbeat_before=_wkt.timestamp(self._registry.next_heartbeat_before(agent)),
        )

    async def DeregisterAgent(
        self, request: pb.DeregisterAgentRequest, context: aio.ServicerContext
    ) -> pb.DeregisterAgentResponse:
        released = await self._registry.deregister(current_caller(), request.instance_id)
        return pb.DeregisterAgentResponse(released_session_ids=released)

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        agents, next_token = await self._registry.page_of_agents(
            current_caller(),
            agent_type=request.agent_type,
            routable_only=request.routable_only,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListAgentsResponse(agents=[self._agent(a) for a in agents], next_page_token=next_token)

    async def GetAgent(
        self, request: pb.GetAgentRequest, context: aio.ServicerContext
    ) -> pb.GetAgentResponse:
        agent = await self._registry.get(current_caller(), request.instance_id)
        return pb.GetAgentResponse(agent=self._agent(agent))

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ConnectResponse]:
        caller = current_caller()
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            return
        try:
            if first.WhichOneof("payload") != "hello":
                raise InvalidArgument("hello", "the first message on Connect must be hello")
            connection = await self._connections.attach(caller, first.hello.instance_id)
        except MeshError:
            await drain_refused(requests)  # the agent's own writes land first: it sees this status
            raise
        reader = asyncio.create_task(self._read(connection, requests))
        try:
            interval_ms = int(self._registry.heartbeat_timeout_s * 1000 / 3)
            yield pb.ConnectResponse(
                welcome=pb.ConnectWelcome(
                    agent=self._agent(connection.agent),
                    heartbeat_interval_ms=interval_ms,
                    update_batches=True,
                )
            )
            async for frame in _frames(connection.outbox, first.hello):
                yield frame
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]  # the agent sent something invalid: tell it
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await self._connections.detach(connection, "the agent's stream ended")

    async def _read(self, connection: AgentConnection, requests: AsyncIterator[pb.ConnectRequest]) -> None:
        """Feed the agent's updates and heartbeats to the core until its side of the stream ends.

        Raises:
            MeshError: the agent sent something invalid; the stream ends with that status.
        """
        reason = "the agent closed its stream"
        try:
            async for request in requests:
                kind = request.WhichOneof("payload")
                if kind == "update":
                    self._receive(connection, request.update)
                elif kind == "update_batch":
                    for update in request.update_batch.updates:
                        self._receive(connection, update)
                elif kind == "heartbeat":
                    beat = request.heartbeat
                    await self._connections.heartbeat(
                        connection,
                        status=convert.agent_status(beat.status, "heartbeat.status"),
                        current_sessions=beat.current_sessions,
                    )
        except MeshError as error:
            reason = f"the agent sent an invalid message: {error.message}"
            raise
        except aio.AioRpcError as error:
            reason = f"the agent's stream failed: {error.details()}"
        finally:
            await self._connections.detach(connection, reason)

    def _receive(self, connection: AgentConnection, message: pb.DispatchUpdate) -> None:
        """Hand one update to the dispatch it is for; an invalid one fails that dispatch alone."""
        try:
            update = update_from_pb(message)
        except InvalidArgument as error:
            update = DispatchUpdate(MessageState.FAILED, reason=f"the agent sent an invalid update: {error}")
        if not self._connections.receive(connection, message.dispatch_id, update):
            _log.debug("update for unknown dispatch %s from %s", message.dispatch_id, connection.key)


BATCH_MAX = 64
"""Most dispatches in one frame."""
BATCH_MAX_BYTES = 1 << 20
"""Most bytes of dispatches in one frame (a single larger dispatch still goes alone)."""


class _Outbox(Protocol):
    """What ``_frames`` reads: a connection's outbox (a ``Mailbox``, or any ``asyncio.Queue``)."""

    async def get(self) -> Outbound | None: ...
    def get_nowait(self) -> Outbound | None: ...
    def empty(self) -> bool: ...


async def _frames(outbox: _Outbox, hello: pb.ConnectHello) -> AsyncIterator[pb.ConnectResponse]:
    """The outbox as frames for the agent, until the mesh ends the stream (``None``).

    When the agent reads batches, dispatches queued together go out in one frame
    (a frame costs far more than a dispatch in it); cancels and answers keep their
    place in the order.
    """
    held: list[Outbound | None] = []  # taken from the queue behind a batch, sent next
    while True:
        out = held.pop() if held else await outbox.get()
        if out is None:
            return
        if out.job is None:
            if out.answer is not None:
                answer = pb.InputAnswer(dispatch_id=out.dispatch_id, request=request_to_pb(out.answer))
                yield pb.ConnectResponse(input_answer=answer)
            else:
                cancel = pb.DispatchCancel(dispatch_id=out.dispatch_id, reason=out.cancel_reason)
                yield pb.ConnectResponse(cancel=cancel)
            continue
        response = pb.ConnectResponse()
        token = hello.dispatch_tokens
        if not hello.dispatch_batches or outbox.empty():
            dispatch_to_pb(out.job, token=token, into=response.dispatch)  # filled in place: no copy
            yield response
            continue
        following = outbox.get_nowait()
        if following is None or following.job is None:  # nothing to batch it with
            held.append(following)
            dispatch_to_pb(out.job, token=token, into=response.dispatch)
            yield response
            continue
        # Each dispatch filled in place in the frame: no copy of a built one.
        dispatches = response.dispatch_batch.dispatches
        size = dispatch_to_pb(out.job, token=token, into=dispatches.add()).ByteSize()
        while True:
            size += dispatch_to_pb(following.job, token=token, into=dispatches.add()).ByteSize()
            if size > BATCH_MAX_BYTES:  # well under gRPC's 4 MiB default: it goes in the next frame
                del dispatches[-1]
                held.append(following)
                break
            if outbox.empty() or len(dispatches) >= BATCH_MAX:
                break
            following = outbox.get_nowait()
            if following is None or following.job is None:
                held.append(following)
                break
        yield response
