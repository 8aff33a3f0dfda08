"""The mesh as an A2A agent, driven by a2a-sdk's own client over each binding.

A real server with a connected echo agent behind it; the A2A HTTP routes served on
loopback (``tests/a2a_ingress_support.py``). Assertions are on what an A2A client
sees (task states, artifacts, context ids, errors) and on what the mesh then holds
(over the gRPC API).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from a2a.client.client import Client as A2AClient
from a2a.helpers import new_data_part
from a2a.types import (
    CancelTaskRequest,
    GetExtendedAgentCardRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    TaskState,
)
from a2a.utils.constants import PROTOCOL_VERSION_0_3, PROTOCOL_VERSION_1_0, TransportProtocol
from a2a.utils.errors import A2AError, TaskNotCancelableError, TaskNotFoundError

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.pb import message_types_pb2, session_service_pb2
from tests._support import Client, running_server
from tests.a2a_ingress_support import a2a_client, call, ingress_http
from tests.agents_connected import get_message, new_session, running_agent, skill

COMPLETED = TaskState.TASK_STATE_COMPLETED
BINDINGS = [
    (TransportProtocol.JSONRPC, PROTOCOL_VERSION_1_0),
    (TransportProtocol.JSONRPC, PROTOCOL_VERSION_0_3),
    (TransportProtocol.HTTP_JSON, PROTOCOL_VERSION_1_0),
    (TransportProtocol.HTTP_JSON, PROTOCOL_VERSION_0_3),  # (listed in the card since a second review)
    (TransportProtocol.GRPC, PROTOCOL_VERSION_1_0),
    (TransportProtocol.GRPC, PROTOCOL_VERSION_0_3),
]
IDS = [f"{b}-{v}" for b, v in BINDINGS]


async def echo(dispatch: Dispatch, reply: Reply) -> None:
    await reply.artifact(f"echo: {dispatch.text}", name="echo")
    await reply.complete()


class Mesh:
    """A running mesh with the echo agent and the A2A HTTP routes."""

    def __init__(self, client: Client, base: str) -> None:
        self.client = client
        self.base = base

    async def token(self, client_id: str = "acme-full") -> str:
        return await self.client.token(client_id)


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with (
        running_server() as client,
        ingress_http(client) as base,
        running_agent(client, echo, skills=[skill("echo", "echo")]),
    ):
        yield Mesh(client, base)


def user(
    text: str, *, context_id: str = "", task_id: str = "", data: dict[str, Any] | None = None
) -> Message:
    parts = [Part(text=text)] if text else []
    if data is not None:
        parts.append(new_data_part(data))
    return Message(
        message_id=f"m-{id(parts):x}-{asyncio.get_running_loop().time():.6f}".replace(".", ""),
        role=Role.ROLE_USER,
        parts=parts,
        context_id=context_id,
        task_id=task_id,
    )


async def events_of(a2a: A2AClient, request: SendMessageRequest, token: str) -> list[StreamResponse]:
    return [event async for event in a2a.send_message(request, context=call(token))]


def artifact_texts(task: Any) -> list[str]:
    return [p.text for a in task.artifacts for p in a.parts if p.text]


async def test_the_public_card_names_the_mesh_its_bindings_and_bearer_auth(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{mesh.base}/.well-known/agent-card.json")
    assert response.status_code == 200
    card = response.json()
    assert card["name"] == "svantic mesh"
    bindings = {(i["protocolBinding"], i["protocolVersion"]) for i in card["supportedInterfaces"]}
    assert set(BINDINGS) <= bindings
    urls = {i["url"] for i in card["supportedInterfaces"]}
    assert f"{mesh.base}/send" in urls and mesh.client.server.target in urls
    assert card["securitySchemes"]["bearer"]["httpAuthSecurityScheme"]["scheme"] == "Bearer"
    assert card["capabilities"]["streaming"] is True
    # what an A2A 0.3 client reads: every 0.3 binding (HTTP+JSON was missing: found in a second review)
    assert card["preferredTransport"] == "JSONRPC" and card["url"] == f"{mesh.base}/send"
    assert {i["transport"] for i in card["additionalInterfaces"]} >= {"HTTP+JSON", "GRPC"}


@pytest.mark.parametrize(
    ("settings", "grpc_host"),
    [
        ({"http_public_url": "https://mesh.example.com"}, "mesh.example.com"),
        (
            {"http_public_url": "https://mesh.example.com", "grpc_public_address": "grpc.example.com:443"},
            "grpc.example.com",
        ),
    ],
    ids=["host-of-the-public-url", "grpc-public-address"],
)
async def test_a_public_card_sends_grpc_clients_where_the_public_can_reach(
    settings: dict[str, Any], grpc_host: str
) -> None:
    # found from outside: behind a public URL (bound to 0.0.0.0), the card sent remote A2A clients
    # to 127.0.0.1 for both gRPC bindings
    async with running_server(**settings) as client, httpx.AsyncClient() as http:
        card = (await http.get(f"{client.server.http.url}/.well-known/agent-card.json")).json()
    grpc_urls = {i["url"] for i in card["supportedInterfaces"] if i["protocolBinding"] == "GRPC"}
    port = client.server.port
    expected = settings.get("grpc_public_address", f"{grpc_host}:{port}")
    assert grpc_urls == {expected}
    http_urls = {i["url"] for i in card["supportedInterfaces"] if i["protocolBinding"] != "GRPC"}
    assert all(u.startswith("https://mesh.example.com/") for u in http_urls), http_urls


@pytest.mark.parametrize(("binding", "version"), BINDINGS, ids=IDS)
async def test_send_get_and_stream_over_each_binding(mesh: Mesh, binding: str, version: str) -> None:
    token = await mesh.token()
    session_id = await new_session(mesh.client)
    async with a2a_client(mesh.base, binding, version, streaming=False) as a2a:
        (response,) = await events_of(
            a2a, SendMessageRequest(message=user("please echo hi", context_id=session_id)), token
        )
        task = response.task
        assert task.status.state == COMPLETED, task.status
        assert task.context_id == session_id
        assert artifact_texts(task) == ["echo: please echo hi"]
        # the task is the mesh's message: same id, same outcome over the gRPC API
        stored = await get_message(mesh.client, session_id, task.id)
        assert stored.state == message_types_pb2.MESSAGE_STATE_COMPLETED
        got = await a2a.get_task(GetTaskRequest(id=task.id), context=call(token))
        assert got.status.state == COMPLETED and artifact_texts(got) == ["echo: please echo hi"]
    async with a2a_client(mesh.base, binding, version, streaming=True) as a2a:
        events = await events_of(
            a2a, SendMessageRequest(message=user("please echo streamed", context_id=session_id)), token
        )
        kinds = [e.WhichOneof("payload") for e in events]
        assert kinds[0] == "task" and events[0].task.context_id == session_id
        assert "artifact_update" in kinds
        last = events[-1].status_update
        assert last.status.state == COMPLETED and last.task_id == events[0].task.id
        artifact = next(e.artifact_update for e in events if e.HasField("artifact_update"))
        assert artifact.artifact.parts[0].text == "echo: please echo streamed"


async def test_a_message_without_a_session_opens_one_for_the_caller(mesh: Mesh) -> None:
    token = await mesh.token()
    async with a2a_client(mesh.base, streaming=False) as a2a:
        (response,) = await events_of(a2a, SendMessageRequest(message=user("please echo new")), token)
    task = response.task
    assert task.status.state == COMPLETED and task.context_id
    agents = await mesh.client.sessions.ListSessionAgents(
        session_service_pb2.ListSessionAgentsRequest(session_id=task.context_id),
        metadata=await mesh.client.md(),
    )
    joined = {(a.agent_type, a.join_reason) for a in agents.agents}
    assert ("a2ui-terminal", 2) in joined or any(a.instance_id == "a2a-acme-full" for a in agents.agents)


async def test_the_seed_send_body_verbatim_reaches_its_session_and_completes(mesh: Mesh) -> None:
    await new_session(mesh.client, "my-session-001")
    body = {
        "jsonrpc": "2.0",
        "id": "1",
        "method": "message/send",
        "params": {
            "message": {
                "kind": "message",
                "messageId": "msg-001",
                "role": "user",
                "parts": [{"kind": "text", "text": "Navigate to geico.com and extract the login page"}],
            },
            "configuration": {"sessionId": "my-session-001"},
        },
    }
    headers = {"Authorization": f"Bearer {await mesh.token()}"}
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.post(f"{mesh.base}/send", json=body, headers=headers)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["id"] == "msg-001" and result["contextId"] == "my-session-001"
    assert result["status"]["state"] == "completed", result
    stored = await get_message(mesh.client, "my-session-001", "msg-001")
    assert stored.state == message_types_pb2.MESSAGE_STATE_COMPLETED


async def test_cancel_a_running_task_and_a_finished_one_is_not_cancelable() -> None:
    started = asyncio.Event()

    async def slow(dispatch: Dispatch, reply: Reply) -> None:
        started.set()
        await asyncio.sleep(30)

    async with (
        running_server() as client,
        ingress_http(client) as base,
        running_agent(client, slow, agent_type="slow", instance_id="slow-1", skills=[skill("slow", "slow")]),
    ):
        token = await client.token()
        session_id = await new_session(client)
        async with a2a_client(base, streaming=True) as a2a:
            stream = a2a.send_message(
                SendMessageRequest(message=user("slow please", context_id=session_id)), context=call(token)
            )
            first = await anext(stream)
            task_id = first.task.id
            await asyncio.wait_for(started.wait(), 5)
            canceled = await a2a.cancel_task(CancelTaskRequest(id=task_id), context=call(token))
            assert canceled.status.state == TaskState.TASK_STATE_CANCELED
            rest = [e async for e in stream]
            assert rest[-1].status_update.status.state == TaskState.TASK_STATE_CANCELED
            with pytest.raises(TaskNotCancelableError):
                await a2a.cancel_task(CancelTaskRequest(id=task_id), context=call(token))
            with pytest.raises(TaskNotFoundError):
                await a2a.get_task(GetTaskRequest(id="no-such-task"), context=call(token))


async def test_another_tenants_task_is_not_found(mesh: Mesh) -> None:
    session_id = await new_session(mesh.client)
    async with a2a_client(mesh.base, streaming=False) as a2a:
        (response,) = await events_of(
            a2a,
            SendMessageRequest(message=user("please echo mine", context_id=session_id)),
            await mesh.token(),
        )
        other = await mesh.token("globex-full")
        with pytest.raises(TaskNotFoundError):
            await a2a.get_task(GetTaskRequest(id=response.task.id), context=call(other))
        with pytest.raises(TaskNotFoundError):
            await a2a.cancel_task(CancelTaskRequest(id=response.task.id), context=call(other))
        with pytest.raises(A2AError):  # another tenant's session is not there either
            await events_of(a2a, SendMessageRequest(message=user("hi", context_id=session_id)), other)


async def test_the_extended_card_lists_the_tenants_skills(mesh: Mesh) -> None:
    async with a2a_client(mesh.base) as a2a:
        card = await a2a.get_extended_agent_card(
            GetExtendedAgentCardRequest(), context=call(await mesh.token())
        )
    assert "echo/echo" in {s.id for s in card.skills}


async def test_metadata_data_parts_route_as_over_grpc(mesh: Mesh) -> None:
    async def other(dispatch: Dispatch, reply: Reply) -> None:
        await reply.artifact(f"other: {dispatch.text}", name="other")
        await reply.complete()

    async with running_agent(mesh.client, other, agent_type="other", instance_id="other-1"):
        session_id = await new_session(mesh.client)
        # the words match the echo skill, the data part names another agent: the data part wins
        message = user("please echo this", context_id=session_id, data={"target_agent": "other"})
        async with a2a_client(mesh.base, streaming=False) as a2a:
            (response,) = await events_of(a2a, SendMessageRequest(message=message), await mesh.token())
            assert artifact_texts(response.task) == ["other: please echo this"]
            bad = user("x", context_id=session_id, data={"target_agent": 7})
            with pytest.raises(A2AError) as refused:
                await events_of(a2a, SendMessageRequest(message=bad), await mesh.token())
            assert "target_agent" in str(refused.value)


async def test_list_tasks_of_a_session(mesh: Mesh) -> None:
    from a2a.types import ListTasksRequest

    token = await mesh.token()
    session_id = await new_session(mesh.client)
    async with a2a_client(mesh.base, TransportProtocol.GRPC, streaming=False) as a2a:
        (sent,) = await events_of(
            a2a, SendMessageRequest(message=user("please echo listed", context_id=session_id)), token
        )
        listed = await a2a.list_tasks(ListTasksRequest(context_id=session_id), context=call(token))
        assert [t.id for t in listed.tasks] == [sent.task.id]
        assert listed.tasks[0].status.state == COMPLETED
        other = await a2a.list_tasks(
            ListTasksRequest(context_id=session_id), context=call(await mesh.token("globex-full"))
        )
        assert list(other.tasks) == []
