"""A server killed with SIGKILL and started again on its SQLite file has lost nothing.

The server runs as a real subprocess (`python -m svantic_grpc serve`); a connected
agent runs in the test and reconnects by itself; the approval is answered through
the webhook receiver after the restart, with the callback token the first server
sent to the test's webhook target before it was killed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc import aio
from standardwebhooks import Webhook

from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.pb import (
    auth_service_pb2,
    message_service_pb2,
    message_types_pb2,
    registry_service_pb2,
    session_service_pb2,
)
from svantic_grpc.pb.auth_service_pb2_grpc import AuthServiceStub
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.registry_service_pb2_grpc import RegistryServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from svantic_grpc.stores import open_store

ROOT = Path(__file__).resolve().parents[2]
HOOK_SECRET = "whsec_" + base64.b64encode(b"outbound-secret-for-restart-test").decode()
TOKEN_KEY = "callback-token-key-for-the-restart-test"
WAIT = 15.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _server(settings: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "svantic_grpc", "serve", "--settings", str(settings)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _read(log: Path) -> str:
    return log.read_text()


async def _until_serving(target: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(_read, log)
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{text}")
        if "serving gRPC" in text:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"server did not start:\n{await asyncio.to_thread(_read, log)}")


@asynccontextmanager
async def _client(target: str) -> AsyncIterator[tuple[aio.Channel, tuple[tuple[str, str], ...]]]:
    # A channel of its own: gRPC otherwise shares connections (and their reconnect backoff after
    # the kill) across the process's channels.
    async with aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        token = await AuthServiceStub(channel).GetToken(
            auth_service_pb2.GetTokenRequest(
                client_id="svantic", client_secret="your-secret", agent_type="terminal"
            ),
            wait_for_ready=True,
            timeout=WAIT,
        )
        yield channel, (("authorization", f"Bearer {token.token}"),)


async def _eventually(check: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
            if last:
                return last
        except aio.AioRpcError as error:  # the server may still be starting
            last = error
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


@pytest.mark.timeout(90)
async def test_a_killed_server_restarts_with_everything_and_finishes_the_approved_work(
    tmp_path: Path,
) -> None:
    grpc_port, http_port, hook_port = _free_port(), _free_port(), _free_port()
    target = f"127.0.0.1:{grpc_port}"
    db = tmp_path / "state" / "mesh.db"
    db.parent.mkdir()  # the server refuses a database in a missing directory
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "grpc_address": target,
                "http_address": f"127.0.0.1:{http_port}",
                "store": f"sqlite:///{db}",
                "shutdown_grace_s": 0,
                "policies": [
                    {"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"}
                ],
                "adapters": {
                    "webhook": {
                        "targets": [{"url": f"http://127.0.0.1:{hook_port}/hook", "secret_env": "HOOK_OUT"}],
                        "callback_token_key_env": "HOOK_TOKEN_KEY",
                    }
                },
            }
        )
    )
    dispatch_key = (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    env = {k: v for k, v in os.environ.items() if k != "SVANTIC_SIGNING_KEY"}
    env.update(HOOK_OUT=HOOK_SECRET, HOOK_TOKEN_KEY=TOKEN_KEY, SVANTIC_DISPATCH_KEY=dispatch_key)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"

    decisions: list[bool] = []

    async def deleting(dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval("crm.delete_records", {"ids": [7]})
        decisions.append(approved)
        await reply.artifact(f"approved: {approved}")
        await reply.complete()

    agent = ConnectedAgent(
        target,
        client_id="svantic",
        client_secret="your-secret",
        agent_type="crm",
        instance_id="crm-1",
        handler=deleting,
        reconnect_delay_s=0.1,
    )
    agent_task: asyncio.Task[None] | None = None
    notifications: list[dict[str, Any]] = []
    hook = await _webhook_target(hook_port, notifications)
    try:
        with _server(settings, env, first_log) as first:
            await _until_serving(target, first, first_log)
            agent_task = asyncio.create_task(agent.run())
            await asyncio.wait_for(agent.connected.wait(), WAIT)
            async with _client(target) as (channel, md):
                sessions, messages = SessionServiceStub(channel), MessageServiceStub(channel)
                idle = await sessions.InitSession(
                    session_service_pb2.InitSessionRequest(session_id="kept"), metadata=md
                )
                await sessions.InitSession(
                    session_service_pb2.InitSessionRequest(session_id="work"), metadata=md
                )
                closed = await sessions.InitSession(
                    session_service_pb2.InitSessionRequest(session_id="gone"), metadata=md
                )
                await sessions.CloseSession(
                    session_service_pb2.CloseSessionRequest(session_id="gone"), metadata=md
                )
                sent = await messages.SendMessage(
                    message_service_pb2.SendMessageRequest(
                        session_id="work",
                        message=message_service_pb2.OutgoingMessage(
                            message_id="m1",
                            parts=[
                                message_types_pb2.Part(text="delete record 7"),
                                _data({"target_agent": "crm"}),
                            ],
                        ),
                    ),
                    metadata=md,
                )
                assert sent.message.state == message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED
                [request_id] = sent.message.input_request_ids
                watched = [
                    r.event.sequence
                    async for r in sessions.WatchSession(
                        session_service_pb2.WatchSessionRequest(session_id="gone"), metadata=md
                    )
                ]

                # The webhook target was told, with a callback token to answer by.
                async def announced() -> str:
                    tokens = [
                        n["callback"]["token"]
                        for n in notifications
                        if n["type"] == "input.required" and n["request"]["id"] == request_id
                    ]
                    return tokens[0] if tokens else ""

                callback_token = await _eventually(announced, "the webhook notification")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        assert idle.session.session_id == "kept" and closed.session.session_id == "gone"

        with _server(settings, env, second_log) as second:
            await _until_serving(target, second, second_log)
            async with _client(target) as (channel, md):
                sessions, messages = SessionServiceStub(channel), MessageServiceStub(channel)
                registry = RegistryServiceStub(channel)
                # Sessions, their states and event logs, registrations and the pending request survived.
                kept = await sessions.GetSession(
                    session_service_pb2.GetSessionRequest(session_id="kept"), metadata=md
                )
                assert kept.session.status == 2  # ACTIVE
                gone = await sessions.GetSession(
                    session_service_pb2.GetSessionRequest(session_id="gone"), metadata=md
                )
                assert gone.session.status == 4  # closed while up, still closed
                replay = [
                    r.event.sequence
                    async for r in sessions.WatchSession(
                        session_service_pb2.WatchSessionRequest(session_id="gone"), metadata=md
                    )
                ]
                assert replay == watched
                paused = await sessions.GetSession(
                    session_service_pb2.GetSessionRequest(session_id="work"), metadata=md
                )
                assert paused.session.status == 3  # PAUSED: still waiting for a human
                pending = await messages.ListPendingInputs(
                    message_service_pb2.ListPendingInputsRequest(session_id="work"), metadata=md
                )
                assert [r.request_id for r in pending.requests] == [request_id]
                agent_after = await registry.GetAgent(
                    registry_service_pb2.GetAgentRequest(instance_id="crm-1"), metadata=md
                )
                assert agent_after.agent.agent_type == "crm"

                # The connected agent reconnects by itself and is routable again.
                async def reconnected() -> bool:
                    found = await registry.GetAgent(
                        registry_service_pb2.GetAgentRequest(instance_id="crm-1"), metadata=md
                    )
                    return bool(found.agent.connection.connected)

                await _eventually(reconnected, "the agent to reconnect")

                # The approval arrives through the webhook receiver, with the token sent before the kill.
                body = {"callback_token": callback_token, "decision": "approve", "responder": "ops"}
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(f"http://127.0.0.1:{http_port}/webhooks/receive", json=body) as response,
                ):
                    assert response.status == 200, await response.text()

                async def completed() -> message_types_pb2.Message | None:
                    got = await messages.GetMessage(
                        message_service_pb2.GetMessageRequest(session_id="work", message_id="m1"), metadata=md
                    )
                    return (
                        got.message
                        if got.message.state == message_types_pb2.MESSAGE_STATE_COMPLETED
                        else None
                    )

                done = await _eventually(completed, "the message to complete")
                assert [p.text for a in done.artifacts for p in a.parts] == ["approved: True"]
                assert decisions == [True]
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=10)
    finally:
        await agent.stop()
        if agent_task is not None:
            await asyncio.wait_for(agent_task, WAIT)
        await hook.cleanup()

    # The audit trail on disk records who approved, through which surface.
    store = open_store(f"sqlite:///{db}")
    await store.connect()
    try:
        trail = await store.list_audit(tenant_id="dev", request_id=request_id)
    finally:
        await store.close()
    assert [(r.actor, r.surface, r.outcome) for r in trail] == [("ops", "webhook", "approve")]


def _data(value: dict[str, Any]) -> message_types_pb2.Part:
    part = message_types_pb2.Part()
    part.data.update(value)
    return part


async def _webhook_target(port: int, received: list[dict[str, Any]]) -> web.AppRunner:
    """A webhook target on loopback that keeps each notification it gets (signature verified)."""
    signer = Webhook(HOOK_SECRET)

    async def hook(request: web.Request) -> web.Response:
        received.append(signer.verify(await request.text(), dict(request.headers)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
