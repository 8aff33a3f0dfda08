"""Test support for the mesh's A2A ingress: where its HTTP routes are, and a2a-sdk clients.

``ingress_http(client)`` gives the base URL of the server's own HTTP server
(``http_address`` 127.0.0.1:0 in tests), where the A2A routes are mounted.
``a2a_client(...)`` builds an a2a-sdk client (not our code) from the mesh's public
card for one binding and protocol version; every call carries the mesh token as
``Authorization: Bearer`` through ``call(token)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from a2a.client import A2ACardResolver, ClientCallContext, ClientConfig, ClientFactory
from a2a.client.client import Client as A2AClient
from a2a.types import AgentCard
from a2a.utils.constants import PROTOCOL_VERSION_1_0, TransportProtocol
from grpc import aio

from tests._support import Client

WAIT = 5.0


@contextlib.asynccontextmanager
async def ingress_http(client: Client) -> AsyncIterator[str]:
    """The base URL of the mesh's own HTTP server, where its A2A routes are."""
    yield client.server.http.url


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
