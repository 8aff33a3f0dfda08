"""Test helpers for connected-mode agents: real ``ConnectedAgent`` tasks and a raw ``Connect`` client.

``running_agent`` runs ``svantic_grpc.connected_agent.ConnectedAgent`` as a task in
the test's loop and stops it on exit. ``RawAgent`` drives ``RegistryService.Connect``
directly with a queue-fed request iterator, so a test decides exactly what the
agent sends and when its stream ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from grpc import aio

from svantic_grpc.connected_agent import ConnectedAgent, Handler
from svantic_grpc.pb import (
    agent_types_pb2,
    message_service_pb2,
    message_types_pb2,
    registry_service_pb2,
    session_service_pb2,
)
from tests._support import SECRET, Client

WAIT = 3.0
"""Upper bound for anything a test waits on, so nothing can hang."""

Metadata = tuple[tuple[str, str], ...]


def skill(skill_id: str, *tags: str, **fields: Any) -> agent_types_pb2.AgentSkill:
    return agent_types_pb2.AgentSkill(id=skill_id, name=skill_id, tags=list(tags), **fields)


@asynccontextmanager
async def running_agent(
    client: Client,
    handler: Handler,
    *,
    agent_type: str = "echo",
    instance_id: str = "echo-1",
    skills: Iterable[agent_types_pb2.AgentSkill] = (),
    max_concurrent_sessions: int = 0,
    client_id: str = "acme-full",
    client_secret: str = SECRET,
    verify_dispatches: bool = False,
) -> AsyncIterator[ConnectedAgent]:
    """A connected agent serving ``handler``, connected when this yields; stopped on exit."""
    agent = ConnectedAgent(
        client.server.target,
        client_id=client_id,
        client_secret=client_secret,
        agent_type=agent_type,
        instance_id=instance_id,
        handler=handler,
        skills=skills,
        max_concurrent_sessions=max_concurrent_sessions,
        reconnect_delay_s=0.05,
        verify_dispatches=verify_dispatches,
    )
    async with run_agent(agent):
        yield agent


@asynccontextmanager
async def run_agent(agent: ConnectedAgent) -> AsyncIterator[ConnectedAgent]:
    """Run an already built ``ConnectedAgent`` until the block ends."""
    task = asyncio.create_task(agent.run(), name=f"agent-{agent.instance_id}")
    try:
        connected = asyncio.create_task(agent.connected.wait())
        done, _ = await asyncio.wait({connected, task}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        if connected not in done:
            connected.cancel()
            if task in done:
                task.result()  # raise what stopped the agent
            raise AssertionError(f"agent {agent.instance_id} did not connect within {WAIT}s")
        yield agent
    finally:
        await agent.stop()
        try:
            await asyncio.wait_for(task, WAIT)
        except TimeoutError:
            task.cancel()
            raise AssertionError(f"agent {agent.instance_id} did not stop within {WAIT}s") from None


class RawAgent:
    """One ``Connect`` stream under the test's full control."""

    def __init__(self, client: Client, md: Metadata, instance_id: str) -> None:
        self.instance_id = instance_id
        self.welcomed = registry_service_pb2.ConnectWelcome()
        """The mesh's welcome, once ``raw_agent`` said hello."""
        self._requests: asyncio.Queue[registry_service_pb2.ConnectRequest | None] = asyncio.Queue()
        self.call = client.registry.Connect(self._iterate(), metadata=md)

    async def _iterate(self) -> AsyncIterator[registry_service_pb2.ConnectRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def send(self, request: registry_service_pb2.ConnectRequest) -> None:
        self._requests.put_nowait(request)

    def hello(self, instance_id: str | None = None, **fields: Any) -> None:
        hello = registry_service_pb2.ConnectHello(instance_id=instance_id or self.instance_id, **fields)
        self.send(registry_service_pb2.ConnectRequest(hello=hello))

    def update(self, dispatch_id: str, state: int = 0, **fields: Any) -> None:
        update = registry_service_pb2.DispatchUpdate(dispatch_id=dispatch_id, state=state, **fields)  # type: ignore[arg-type]
        self.send(registry_service_pb2.ConnectRequest(update=update))

    def heartbeat(self, **fields: Any) -> None:
        beat = registry_service_pb2.HeartbeatRequest(instance_id=self.instance_id, **fields)
        self.send(registry_service_pb2.ConnectRequest(heartbeat=beat))

    def end(self) -> None:
        """Half-close: the agent's side of the stream ends."""
        self._requests.put_nowait(None)

    async def receive(self) -> registry_service_pb2.ConnectResponse:
        response = await asyncio.wait_for(self.call.read(), WAIT)
        assert response is not aio.EOF, "the mesh ended the stream"
        return response  # type: ignore[no-any-return]

    async def welcome(self) -> registry_service_pb2.ConnectWelcome:
        response = await self.receive()
        assert response.WhichOneof("payload") == "welcome", response
        return response.welcome

    async def dispatch(self) -> registry_service_pb2.Dispatch:
        response = await self.receive()
        assert response.WhichOneof("payload") == "dispatch", response
        return response.dispatch

    async def ended(self) -> bool:
        """Whether the mesh ends the stream (EOF) within ``WAIT``."""
        return await asyncio.wait_for(self.call.read(), WAIT) is aio.EOF

    def close(self) -> None:
        self.end()
        self.call.cancel()


@asynccontextmanager
async def raw_agent(
    client: Client,
    instance_id: str,
    *,
    agent_type: str = "echo",
    register: bool = True,
    hello: bool = True,
    skills: Iterable[agent_types_pb2.AgentSkill] = (),
    **hello_fields: Any,
) -> AsyncIterator[RawAgent]:
    """A raw Connect stream of a registered connected instance, welcomed when this yields."""
    md = await client.md()
    if register:
        await register_connected(client, instance_id, agent_type=agent_type, skills=skills)
    agent = RawAgent(client, md, instance_id)
    try:
        if hello:
            agent.hello(**hello_fields)
            agent.welcomed = await agent.welcome()
        yield agent
    finally:
        agent.close()


async def register_connected(
    client: Client,
    instance_id: str,
    *,
    agent_type: str = "echo",
    skills: Iterable[agent_types_pb2.AgentSkill] = (),
    **fields: Any,
) -> agent_types_pb2.Agent:
    response: registry_service_pb2.RegisterAgentResponse = await client.registry.RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(
            agent_type=agent_type,
            instance_id=instance_id,
            deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_CONNECTED,
            skills=list(skills),
            **fields,
        ),
        metadata=await client.md(),
    )
    return response.agent


# --- mesh calls ---------------------------------------------------------------


def text(value: str) -> message_types_pb2.Part:
    return message_types_pb2.Part(text=value)


def data(value: dict[str, Any]) -> message_types_pb2.Part:
    part = message_types_pb2.Part()
    part.data.update(value)
    return part


def outgoing(
    *parts: message_types_pb2.Part | str, message_id: str = ""
) -> message_service_pb2.OutgoingMessage:
    return message_service_pb2.OutgoingMessage(
        message_id=message_id, parts=[text(p) if isinstance(p, str) else p for p in parts]
    )


async def new_session(client: Client, session_id: str = "", md: Metadata | None = None) -> str:
    response: session_service_pb2.InitSessionResponse = await client.sessions.InitSession(
        session_service_pb2.InitSessionRequest(session_id=session_id), metadata=md or await client.md()
    )
    return response.session.session_id


async def send(
    client: Client,
    session_id: str,
    *parts: message_types_pb2.Part | str,
    message_id: str = "",
    md: Metadata | None = None,
) -> message_types_pb2.Message:
    """SendMessage, bounded by ``WAIT``."""
    response: message_service_pb2.SendMessageResponse = await asyncio.wait_for(
        client.messages.SendMessage(
            message_service_pb2.SendMessageRequest(
                session_id=session_id, message=outgoing(*parts, message_id=message_id)
            ),
            metadata=md or await client.md(),
        ),
        WAIT,
    )
    return response.message


async def get_message(client: Client, session_id: str, message_id: str) -> message_types_pb2.Message:
    response: message_service_pb2.GetMessageResponse = await client.messages.GetMessage(
        message_service_pb2.GetMessageRequest(session_id=session_id, message_id=message_id),
        metadata=await client.md(),
    )
    return response.message


async def wait_for_state(
    client: Client, session_id: str, message_id: str, *states: int
) -> message_types_pb2.Message:
    """Poll GetMessage until the message is in one of ``states``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        message = await get_message(client, session_id, message_id)
        if message.state in states:
            return message
        if loop.time() > deadline:
            raise AssertionError(f"message {message_id} stayed {message.state} ({message.state_reason})")
        await asyncio.sleep(0.01)


async def get_agent(client: Client, instance_id: str) -> agent_types_pb2.Agent:
    response: registry_service_pb2.GetAgentResponse = await client.registry.GetAgent(
        registry_service_pb2.GetAgentRequest(instance_id=instance_id), metadata=await client.md()
    )
    return response.agent


async def invite(client: Client, session_id: str, agent_type: str, instance_id: str = "") -> None:
    await client.sessions.InviteAgent(
        session_service_pb2.InviteAgentRequest(
            session_id=session_id, agent_type=agent_type, instance_id=instance_id
        ),
        metadata=await client.md(),
    )


async def session_agents(client: Client, session_id: str, *, include_departed: bool = False) -> list[Any]:
    response = await client.sessions.ListSessionAgents(
        session_service_pb2.ListSessionAgentsRequest(
            session_id=session_id, include_departed=include_departed
        ),
        metadata=await client.md(),
    )
    return list(response.agents)


async def eventually(predicate: Callable[[], Awaitable[bool]], *, interval: float = 0.01) -> None:
    """Wait until the async ``predicate()`` is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
