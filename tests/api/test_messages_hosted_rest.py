"""MessageService with hosted agents that speak only A2A's HTTP+JSON (REST) binding.

The agents of ``tests/agents_a2a.py`` with ``binding=HTTP_JSON``: the card offers one
interface, the a2a-sdk REST routes under ``/<instance>/rest``, and no JSON-RPC route
exists for them, so a message can only reach them over REST. The mesh is real
(``running_server``); the helpers are those of the JSON-RPC tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from a2a.utils.constants import TransportProtocol

from tests._support import Client
from tests.agents_a2a import HostedAgent, HostedAgents, hosted_agents
from tests.agents_connected import wait_for_state
from tests.agents_inputs import pending, resolve
from tests.api.test_messages_hosted import (
    COMPLETED,
    FAILED,
    INPUT_REQUIRED,
    artifact_texts,
    assert_one_dispatch_with_a_good_token,
    get_agent,
    new_session,
    register,
    send,
    target,
    text,
)

REST = TransportProtocol.HTTP_JSON


@pytest.fixture
async def agents(client: Client) -> AsyncIterator[HostedAgents]:
    """An echo, an error and an asking agent over HTTP+JSON, served but not registered."""
    async with hosted_agents(
        client.channel,
        HostedAgent("echo", "echo-r", binding=REST),
        HostedAgent("error", "err-r", binding=REST),
        HostedAgent("ask", "ask-r", binding=REST),
    ) as hosted:
        yield hosted


async def test_a_rest_agent_gets_the_message_and_its_token_and_completes_it(
    client: Client, agents: HostedAgents
) -> None:
    echo = agents["echo-r"]
    [interface] = echo.card.supported_interfaces
    assert interface.protocol_binding == REST and interface.url.endswith("/echo-r/rest")
    await register(client, echo)
    session_id = await new_session(client)

    message = await send(client, session_id, text("hello over rest"), target("echo-agent"))

    assert message.state == COMPLETED, message.state_reason
    assert (message.agent_type, message.instance_id) == ("echo-agent", "echo-r")
    assert artifact_texts(message) == ["echo: hello over rest"]
    seen = assert_one_dispatch_with_a_good_token(echo, session_id, message)
    assert seen.text == "hello over rest"
    connection = (await get_agent(client, "echo-r")).connection
    assert (connection.transport, connection.successes, connection.failures) == ("a2a-rest", 1, 0)


async def test_a_rest_agent_error_fails_the_message_with_the_cause(
    client: Client, agents: HostedAgents
) -> None:
    await register(client, agents["err-r"])
    session_id = await new_session(client)

    message = await send(client, session_id, text("go"), target("error-agent"))

    assert message.state == FAILED
    # a2a-sdk's REST server hides the exception's text ("unknown exception"): the mesh says what it got
    assert "err-r" in message.state_reason and "unknown exception" in message.state_reason
    assert len(agents["err-r"].accepted) == 1  # no fail-over: the agent had the message


async def test_a_rest_agent_asks_a_human_and_gets_the_answer_on_its_task(
    client: Client, agents: HostedAgents
) -> None:
    ask = agents["ask-r"]
    await register(client, ask)
    session_id = await new_session(client)

    message = await send(client, session_id, text("hello"), target("ask-agent"))
    assert message.state == INPUT_REQUIRED, message.state_reason
    [request] = (await pending(client, session_id)).requests
    await resolve(client, request.request_id, values={"answer": "Ada"})

    done = await wait_for_state(client, session_id, message.message_id, COMPLETED, FAILED)
    assert done.state == COMPLETED, done.state_reason
    assert artifact_texts(done) == ["Nice to meet you, Ada"]
    first, answer = ask.accepted
    assert answer.task_id == first.task_id  # the answer went to the task that asked
