"""Who waits for a message to stop (``SendMessage``, ``first_stop``) waits on their own.

A waiter that goes away (its RPC cancelled) neither cancels the message nor the other
waiters; each gets the message where it first stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.dispatch import DispatchJob, DispatchUpdate
from svantic_grpc.core.messages.model import MessageState, Part
from tests.core.test_message_runtime import CALLER, ScriptedTransport, make_mesh, register, target


async def test_a_waiter_that_goes_away_cancels_neither_the_message_nor_the_other_waiters(
    clock: ManualClock,
) -> None:
    go_on = asyncio.Event()

    async def gated(job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
        yield DispatchUpdate(MessageState.WORKING)
        await go_on.wait()
        yield DispatchUpdate(MessageState.COMPLETED, (Part(text="done"),))

    transport = ScriptedTransport()
    transport.scripts["w1"] = gated
    mesh = make_mesh(clock, transport)
    await register(mesh, "w1")
    session = await mesh.sessions.init(CALLER)
    message, task = await mesh.messages.send(CALLER, session.session_id, parts=target())
    leaving = asyncio.create_task(mesh.messages.first_stop(message, task))
    staying = asyncio.create_task(mesh.messages.first_stop(message, task))
    for _ in range(20):
        await asyncio.sleep(0)
    leaving.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done() and not staying.done()
    go_on.set()
    stopped = await asyncio.wait_for(staying, 2)
    assert stopped.state is MessageState.COMPLETED
    assert (await asyncio.wait_for(task, 2)).state is MessageState.COMPLETED
    assert leaving.cancelled()
