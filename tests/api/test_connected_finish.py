"""A connected dispatch that finished is left alone: no cancel, no extra frame (issue 9, item 2).

The mesh's frames to an agent are one ordered stream, so "nothing after the end" is
checked without waiting for silence: after a dispatch completed, the next frame the
agent receives must be the next dispatch.
"""

from __future__ import annotations

import asyncio

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.pb import message_types_pb2, registry_service_pb2
from tests._support import running_server
from tests.agents_connected import WAIT, data, new_session, raw_agent, running_agent, send, skill, text

WORKING = message_types_pb2.MESSAGE_STATE_WORKING
COMPLETED = message_types_pb2.MESSAGE_STATE_COMPLETED


async def test_a_completed_dispatch_gets_no_cancel_and_no_extra_frame() -> None:
    async with running_server() as client, raw_agent(client, "raw-1") as raw:
        session_id = await new_session(client)
        frames: list[registry_service_pb2.ConnectResponse] = []

        async def next_frame() -> registry_service_pb2.ConnectResponse:
            frames.append(await raw.receive())
            return frames[-1]

        for word in ("one", "two"):
            sending = asyncio.create_task(send(client, session_id, word, data({"target_agent": "echo"})))
            frame = await next_frame()
            # After "one" completed, the next frame must be the dispatch of "two", not a cancel of "one".
            assert frame.WhichOneof("payload") == "dispatch", [f.WhichOneof("payload") for f in frames]
            dispatch_id = frame.dispatch.dispatch_id
            raw.update(dispatch_id, WORKING)
            turn = message_types_pb2.Turn(role=message_types_pb2.ROLE_AGENT, parts=[text(f"did {word}")])
            raw.update(dispatch_id, COMPLETED, turn=turn)
            message = await sending
            assert message.state == COMPLETED, message.state_reason
        assert [f.WhichOneof("payload") for f in frames] == ["dispatch", "dispatch"]


async def test_handler_code_after_complete_runs_to_its_end() -> None:
    second_arrived = asyncio.Event()
    ran_after_complete = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(dispatch: Dispatch, reply: Reply) -> None:
        if dispatch.text == "second":
            second_arrived.set()
            await reply.complete("second done")
            return
        await reply.complete("first done")
        try:
            # Clean-up after reporting: it must not be cut short by a cancel from the mesh.
            await asyncio.wait_for(second_arrived.wait(), WAIT)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        ran_after_complete.set()

    async with (
        running_server() as client,
        running_agent(client, handler, instance_id="echo-1", skills=[skill("echo", "echo")]),
    ):
        session_id = await new_session(client)
        first = await send(client, session_id, "first", data({"target_agent": "echo"}))
        assert first.state == COMPLETED, first.state_reason
        # Frames reach the agent in order: a cancel of "first" would arrive before "second".
        second = await send(client, session_id, "second", data({"target_agent": "echo"}))
        assert second.state == COMPLETED, second.state_reason
        ended = [asyncio.ensure_future(e.wait()) for e in (ran_after_complete, cancelled)]
        await asyncio.wait(ended, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        for waiting in ended:
            waiting.cancel()
        assert not cancelled.is_set(), "the mesh cancelled a dispatch that had completed"
        assert ran_after_complete.is_set()
