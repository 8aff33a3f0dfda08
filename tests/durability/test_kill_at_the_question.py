"""A kill the moment a human is asked (found from outside: clients had seen ``input_required``,
adapters had been told, and the restart failed the message as "interrupted" and withdrew the
question, because the message went input-required in a write of its own after the request's).

The request, its event, the message waiting on it and the session paused are one store write:
whatever a watcher saw of the question survives a kill -9 at once, and the restart waits again.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from svantic_grpc.pb import message_service_pb2, session_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from tests.durability._approvals import APPROVE, Deleting, approval_mesh, ask_to_delete, crm_agent, ended, pb
from tests.durability.test_restart import WAIT, _client, _server, _until_serving


@pytest.mark.timeout(120)
async def test_a_kill_as_soon_as_the_question_is_seen_keeps_the_question(tmp_path: Path) -> None:
    mesh = approval_mesh(tmp_path)
    deleting = Deleting()
    agent = crm_agent(mesh.target, deleting)
    running = asyncio.create_task(agent.run())
    try:
        with _server(mesh.settings, mesh.env, tmp_path / "first.log") as first:
            await _until_serving(mesh.target, first, tmp_path / "first.log")
            await asyncio.wait_for(agent.connected.wait(), WAIT)
            async with _client(mesh.target) as (channel, md):
                sessions = SessionServiceStub(channel)
                await sessions.InitSession(
                    session_service_pb2.InitSessionRequest(session_id="s1"), metadata=md
                )
                watch = sessions.WatchSession(
                    session_service_pb2.WatchSessionRequest(session_id="s1"), metadata=md
                )
                asking = asyncio.create_task(ask_to_delete(channel, md, "s1", init=False))
                async for event in watch:
                    if event.event.WhichOneof("event") == "input_required":
                        first.send_signal(signal.SIGKILL)  # as soon as a watcher sees the question
                        break
                watch.cancel()
                await asyncio.gather(asking, return_exceptions=True)
            await asyncio.to_thread(first.wait, WAIT)

        with _server(mesh.settings, mesh.env, tmp_path / "second.log") as second:
            await _until_serving(mesh.target, second, tmp_path / "second.log")
            async with _client(mesh.target) as (channel, md):
                messages = MessageServiceStub(channel)
                got = await messages.GetMessage(
                    message_service_pb2.GetMessageRequest(session_id="s1", message_id="m1"), metadata=md
                )
                assert got.message.state == pb.MESSAGE_STATE_INPUT_REQUIRED, got.message.state_reason
                [request_id] = got.message.input_request_ids
                await messages.ResolveInput(
                    message_service_pb2.ResolveInputRequest(request_id=request_id, resolution=APPROVE),
                    metadata=md,
                )
                done = await ended(channel, md, "s1")
                assert done.state == pb.MESSAGE_STATE_COMPLETED, done.state_reason
                assert [p.text for a in done.artifacts for p in a.parts] == ["approved: True"]
        assert deleting.runs == [True]
    finally:
        await agent.stop()
        await asyncio.wait_for(running, WAIT)
