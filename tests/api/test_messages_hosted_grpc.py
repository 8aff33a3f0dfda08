"""MessageService with hosted agents that speak the A2A gRPC binding.

The agents of ``tests/agents_a2a.py`` with ``binding=GRPC``: each serves its card
over HTTP at the URL it registers with, and the card offers one interface, a
grpc.aio server on 127.0.0.1. No JSON-RPC route exists for them, so a message
can only reach them over gRPC. The mesh is real (``running_server``); the helpers
are those of the JSON-RPC tests in ``test_messages_hosted.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from a2a.utils.constants import TransportProtocol

from tests._support import Client
from tests.agents_a2a import HostedAgent, HostedAgents, hosted_agents
from tests.api.test_messages_hosted import (
    COMPLETED,
    FAILED,
    ROUTED,
    artifact_texts,
    assert_one_dispatch_with_a_good_token,
    get_agent,
    new_session,
    register,
    send,
    session_agents,
    target,
    text,
)

GRPC = TransportProtocol.GRPC
JSONRPC = TransportProtocol.JSONRPC


@pytest.fixture
async def agents(client: Client) -> AsyncIterator[HostedAgents]:
    """An echo and an error agent over gRPC, served but not registered."""
    async with hosted_agents(
        client.channel,
        HostedAgent("echo", "echo-g", binding=GRPC),
        HostedAgent("error", "err-g", binding=GRPC),
    ) as hosted:
        yield hosted


async def test_a_grpc_agent_gets_the_message_and_its_token_and_completes_it(
    client: Client, agents: HostedAgents
) -> None:
    echo = agents["echo-g"]
    [interface] = echo.card.supported_interfaces
    assert interface.protocol_binding == GRPC
    assert interface.url.startswith("127.0.0.1:") and interface.url != echo.url
    await register(client, echo)
    session_id = await new_session(client)

    message = await send(client, session_id, text("hello over grpc"), target("echo-agent"))

    assert message.state == COMPLETED, message.state_reason
    assert (message.agent_type, message.instance_id) == ("echo-agent", "echo-g")
    assert artifact_texts(message) == ["echo: hello over grpc"]
    assert echo.methods == ["SendStreamingMessage"]  # the A2A gRPC method, streamed

    seen = assert_one_dispatch_with_a_good_token(echo, session_id, message)
    assert seen.text == "hello over grpc"

    [joined] = await session_agents(client, session_id)
    assert (joined.agent_type, joined.instance_id, joined.join_reason) == ("echo-agent", "echo-g", ROUTED)
    connection = (await get_agent(client, "echo-g")).connection
    assert (connection.successes, connection.failures, connection.last_error) == (1, 0, "")


async def test_a_grpc_agent_error_fails_the_message_with_the_cause(
    client: Client, agents: HostedAgents
) -> None:
    failing = agents["err-g"]
    await register(client, failing)
    session_id = await new_session(client)

    message = await send(client, session_id, text("go"), target("error-agent"))

    assert message.state == FAILED
    assert "agent blew up: database unavailable" in message.state_reason
    assert "err-g" in message.state_reason
    assert message.instance_id == "err-g"
    [seen] = failing.accepted  # it got the message, with a good token, before it failed
    assert seen.text == "go"
    connection = (await get_agent(client, "err-g")).connection
    assert (connection.successes, connection.failures) == (0, 1)
    assert "agent blew up" in connection.last_error


@pytest.mark.parametrize(
    "binding",
    [JSONRPC, GRPC],
)
async def test_an_agent_crashing_before_its_first_event_fails_the_message_once(
    client: Client, binding: str
) -> None:
    """The message ran on an agent that crashed: it fails with the cause, and is not run again elsewhere."""
    specs = (
        HostedAgent("crash", "crash-1", binding=binding),
        HostedAgent("crash", "crash-2", binding=binding),
    )
    async with hosted_agents(client.channel, *specs) as crashing:
        for agent in crashing:
            await register(client, agent)
        session_id = await new_session(client)

        message = await send(client, session_id, text("go"), target("crash-agent"))

        assert message.state == FAILED
        assert "agent crashed: out of memory" in message.state_reason
        ran_on = [agent.instance_id for agent in crashing if agent.accepted]
        assert len(ran_on) == 1, f"the message ran on {ran_on}"
        ran = crashing[ran_on[0]]
        assert len(ran.accepted) == 1
        assert message.instance_id == ran.instance_id
        assert ran.instance_id in message.state_reason
        connection = (await get_agent(client, ran.instance_id)).connection
        assert (connection.successes, connection.failures) == (0, 1)
        assert "agent crashed" in connection.last_error
        [other] = [a.instance_id for a in crashing if a is not ran]
        untouched = (await get_agent(client, other)).connection
        assert (untouched.successes, untouched.failures) == (0, 0)  # never tried, never blamed


async def test_a_grpc_agent_gone_mid_session_is_replaced_by_another(
    client: Client, agents: HostedAgents
) -> None:
    async with hosted_agents(client.channel, HostedAgent("echo", "echo-doomed", binding=GRPC)) as doomed:
        await register(client, doomed["echo-doomed"])
        session_id = await new_session(client)
        first = await send(client, session_id, text("before"), target("echo-agent"))
        assert (first.state, first.instance_id) == (COMPLETED, "echo-doomed")
    await register(client, agents["echo-g"])  # echo-doomed's servers are gone: UNAVAILABLE

    second = await send(client, session_id, text("after"), target("echo-agent"))

    assert second.state == COMPLETED, second.state_reason
    assert second.instance_id == "echo-g"
    assert [s.text for s in agents["echo-g"].seen] == ["after"]
    gone = (await get_agent(client, "echo-doomed")).connection
    assert (gone.successes, gone.failures) == (1, 1)
    assert "not delivered" in gone.last_error
