"""An approval given around a restart waits for its connected agent to come back, then runs once.

Two messages wait for an approval on a connected agent when the server is killed; the agent
stays away. One request is answered on the next server, which is killed at once (so the answer
is re-dispatched by the start-up recovery of a third server, before its port is even bound);
the other is answered on the third server while the agent is still away. Then the agent comes
back: both messages run, each once, and complete.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from tests.durability._approvals import approval_mesh, crm_agent
from tests.durability.test_restart import (
    WAIT,
    _client,
    _data,
    _eventually,
    _server,
    _until_serving,
)

APPROVE = message_types_pb2.Resolution(decision=message_types_pb2.DECISION_APPROVE)


@pytest.mark.timeout(120)
async def test_answers_given_around_a_restart_run_once_when_the_agent_reconnects(tmp_path: Path) -> None:
    mesh = approval_mesh(tmp_path)
    target, settings, env = mesh.target, mesh.settings, mesh.env
    log = tmp_path / "server.log"
    ran: list[tuple[str, bool]] = []

    async def deleting(dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval("crm.delete_records", {"ids": [7]})
        ran.append((dispatch.session_id, approved))
        await reply.artifact(f"approved: {approved}")
        await reply.complete()

    def agent() -> ConnectedAgent:
        return crm_agent(target, deleting)

    requests: dict[str, str] = {}
    first_agent = agent()
    with _server(settings, env, log) as first:
        await _until_serving(target, first, log)
        task = asyncio.create_task(first_agent.run())
        await asyncio.wait_for(first_agent.connected.wait(), WAIT)
        async with _client(target) as (channel, md):
            sessions, messages = SessionServiceStub(channel), MessageServiceStub(channel)
            for session_id in ("before-kill", "after-restart"):
                await sessions.InitSession(
                    session_service_pb2.InitSessionRequest(session_id=session_id), metadata=md
                )
                sent = await messages.SendMessage(
                    message_service_pb2.SendMessageRequest(
                        session_id=session_id,
                        message=message_service_pb2.OutgoingMessage(
                            message_id="m1",
                            parts=[
                                message_types_pb2.Part(text="delete record 7"),
                                _data({"target_agent": "crm"}),
                            ],
                        ),
                    ),
                    metadata=md,
                )
                assert sent.message.state == message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED
                requests[session_id] = sent.message.input_request_ids[0]
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, WAIT)
    await first_agent.stop()  # the agent stays away until both answers are given
    await asyncio.wait_for(task, WAIT)

    with _server(settings, env, log) as second:
        await _until_serving(target, second, log)
        async with _client(target) as (channel, md):
            await MessageServiceStub(channel).ResolveInput(
                message_service_pb2.ResolveInputRequest(
                    request_id=requests["before-kill"], resolution=APPROVE
                ),
                metadata=md,
            )
        second.send_signal(signal.SIGKILL)  # answered just before the kill
        await asyncio.to_thread(second.wait, WAIT)

    back = agent()
    with _server(settings, env, log) as third:
        await _until_serving(target, third, log)
        async with _client(target) as (channel, md):
            messages = MessageServiceStub(channel)
            await messages.ResolveInput(
                message_service_pb2.ResolveInputRequest(
                    request_id=requests["after-restart"], resolution=APPROVE
                ),
                metadata=md,
            )
            task = asyncio.create_task(back.run())  # the agent comes back only now
            try:
                for session_id in requests:

                    async def ended(session_id: str = session_id) -> message_types_pb2.Message | None:
                        got = await messages.GetMessage(
                            message_service_pb2.GetMessageRequest(session_id=session_id, message_id="m1"),
                            metadata=md,
                        )
                        return (
                            got.message
                            if got.message.state >= message_types_pb2.MESSAGE_STATE_COMPLETED
                            else None
                        )

                    done = await _eventually(ended, f"the message of {session_id} to end")
                    assert done.state == message_types_pb2.MESSAGE_STATE_COMPLETED, done.state_reason
                    assert [p.text for a in done.artifacts for p in a.parts] == ["approved: True"]
                    session = await SessionServiceStub(channel).GetSession(
                        session_service_pb2.GetSessionRequest(session_id=session_id, include_agents=True),
                        metadata=md,
                    )
                    [member] = [a for a in session.session.agents if a.instance_id == "crm-1"]
                    assert not member.HasField("left_at")  # still in the session
            finally:
                await back.stop()
                await asyncio.wait_for(task, WAIT)
    assert sorted(ran) == [("after-restart", True), ("before-kill", True)]  # each ran once
