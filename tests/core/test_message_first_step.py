"""A message's run takes its first step as it is sent (``core._eager.start_eagerly``).

Routing, the agent joining and the dispatch to the agent happen before ``send`` returns, in
the sender's turn of the event loop; what the step starts (the dispatch's timeout, a cancel)
acts on the message's own task, never on the sender's call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.dispatch import DispatchJob, DispatchUpdate
from svantic_grpc.core.messages.model import MessageState
from tests.core.test_message_runtime import CALLER, ScriptedTransport, hang, make_mesh, register, target


async def test_the_agent_has_the_message_when_send_returns(clock: ManualClock) -> None:
    transport = ScriptedTransport()
    transport.scripts["w1"] = hang
    mesh = make_mesh(clock, transport)
    await register(mesh, "w1")
    session = await mesh.sessions.init(CALLER)
    message, task = await mesh.messages.send(CALLER, session.session_id, parts=target())
    # No turn of the event loop since: the dispatch went out within the send.
    assert [job.message.message_id for job in transport.jobs] == [message.message_id]
    assert not task.done()
    task.cancel()
    ended = await asyncio.wait_for(asyncio.shield(task), 2)
    assert ended.state is MessageState.CANCELED


async def test_a_dispatch_timeout_started_in_the_first_step_fails_the_message_not_the_sender(
    clock: ManualClock,
) -> None:
    transport = ScriptedTransport()
    transport.scripts["w1"] = hang
    mesh = make_mesh(clock, transport, dispatch_timeout_s=0.05)
    await register(mesh, "w1")
    session = await mesh.sessions.init(CALLER)
    sender = asyncio.create_task(mesh.messages.send_and_wait(CALLER, session.session_id, parts=target()))
    stopped = await asyncio.wait_for(sender, 5)  # the sender is answered, not cancelled
    assert stopped.state is MessageState.FAILED
    assert "did not finish within" in stopped.state_reason


async def test_a_message_ended_in_its_first_step_is_the_task_result(clock: ManualClock) -> None:
    async def at_once(job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
        yield DispatchUpdate(MessageState.COMPLETED)

    transport = ScriptedTransport()
    transport.scripts["w1"] = at_once
    mesh = make_mesh(clock, transport)
    await register(mesh, "w1")
    session = await mesh.sessions.init(CALLER)
    message, task = await mesh.messages.send(CALLER, session.session_id, parts=target())
    # Ended before the task's first turn: the sender that waits (as SendMessage) gets it all the same.
    assert (await mesh.messages.first_stop(message, task)).state is MessageState.COMPLETED
    assert (await asyncio.wait_for(task, 2)).state is MessageState.COMPLETED
    assert mesh.messages.runtime(CALLER.tenant_id, session.session_id).running == 0
