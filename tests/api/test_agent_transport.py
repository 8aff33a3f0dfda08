"""GetAgent reports how the mesh reaches an instance: ``a2a-jsonrpc``, ``a2a-grpc`` or ``a2a-rest`` for
hosted agents.

Before the mesh has read an agent's card (its first dispatch), the card given at registration
says; afterwards, the binding of the client the mesh really uses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from a2a.utils.constants import TransportProtocol
from google.protobuf import json_format, struct_pb2

from svantic_grpc.pb import agent_types_pb2, registry_service_pb2
from tests._support import Client
from tests.agents_a2a import HostedAgent, HostedAgents, hosted_agents
from tests.api.test_messages_hosted import COMPLETED, get_agent, new_session, register, send, target, text

GRPC = TransportProtocol.GRPC
JSONRPC = TransportProtocol.JSONRPC
REST = TransportProtocol.HTTP_JSON


@pytest.fixture
async def agents(client: Client) -> AsyncIterator[HostedAgents]:
    async with hosted_agents(
        client.channel,
        HostedAgent("echo", "echo-j", agent_type="echo-json", binding=JSONRPC),
        HostedAgent("echo", "echo-g", agent_type="echo-grpc", binding=GRPC),
        HostedAgent("echo", "echo-r", agent_type="echo-rest", binding=REST),
    ) as hosted:
        yield hosted


def _card(**fields: Any) -> struct_pb2.Struct:
    card = struct_pb2.Struct()
    card.update({"name": "card-test", "description": "", "version": "1", "skills": [], **fields})
    return card


async def _register_with_card(
    client: Client, instance_id: str, card: struct_pb2.Struct
) -> agent_types_pb2.Agent:
    response = await client.registry.RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(
            agent_type="carded",
            instance_id=instance_id,
            url="http://127.0.0.1:9/a2a",
            deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_HOSTED,
            agent_card=card,
        ),
        metadata=await client.md(),
    )
    return response.agent


@pytest.mark.parametrize(
    ("instance_id", "expected"), [("echo-j", "a2a-jsonrpc"), ("echo-g", "a2a-grpc"), ("echo-r", "a2a-rest")]
)
async def test_a_hosted_agent_reports_the_binding_the_mesh_used(
    client: Client, agents: HostedAgents, instance_id: str, expected: str
) -> None:
    agent = agents[instance_id]
    await register(client, agent)
    assert (await get_agent(client, instance_id)).connection.transport == ""  # no card given, never called
    session_id = await new_session(client)

    message = await send(client, session_id, text("hi"), target(agent.agent_type))

    assert message.state == COMPLETED, message.state_reason
    assert (await get_agent(client, instance_id)).connection.transport == expected
    listed = await client.registry.ListAgents(
        registry_service_pb2.ListAgentsRequest(), metadata=await client.md()
    )
    assert {a.instance_id: a.connection.transport for a in listed.agents}[instance_id] == expected


async def test_the_registered_card_tells_before_the_first_call(client: Client, agents: HostedAgents) -> None:
    agent = agents["echo-g"]
    card = struct_pb2.Struct()
    card.update(json_format.MessageToDict(agent.card))
    registered = (await register(client, agent, agent_card=card)).connection.transport
    assert registered == "a2a-grpc"
    assert (await get_agent(client, "echo-g")).connection.transport == "a2a-grpc"


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        pytest.param(
            {
                "supportedInterfaces": [
                    {"url": "127.0.0.1:1", "protocolBinding": "GRPC", "protocolVersion": "1.0"}
                ]
            },
            "a2a-grpc",
            id="1.0-grpc",
        ),
        pytest.param(
            {
                "supportedInterfaces": [
                    {"url": "http://127.0.0.1:1", "protocolBinding": "HTTP+JSON"},
                    {"url": "http://127.0.0.1:1", "protocolBinding": "JSONRPC"},
                    {"url": "127.0.0.1:1", "protocolBinding": "GRPC"},
                ]
            },
            "a2a-rest",
            id="1.0-first-spoken-wins",
        ),
        pytest.param(
            {"url": "http://127.0.0.1:1", "preferredTransport": "GRPC", "protocolVersion": "0.3.0"},
            "a2a-grpc",
            id="0.3-preferred-grpc",
        ),
        pytest.param(
            {"url": "http://127.0.0.1:1", "protocolVersion": "0.3.0"},
            "a2a-jsonrpc",
            id="0.3-default-jsonrpc",
        ),
        pytest.param(
            {
                "supportedInterfaces": [
                    {"url": "http://127.0.0.1:1", "protocolBinding": "SLIMRPC"},
                    {"url": "http://127.0.0.1:1", "protocolBinding": "JSONRPC"},
                ]
            },
            "a2a-jsonrpc",
            id="1.0-unknown-binding-skipped",
        ),
        pytest.param(
            {"supportedInterfaces": [{"url": "http://127.0.0.1:1", "protocolBinding": "HTTP+JSON"}]},
            "a2a-rest",
            id="1.0-rest-only",
        ),
        pytest.param(
            {"supportedInterfaces": [{"url": "http://127.0.0.1:1", "protocolBinding": "SLIMRPC"}]},
            "",
            id="nothing-the-mesh-speaks",
        ),
        pytest.param({"supportedInterfaces": "grpc please", "capabilities": 3}, "", id="malformed"),
    ],
)
async def test_cards_of_both_protocol_versions_are_read(
    client: Client, card: dict[str, Any], expected: str
) -> None:
    agent = await _register_with_card(client, "carded-1", _card(**card))
    assert agent.connection.transport == expected
    assert (await get_agent(client, "carded-1")).connection.transport == expected


async def test_a_connected_agent_is_reached_over_its_stream(client: Client) -> None:
    response = await client.registry.RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(
            agent_type="worker", instance_id="w-1", deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_CONNECTED
        ),
        metadata=await client.md(),
    )
    assert response.agent.connection.transport == "connect-stream"
