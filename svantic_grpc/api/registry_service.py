"""RegistryService: each RPC builds the caller, calls one core method, converts the result."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from svantic_grpc.api import convert
from svantic_grpc.api._context import current_caller
from svantic_grpc.core.errors import Unimplemented
from svantic_grpc.core.mesh import Mesh
from svantic_grpc.core.models import AgentRegistration
from svantic_grpc.pb import agent_types_pb2
from svantic_grpc.pb import registry_service_pb2 as pb
from svantic_grpc.pb import registry_service_pb2_grpc as pb_grpc

__all__ = ["RegistryServicer"]


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(self, mesh: Mesh) -> None:
        self._registry = mesh.registry

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
            next_heartbeat_before=convert.timestamp(self._registry.next_heartbeat_before(agent)),
        )

    async def DeregisterAgent(
        self, request: pb.DeregisterAgentRequest, context: aio.ServicerContext
    ) -> pb.DeregisterAgentResponse:
        released = await self._registry.deregister(current_caller(), request.instance_id)
        return pb.DeregisterAgentResponse(released_session_ids=released)

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        agents = await self._registry.list_agents(
            current_caller(), agent_type=request.agent_type, routable_only=request.routable_only
        )
        return pb.ListAgentsResponse(agents=[self._agent(a) for a in agents])

    async def GetAgent(
        self, request: pb.GetAgentRequest, context: aio.ServicerContext
    ) -> pb.GetAgentResponse:
        agent = await self._registry.get(current_caller(), request.instance_id)
        return pb.GetAgentResponse(agent=self._agent(agent))

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ConnectResponse]:
        current_caller()
        raise Unimplemented(
            "Connect (connected-mode agents) is not served yet; register the agent as hosted with a URL",
            reason="NOT_YET_SERVED",
        )
        yield  # pragma: no cover - makes this an async generator
