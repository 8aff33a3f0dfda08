"""A connected agent whose ``Connect`` stream another replica holds (three servers in this process).

The agent is connected to replica c, the session is owned by a, the message is sent on b: the
owner's dispatch reaches the agent through PostgreSQL and its updates come back the same way.
Every replica shows the agent connected; an approval the agent asks for is answered on another
replica; an agent that drops mid-dispatch fails the message, which never runs twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.pb import message_service_pb2, message_types_pb2
from tests import _postgres
from tests._support import Client, running_server
from tests.adapters.e2e_support import AGENT_TYPE, ENV, INPUT_REQUIRED, POLICIES, TENANT, ApprovalAgent, until
from tests.agents_connected import (
    WAIT,
    data,
    eventually,
    get_agent,
    new_session,
    running_agent,
    send,
    wait_for_state,
)
from tests.agents_inputs import resolution

COMPLETED = message_types_pb2.MESSAGE_STATE_COMPLETED
FAILED = message_types_pb2.MESSAGE_STATE_FAILED


@asynccontextmanager
async def _three(dispatch_timeout_ms: int) -> AsyncIterator[list[Client]]:
    """Three replicas on one fresh schema (dropped afterwards)."""
    _postgres.require_postgres()
    schema = _postgres.new_schema()
    try:
        async with AsyncExitStack() as stack:
            settings: dict[str, Any] = {
                "store": _postgres.POSTGRES_DSN,
                "postgres": {"schema_name": schema, "pool_size": 4},
                "replica": {"lease_ms": 2000, "renew_ms": 500},
                "policies": POLICIES,
                "dispatch": {"timeout_ms": dispatch_timeout_ms},
            }
            yield [await stack.enter_async_context(running_server(env=ENV, **settings)) for _ in range(3)]
    finally:
        await _postgres.drop_schema(schema)


@pytest.fixture
async def replicas() -> AsyncIterator[list[Client]]:
    async with _three(dispatch_timeout_ms=1500) as three:  # a human's time does not count
        yield three


def _replica(client: Client) -> str:
    return client.server.mesh.ownership.replica_id


async def test_a_message_reaches_an_agent_connected_to_another_replica(replicas: list[Client]) -> None:
    a, b, c = replicas
    runs: list[str] = []

    async def echo(dispatch: Dispatch, reply: Reply) -> None:
        runs.append(dispatch.session_id)
        await reply.say("working on it")
        await reply.complete(f"echo from the agent on c: {len(runs)}")

    async with running_agent(c, echo, agent_type="echo", instance_id="echo-c"):
        # Every replica shows it connected, held by c.
        for client in replicas:
            agent = await get_agent(client, "echo-c")
            assert agent.connection.connected, client
            assert agent.connection.replica == _replica(c), client

        session_id = await new_session(a)
        answered = await send(b, session_id, "hello", data({"target_agent": "echo"}))
        assert answered.state == COMPLETED, (answered.state, answered.state_reason)
        agent_turns = [t for t in answered.history if t.role == message_types_pb2.ROLE_AGENT]
        agent_said = [p.text for t in agent_turns for p in t.parts]
        assert agent_said == ["working on it", "echo from the agent on c: 1"]
        assert runs == [session_id]  # once, on the agent
        assert (TENANT, session_id) in a.server.mesh.messages._runtimes  # decided on the owner
        assert (TENANT, session_id) not in c.server.mesh.messages._runtimes

    # Gone from c: no replica shows it connected any more.
    for client in replicas:

        async def gone(client: Client = client) -> bool:
            connection = (await get_agent(client, "echo-c")).connection
            return not connection.connected and not connection.replica

        await eventually(gone)


async def test_outputs_sent_apart_from_the_final_state_do_not_end_a_relayed_dispatch(
    replicas: list[Client],
) -> None:
    a, b, c = replicas

    async def slow(dispatch: Dispatch, reply: Reply) -> None:
        await reply.artifact("first part", name="part-1")  # an update with no state of its own
        await asyncio.sleep(0.1)  # its own frame, not folded into the next
        await reply.artifact("second part", name="part-2")
        await asyncio.sleep(0.1)
        await reply.complete("done")

    async with running_agent(c, slow, agent_type="slow", instance_id="slow-c"):
        session_id = await new_session(a)
        answered = await send(b, session_id, "go", data({"target_agent": "slow"}))
    assert answered.state == COMPLETED, (answered.state, answered.state_reason)
    assert [p.text for artifact in answered.artifacts for p in artifact.parts] == [
        "first part",
        "second part",
    ]


async def test_an_approval_across_replicas_is_answered_on_a_third(replicas: list[Client]) -> None:
    a, b, c = replicas
    agent = ApprovalAgent()
    async with running_agent(c, agent, agent_type=AGENT_TYPE, instance_id="crm-c"):
        session_id = await new_session(a)
        message = await send(b, session_id, "clean up", data({"target_agent": AGENT_TYPE}))
        assert message.state == INPUT_REQUIRED, (message.state, message.state_reason)
        (request_id,) = message.input_request_ids
        await c.messages.ResolveInput(
            message_service_pb2.ResolveInputRequest(
                request_id=request_id, resolution=resolution(message_types_pb2.DECISION_APPROVE)
            ),
            metadata=await c.md(),
        )
        done = await wait_for_state(b, session_id, message.message_id, COMPLETED, FAILED)
        assert done.state == COMPLETED, done.state_reason
        await until(lambda: agent.decisions.get(session_id), "the agent's decision")
        assert agent.decisions[session_id] == [True] and agent.extra_answers[session_id] == 0
        names = [x.name for x in done.artifacts]
        assert names == ["decision"], names


async def test_an_agent_dropping_mid_dispatch_fails_the_message_once(replicas: list[Client]) -> None:
    a, b, c = replicas
    runs: list[str] = []
    started = asyncio.Event()

    async def stuck(dispatch: Dispatch, reply: Reply) -> None:
        runs.append(dispatch.session_id)
        await reply.say("started")
        started.set()
        await asyncio.sleep(WAIT)

    session_id = await new_session(a)
    async with running_agent(c, stuck, agent_type="slow", instance_id="slow-c"):
        sending = asyncio.create_task(send(b, session_id, "go", data({"target_agent": "slow"})))
        await asyncio.wait_for(started.wait(), WAIT)
    # The agent left c mid-dispatch: the owner's message fails, and nothing runs it again.
    failed = await sending
    assert failed.state == FAILED, (failed.state, failed.state_reason)
    assert "dropped" in failed.state_reason, failed.state_reason
    await asyncio.sleep(0.3)
    assert runs == [session_id]


async def test_a_cancel_on_the_owner_reaches_the_agent_on_another_replica(replicas: list[Client]) -> None:
    a, b, c = replicas
    started, cancelled = asyncio.Event(), asyncio.Event()
    message_ids: list[str] = []

    async def stuck(dispatch: Dispatch, reply: Reply) -> None:
        message_ids.append(dispatch.message.message_id)
        await reply.say("started")
        started.set()
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    session_id = await new_session(a)
    async with running_agent(c, stuck, agent_type="slow", instance_id="slow-c"):
        sending = asyncio.create_task(send(b, session_id, "go", data({"target_agent": "slow"})))
        await asyncio.wait_for(started.wait(), WAIT)
        (message_id,) = message_ids
        await a.messages.CancelMessage(
            message_service_pb2.CancelMessageRequest(session_id=session_id, message_id=message_id),
            metadata=await a.md(),
        )
        await asyncio.wait_for(cancelled.wait(), WAIT)  # the agent on c was told to stop
        ended = await sending
        assert ended.state == message_types_pb2.MESSAGE_STATE_CANCELED, (ended.state, ended.state_reason)


async def test_a_holder_that_stops_answering_fails_the_message_at_the_timeout(replicas: list[Client]) -> None:
    a, b, c = replicas
    runs: list[str] = []

    async def echo(dispatch: Dispatch, reply: Reply) -> None:
        runs.append(dispatch.session_id)
        await reply.complete("too late")

    async with running_agent(c, echo, agent_type="echo", instance_id="echo-c"):
        relay = c.server.mesh.relay
        assert relay is not None
        await relay.stop()  # c takes nothing relayed to it any more, as if it had died
        session_id = await new_session(a)
        failed = await send(b, session_id, "hello", data({"target_agent": "echo"}))
        assert failed.state == FAILED, (failed.state, failed.state_reason)
        assert "did not finish within 1.5s" in failed.state_reason, failed.state_reason
        assert runs == []  # and never runs later: c's rows are deleted when it starts again


@pytest.fixture
async def patient_replicas() -> AsyncIterator[list[Client]]:
    """As ``replicas``, with a dispatch timeout far longer than the test waits."""
    async with _three(dispatch_timeout_ms=60_000) as three:
        yield three


async def test_work_on_a_holder_that_died_fails_once_the_agent_is_back_elsewhere(
    patient_replicas: list[Client],
) -> None:
    """Found from outside (review 7, W4): the holder of the agent's stream killed -9 mid-work, the
    agent back on another replica within milliseconds, and the message waited out the whole dispatch
    timeout (60 s) with nobody running it. Here c stops taking and sending relayed items, as a dead
    replica would, and the agent connects again on b: the owner fails the message within seconds,
    and nothing runs it again."""
    a, b, c = patient_replicas
    runs: list[str] = []
    started = asyncio.Event()

    async def stuck(dispatch: Dispatch, reply: Reply) -> None:
        runs.append(dispatch.session_id)
        await reply.say("started")
        started.set()
        await asyncio.sleep(WAIT)

    session_id = await new_session(a)
    async with running_agent(c, stuck, agent_type="slow", instance_id="slow-1"):
        sending = asyncio.create_task(send(a, session_id, "go", data({"target_agent": "slow"})))
        await asyncio.wait_for(started.wait(), WAIT)
        relay = c.server.mesh.relay
        assert relay is not None
        await relay.stop()  # c takes nothing relayed to it any more and sends nothing, as if it had died

        async def dead(to_replica: str, item: object) -> None:
            await asyncio.Event().wait()

        relay.send = dead  # type: ignore[method-assign]
        async with running_agent(b, stuck, agent_type="slow", instance_id="slow-1"):
            failed = await asyncio.wait_for(sending, 10)  # not the 60 s dispatch timeout
            assert failed.state == FAILED, (failed.state, failed.state_reason)
            assert "connected again" in failed.state_reason, failed.state_reason
            await asyncio.sleep(0.5)
            assert runs == [session_id]
