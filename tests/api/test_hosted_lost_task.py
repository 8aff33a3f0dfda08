"""A hosted agent that lost the task it asked on still gets the human's answer.

An a2a-sdk agent with its tasks in memory asks a question, then restarts (same port, empty task
store) while the human thinks. When the answer comes, the agent says "task not found" to it. The
human's answer is acknowledged, so the mesh does not fail the message for that: it sends the
original request and the answer to the agent as a new task in the same context, and the message
completes with what the agent made of them. The same when the mesh restarts too (SQLite, killed)
and resumes the agent's task with the answer after its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from a2a.helpers import new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from a2a.utils.constants import TransportProtocol
from google.protobuf import json_format, struct_pb2
from grpc import aio

from svantic_grpc.pb import agent_types_pb2, message_service_pb2, message_types_pb2, registry_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.registry_service_pb2_grpc import RegistryServiceStub
from tests._support import running_server
from tests.agents_a2a import serve_a2a, serve_a2a_grpc
from tests.agents_connected import WAIT, data, new_session, send, wait_for_state
from tests.agents_inputs import artifact_texts, pending, resolve
from tests.api.test_inputs import COMPLETED, INPUT_REQUIRED
from tests.durability._approvals import approval_mesh, ask_to_delete, ended
from tests.durability.test_restart import WAIT as RESTART_WAIT
from tests.durability.test_restart import _client, _server, _until_serving

FAILED = message_types_pb2.MESSAGE_STATE_FAILED


@dataclass
class Turn:
    """One call the agent's executor ran: whether it continued a task it had, and what it was sent."""

    continued: bool
    texts: list[str]
    resolution: dict[str, Any]


@dataclass
class ForgetfulAgent(AgentExecutor):
    """Asks for a name unless the message carries an ``input_resolution``; with one, greets the
    name and says what the request was (the first text of the task's first message)."""

    url: str
    binding: str
    interface_url: str
    turns: list[Turn] = field(default_factory=list)

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        task = context.current_task
        continued = task is not None
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        texts = [p.text for p in context.message.parts if p.WhichOneof("content") == "text"]
        resolution: dict[str, Any] = {}
        for part in context.message.parts:
            if part.WhichOneof("content") == "data":
                value = json_format.MessageToDict(part.data)
                if isinstance(value, dict) and "input_resolution" in value:
                    resolution = value["input_resolution"]
        self.turns.append(Turn(continued, texts, resolution))
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        if not resolution:
            await updater.requires_input(updater.new_agent_message([new_text_part("What is your name?")]))
            return
        request = task.history[0].parts[0].text if continued and task.history else texts[0]
        name = resolution.get("values", {}).get("answer", "?")
        await updater.add_artifact([new_text_part(f"Nice to meet you, {name} ({request})")])
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError

    def card(self) -> AgentCard:
        return AgentCard(
            name="forgetful-1",
            description="keeps its tasks in memory",
            version="1.0.0",
            supported_interfaces=[
                AgentInterface(
                    url=self.url, protocol_binding=TransportProtocol.JSONRPC, protocol_version="1.0"
                )
            ],
            capabilities=AgentCapabilities(streaming=True, push_notifications=False),
            default_input_modes=["text/plain"],
            default_output_modes=["text/plain"],
            skills=[AgentSkill(id="greet", name="greet", description="greet", tags=["greet"])],
        )


def _socket_on(port: int) -> socket.socket:
    """A listening socket for ``port`` again, after the agent's first server let it go."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.asynccontextmanager
async def _serving(port: int, grpc_port: int, agent: ForgetfulAgent) -> AsyncIterator[None]:
    """The agent (its card on ``port``, JSON-RPC there or gRPC on ``grpc_port``) with a new
    in-memory task store, as a2a-sdk's ``DefaultRequestHandler`` keeps it."""
    async with serve_a2a(_socket_on(port), [("forgetful-1", agent, agent.card())]) as [handler]:
        if agent.binding != TransportProtocol.GRPC:
            yield
            return
        server = aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_insecure_port(f"127.0.0.1:{grpc_port}")
        async with serve_a2a_grpc(server, handler):
            yield


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("binding", [TransportProtocol.JSONRPC, TransportProtocol.GRPC])
async def test_an_answer_to_an_agent_that_lost_its_task_reaches_it_as_a_new_task(binding: str) -> None:
    port, grpc_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}/forgetful-1"
    agent = ForgetfulAgent(
        url, binding, f"127.0.0.1:{grpc_port}" if binding == TransportProtocol.GRPC else url
    )
    async with running_server() as client:
        async with _serving(port, grpc_port, agent):
            await client.registry.RegisterAgent(
                registry_service_pb2.RegisterAgentRequest(
                    agent_type="forgetful",
                    instance_id="forgetful-1",
                    url=agent.url,
                    deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_HOSTED,
                ),
                metadata=await client.md(),
                timeout=WAIT,
            )
            session_id = await new_session(client)
            asked = await send(client, session_id, "book a table", data({"target_agent": "forgetful"}))
            assert asked.state == INPUT_REQUIRED, asked.state_reason
            [question] = (await pending(client, session_id)).requests
        # The agent restarts while the human thinks: same address, no tasks.
        async with _serving(port, grpc_port, agent):
            await resolve(client, question.request_id, values={"answer": "Ada"})
            done = await wait_for_state(client, session_id, asked.message_id, COMPLETED, FAILED)

    assert done.state == COMPLETED, done.state_reason
    assert artifact_texts(done) == ["Nice to meet you, Ada (book a table)"]
    asking, afresh = agent.turns  # the answer on the lost task never reached the executor
    assert (asking.continued, asking.texts, asking.resolution) == (False, ["book a table"], {})
    assert afresh.continued is False
    assert afresh.texts == ["book a table", "Ada"]
    assert afresh.resolution["request_id"] == question.request_id
    assert afresh.resolution["values"] == {"answer": "Ada"}


@pytest.mark.timeout(120)
async def test_after_both_restart_the_answer_reaches_the_agent_as_a_new_task(tmp_path: Path) -> None:
    # The mesh (SQLite) is killed while the human thinks, and the agent restarts too: the next
    # mesh resumes the agent's task with the answer, which the agent no longer has.
    mesh = approval_mesh(tmp_path)
    port, grpc_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}/forgetful-1"
    agent = ForgetfulAgent(url, TransportProtocol.JSONRPC, url)
    registration = registry_service_pb2.RegisterAgentRequest(
        agent_type="forgetful",
        instance_id="forgetful-1",
        url=url,
        deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_HOSTED,
    )
    async with _serving(port, grpc_port, agent):
        with _server(mesh.settings, mesh.env, tmp_path / "first.log") as first:
            await _until_serving(mesh.target, first, tmp_path / "first.log")
            async with _client(mesh.target) as (channel, md):
                await RegistryServiceStub(channel).RegisterAgent(registration, metadata=md)
                asked = await ask_to_delete(channel, md, "s1", "forgetful")
                [request_id] = asked.input_request_ids
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, RESTART_WAIT)
    async with _serving(port, grpc_port, agent):  # back, with no tasks
        with _server(mesh.settings, mesh.env, tmp_path / "second.log") as second:
            await _until_serving(mesh.target, second, tmp_path / "second.log")
            async with _client(mesh.target) as (channel, md):
                answer = struct_pb2.Struct()
                answer.update({"answer": "Ada"})
                await MessageServiceStub(channel).ResolveInput(
                    message_service_pb2.ResolveInputRequest(
                        request_id=request_id, resolution=message_types_pb2.Resolution(values=answer)
                    ),
                    metadata=md,
                )
                done = await ended(channel, md, "s1")

    assert done.state == COMPLETED, done.state_reason
    assert artifact_texts(done) == ["Nice to meet you, Ada (delete record 7)"]
    asking, afresh = agent.turns
    assert (asking.continued, asking.texts, asking.resolution) == (False, ["delete record 7"], {})
    assert (afresh.continued, afresh.texts) == (False, ["delete record 7"])
    assert afresh.resolution["request_id"] == request_id
    assert afresh.resolution["values"] == {"answer": "Ada"}
