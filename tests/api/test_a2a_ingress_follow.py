"""Following A2A tasks: resubscribe with replay after a disconnect, and input-required answered over A2A.

a2a-sdk's client (not our code) against a real mesh with connected agents; the
other surface in the race is the gRPC ``ResolveInput`` call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from a2a.helpers import new_data_part
from a2a.types import (
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)
from a2a.utils.constants import PROTOCOL_VERSION_0_3, PROTOCOL_VERSION_1_0, TransportProtocol
from a2a.utils.errors import A2AError
from google.protobuf import json_format

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.core.inputs.model import Surface
from svantic_grpc.pb import message_types_pb2 as pb
from tests._support import Client, running_server
from tests.a2a_ingress_support import WAIT, a2a_client, call, ingress_http
from tests.agents_connected import data, new_session, running_agent, send, skill
from tests.agents_inputs import pending_ids, resolve

FOLLOW_BINDINGS = [
    (TransportProtocol.JSONRPC, PROTOCOL_VERSION_1_0),
    (TransportProtocol.JSONRPC, PROTOCOL_VERSION_0_3),
    (TransportProtocol.HTTP_JSON, PROTOCOL_VERSION_1_0),
    (TransportProtocol.GRPC, PROTOCOL_VERSION_1_0),
]
IDS = [f"{b}-{v}" for b, v in FOLLOW_BINDINGS]
INPUT_REQUIRED = TaskState.TASK_STATE_INPUT_REQUIRED
COMPLETED = TaskState.TASK_STATE_COMPLETED

_count = 0


def user(text: str, *, context_id: str = "", task_id: str = "", parts: list[Part] | None = None) -> Message:
    global _count
    _count += 1
    return Message(
        message_id=f"msg-{_count}-{id(text):x}",
        role=Role.ROLE_USER,
        parts=parts if parts is not None else [Part(text=text)],
        context_id=context_id,
        task_id=task_id,
    )


def state_of(event: StreamResponse) -> int:
    if event.HasField("task"):
        return int(event.task.status.state)
    if event.HasField("status_update"):
        return int(event.status_update.status.state)
    return -1


class Gate:
    """An agent that says it started, waits to be released, then answers."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        await reply.say("step 1")
        self.started.set()
        await self.release.wait()
        await reply.artifact(f"done: {dispatch.text}", name="result")
        await reply.complete()


async def ask(dispatch: Dispatch, reply: Reply) -> None:
    answer = await reply.input_required("Which account should I use?")
    await reply.artifact(f"using {answer}", name="answer")
    await reply.complete()


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with running_server() as c:
        yield c


@pytest.mark.parametrize(("binding", "version"), FOLLOW_BINDINGS, ids=IDS)
async def test_resubscribe_after_a_disconnect_replays_then_follows_live(
    client: Client, binding: str, version: str
) -> None:
    gate = Gate()
    async with (
        ingress_http(client) as base,
        running_agent(client, gate, agent_type="gate", instance_id="gate-1", skills=[skill("gate", "gate")]),
        a2a_client(base, binding, version) as a2a,
    ):
        token = await client.token()
        session_id = await new_session(client)
        stream = a2a.send_message(
            SendMessageRequest(message=user("gate it", context_id=session_id)), context=call(token)
        )
        first = await anext(stream)
        task_id = first.task.id if first.HasField("task") else first.status_update.task_id
        await asyncio.wait_for(gate.started.wait(), WAIT)
        await stream.aclose()  # the client goes away while the task runs

        again = a2a.subscribe(SubscribeToTaskRequest(id=task_id), context=call(token))
        replayed = [await anext(again)]
        while not any(
            e.HasField("status_update") and e.status_update.status.message.parts for e in replayed
        ):  # up to the agent's "step 1", said before the disconnect
            replayed.append(await asyncio.wait_for(anext(again), WAIT))
        assert state_of(replayed[0]) == TaskState.TASK_STATE_SUBMITTED
        said = [p.text for e in replayed for p in e.status_update.status.message.parts]
        assert "step 1" in said
        gate.release.set()
        live = [e async for e in again]
        assert state_of(live[-1]) == COMPLETED
        artifacts = [
            p.text for e in live if e.HasField("artifact_update") for p in e.artifact_update.artifact.parts
        ]
        assert artifacts == ["done: gate it"]


async def test_input_required_carries_the_request_and_a_follow_up_answers_it(client: Client) -> None:
    async with (
        ingress_http(client) as base,
        running_agent(client, ask, agent_type="ask", instance_id="ask-1", skills=[skill("ask", "ask")]),
        a2a_client(base) as a2a,
    ):
        token = await client.token()
        session_id = await new_session(client)
        events = [
            e
            async for e in a2a.send_message(
                SendMessageRequest(message=user("ask me", context_id=session_id)), context=call(token)
            )
        ]
        stopped = events[-1].status_update
        assert stopped.status.state == INPUT_REQUIRED
        data = [json_format.MessageToDict(p.data) for p in stopped.status.message.parts if p.HasField("data")]
        asked = data[0]["input_request"]
        assert asked["kind"] == "form" and asked["form"]["fields"][0]["name"] == "answer"
        assert asked["request_id"] in await pending_ids(client, session_id)
        task_id = stopped.task_id

        # An answer naming another context is refused naming the field, and answers nothing.
        other = await new_session(client)
        with pytest.raises(A2AError) as refused:
            async for _ in a2a.send_message(
                SendMessageRequest(message=user("checking", task_id=task_id, context_id=other)),
                context=call(token),
            ):
                pass
        assert "message.context_id" in str(refused.value) and "belongs to context" in str(refused.value)
        assert asked["request_id"] in await pending_ids(client, session_id)

        answered = [
            e
            async for e in a2a.send_message(
                SendMessageRequest(message=user("savings", task_id=task_id, context_id=session_id)),
                context=call(token),
            )
        ]
        assert state_of(answered[-1]) == COMPLETED
        task = await a2a.get_task(GetTaskRequest(id=task_id), context=call(token))
        assert task.status.state == COMPLETED
        assert [p.text for a in task.artifacts for p in a.parts] == ["using savings"]
        request = await client.server.mesh.inputs.get("acme", asked["request_id"])
        assert request.resolution is not None and request.resolution.surface is Surface.A2A


async def test_a_message_sent_over_grpc_is_an_a2a_task_to_read_answer_and_follow(client: Client) -> None:
    # found from outside: ListTasks listed it, but GetTask, a follow-up and resubscribe said "not found"
    async with (
        ingress_http(client) as base,
        running_agent(client, ask, agent_type="ask", instance_id="ask-1", skills=[skill("ask", "ask")]),
        a2a_client(base) as a2a,
    ):
        token = await client.token()
        session_id = await new_session(client)
        sent = await send(client, session_id, "ask me", data({"target_agent": "ask"}))
        assert sent.state == pb.MESSAGE_STATE_INPUT_REQUIRED
        task = await a2a.get_task(GetTaskRequest(id=sent.message_id), context=call(token))
        assert (task.id, task.context_id, task.status.state) == (sent.message_id, session_id, INPUT_REQUIRED)
        answered = [
            e
            async for e in a2a.send_message(
                SendMessageRequest(message=user("savings", task_id=sent.message_id, context_id=session_id)),
                context=call(token),
            )
        ]
        assert state_of(answered[-1]) == COMPLETED
        followed = [
            e async for e in a2a.subscribe(SubscribeToTaskRequest(id=sent.message_id), context=call(token))
        ]
        assert state_of(followed[-1]) == COMPLETED


async def test_an_answer_from_another_surface_wins_and_the_a2a_loser_is_told_who(client: Client) -> None:
    async with (
        ingress_http(client) as base,
        running_agent(client, ask, agent_type="ask", instance_id="ask-1", skills=[skill("ask", "ask")]),
    ):
        token = await client.token()
        session_id = await new_session(client)
        async with a2a_client(base, streaming=False) as a2a:
            (sent,) = [
                e
                async for e in a2a.send_message(
                    SendMessageRequest(message=user("ask me", context_id=session_id)), context=call(token)
                )
            ]
        assert sent.task.status.state == INPUT_REQUIRED
        (request_id,) = await pending_ids(client, session_id)
        async with a2a_client(base, streaming=True) as a2a:
            watching = a2a.subscribe(SubscribeToTaskRequest(id=sent.task.id), context=call(token))
            seen = [await asyncio.wait_for(anext(watching), WAIT)]
            await resolve(client, request_id, values={"answer": "checking"})  # the gRPC surface answers first
            seen += [e async for e in watching]
            assert state_of(seen[-1]) == COMPLETED
            answer = {"input_resolution": {"request_id": request_id, "values": {"answer": "too late"}}}
            late = user("", task_id=sent.task.id, parts=[new_data_part(answer)])
            with pytest.raises(A2AError) as lost:
                async for _ in a2a.send_message(SendMessageRequest(message=late), context=call(token)):
                    pass
            assert "already answered by acme-full via grpc" in str(lost.value)
            task = await a2a.get_task(GetTaskRequest(id=sent.task.id), context=call(token))
            assert [p.text for a in task.artifacts for p in a.parts] == ["using checking"]


async def test_a_task_is_found_after_a_restart(tmp_path: Path) -> None:
    """The task id -> session index is in the store: a durable store keeps it across a restart."""

    async def echo(dispatch: Dispatch, reply: Reply) -> None:
        await reply.artifact(f"echo: {dispatch.text}")
        await reply.complete()

    store = f"sqlite:///{tmp_path / 'mesh.db'}"
    async with (
        running_server(store=store) as first,
        ingress_http(first) as base,
        running_agent(first, echo, skills=[skill("echo", "echo")]),
        a2a_client(base, streaming=False) as a2a,
    ):
        session_id = await new_session(first)
        request = SendMessageRequest(message=user("please echo me", context_id=session_id))
        (sent,) = [e async for e in a2a.send_message(request, context=call(await first.token()))]
    assert sent.task.status.state == COMPLETED
    async with (
        running_server(store=store) as second,
        ingress_http(second) as base,
        a2a_client(base, streaming=False) as a2a,
    ):
        task = await a2a.get_task(GetTaskRequest(id=sent.task.id), context=call(await second.token()))
    assert task.context_id == session_id and task.status.state == COMPLETED
    assert [p.text for a in task.artifacts for p in a.parts] == ["echo: please echo me"]


async def test_a_task_id_repeated_in_two_contexts_is_answered_in_the_one_named(client: Client) -> None:
    # found from outside: an answer naming session S1 approved the request waiting in session S0
    # (the same message id, chosen by the client, in both)
    async with (
        ingress_http(client) as base,
        running_agent(client, ask, agent_type="ask", instance_id="ask-1", skills=[skill("ask", "ask")]),
        a2a_client(base) as a2a,
    ):
        token = await client.token()
        first, second = await new_session(client), await new_session(client)
        for session_id in (first, second):
            sent = await send(client, session_id, "ask me", data({"target_agent": "ask"}), message_id="m-1")
            assert sent.state == pb.MESSAGE_STATE_INPUT_REQUIRED
        answered = [
            e
            async for e in a2a.send_message(
                SendMessageRequest(message=user("savings", task_id="m-1", context_id=second)),
                context=call(token),
            )
        ]
        assert state_of(answered[-1]) == COMPLETED
        assert len(await pending_ids(client, first)) == 1  # the other conversation still waits
        assert await pending_ids(client, second) == []

        # Over A2A alone, one id is one task: the same messageId in another context is refused.
        fresh = await new_session(client)
        again = user("hello", context_id=first)
        again.message_id = "a2a-once"
        [_ async for _ in a2a.send_message(SendMessageRequest(message=again), context=call(token))]
        again.context_id = fresh
        with pytest.raises(A2AError) as refused:
            [_ async for _ in a2a.send_message(SendMessageRequest(message=again), context=call(token))]
        assert "message.message_id" in str(refused.value)
