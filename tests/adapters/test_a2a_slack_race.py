"""A tool approval asked of an A2A client, answered from Slack while the client follows the task.

The A2A client (a2a-sdk's) sees ``input-required`` with the tool and its arguments,
follows the task with ``tasks/resubscribe``, and sees it finish when a Slack user
approves; its own late answer is refused, naming the Slack user.
"""

from __future__ import annotations

import asyncio

import pytest
from a2a.helpers import new_data_part
from a2a.types import Message, Part, Role, SendMessageRequest, SubscribeToTaskRequest, TaskState
from a2a.utils.errors import A2AError
from google.protobuf import json_format

from svantic_grpc.core.inputs.model import Surface
from tests.a2a_ingress_support import a2a_client, call, ingress_http
from tests.adapters.e2e_support import AGENT_TYPE, ARGUMENTS, TOOL, WAIT, ApprovalAgent, surfaces
from tests.agents_connected import new_session


async def test_slack_answers_while_an_a2a_client_follows_and_the_late_a2a_answer_is_told_who() -> None:
    async with surfaces(ApprovalAgent()) as s, ingress_http(s.client) as base:
        token = await s.client.token()
        session_id = await new_session(s.client)
        ask = Message(
            message_id="a2a-ask-1",
            role=Role.ROLE_USER,
            context_id=session_id,
            parts=[Part(text="clean up the CRM"), new_data_part({"target_agent": AGENT_TYPE})],
        )
        async with a2a_client(base) as a2a:
            events = [e async for e in a2a.send_message(SendMessageRequest(message=ask), context=call(token))]
            stopped = events[-1].status_update
            assert stopped.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            (asked,) = [
                json_format.MessageToDict(p.data)["input_request"]
                for p in stopped.status.message.parts
                if p.HasField("data")
            ]
            assert asked["kind"] == "tool_approval"
            assert asked["tool_call"]["tool_name"] == TOOL
            assert asked["tool_call"]["arguments"] == ARGUMENTS  # (doubles on the wire: 1.0 == 1)

            following = a2a.subscribe(SubscribeToTaskRequest(id=stopped.task_id), context=call(token))
            await asyncio.wait_for(anext(following), WAIT)
            assert await s.click(asked["request_id"], "approve", user="U1") == 200
            rest = [e async for e in following]
            assert rest[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
            artifacts = [
                p.text
                for e in rest
                if e.HasField("artifact_update")
                for p in e.artifact_update.artifact.parts
            ]
            assert artifacts == ["decision: approved"]

            late = Message(
                message_id="a2a-late-1",
                role=Role.ROLE_USER,
                task_id=stopped.task_id,
                parts=[Part(text="deny: no")],
            )
            with pytest.raises(A2AError) as lost:
                async for _ in a2a.send_message(SendMessageRequest(message=late), context=call(token)):
                    pass
            assert "already answered by slack:U1 via slack" in str(lost.value)
        record = await s.record(asked["request_id"])
        assert record.resolution is not None and record.resolution.surface is Surface.SLACK
