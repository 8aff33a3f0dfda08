"""A cancel that comes right after a human's answer (found from outside: the reviewer's
``approve -> ResolveInput(DENY) -> CancelMessage at once``).

The answer resumes the message (input-required -> working) in one write; a cancel arriving
while that write is under way used to find the message's writer a version behind: the cancel
answered ``ABORTED`` ("changed concurrently") to an innocent client and the message stayed
``working`` for ever, its agent's answer dropped. The same race hit ``CloseSession`` (which
then left the session's runtime half closed). On a store whose writes take real time (SQLite),
a few rounds are enough to meet it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.pb import message_service_pb2, session_service_pb2
from svantic_grpc.pb import message_types_pb2 as pb
from tests._support import running_server
from tests.agents_connected import get_message, new_session, running_agent
from tests.agents_inputs import resolve
from tests.api.test_inputs import APPROVE, CLOSED, DELETE_RECORDS, DELETES, DENY, ask_tools, crm_agent

ROUNDS = 12


def _stuck(state: int) -> bool:
    return state in (pb.MESSAGE_STATE_WORKING, pb.MESSAGE_STATE_SUBMITTED, pb.MESSAGE_STATE_INPUT_REQUIRED)


@pytest.mark.parametrize("decision", [DENY, APPROVE], ids=["deny", "approve"])
async def test_cancel_message_right_after_the_answer_cancels_or_finds_it_ended(
    tmp_path: Path, decision: int
) -> None:
    async with (
        running_server(policies=[DELETES], store=f"sqlite:///{tmp_path / 'mesh.db'}") as client,
        crm_agent(client),
    ):
        session_id = await new_session(client)
        outcomes = []
        for _ in range(ROUNDS):
            asked = await ask_tools(client, session_id, DELETE_RECORDS)
            [request_id] = asked.input_request_ids
            await resolve(client, request_id, decision=decision, reason="no" if decision == DENY else "")
            try:  # never ABORTED: the race is the server's own
                canceled = await client.messages.CancelMessage(
                    message_service_pb2.CancelMessageRequest(
                        session_id=session_id, message_id=asked.message_id
                    ),
                    metadata=await client.md(),
                    timeout=10,
                )
                outcomes.append(canceled.message.state)
            except grpc.aio.AioRpcError as error:  # or the message ended first, as the agent finished
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
                assert "cannot be canceled" in (error.details() or "")
            await asyncio.sleep(0.05)
            stored = await get_message(client, session_id, asked.message_id)
            assert not _stuck(stored.state), stored.state_reason
        assert not any(_stuck(s) for s in outcomes)


async def _answers_at_once(dispatch: Dispatch, reply: Reply) -> None:
    """Ends with a turn the moment it has the answer: the message's end is then two writes and a
    withdrawal, the window a close used to cut in (the message then stayed working for ever)."""
    approved = await reply.ask_approval("crm.delete_records", {"ids": ["r1"]})
    await reply.complete(f"approved={approved}")


@pytest.mark.parametrize("agent", ["tool", "answers-at-once"])
async def test_close_session_right_after_a_denial_closes_it_with_nothing_left_running(
    tmp_path: Path, agent: str
) -> None:
    async with (
        running_server(policies=[DELETES], store=f"sqlite:///{tmp_path / 'mesh.db'}") as client,
        crm_agent(client)
        if agent == "tool"
        else running_agent(client, _answers_at_once, agent_type="crm", instance_id="crm-1"),
    ):
        for _ in range(ROUNDS):
            session_id = await new_session(client)
            asked = await ask_tools(client, session_id, DELETE_RECORDS)
            [request_id] = asked.input_request_ids
            await resolve(client, request_id, decision=DENY, reason="no")
            closed = await client.sessions.CloseSession(
                session_service_pb2.CloseSessionRequest(session_id=session_id),
                metadata=await client.md(),
                timeout=10,
            )
            assert closed.session.status == CLOSED
            stored = await get_message(client, session_id, asked.message_id)
            assert not _stuck(stored.state), stored.state_reason
