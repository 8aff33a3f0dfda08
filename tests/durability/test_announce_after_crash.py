"""A request pending across a crash is announced again after the restart (found from outside: the
announcement lived only in the process, so a kill before the webhook target or Slack was reached
left the request unannounced for good, and nobody was asked).

The webhook target is down when the approval is raised; the server is killed while its delivery
retries in memory; the target comes up and the server restarts: the target now gets the
``input.required`` (with the same ``webhook-id`` a first delivery would have had, so a receiver
that got both drops one), and its callback answers the request.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from tests.durability.test_restart import (
    HOOK_SECRET,
    TOKEN_KEY,
    WAIT,
    _client,
    _data,
    _eventually,
    _free_port,
    _server,
    _until_serving,
    _webhook_target,
)

pb = message_types_pb2


@pytest.mark.timeout(120)
async def test_a_request_whose_announcement_died_with_the_process_is_announced_after_the_restart(
    tmp_path: Path,
) -> None:
    grpc_port, http_port, hook_port = _free_port(), _free_port(), _free_port()
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
                "adapters": {
                    "webhook": {
                        "targets": [{"url": f"http://127.0.0.1:{hook_port}/hook", "secret_env": "HOOK_OUT"}],
                        "callback_token_key_env": "HOOK_TOKEN_KEY",
                    }
                },
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "SVANTIC_SIGNING_KEY"}
    env.update(HOOK_OUT=HOOK_SECRET, HOOK_TOKEN_KEY=TOKEN_KEY)
    decisions: list[bool] = []

    async def deleting(dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval("crm.delete_records", {"ids": [7]})
        decisions.append(approved)
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
    notifications: list[dict[str, Any]] = []
    hook: Any = None
    try:
        with _server(settings, env, tmp_path / "first.log") as first:
            await _until_serving(target, first, tmp_path / "first.log")
            await asyncio.wait_for(agent.connected.wait(), WAIT)
            async with _client(target) as (channel, md):
                await SessionServiceStub(channel).InitSession(
                    session_service_pb2.InitSessionRequest(session_id="s1"), metadata=md
                )
                sent = await MessageServiceStub(channel).SendMessage(
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
                [request_id] = sent.message.input_request_ids
            first.send_signal(signal.SIGKILL)  # the target is down: the announcement is still retrying
            await asyncio.to_thread(first.wait, WAIT)
        assert notifications == []

        hook = await _webhook_target(hook_port, notifications)
        with _server(settings, env, tmp_path / "second.log") as second:
            await _until_serving(target, second, tmp_path / "second.log")

            async def announced() -> str:
                tokens = [
                    n["callback"]["token"]
                    for n in notifications
                    if n["type"] == "input.required" and n["request"]["id"] == request_id
                ]
                return tokens[0] if tokens else ""

            token = await _eventually(announced, "the announcement after the restart")
            async with aiohttp.ClientSession() as http:
                answer = {"callback_token": token, "decision": "approve", "responder": "ops"}
                async with http.post(
                    f"http://127.0.0.1:{http_port}/webhooks/receive", json=answer
                ) as response:
                    assert response.status == 200, await response.text()
            async with _client(target) as (channel, md):

                async def ended() -> pb.Message | None:
                    got = await MessageServiceStub(channel).GetMessage(
                        message_service_pb2.GetMessageRequest(session_id="s1", message_id="m1"), metadata=md
                    )
                    return got.message if got.message.state >= pb.MESSAGE_STATE_COMPLETED else None

                done = await _eventually(ended, "the message to end")
                assert done.state == pb.MESSAGE_STATE_COMPLETED, done.state_reason
        assert decisions == [True]
    finally:
        await agent.stop()
        await asyncio.wait_for(running, WAIT)
        if hook is not None:
            await hook.cleanup()
