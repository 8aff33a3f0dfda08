"""A kill right after a human's answer reached the agent, before the agent reported anything
(found from outside: the message was marked working as soon as the answer was recorded, so
the restart failed it as "interrupted" and the answer was lost for the agent).

The message now stays input-required until the agent reports after the answer; the restart
then resumes it, the agent gets the answer again with the message (the Python helper answers
its question from it without asking), and the message completes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from tests.durability.test_restart import (
    WAIT,
    _client,
    _data,
    _eventually,
    _free_port,
    _server,
    _until_serving,
)

pb = message_types_pb2


@pytest.mark.timeout(120)
async def test_a_kill_between_the_answer_and_the_agents_next_report_resumes_the_message(
    tmp_path: Path,
) -> None:
    grpc_port, http_port = _free_port(), _free_port()
    target = f"127.0.0.1:{grpc_port}"
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "grpc_address": target,
                "http_address": f"127.0.0.1:{http_port}",
                "store": f"sqlite:///{tmp_path / 'mesh.db'}",
                "shutdown_grace_s": 0,
                "dispatch": {"timeout_ms": 30_000},
                "policies": [
                    {"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"}
                ],
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "SVANTIC_SIGNING_KEY"}
    answers: list[bool] = []
    got_answer = asyncio.Event()

    async def deleting(dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval("crm.delete_records", {"ids": [7]})
        answers.append(approved)
        got_answer.set()
        if len(answers) == 1:
            await asyncio.sleep(60)  # still at work, reporting nothing, when the server dies
        await reply.artifact(f"approved: {approved}")
        await reply.complete()

    agent = ConnectedAgent(
        target,
        client_id="svantic",
        client_secret="your-secret",
        agent_type="crm",
        instance_id="crm-1",
        handler=deleting,
        reconnect_delay_s=0.1,
    )
    running = asyncio.create_task(agent.run())
    try:
        with _server(settings, env, tmp_path / "first.log") as first:
            await _until_serving(target, first, tmp_path / "first.log")
            await asyncio.wait_for(agent.connected.wait(), WAIT)
            async with _client(target) as (channel, md):
                await SessionServiceStub(channel).InitSession(
                    session_service_pb2.InitSessionRequest(session_id="s1"), metadata=md
                )
                messages = MessageServiceStub(channel)
                sent = await messages.SendMessage(
                    message_service_pb2.SendMessageRequest(
                        session_id="s1",
                        message=message_service_pb2.OutgoingMessage(
                            message_id="m1",
                            parts=[pb.Part(text="delete record 7"), _data({"target_agent": "crm"})],
                        ),
                    ),
                    metadata=md,
                )
                assert sent.message.state == pb.MESSAGE_STATE_INPUT_REQUIRED
                await messages.ResolveInput(
                    message_service_pb2.ResolveInputRequest(
                        request_id=sent.message.input_request_ids[0],
                        resolution=pb.Resolution(decision=pb.DECISION_APPROVE),
                    ),
                    metadata=md,
                )
                await asyncio.wait_for(got_answer.wait(), WAIT)  # the agent has it, says nothing yet
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, WAIT)

        with _server(settings, env, tmp_path / "second.log") as second:
            await _until_serving(target, second, tmp_path / "second.log")
            async with _client(target) as (channel, md):
                messages = MessageServiceStub(channel)

                async def ended() -> pb.Message | None:
                    got = await messages.GetMessage(
                        message_service_pb2.GetMessageRequest(session_id="s1", message_id="m1"), metadata=md
                    )
                    return got.message if got.message.state >= pb.MESSAGE_STATE_COMPLETED else None

                done = await _eventually(ended, "the message to end")
                assert done.state == pb.MESSAGE_STATE_COMPLETED, done.state_reason
                assert [p.text for a in done.artifacts for p in a.parts] == ["approved: True"]
        assert answers == [True, True]  # given live, then again with the resumed message
    finally:
        await agent.stop()
        await asyncio.wait_for(running, WAIT)
