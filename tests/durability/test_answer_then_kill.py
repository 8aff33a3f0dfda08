"""A kill right after a human's answer reached the agent, before the agent reported anything
(found from outside: the message was marked working as soon as the answer was recorded, so
the restart failed it as "interrupted" and the answer was lost for the agent).

The message now stays input-required until the agent reports after the answer; the restart
then resumes it, the agent gets the answer again with the message, and the message completes.
The Python helper keeps the handler that was at work on that answer through the reconnect, and
that handler carries on for the new dispatch: the approved work is done once.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from svantic_grpc.pb import message_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from tests.durability._approvals import APPROVE, Deleting, approval_mesh, ask_to_delete, crm_agent, ended, pb
from tests.durability.test_restart import WAIT, _client, _server, _until_serving


@pytest.mark.timeout(120)
async def test_a_kill_between_the_answer_and_the_agents_next_report_resumes_the_message(
    tmp_path: Path,
) -> None:
    mesh = approval_mesh(tmp_path)
    go_on = asyncio.Event()
    deleting = Deleting(go_on)  # still at work, reporting nothing, when the server dies
    agent = crm_agent(mesh.target, deleting)
    running = asyncio.create_task(agent.run())
    try:
        with _server(mesh.settings, mesh.env, tmp_path / "first.log") as first:
            await _until_serving(mesh.target, first, tmp_path / "first.log")
            await asyncio.wait_for(agent.connected.wait(), WAIT)
            async with _client(mesh.target) as (channel, md):
                asked = await ask_to_delete(channel, md, "s1")
                await MessageServiceStub(channel).ResolveInput(
                    message_service_pb2.ResolveInputRequest(
                        request_id=asked.input_request_ids[0], resolution=APPROVE
                    ),
                    metadata=md,
                )
                await asyncio.wait_for(deleting.answered.wait(), WAIT)  # the agent has it, says nothing yet
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, WAIT)

        with _server(mesh.settings, mesh.env, tmp_path / "second.log") as second:
            await _until_serving(mesh.target, second, tmp_path / "second.log")
            await asyncio.wait_for(agent.connected.wait(), WAIT)
            await asyncio.sleep(0.5)  # the resumed message reaches the agent
            go_on.set()
            async with _client(mesh.target) as (channel, md):
                done = await ended(channel, md, "s1")
                assert done.state == pb.MESSAGE_STATE_COMPLETED, done.state_reason
                assert [p.text for a in done.artifacts for p in a.parts] == ["approved: True"]
        assert deleting.runs == [True]  # given live; given again with the resumed message, to the same work
    finally:
        await agent.stop()
        await asyncio.wait_for(running, WAIT)
