"""MessageService with hosted agents: real a2a-sdk agents on loopback, called by a real server.

Each test runs a mesh (``running_server``) and the agents of ``tests/agents_a2a.py``
in its own event loop. The agents verify every dispatch token with the mesh's
public key and record what they saw; the tests assert what a user of the mesh
sees (message state, reason, output, history, session agents, agent counters)
and what the agent saw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import pytest
from a2a.client import ClientCallContext, ClientConfig, ClientFactory
from a2a.types import Message as A2AMessage
from a2a.types import Part as A2APart
from a2a.types import Role as A2ARole
from a2a.types import SendMessageRequest, TaskState
from google.protobuf import json_format, struct_pb2

from svantic_grpc.pb import (
    agent_types_pb2,
    event_types_pb2,
    message_service_pb2,
    message_types_pb2,
    registry_service_pb2,
    session_service_pb2,
    session_types_pb2,
)
from tests._support import Client, code_of, error_details, running_server
from tests.agents_a2a import AgentServer, HostedAgent, HostedAgents, Seen, closed_port_url, hosted_agents

pb = message_types_pb2
COMPLETED = pb.MESSAGE_STATE_COMPLETED
FAILED = pb.MESSAGE_STATE_FAILED
CANCELED = pb.MESSAGE_STATE_CANCELED
REJECTED = pb.MESSAGE_STATE_REJECTED
WORKING = pb.MESSAGE_STATE_WORKING
SUBMITTED = pb.MESSAGE_STATE_SUBMITTED
INPUT_REQUIRED = pb.MESSAGE_STATE_INPUT_REQUIRED
ROUTED = agent_types_pb2.JOIN_REASON_ROUTED

#: Longest any single call may take here; every wait is bounded by it or less.
CALL_TIMEOUT = 5.0

STANDARD_AGENTS = (
    HostedAgent("echo", "echo-1"),
    HostedAgent("echo", "echo-2"),
    HostedAgent("echo", "echo-3"),
    HostedAgent("slow", "slow-1"),
    HostedAgent("error", "err-1"),
    HostedAgent("streaming", "stream-1"),
    HostedAgent("ask", "ask-1"),
    HostedAgent("json", "json-1"),
)


@pytest.fixture
async def agents(client: Client) -> AsyncIterator[HostedAgents]:
    """The standard agents, served but not registered (each test registers what it needs)."""
    async with hosted_agents(client.channel, *STANDARD_AGENTS) as hosted:
        yield hosted


# --- helpers ------------------------------------------------------------------------------------


def text(value: str) -> pb.Part:
    return pb.Part(text=value)


def data(value: dict[str, Any]) -> pb.Part:
    struct = struct_pb2.Struct()
    struct.update(value)
    return pb.Part(data=struct)


def target(agent_type: str) -> pb.Part:
    return data({"target_agent": agent_type})


async def register(client: Client, agent: AgentServer, **fields: Any) -> agent_types_pb2.Agent:
    response: registry_service_pb2.RegisterAgentResponse = await client.registry.RegisterAgent(
        agent.registration(**fields), metadata=await client.md(), timeout=CALL_TIMEOUT
    )
    return response.agent


async def get_agent(client: Client, instance_id: str) -> agent_types_pb2.Agent:
    response: registry_service_pb2.GetAgentResponse = await client.registry.GetAgent(
        registry_service_pb2.GetAgentRequest(instance_id=instance_id),
        metadata=await client.md(),
        timeout=CALL_TIMEOUT,
    )
    return response.agent


async def new_session(client: Client, client_id: str = "acme-full") -> str:
    response: session_service_pb2.InitSessionResponse = await client.sessions.InitSession(
        session_service_pb2.InitSessionRequest(), metadata=await client.md(client_id), timeout=CALL_TIMEOUT
    )
    return response.session.session_id


async def send(
    client: Client,
    session_id: str,
    *parts: pb.Part,
    client_id: str = "acme-full",
    within: float = CALL_TIMEOUT,
) -> pb.Message:
    """SendMessage, bounded: a hang is a failure, not a stuck test."""
    request = message_service_pb2.SendMessageRequest(
        session_id=session_id, message=message_service_pb2.OutgoingMessage(parts=list(parts))
    )
    call = client.messages.SendMessage(request, metadata=await client.md(client_id), timeout=CALL_TIMEOUT)
    response: message_service_pb2.SendMessageResponse = await asyncio.wait_for(call, within)
    return response.message


async def get_message(
    client: Client, session_id: str, message_id: str, client_id: str = "acme-full"
) -> pb.Message:
    response: message_service_pb2.GetMessageResponse = await client.messages.GetMessage(
        message_service_pb2.GetMessageRequest(session_id=session_id, message_id=message_id),
        metadata=await client.md(client_id),
        timeout=CALL_TIMEOUT,
    )
    return response.message


async def list_messages(
    client: Client, client_id: str = "acme-full", **fields: Any
) -> message_service_pb2.ListMessagesResponse:
    response: message_service_pb2.ListMessagesResponse = await client.messages.ListMessages(
        message_service_pb2.ListMessagesRequest(**fields),
        metadata=await client.md(client_id),
        timeout=CALL_TIMEOUT,
    )
    return response


async def session_agents(
    client: Client, session_id: str, *, include_departed: bool = False
) -> list[session_types_pb2.SessionAgent]:
    response = await client.sessions.ListSessionAgents(
        session_service_pb2.ListSessionAgentsRequest(
            session_id=session_id, include_departed=include_departed
        ),
        metadata=await client.md(),
        timeout=CALL_TIMEOUT,
    )
    return [a for a in response.agents if not a.internal]


async def session_events(
    client: Client,
    session_id: str,
    until: Callable[[event_types_pb2.SessionEvent], bool],
    *,
    within: float = 2.0,
    then_idle: float = 0.1,
) -> list[event_types_pb2.SessionEvent]:
    """WatchSession from the start until an event matches ``until``, then what follows in ``then_idle``."""
    call = client.sessions.WatchSession(
        session_service_pb2.WatchSessionRequest(session_id=session_id, after_sequence=0),
        metadata=await client.md(),
    )
    events: list[event_types_pb2.SessionEvent] = []
    try:
        async with asyncio.timeout(within):
            while not events or not until(events[-1]):
                response = await call.read()
                assert response is not grpc.aio.EOF, "the session's event stream ended early"
                events.append(response.event)
        while True:
            try:
                response = await asyncio.wait_for(call.read(), then_idle)
            except TimeoutError:
                break
            if response is grpc.aio.EOF:
                break
            events.append(response.event)
    finally:
        call.cancel()
    return events


def ended(message_id: str) -> Callable[[event_types_pb2.SessionEvent], bool]:
    """Matches the event that moves ``message_id`` to a terminal or input-required state."""
    stops = {COMPLETED, FAILED, CANCELED, REJECTED, INPUT_REQUIRED}

    def match(event: event_types_pb2.SessionEvent) -> bool:
        change = event.message_state_changed
        return (
            event.HasField("message_state_changed")
            and change.message_id == message_id
            and change.to_state in stops
        )

    return match


async def eventually(check: Callable[[], bool], *, within: float = 2.0) -> bool:
    """Poll ``check`` until it holds or ``within`` seconds pass; returns its last value."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _all(events: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in events]


def artifact_texts(message: pb.Message) -> list[str]:
    return [p.text for a in message.artifacts for p in a.parts if p.HasField("text")]


def turn_texts(message: pb.Message) -> list[str]:
    return [p.text for t in message.history for p in t.parts if p.HasField("text")]


def assert_one_dispatch_with_a_good_token(agent: AgentServer, session_id: str, message: pb.Message) -> Seen:
    """The agent saw one request: its token verified, with claims about this session and instance."""
    [seen] = agent.seen
    assert seen.token_error == ""
    claims = seen.claims
    assert claims is not None
    assert claims["aud"] == agent.instance_id
    assert claims["iss"] == "svantic-grpc"
    assert claims["tenant_id"] == "acme"
    assert claims["agent_type"] == "echo-agent"
    assert claims["session_id"] == session_id
    assert claims["dispatch_id"].startswith("dsp_")
    assert 0 < claims["exp"] - time.time() <= 600  # minutes, not hours
    assert 0 < claims["exp"] - claims["iat"] <= 600
    assert seen.context_id == session_id
    assert seen.metadata["svantic"] == {"session_id": session_id, "message_id": message.message_id}
    return seen


# --- routing to a hosted agent ------------------------------------------------------------------


async def test_target_agent_reaches_the_hosted_agent_which_verifies_its_token(
    client: Client, agents: HostedAgents
) -> None:
    echo = agents["echo-1"]
    await register(client, echo)
    session_id = await new_session(client)

    message = await send(client, session_id, text("hello there"), target("echo-agent"))

    assert message.state == COMPLETED, message.state_reason
    assert (message.agent_type, message.instance_id) == ("echo-agent", "echo-1")
    assert artifact_texts(message) == ["echo: hello there"]
    assert message.history[0].role == pb.ROLE_USER
    assert message.history[0].parts[0].text == "hello there"
    assert message.sender == "acme-full"

    seen = assert_one_dispatch_with_a_good_token(echo, session_id, message)
    assert seen.text == "hello there"

    [joined] = await session_agents(client, session_id)
    assert (joined.agent_type, joined.instance_id, joined.join_reason) == ("echo-agent", "echo-1", ROUTED)
    connection = (await get_agent(client, "echo-1")).connection
    assert (connection.successes, connection.failures, connection.last_error) == (1, 0, "")
    assert connection.last_dispatch_at.seconds > 0


async def test_each_dispatch_has_its_own_token_bound_to_the_instance(
    client: Client, agents: HostedAgents
) -> None:
    echo = agents["echo-1"]
    await register(client, echo)
    session_id = await new_session(client)
    await send(client, session_id, text("one"), target("echo-agent"))
    await send(client, session_id, text("two"), target("echo-agent"))
    first, second = echo.accepted
    assert first.claims is not None and second.claims is not None
    assert first.claims["dispatch_id"] != second.claims["dispatch_id"]
    assert first.claims["jti"] == first.claims["dispatch_id"]

    # The same token replayed to another instance fails there (its audience is echo-1), as does no token.
    other = agents["echo-2"]
    async with httpx.AsyncClient(timeout=CALL_TIMEOUT) as http:
        factory = ClientFactory(ClientConfig(httpx_client=http, streaming=False))
        a2a = await asyncio.wait_for(factory.create_from_url(other.url), CALL_TIMEOUT)
        try:
            for index, token in enumerate((first.token, "")):
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                request = SendMessageRequest(
                    message=A2AMessage(
                        message_id=f"replay-{index}", role=A2ARole.ROLE_USER, parts=[A2APart(text="replayed")]
                    )
                )
                call = a2a.send_message(request, context=ClientCallContext(service_parameters=headers))
                events = await asyncio.wait_for(_all(call), CALL_TIMEOUT)
                assert events[-1].task.status.state == TaskState.TASK_STATE_REJECTED
        finally:
            await a2a.close()
    replayed, missing = other.seen
    assert replayed.claims is None and "audience" in replayed.token_error.lower()
    assert missing.claims is None and missing.token_error == "missing bearer token"


async def test_an_agent_trusting_another_mesh_rejects_the_dispatch(agents: HostedAgents) -> None:
    """The agents verify with the first mesh's key; a second mesh's tokens do not verify (a mesh
    with another signing key: one with the same key derives the same dispatch key, as replicas do)."""
    async with running_server(
        env={"SVANTIC_SIGNING_KEY": "another-mesh-signing-key-0123456789abcdef"}
    ) as other_mesh:
        await register(other_mesh, agents["echo-1"])
        session_id = await new_session(other_mesh)
        message = await send(other_mesh, session_id, text("hi"), target("echo-agent"))
    assert message.state == REJECTED
    assert "dispatch token rejected" in message.state_reason
    [seen] = agents["echo-1"].seen
    assert seen.claims is None
    assert seen.token_error.startswith("invalid token")


async def test_skill_match_routes_without_target_agent(client: Client, agents: HostedAgents) -> None:
    await register(client, agents["echo-1"])
    await register(client, agents["stream-1"])
    session_id = await new_session(client)

    echoed = await send(client, session_id, text("please repeat after me"))
    reported = await send(client, session_id, text("write a report on sales"))

    assert echoed.state == COMPLETED and echoed.instance_id == "echo-1"
    assert artifact_texts(echoed) == ["echo: please repeat after me"]
    assert reported.state == COMPLETED and reported.instance_id == "stream-1"
    assert [s.text for s in agents["echo-1"].seen] == ["please repeat after me"]
    assert [s.text for s in agents["stream-1"].seen] == ["write a report on sales"]


async def test_no_skill_match_goes_to_chat_which_lists_the_capabilities(
    client: Client, agents: HostedAgents
) -> None:
    await register(client, agents["echo-1"])
    await register(client, agents["ask-1"])
    session_id = await new_session(client)

    message = await send(client, session_id, text("what is the weather like"))

    assert message.state == COMPLETED, message.state_reason
    assert (message.agent_type, message.instance_id) == ("savant:chat", f"chat-{session_id}")
    answer = message.history[-1]
    assert answer.role == pb.ROLE_AGENT and answer.instance_id == f"chat-{session_id}"
    said = "\n".join(p.text for p in answer.parts if p.HasField("text"))
    assert "echo-agent" in said and "ask-agent" in said
    [capabilities] = [json_format.MessageToDict(p.data) for p in answer.parts if p.HasField("data")]
    assert set(capabilities["capabilities"]["agent_types"]) == {"echo-agent", "ask-agent"}
    assert agents.seen == []  # no remote agent was called
    assert await session_agents(client, session_id) == []


# --- affinity, load and capacity ---------------------------------------------------------------


async def test_session_affinity_keeps_the_instance_across_messages(
    client: Client, agents: HostedAgents
) -> None:
    await register(client, agents["echo-1"])
    session_id = await new_session(client)
    first = await send(client, session_id, text("first"), target("echo-agent"))
    await register(client, agents["echo-2"])  # idle, so less loaded than echo-1

    second = await send(client, session_id, text("second"), target("echo-agent"))

    assert first.instance_id == second.instance_id == "echo-1"
    assert [s.text for s in agents["echo-1"].seen] == ["first", "second"]
    assert agents["echo-2"].seen == []
    joined = await session_agents(client, session_id)
    assert [(a.instance_id, a.join_reason) for a in joined] == [("echo-1", ROUTED)]


async def test_a_fresh_session_gets_the_least_loaded_of_three_instances(
    client: Client, agents: HostedAgents
) -> None:
    # echo-3 registers first, so "most recently seen" would not pick it: only load does.
    for instance_id in ("echo-3", "echo-1", "echo-2"):
        await register(client, agents[instance_id])
    busy_a, busy_b = await new_session(client), await new_session(client)
    for session_id, instance_id in ((busy_a, "echo-1"), (busy_b, "echo-1"), (busy_a, "echo-2")):
        await client.sessions.InviteAgent(
            session_service_pb2.InviteAgentRequest(
                session_id=session_id, agent_type="echo-agent", instance_id=instance_id
            ),
            metadata=await client.md(),
            timeout=CALL_TIMEOUT,
        )
    fresh = await new_session(client)

    message = await send(client, fresh, text("who takes this"), target("echo-agent"))

    assert message.state == COMPLETED
    assert message.instance_id == "echo-3"
    assert [s.context_id for s in agents["echo-3"].seen] == [fresh]
    assert agents["echo-1"].seen == agents["echo-2"].seen == []
    [joined] = await session_agents(client, fresh)
    assert (joined.instance_id, joined.join_reason) == ("echo-3", ROUTED)
    assert fresh in (await get_agent(client, "echo-3")).session_ids


async def test_an_instance_at_capacity_is_not_routed_and_the_message_fails(
    client: Client, agents: HostedAgents
) -> None:
    await register(client, agents["echo-1"], max_concurrent_sessions=1)
    taken = await new_session(client)
    assert (await send(client, taken, text("mine"), target("echo-agent"))).state == COMPLETED
    other = await new_session(client)

    started = time.monotonic()
    message = await send(client, other, text("and mine?"), target("echo-agent"))

    assert time.monotonic() - started < 2.5
    assert message.state == FAILED
    assert "echo-agent" in message.state_reason
    assert "busy" in message.state_reason
    assert [s.context_id for s in agents["echo-1"].seen] == [taken]
    assert await session_agents(client, other) == []


async def test_no_registered_agent_of_the_target_type_fails_the_message(client: Client) -> None:
    session_id = await new_session(client)
    started = time.monotonic()
    message = await send(client, session_id, text("anyone?"), target("ghost-agent"))
    assert time.monotonic() - started < 2.5
    assert message.state == FAILED
    assert "ghost-agent" in message.state_reason
    assert "none is registered" in message.state_reason


# --- failures -----------------------------------------------------------------------------------


async def test_an_agent_that_does_not_finish_in_time_fails_the_message_and_is_canceled() -> None:
    async with (
        running_server(dispatch={"timeout_ms": 300}) as client,
        hosted_agents(client.channel, HostedAgent("slow", "slow-1")) as agents,
    ):
        slow = agents["slow-1"]
        await register(client, slow)
        session_id = await new_session(client)

        started = time.monotonic()
        message = await send(client, session_id, text("take your time"), target("slow-agent"))

        assert time.monotonic() - started < 2.5
        assert message.state == FAILED
        assert "did not finish within 0.3s" in message.state_reason
        assert "slow-1" in message.state_reason
        assert "working slowly..." in turn_texts(message)  # what it said before the deadline is kept
        assert len(slow.accepted) == 1
        assert await eventually(lambda: slow.cancels == [slow.seen[0].task_id]), slow.methods
        connection = (await get_agent(client, "slow-1")).connection
        assert (connection.successes, connection.failures) == (0, 1)
        assert "did not finish within" in connection.last_error


async def test_an_agent_error_fails_the_message_with_the_cause(client: Client, agents: HostedAgents) -> None:
    await register(client, agents["err-1"])
    session_id = await new_session(client)

    message = await send(client, session_id, text("go"), target("error-agent"))

    assert message.state == FAILED
    assert "agent blew up: database unavailable" in message.state_reason
    assert "err-1" in message.state_reason
    assert message.instance_id == "err-1"
    connection = (await get_agent(client, "err-1")).connection
    assert (connection.successes, connection.failures) == (0, 1)
    assert "agent blew up" in connection.last_error


async def test_an_unreachable_instance_fails_over_to_another_of_its_type(
    client: Client, agents: HostedAgents
) -> None:
    await register(client, agents["echo-1"])
    # Registered last and sorting first: routing tries it before echo-1.
    gone_url = closed_port_url("echo-0-gone")
    await register(client, agents["echo-2"], instance_id="echo-0-gone", url=gone_url)
    session_id = await new_session(client)

    message = await send(client, session_id, text("still there?"), target("echo-agent"))

    assert message.state == COMPLETED, message.state_reason
    assert message.instance_id == "echo-1"
    assert artifact_texts(message) == ["echo: still there?"]
    gone = (await get_agent(client, "echo-0-gone")).connection
    assert (gone.successes, gone.failures) == (0, 1)
    assert "not delivered" in gone.last_error
    everyone = await session_agents(client, session_id, include_departed=True)
    by_id = {a.instance_id: a for a in everyone}
    assert by_id["echo-0-gone"].join_reason == ROUTED and by_id["echo-0-gone"].HasField("left_at")
    assert by_id["echo-1"].join_reason == ROUTED and not by_id["echo-1"].HasField("left_at")
    events = await session_events(client, session_id, ended(message.message_id))
    [left] = [e.agent_left for e in events if e.HasField("agent_left")]
    assert left.instance_id == "echo-0-gone"
    assert left.reason.startswith("unreachable")
    assert session_id not in (await get_agent(client, "echo-0-gone")).session_ids


async def test_an_instance_that_vanished_mid_session_is_replaced_by_another(
    client: Client, agents: HostedAgents
) -> None:
    async with hosted_agents(client.channel, HostedAgent("echo", "echo-9")) as doomed:
        await register(client, doomed["echo-9"])
        session_id = await new_session(client)
        first = await send(client, session_id, text("before"), target("echo-agent"))
        assert first.instance_id == "echo-9"
    await register(client, agents["echo-1"])  # echo-9's server is gone now

    second = await send(client, session_id, text("after"), target("echo-agent"))

    assert second.state == COMPLETED, second.state_reason
    assert second.instance_id == "echo-1"
    assert [s.text for s in agents["echo-1"].seen] == ["after"]
    present = {a.instance_id for a in await session_agents(client, session_id)}
    assert present == {"echo-1"}
    failed = (await get_agent(client, "echo-9")).connection
    assert (failed.successes, failed.failures) == (1, 1)


async def test_an_unreachable_instance_with_no_other_fails_the_message(client: Client) -> None:
    registration = registry_service_pb2.RegisterAgentRequest(
        agent_type="echo-agent",
        instance_id="echo-gone",
        url=closed_port_url(),
        deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_HOSTED,
    )
    await client.registry.RegisterAgent(registration, metadata=await client.md(), timeout=CALL_TIMEOUT)
    session_id = await new_session(client)

    started = time.monotonic()
    message = await send(client, session_id, text("hello?"), target("echo-agent"))

    assert time.monotonic() - started < 2.5
    assert message.state == FAILED
    assert "echo-agent" in message.state_reason
    assert "reach" in message.state_reason
    assert "echo-gone" in message.state_reason


async def test_cancel_while_working(client: Client, agents: HostedAgents) -> None:
    slow = agents["slow-1"]
    await register(client, slow)
    session_id = await new_session(client)
    sending = asyncio.create_task(send(client, session_id, text("long job"), target("slow-agent")))
    try:
        assert await eventually(lambda: len(slow.accepted) == 1), "the slow agent never got the dispatch"
        [listed] = (await list_messages(client, session_id=session_id)).messages
        assert listed.state == WORKING
        message_id = listed.message_id

        canceled = await client.messages.CancelMessage(
            message_service_pb2.CancelMessageRequest(
                session_id=session_id, message_id=message_id, reason="the user changed their mind"
            ),
            metadata=await client.md(),
            timeout=CALL_TIMEOUT,
        )
        assert canceled.message.state == CANCELED
        assert canceled.message.state_reason == "the user changed their mind"

        returned = await asyncio.wait_for(sending, 2)
        assert returned.message_id == message_id
        assert returned.state == CANCELED
        assert returned.state_reason == "the user changed their mind"
    finally:
        sending.cancel()

    with pytest.raises(grpc.aio.AioRpcError) as again:
        await client.messages.CancelMessage(
            message_service_pb2.CancelMessageRequest(session_id=session_id, message_id=message_id),
            metadata=await client.md(),
            timeout=CALL_TIMEOUT,
        )
    assert code_of(again) == grpc.StatusCode.FAILED_PRECONDITION
    assert (await get_message(client, session_id, message_id)).state == CANCELED
    assert await eventually(lambda: slow.cancels == [slow.seen[0].task_id]), slow.methods


# --- streaming ----------------------------------------------------------------------------------


async def test_streaming_send_yields_status_turns_artifacts_and_the_final_snapshot(
    client: Client, agents: HostedAgents
) -> None:
    await register(client, agents["stream-1"])
    session_id = await new_session(client)
    call = client.messages.SendStreamingMessage(
        message_service_pb2.SendStreamingMessageRequest(
            session_id=session_id,
            message=message_service_pb2.OutgoingMessage(parts=[text("quarterly"), target("streaming-agent")]),
        ),
        metadata=await client.md(),
        timeout=CALL_TIMEOUT,
    )

    async def collect() -> list[event_types_pb2.SessionEvent]:
        return [response.event async for response in call]

    events = await asyncio.wait_for(collect(), 3)

    kinds = [e.WhichOneof("event") for e in events]
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert all(e.session_id == session_id for e in events)
    states = [e.message_state_changed.to_state for e in events if e.HasField("message_state_changed")]
    assert states[:2] == [SUBMITTED, WORKING]
    assert states[-1] == COMPLETED
    assert kinds[-1] == "message_state_changed"  # the stream ends with the final state
    turns = [p.text for e in events if e.HasField("turn_added") for p in e.turn_added.turn.parts]
    assert turns == ["progress 1/2", "progress 2/2", "all done"]
    [artifact] = [e.artifact_added.artifact for e in events if e.HasField("artifact_added")]
    assert [p.text for p in artifact.parts] == ["report on quarterly"]
    message_ids = {
        getattr(e, e.WhichOneof("event")).message_id
        for e in events
        if e.WhichOneof("event") != "agent_joined"
    }
    assert len(message_ids) == 1
    snapshot = events[-1].message_state_changed.message
    assert snapshot.state == COMPLETED
    assert snapshot.instance_id == "stream-1"
    assert artifact_texts(snapshot) == ["report on quarterly"]
    assert turn_texts(snapshot)[-1] == "all done"


# --- isolation ----------------------------------------------------------------------------------


async def test_two_sessions_sharing_one_instance_do_not_see_each_other(
    client: Client, agents: HostedAgents
) -> None:
    echo = agents["echo-1"]
    await register(client, echo)
    session_a, session_b = await new_session(client), await new_session(client)

    alpha, beta = await asyncio.gather(
        send(client, session_a, text("alpha secret"), target("echo-agent")),
        send(client, session_b, text("beta secret"), target("echo-agent")),
    )

    assert alpha.state == beta.state == COMPLETED
    assert alpha.instance_id == beta.instance_id == "echo-1"
    contexts = {s.text: s.context_id for s in echo.seen}
    assert contexts == {"alpha secret": session_a, "beta secret": session_b}
    claimed = {s.text: (s.claims or {}).get("session_id") for s in echo.seen}
    assert claimed == {"alpha secret": session_a, "beta secret": session_b}
    assert artifact_texts(alpha) == ["echo: alpha secret"]
    assert artifact_texts(beta) == ["echo: beta secret"]

    for mine, theirs, session_id in ((alpha, beta, session_a), (beta, alpha, session_b)):
        listed = (await list_messages(client, session_id=session_id)).messages
        assert [m.message_id for m in listed] == [mine.message_id]
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await get_message(client, session_id, theirs.message_id)
        assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
        seen_ids = {
            getattr(e, kind).message_id
            for e in await session_events(client, session_id, ended(mine.message_id))
            if (kind := e.WhichOneof("event")) in ("message_state_changed", "turn_added", "artifact_added")
        }
        assert seen_ids == {mine.message_id}

    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await get_message(client, session_a, alpha.message_id, client_id="globex-full")
    assert code_of(foreign) == grpc.StatusCode.NOT_FOUND
    assert (await list_messages(client, client_id="globex-full")).messages == []


# --- critic, input-required, plans --------------------------------------------------------------


async def test_the_critic_fails_output_that_does_not_fit_the_skill_after_one_retry(
    client: Client, agents: HostedAgents
) -> None:
    json_agent = agents["json-1"]
    await register(client, json_agent)
    session_id = await new_session(client)

    message = await send(client, session_id, text("give me json"), target("json-agent"))

    assert message.state == FAILED
    assert message.state_reason.startswith("critic:")
    assert "application/json" in message.state_reason
    assert len(json_agent.accepted) == 2  # the first try and one retry
    assert {s.context_id for s in json_agent.accepted} == {session_id}


async def test_an_agent_asking_for_input_leaves_the_message_input_required(
    client: Client, agents: HostedAgents
) -> None:
    await register(client, agents["ask-1"])
    session_id = await new_session(client)

    message = await send(client, session_id, text("hello"), target("ask-agent"))

    assert message.state == INPUT_REQUIRED
    assert message.state_reason == "waiting for a human: answer: What is your name?"
    assert len(message.input_request_ids) == 1
    assert message.history[-1].role == pb.ROLE_AGENT
    assert message.history[-1].instance_id == "ask-1"
    assert turn_texts(message)[-1] == "What is your name?"
    assert (await get_message(client, session_id, message.message_id)).state == INPUT_REQUIRED


async def test_the_mesh_leaves_the_agents_input_required_task_alone(
    client: Client, agents: HostedAgents
) -> None:
    ask = agents["ask-1"]
    await register(client, ask)
    session_id = await new_session(client)
    message = await send(client, session_id, text("hello"), target("ask-agent"))
    assert message.state == INPUT_REQUIRED
    await asyncio.sleep(0.2)  # the cancel, when it comes, comes within milliseconds
    assert ask.cancels == []
    assert ask.methods == ["SendStreamingMessage"]


async def test_no_cancel_is_sent_for_a_completed_task(client: Client, agents: HostedAgents) -> None:
    echo = agents["echo-1"]
    await register(client, echo)
    session_id = await new_session(client)
    assert (await send(client, session_id, text("hi"), target("echo-agent"))).state == COMPLETED
    await asyncio.sleep(0.2)
    assert echo.methods == ["SendStreamingMessage"]


async def test_messages_to_a_hosted_agent_reuse_one_http_connection(
    client: Client, agents: HostedAgents
) -> None:
    # The agent sees one connection, not a new one (a TCP handshake and a socket in TIME_WAIT)
    # per message: the mesh reads each stream to its end, so the connection goes back to its pool.
    echo = agents["echo-1"]
    await register(client, echo)
    session_id = await new_session(client)
    for word in ("one", "two", "three"):
        assert (await send(client, session_id, text(word), target("echo-agent"))).state == COMPLETED
    assert echo.methods == ["SendStreamingMessage"] * 3
    assert len(set(echo.peers)) == 1, echo.peers


async def test_a_plan_runs_its_steps_in_order(client: Client, agents: HostedAgents) -> None:
    echo = agents["echo-1"]
    await register(client, echo)
    session_id = await new_session(client)
    plan = {
        "plan": [
            {"target_agent": "echo-agent", "text": "one"},
            {"target_agent": "echo-agent", "text": "two"},
        ]
    }

    message = await send(client, session_id, text("do the plan"), data({"action_data": plan}))

    assert message.state == COMPLETED, message.state_reason
    assert "2 steps" in message.state_reason
    assert artifact_texts(message) == ["echo: one", "echo: two"]
    assert [s.text for s in echo.accepted] == ["one", "two"]
    assert len({(s.claims or {}).get("dispatch_id") for s in echo.accepted}) == 2
    assert {s.context_id for s in echo.accepted} == {session_id}


async def test_each_message_of_a_conversation_carries_a_token_of_its_own(
    client: Client, agents: HostedAgents
) -> None:
    """Messages in a row to one agent (the mesh signs the next one's token once the last is
    answered): each call's token verifies and names its own dispatch."""
    echo = agents["echo-1"]
    await register(client, echo)
    session_id = await new_session(client)
    words = ["one", "two", "three", "four"]
    for word in words:
        message = await send(client, session_id, text(word), data({"target_agent": "echo-agent"}))
        assert message.state == COMPLETED, message.state_reason

    assert [s.text for s in echo.accepted] == words  # every token verified (the rest are refused)
    claims = [s.claims or {} for s in echo.accepted]
    assert len({c["dispatch_id"] for c in claims}) == len(words)
    assert all(c["jti"] == c["dispatch_id"] for c in claims)
    assert {(c["session_id"], c["aud"], c["agent_type"]) for c in claims} == {
        (session_id, "echo-1", "echo-agent")
    }


# --- reading and validation ---------------------------------------------------------------------


async def test_list_messages_filters_by_session_and_state_and_pages(
    client: Client, agents: HostedAgents
) -> None:
    await register(client, agents["echo-1"])
    session_a, session_b = await new_session(client), await new_session(client)
    sent_a = [await send(client, session_a, text(f"note {i}"), target("echo-agent")) for i in range(3)]
    failed_b = await send(client, session_b, text("nobody home"), target("ghost-agent"))
    assert [m.state for m in sent_a] == [COMPLETED] * 3 and failed_b.state == FAILED

    in_a = (await list_messages(client, session_id=session_a)).messages
    assert [m.message_id for m in in_a] == [m.message_id for m in sent_a]
    failed = (await list_messages(client, states=[FAILED])).messages
    assert [m.message_id for m in failed] == [failed_b.message_id]
    assert (await list_messages(client, session_id=session_a, states=[FAILED])).messages == []
    assert len((await list_messages(client)).messages) == 4

    first = await list_messages(client, session_id=session_a, page_size=2)
    assert len(first.messages) == 2 and first.next_page_token
    second = await list_messages(client, session_id=session_a, page_size=2, page_token=first.next_page_token)
    assert len(second.messages) == 1 and not second.next_page_token
    paged = [m.message_id for m in (*first.messages, *second.messages)]
    assert paged == [m.message_id for m in sent_a]


async def test_get_unknown_message_is_not_found(client: Client) -> None:
    session_id = await new_session(client)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await get_message(client, session_id, "msg_nope")
    assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("parts", "field"),
    [
        pytest.param([], "message.parts", id="no-parts"),
        pytest.param([pb.Part()], "message.parts[0]", id="empty-part"),
        pytest.param([text("x"), target("bad agent!")], "message.target_agent", id="bad-target"),
        pytest.param(
            [text("x"), data({"action_data": {"plan": "step one"}})], "message.action_data.plan", id="plan"
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field_and_stores_nothing(
    client: Client, parts: list[pb.Part], field: str
) -> None:
    session_id = await new_session(client)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await send(client, session_id, *parts)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(excinfo) == ("INVALID_ARGUMENT", field)
    assert (await list_messages(client, session_id=session_id)).messages == []
