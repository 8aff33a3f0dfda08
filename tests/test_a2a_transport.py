"""The A2A transport's own rule: fail over only when the call cannot have reached the agent.

Over real loopback connections: an agent card served over HTTP whose JSON-RPC
interface is a port that accepts no connection (its backlog is full, so the
connection attempt times out rather than being refused).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress

import pytest
from a2a.types import AgentCapabilities, AgentCard, AgentInterface
from a2a.utils.constants import TransportProtocol
from aiohttp import web
from google.protobuf import json_format

from svantic_grpc.core.dispatch import DispatchJob, NotDelivered
from svantic_grpc.core.messages.model import Message, MessageState, Part, Role
from svantic_grpc.core.models import AgentRegistration, DeploymentMode
from svantic_grpc.dispatch.a2a import A2ATransport


@contextmanager
def _silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose connections hang: it listens, but its accept queue is full."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.fixture
async def card_url() -> AsyncIterator[str]:
    """An agent card (served over HTTP on loopback) whose interface never answers."""
    with _silent_port() as silent:
        card = AgentCard(
            name="silent",
            description="an agent that cannot be reached",
            version="1.0.0",
            supported_interfaces=[
                AgentInterface(
                    url=f"http://127.0.0.1:{silent}/",
                    protocol_binding=TransportProtocol.JSONRPC,
                    protocol_version="1.0",
                )
            ],
            capabilities=AgentCapabilities(streaming=True),
            default_input_modes=["text/plain"],
            default_output_modes=["text/plain"],
        )

        async def serve_card(request: web.Request) -> web.Response:
            return web.json_response(json_format.MessageToDict(card))

        app = web.Application()
        app.router.add_get("/.well-known/agent-card.json", serve_card)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


async def test_an_agent_that_never_accepts_the_connection_was_not_delivered_to(card_url: str) -> None:
    transport = A2ATransport(connect_timeout_s=0.3)
    agent = AgentRegistration("acme", "silent", "silent-1", DeploymentMode.HOSTED, 0.0, 0.0, url=card_url)
    message = Message("acme", "s1", "m1", Role.USER, (Part(text="hi"),), MessageState.WORKING, 0.0, 0.0)
    job = DispatchJob("dsp_1", "acme", "s1", agent, message, lambda: "token", 0.0)
    try:
        with pytest.raises(NotDelivered, match="cannot reach the agent"):
            async for _ in transport.dispatch(job):
                pass
    finally:
        await transport.close()
