"""Test support for the mesh's A2A ingress: its HTTP routes served on loopback, and a2a-sdk clients.

``ingress_http(client)`` serves ``MeshServer.a2a.routes()`` with uvicorn on
``127.0.0.1`` (a random port) in the test's loop and points the agent card at it.
``a2a_client(...)`` builds an a2a-sdk client (not our code) from the mesh's public
card for one binding and protocol version; every call carries the mesh token as
``Authorization: Bearer`` through ``call(token)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import uvicorn
from a2a.client import A2ACardResolver, ClientCallContext, ClientConfig, ClientFactory
from a2a.client.client import Client as A2AClient
from a2a.types import AgentCard
from a2a.utils.constants import PROTOCOL_VERSION_1_0, TransportProtocol
from grpc import aio
from starlette.applications import Starlette

from tests._support import Client

WAIT = 5.0


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def ingress_http(client: Client) -> AsyncIterator[str]:
    """Serve the mesh's A2A HTTP routes until the block ends; yields the base URL."""
    sock = _listening_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client.server.a2a.http_base_url = base
    config = uvicorn.Config(
        Starlette(routes=client.server.a2a.routes()),
        log_level="warning",
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(WAIT):
            while not server.started:
                if serving.done():
                    serving.result()
                    raise RuntimeError("the HTTP server stopped before it started")
                await asyncio.sleep(0.005)
        yield base
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(WAIT):
                await serving
        if not serving.done():
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
        sock.close()


def call(token: str) -> ClientCallContext:
    """A client call context carrying the mesh token."""
    return ClientCallContext(service_parameters={"Authorization": f"Bearer {token}"}, timeout=WAIT)


async def public_card(base: str) -> AgentCard:
    async with httpx.AsyncClient() as http:
        return await A2ACardResolver(http, base).get_agent_card()


@contextlib.asynccontextmanager
async def a2a_client(
    base: str,
    binding: str = TransportProtocol.JSONRPC,
    version: str = PROTOCOL_VERSION_1_0,
    *,
    streaming: bool = True,
) -> AsyncIterator[A2AClient]:
    """An a2a-sdk client of the mesh speaking ``binding`` at protocol ``version``, from the public card."""
    card = await public_card(base)
    chosen = [
        i
        for i in card.supported_interfaces
        if i.protocol_binding == binding and i.protocol_version == version
    ]
    assert chosen, f"the card offers no {binding} {version} interface"
    del card.supported_interfaces[:]
    card.supported_interfaces.extend(chosen)
    async with httpx.AsyncClient(timeout=WAIT) as http:
        factory = ClientFactory(
            ClientConfig(
                streaming=streaming,
                httpx_client=http,
                supported_protocol_bindings=[binding],
                grpc_channel_factory=aio.insecure_channel,
            )
        )
        a2a = factory.create(card)
        try:
            yield a2a
        finally:
            await a2a.close()
