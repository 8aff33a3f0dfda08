"""JSON values nest at most MAX_JSON_DEPTH levels, at every door, so whatever is stored reads back.

Before the limit, a data part 31 levels deep was accepted and then broke WatchSession and
Converse for Python clients at that event, on every replay (protobuf's decoders stop at 100
nested messages and each JSON level costs up to 3).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc import aio

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.core._validate import MAX_JSON_DEPTH
from svantic_grpc.pb import (
    agent_types_pb2,
    message_service_pb2,
    message_types_pb2,
    registry_service_pb2,
    session_service_pb2,
)
from tests._support import Client, code_of, error_details
from tests.agents_a2a import HostedAgent, hosted_agents
from tests.agents_connected import data, new_session, running_agent, send

WAIT = 5.0
COMPLETED = message_types_pb2.MESSAGE_STATE_COMPLETED
FAILED = message_types_pb2.MESSAGE_STATE_FAILED
INPUT_REQUIRED = message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED


def nested(depth: int, *, shape: str = "object") -> dict[str, Any]:
    """A value ``depth`` levels deep (the outer object counts 1): objects, or arrays inside one object."""
    value: Any = "bottom"
    for _ in range(depth - 1):
        value = {"next": value} if shape == "object" else [value]
    return {"next": value}


def _deep_parts(message: message_types_pb2.Message) -> list[dict[str, Any]]:
    found = [p for turn in message.history for p in turn.parts if p.HasField("data")]
    found += [p for p in message.parts if p.HasField("data")]
    return [json_format.MessageToDict(p.data) for p in found if "next" in p.data]


async def _watched_messages(
    client: Client, session_id: str, message_id: str
) -> list[message_types_pb2.Message]:
    """Replays the session through WatchSession until the message ends; the copies of it seen."""
    call = client.sessions.WatchSession(
        session_service_pb2.WatchSessionRequest(session_id=session_id),
        metadata=await client.md(),
        timeout=WAIT,
    )
    return await _copies(call, message_id)


async def _conversed_messages(
    client: Client, session_id: str, message_id: str
) -> list[message_types_pb2.Message]:
    """The same, through Converse."""

    async def requests() -> AsyncIterator[message_service_pb2.ConverseRequest]:
        yield message_service_pb2.ConverseRequest(
            open=message_service_pb2.ConverseOpen(session_id=session_id)
        )
        await asyncio.Event().wait()  # keep the stream open; cancelled with the call

    call = client.messages.Converse(requests(), metadata=await client.md(), timeout=WAIT)
    return await _copies(call, message_id)


async def _copies(call: Any, message_id: str) -> list[message_types_pb2.Message]:
    """The copies of the message in the state changes a stream carries, until it ends; then the call ends."""
    seen: list[message_types_pb2.Message] = []
    try:
        async for response in call:
            changed = response.event.message_state_changed
            if changed.message.message_id == message_id:
                seen.append(changed.message)
                if changed.to_state in (COMPLETED, FAILED):
                    break
    finally:
        call.cancel()
    return seen


@pytest.mark.parametrize("shape", ["object", "array"])
async def test_the_deepest_accepted_part_reads_back_through_watch_and_converse(
    client: Client, shape: str
) -> None:
    session_id = await new_session(client)
    deepest = nested(MAX_JSON_DEPTH, shape=shape)

    message = await send(client, session_id, "keep this", data(deepest))
    assert message.state == COMPLETED, message.state_reason

    for seen in (
        await _watched_messages(client, session_id, message.message_id),
        await _conversed_messages(client, session_id, message.message_id),
    ):
        assert seen, "the message's events were not seen"
        assert seen[-1].state == COMPLETED
        assert deepest in _deep_parts(seen[-1])


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 31])  # 31 was accepted once, and broke replays
async def test_one_level_more_is_invalid_argument_naming_the_field(client: Client, depth: int) -> None:
    session_id = await new_session(client)
    with pytest.raises(aio.AioRpcError) as excinfo:
        await send(client, session_id, "too deep", data(nested(depth)))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(excinfo)[1] == "message.parts[1].data"
    assert f"more than {MAX_JSON_DEPTH} levels" in (excinfo.value.details() or "")
    with pytest.raises(aio.AioRpcError) as excinfo:
        await send(client, session_id, "too deep", data(nested(MAX_JSON_DEPTH + 1, shape="array")))
    assert error_details(excinfo)[1] == "message.parts[1].data"
    # Nothing of it was stored: the session replays cleanly.
    listed = await client.messages.ListMessages(
        message_service_pb2.ListMessagesRequest(session_id=session_id), metadata=await client.md()
    )
    assert list(listed.messages) == []


async def test_a_registration_too_deep_is_refused_naming_the_field(client: Client) -> None:
    card = struct_pb2.Struct()
    card.update(nested(MAX_JSON_DEPTH + 1))
    schema = struct_pb2.Struct()
    schema.update(nested(MAX_JSON_DEPTH + 1))
    for fields, field in (
        ({"agent_card": card}, "agent_card"),
        ({"mcp_servers": card}, "mcp_servers"),
        ({"tools": [agent_types_pb2.AgentTool(name="t", input_schema=schema)]}, "tools[0].input_schema"),
    ):
        with pytest.raises(aio.AioRpcError) as excinfo:
            await client.registry.RegisterAgent(
                registry_service_pb2.RegisterAgentRequest(
                    agent_type="deep",
                    instance_id="deep-1",
                    deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_CONNECTED,
                    **fields,
                ),
                metadata=await client.md(),
            )
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(excinfo)[1] == field


async def test_an_agent_reply_too_deep_fails_the_message_naming_the_field(client: Client) -> None:
    async def deep_reply(dispatch: Dispatch, reply: Reply) -> None:
        await reply.complete(nested(MAX_JSON_DEPTH + 1))

    async with running_agent(client, deep_reply, agent_type="deep", instance_id="deep-1"):
        session_id = await new_session(client)
        message = await send(client, session_id, "go", data({"target_agent": "deep/deep-1"}))

    assert message.state == FAILED
    assert "the agent sent an invalid update" in message.state_reason
    assert "parts[0].data" in message.state_reason and f"more than {MAX_JSON_DEPTH}" in message.state_reason
    seen = await _watched_messages(client, session_id, message.message_id)  # replays: nothing unreadable
    assert seen and not any(_deep_parts(m) for m in seen)


async def test_a_hosted_agent_over_a2a_is_held_to_the_same_limit(client: Client) -> None:
    async with hosted_agents(client.channel, HostedAgent("deep", "deep-h")) as agents:
        await client.registry.RegisterAgent(agents["deep-h"].registration(), metadata=await client.md())
        session_id = await new_session(client)
        deepest = await send(client, session_id, str(MAX_JSON_DEPTH), data({"target_agent": "deep-agent"}))
        too_deep = await send(
            client, session_id, str(MAX_JSON_DEPTH + 1), data({"target_agent": "deep-agent"})
        )

    assert deepest.state == COMPLETED, deepest.state_reason
    [artifact] = deepest.artifacts
    assert json_format.MessageToDict(artifact.parts[0].data) == nested(MAX_JSON_DEPTH)
    assert too_deep.state == FAILED
    assert "artifacts[0].parts[0].data" in too_deep.state_reason
    seen = await _watched_messages(client, session_id, deepest.message_id)  # the replay reads it back
    assert seen[-1].artifacts[0] == artifact


async def test_an_agent_asking_with_arguments_too_deep_fails_naming_the_field(client: Client) -> None:
    async def deep_ask(dispatch: Dispatch, reply: Reply) -> None:
        await reply.ask_approval("crm.delete", nested(MAX_JSON_DEPTH + 1))

    async with running_agent(client, deep_ask, agent_type="deep", instance_id="deep-1"):
        session_id = await new_session(client)
        message = await send(client, session_id, "go", data({"target_agent": "deep/deep-1"}))

    assert message.state == FAILED
    assert "input_request.tool_call.arguments" in message.state_reason


async def test_an_answer_too_deep_is_refused_and_a_good_one_still_counts(client: Client) -> None:
    async def asks(dispatch: Dispatch, reply: Reply) -> None:
        values = await reply.ask_form("Why?", [message_types_pb2.FormField(name="why", type="text")])
        await reply.complete(f"because {values}")

    async with running_agent(client, asks, agent_type="asker", instance_id="asker-1"):
        session_id = await new_session(client)
        message = await send(client, session_id, "go", data({"target_agent": "asker/asker-1"}))
        assert message.state == INPUT_REQUIRED, message.state_reason
        [request_id] = message.input_request_ids
        deep = struct_pb2.Struct()
        deep.update(nested(MAX_JSON_DEPTH + 1))
        for resolution, field in (
            (message_types_pb2.Resolution(payload=deep), "resolution.payload"),
            (message_types_pb2.Resolution(values=deep), "resolution.values"),
        ):
            with pytest.raises(aio.AioRpcError) as excinfo:
                await client.messages.ResolveInput(
                    message_service_pb2.ResolveInputRequest(request_id=request_id, resolution=resolution),
                    metadata=await client.md(),
                )
            assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
            assert error_details(excinfo)[1] == field
        good = struct_pb2.Struct()
        good.update({"why": "it is time"})
        resolved = await client.messages.ResolveInput(
            message_service_pb2.ResolveInputRequest(
                request_id=request_id, resolution=message_types_pb2.Resolution(values=good)
            ),
            metadata=await client.md(),
        )
        assert resolved.request.state == message_types_pb2.INPUT_STATE_RESOLVED
