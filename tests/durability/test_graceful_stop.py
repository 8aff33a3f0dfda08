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
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from grpc import aio

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.pb import message_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.registry_service_pb2_grpc import RegistryServiceStub
from tests import _postgres
from tests.agents_a2a import HostedAgent, hosted_agents
from tests.durability._approvals import APPROVE, approval_mesh, ask_to_delete, crm_agent, ended, pb
from tests.durability.test_restart import WAIT, _client, _server, _until_serving


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Settings of the store the servers share (found from outside: on PostgreSQL the stop failed
    messages waiting for a human, "the server is shutting down; resume with after_sequence=...")."""
    if request.param == "sqlite":
        yield {}
        return
    async with _postgres.store_settings() as settings:
        yield settings


@pytest.mark.timeout(120)
async def test_sigterm_leaves_approvals_pending_for_the_next_start(
    tmp_path: Path, store: dict[str, Any]
) -> None:
    # The hosted agent outlives the mesh's restart (only the mesh stops); it reads the mesh's
    # dispatch keys once, so the mesh keeps its key across the restart.
    mesh = approval_mesh(tmp_path, keep_dispatch_key=True, shutdown_grace_s=1, **store)
    ran: list[bool] = []
    started: list[str] = []

    async def deleting(dispatch: Dispatch, reply: Reply) -> None:
        started.append(dispatch.dispatch_id)  # the work before the question
        approved = await reply.ask_approval("crm.delete_records", {"ids": [7]})
        ran.append(approved)
        await reply.artifact(f"approved: {approved}")
        await reply.complete()

    agent = crm_agent(mesh.target, deleting)
    requests: dict[str, str] = {}
    running = asyncio.create_task(agent.run())
    keys_channel = aio.insecure_channel(mesh.target, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        async with hosted_agents(keys_channel, HostedAgent("ask", "ask-1")) as hosted:
            ask = hosted["ask-1"]
            with _server(mesh.settings, mesh.env, tmp_path / "first.log") as first:
                await _until_serving(mesh.target, first, tmp_path / "first.log")
                await asyncio.wait_for(agent.connected.wait(), WAIT)
                async with _client(mesh.target) as (channel, md):
                    await RegistryServiceStub(channel).RegisterAgent(ask.registration(), metadata=md)
                    for session_id, to in (("connected", "crm"), ("hosted", "ask-agent")):
                        asked = await ask_to_delete(channel, md, session_id, to)
                        requests[session_id] = asked.input_request_ids[0]
                first.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(first.wait, WAIT) == 0
            await asyncio.sleep(0.3)  # a cancel, had one been sent, would have arrived by now
            assert ask.cancels == []  # the hosted agent's task was left alone

            with _server(mesh.settings, mesh.env, tmp_path / "second.log") as second:
                await _until_serving(mesh.target, second, tmp_path / "second.log")
                async with _client(mesh.target) as (channel, md):
                    messages = MessageServiceStub(channel)
                    listing = message_service_pb2.ListPendingInputsRequest()
                    pending = await messages.ListPendingInputs(listing, metadata=md)
                    assert sorted(r.request_id for r in pending.requests) == sorted(requests.values())
                    for session_id in requests:
                        asked_for = message_service_pb2.GetMessageRequest(
                            session_id=session_id, message_id="m1"
                        )
                        got = await messages.GetMessage(asked_for, metadata=md)
                        assert got.message.state == pb.MESSAGE_STATE_INPUT_REQUIRED, got.message.state_reason
                    answer = struct_pb2.Struct()
                    answer.update({"answer": "Ada"})
                    for request_id, resolution in (
                        (requests["connected"], APPROVE),
                        (requests["hosted"], pb.Resolution(values=answer)),
                    ):
                        await messages.ResolveInput(
                            message_service_pb2.ResolveInputRequest(
                                request_id=request_id, resolution=resolution
                            ),
                            metadata=md,
                        )
                    for session_id in requests:
                        done = await ended(channel, md, session_id)
                        assert done.state == pb.MESSAGE_STATE_COMPLETED, done.state_reason
                    assert ran == [True]  # the connected agent acted once, approved
                    # and took the answer where it asked, kept across the restart: the handler
                    # did not run again from the start (it does when the agent itself restarted)
                    assert len(started) == 1, started
                    assert [t.text for t in ask.accepted] == ["delete record 7", "Ada"]
    finally:
        await agent.stop()
        await asyncio.wait_for(running, WAIT)
        await keys_channel.close()
