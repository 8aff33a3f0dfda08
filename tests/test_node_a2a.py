"""Other people's A2A code, in another language: the A2A JS SDK (``@a2a-js/sdk``, protocol 1.0)
as a client of the mesh and as a hosted agent the mesh calls, against a real server.

- ``tests/node/a2a_client.mjs`` reads the mesh's public card and speaks each binding it offers
  (JSON-RPC, HTTP+JSON, gRPC): a blocking send that opens a session, a streamed send in the
  same context, getTask, cancelTask of a finished task and getTask of an unknown id (the SDK's
  own error classes), and a call without the token.
- ``tests/node/a2a_agent.mjs`` is a hosted agent on JSON-RPC or on HTTP+JSON. Like every
  agent built on that SDK, it begins each turn with the task, so the turn that carries a
  human's answer begins with the task still input-required: the mesh must take that for the
  task as it stood, not for the same question asked again.

The Node packages are pinned by ``tests/node/package-lock.json`` (``tests/_node.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from svantic_grpc.pb import agent_types_pb2, message_service_pb2, registry_service_pb2
from tests._node import NODE_DIR, require_node, run_node
from tests._support import Client
from tests.agents_connected import wait_for_state
from tests.agents_inputs import pending, resolve
from tests.api.test_messages_hosted import (
    COMPLETED,
    FAILED,
    INPUT_REQUIRED,
    artifact_texts,
    new_session,
    send,
    target,
    text,
)

# A2A 1.0 task states as the JS SDK numbers them
SUBMITTED, WORKING, TASK_COMPLETED = 1, 2, 3


@pytest.mark.parametrize("binding", ["JSONRPC", "HTTP+JSON", "GRPC"])
async def test_the_a2a_js_client_uses_the_mesh_over_each_binding(client: Client, binding: str) -> None:
    require_node("the A2A JS SDK client test")
    token = await client.token()

    [out] = await run_node("a2a_client.mjs", client.server.http.url, token, binding)

    sent = out["send"]
    assert sent["state"] == TASK_COMPLETED and sent["contextId"].startswith("ses_")
    assert sent["texts"][0] == "what can you do?" and "what this session can do" in sent["texts"][1]
    stream = out["stream"]
    assert stream[0]["kind"] == "task" and stream[-1] == {
        "kind": "statusUpdate",
        "state": TASK_COMPLETED,
        "contextId": sent["contextId"],  # the same session
    }
    assert {e["contextId"] for e in stream} == {sent["contextId"]}
    assert out["get"] == {"state": TASK_COMPLETED, "id": sent["id"]}
    assert out["cancelFinished"].endswith("TaskNotCancelableError")
    assert out["getUnknown"].endswith("TaskNotFoundError")
    assert out["unauthenticated"] is not None  # refused without the token
    # what the JS client did is what the mesh holds: its session, with its two messages
    listed = await client.messages.ListMessages(
        message_service_pb2.ListMessagesRequest(session_id=sent["contextId"]), metadata=await client.md()
    )
    assert [m.state for m in listed.messages] == [COMPLETED, COMPLETED]


@contextlib.asynccontextmanager
async def _js_agent(binding: str) -> AsyncIterator[str]:
    """The JS SDK agent on a free loopback port; its base URL."""
    process = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "a2a_agent.mjs"), binding, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        yield str(json.loads(line)["url"])
    finally:
        process.kill()
        await process.wait()


async def _seen(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{url}/seen")
        seen: list[dict[str, Any]] = response.json()
        return seen


@pytest.mark.parametrize(("binding", "transport"), [("JSONRPC", "a2a-jsonrpc"), ("HTTP+JSON", "a2a-rest")])
async def test_the_mesh_calls_an_agent_written_with_the_a2a_js_sdk(
    client: Client, binding: str, transport: str
) -> None:
    require_node("the A2A JS SDK agent test")
    async with _js_agent(binding) as url:
        await client.registry.RegisterAgent(
            registry_service_pb2.RegisterAgentRequest(
                agent_type="js-echo",
                instance_id="js-echo-1",
                url=url,
                deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_HOSTED,
            ),
            metadata=await client.md(),
        )
        session_id = await new_session(client)

        echoed = await send(client, session_id, text("hello js"), target("js-echo"))
        assert echoed.state == COMPLETED, echoed.state_reason
        assert artifact_texts(echoed) == ["js echo: hello js"]

        asked = await send(client, session_id, text("please ask me something"), target("js-echo"))
        assert asked.state == INPUT_REQUIRED, asked.state_reason
        assert "what is your name?" in asked.state_reason
        [request] = (await pending(client, session_id)).requests
        await resolve(client, request.request_id, values={"answer": "Ada"})
        done = await wait_for_state(client, session_id, asked.message_id, COMPLETED, FAILED)
        assert done.state == COMPLETED, done.state_reason
        assert artifact_texts(done) == ["hello, Ada"]
        assert (await pending(client, session_id)).requests == []  # asked once, answered once

        first, ask, answer = await _seen(url)
        assert {t["contextId"] for t in (first, ask, answer)} == {session_id}
        assert (ask["followUp"], answer["followUp"]) == (False, True)
        assert answer["taskId"] == ask["taskId"] and answer["text"] == "Ada"
        assert all(t["authorization"].startswith("Bearer ey") for t in (first, ask, answer))
        got = await client.registry.GetAgent(
            registry_service_pb2.GetAgentRequest(instance_id="js-echo-1"), metadata=await client.md()
        )
        assert got.agent.connection.transport == transport
