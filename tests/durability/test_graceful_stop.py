"""A graceful stop (SIGTERM: every deploy, every Ctrl-C) leaves what waits for a human as a crash
leaves it: the message input-required, its request pending and answerable after the restart, the
agents not told to drop the work (found from outside: it used to fail or cancel every message
waiting for an approval and withdraw the requests).

A connected agent (it stays connected while the server stops, so its stream ends under it) and a
hosted a2a-sdk agent each ask a human; the server gets SIGTERM and exits cleanly; the next server
still shows both requests pending; answered there, each message completes, each agent acting once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import struct_pb2
from grpc import aio

from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.registry_service_pb2_grpc import RegistryServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from tests.agents_a2a import HostedAgent, hosted_agents
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
APPROVE = pb.Resolution(decision=pb.DECISION_APPROVE)


@pytest.mark.timeout(120)
async def test_sigterm_leaves_approvals_pending_for_the_next_start(tmp_path: Path) -> None:
    grpc_port, http_port = _free_port(), _free_port()
    target = f"127.0.0.1:{grpc_port}"
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "grpc_address": target,
                "http_address": f"127.0.0.1:{http_port}",
                "store": f"sqlite:///{tmp_path / 'mesh.db'}",
                "shutdown_grace_s": 1,
                "dispatch": {"timeout_ms": 30_000},
                "policies": [
                    {"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"}
                ],
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "SVANTIC_SIGNING_KEY"}
    env["SVANTIC_DISPATCH_KEY"] = (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    ran: list[bool] = []

    async def deleting(dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval("crm.delete_records", {"ids": [7]})
        ran.append(approved)
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

    async def send(messages: MessageServiceStub, md: object, session_id: str, target_agent: str) -> str:
        sent = await messages.SendMessage(
            message_service_pb2.SendMessageRequest(
                session_id=session_id,
                message=message_service_pb2.OutgoingMessage(
                    message_id="m1",
                    parts=[pb.Part(text="delete record 7"), _data({"target_agent": target_agent})],
                ),
            ),
            metadata=md,
        )
        assert sent.message.state == pb.MESSAGE_STATE_INPUT_REQUIRED, sent.message.state_reason
        return str(sent.message.input_request_ids[0])

    requests: dict[str, str] = {}
    running = asyncio.create_task(agent.run())
    # The hosted agent outlives the mesh's restart (only the mesh stops); it reads the mesh's
    # dispatch keys once, so the mesh keeps its key across the restart (SVANTIC_DISPATCH_KEY).
    keys_channel = aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        async with hosted_agents(keys_channel, HostedAgent("ask", "ask-1")) as hosted:
            ask = hosted["ask-1"]
            with _server(settings, env, tmp_path / "first.log") as first:
                await _until_serving(target, first, tmp_path / "first.log")
                await asyncio.wait_for(agent.connected.wait(), WAIT)
                async with _client(target) as (channel, md):
                    await RegistryServiceStub(channel).RegisterAgent(ask.registration(), metadata=md)
                    sessions, messages = SessionServiceStub(channel), MessageServiceStub(channel)
                    for session_id, to in (("connected", "crm"), ("hosted", "ask-agent")):
                        opened = session_service_pb2.InitSessionRequest(session_id=session_id)
                        await sessions.InitSession(opened, metadata=md)
                        requests[session_id] = await send(messages, md, session_id, to)
                first.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(first.wait, WAIT) == 0
            await asyncio.sleep(0.3)  # a cancel, had one been sent, would have arrived by now
            assert ask.cancels == []  # the hosted agent's task was left alone

            with _server(settings, env, tmp_path / "second.log") as second:
                await _until_serving(target, second, tmp_path / "second.log")
                async with _client(target) as (channel, md):
                    messages = MessageServiceStub(channel)
                    listing = message_service_pb2.ListPendingInputsRequest()
                    pending = await messages.ListPendingInputs(listing, metadata=md)
                    assert sorted(r.request_id for r in pending.requests) == sorted(requests.values())
                    for session_id in requests:
                        asked = message_service_pb2.GetMessageRequest(session_id=session_id, message_id="m1")
                        got = await messages.GetMessage(asked, metadata=md)
                        assert got.message.state == pb.MESSAGE_STATE_INPUT_REQUIRED, got.message.state_reason
                    await messages.ResolveInput(
                        message_service_pb2.ResolveInputRequest(
                            request_id=requests["connected"], resolution=APPROVE
                        ),
                        metadata=md,
                    )
                    await messages.ResolveInput(
                        message_service_pb2.ResolveInputRequest(
                            request_id=requests["hosted"],
                            resolution=pb.Resolution(values=_struct(answer="Ada")),
                        ),
                        metadata=md,
                    )
                    for session_id in requests:

                        async def ended(session_id: str = session_id) -> pb.Message | None:
                            got = await messages.GetMessage(
                                message_service_pb2.GetMessageRequest(session_id=session_id, message_id="m1"),
                                metadata=md,
                            )
                            return got.message if got.message.state >= pb.MESSAGE_STATE_COMPLETED else None

                        done = await _eventually(ended, f"the message of {session_id} to end")
                        assert done.state == pb.MESSAGE_STATE_COMPLETED, done.state_reason
                    assert ran == [True]  # the connected agent acted once, approved
                    assert [t.text for t in ask.accepted] == [
                        "delete record 7",
                        "Ada",
                    ]  # asked, then answered
    finally:
        await agent.stop()
        await asyncio.wait_for(running, WAIT)
        await keys_channel.close()


def _struct(**values: object) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct
