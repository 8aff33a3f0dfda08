"""What a hosted agent receives: the message as the mesh holds it, whatever binding the agent speaks.

A real a2a-sdk agent on loopback records the A2A message each call brings (as its request
handler parsed it), its headers and tenant, and answers with an artifact. The mesh's transport
sends it text, a data part of every JSON type, file bytes that are no text, and a file by URL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from a2a.helpers import new_data_part, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from a2a.types import Message as A2AMessage
from a2a.types import Part as A2APart
from a2a.types import Role as A2ARole
from a2a.utils.constants import TransportProtocol
from grpc import aio

from svantic_grpc.core.dispatch import DispatchJob, DispatchUpdate
from svantic_grpc.core.messages.model import FilePart, Message, MessageState, Part, Role
from svantic_grpc.core.models import AgentRegistration, DeploymentMode
from svantic_grpc.dispatch.a2a import A2ATransport
from tests.agents_a2a import _listening_socket, serve_a2a, serve_a2a_grpc

DATA = {
    "name": "Zoë ✓",
    "count": 3,
    "ratio": 0.25,
    "big": 2**40,
    "yes": True,
    "nothing": None,
    "list": [1, "two", {"three": [3.5]}],
    "nested": {"deeper": {"deepest": []}},
}
RAW = bytes(range(256))


class Recorder(AgentExecutor):
    def __init__(self) -> None:
        self.received: list[A2AMessage] = []
        self.headers: list[dict[str, str]] = []
        self.tenants: list[str] = []

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        received = A2AMessage()
        received.CopyFrom(context.message)
        received.ClearField("task_id")  # the request handler's, for the task it made
        self.received.append(received)
        self.tenants.append(context.tenant)
        self.headers.append(
            dict(context.call_context.state.get("headers") or {}) if context.call_context else {}
        )
        task = new_task_from_user_message(context.message)
        await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.add_artifact([new_text_part("got it")], name="ack")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


def _card(interface_url: str, binding: str, streaming: bool, tenant: str) -> AgentCard:
    return AgentCard(
        name="recorder",
        description="records what it receives",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=interface_url, protocol_binding=binding, protocol_version="1.0", tenant=tenant)
        ],
        capabilities=AgentCapabilities(streaming=streaming),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="record", name="record", description="records", tags=["record"])],
    )


@contextlib.asynccontextmanager
async def _recorder(binding: str, streaming: bool, tenant: str) -> AsyncIterator[tuple[str, Recorder]]:
    sock = _listening_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/recorder"
    recorder = Recorder()
    server = None
    interface_url = url
    if binding == TransportProtocol.GRPC:
        server = aio.server(options=[("grpc.so_reuseport", 0)])
        interface_url = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    card = _card(interface_url, binding, streaming, tenant)
    async with serve_a2a(sock, [("recorder", recorder, card)]) as [handler]:
        if server is None:
            yield url, recorder
            return
        async with serve_a2a_grpc(server, handler):
            yield url, recorder


@pytest.mark.parametrize(
    ("binding", "streaming", "tenant"),
    [
        pytest.param(TransportProtocol.JSONRPC, True, "", id="jsonrpc"),
        pytest.param(TransportProtocol.JSONRPC, False, "", id="jsonrpc-not-streaming"),
        pytest.param(TransportProtocol.JSONRPC, True, "tenant-9", id="jsonrpc-tenant"),
        pytest.param(TransportProtocol.GRPC, True, "", id="grpc"),
    ],
)
async def test_the_agent_receives_every_kind_of_part_as_the_mesh_holds_it(
    binding: str, streaming: bool, tenant: str
) -> None:
    parts = (
        Part(text="hello ✓"),
        Part(data=DATA),
        Part(file=FilePart("blob.bin", "application/octet-stream", data=RAW)),
        Part(file=FilePart("", "", uri="https://files.example/report.pdf")),
        Part(file=FilePart("photo.png", "image/png", uri="https://files.example/photo.png")),
    )
    async with _recorder(binding, streaming, tenant) as (url, recorder):
        transport = A2ATransport()
        agent = AgentRegistration("acme", "recorder", "recorder-1", DeploymentMode.HOSTED, 0.0, 0.0, url=url)
        message = Message("acme", "s1", "m1", Role.USER, parts, MessageState.WORKING, 0.0, 0.0)
        job = DispatchJob(
            "dsp_1",
            "acme",
            "s1",
            agent,
            message,
            lambda: "the-token",
            0.0,
            trace_context={"traceparent": "00-ab"},
        )
        try:
            updates: list[DispatchUpdate] = await asyncio.wait_for(_all(transport, job), 10)
        finally:
            await transport.close()
    assert updates[-1].state is MessageState.COMPLETED
    [received] = recorder.received
    expected = A2AMessage(
        message_id="dsp_1",
        context_id="s1",
        role=A2ARole.ROLE_USER,
        parts=[
            A2APart(text="hello ✓"),
            new_data_part(DATA),
            A2APart(raw=RAW, media_type="application/octet-stream", filename="blob.bin"),
            A2APart(url="https://files.example/report.pdf"),
            A2APart(url="https://files.example/photo.png", media_type="image/png", filename="photo.png"),
        ],
        metadata={"svantic": {"session_id": "s1", "message_id": "m1"}},
    )
    assert received == expected
    assert recorder.tenants == [tenant]  # the card's interface names it: the agent gets it
    [headers] = recorder.headers
    assert headers["authorization"] == "Bearer the-token"
    assert headers["traceparent"] == "00-ab"


async def _all(transport: A2ATransport, job: DispatchJob) -> list[DispatchUpdate]:
    return [update async for update in transport.dispatch(job)]
