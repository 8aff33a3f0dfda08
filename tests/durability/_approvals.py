"""What the restart tests around a human's approval share: a server's settings (SQLite, a policy
that makes ``crm.delete_*`` need approval), the connected ``crm`` agent, the message that asks,
and waiting for it to end.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Handler, Reply
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from tests.durability.test_restart import _data, _eventually, _free_port

pb = message_types_pb2
APPROVE = pb.Resolution(decision=pb.DECISION_APPROVE)
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Mesh:
    """Where the servers of one test listen, their settings file and environment."""

    target: str
    http_port: int
    settings: Path
    env: dict[str, str]


@dataclass
class Deleting:
    """A ``crm`` handler: asks approval to delete record 7, does the work the answer allows
    (``runs`` counts it), waits for ``go_on`` when given, then reports ``approved: <answer>`` as an
    artifact and completes."""

    go_on: asyncio.Event | None = None
    runs: list[bool] = field(default_factory=list)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval("crm.delete_records", {"ids": [7]})
        self.runs.append(approved)
        self.answered.set()
        if self.go_on is not None:
            await self.go_on.wait()  # still at work, reporting nothing
        await reply.artifact(f"approved: {approved}")
        await reply.complete()
        self.finished.set()


def approval_mesh(tmp_path: Path, *, keep_dispatch_key: bool = False, **settings: Any) -> Mesh:
    """Settings for servers on one SQLite file (fixed ports, so a restart is at the same address);
    ``settings`` add to or replace keys. ``keep_dispatch_key``: one dispatch key for every server
    (a hosted agent that read the keys once still verifies after the restart)."""
    grpc_port, http_port = _free_port(), _free_port()
    target = f"127.0.0.1:{grpc_port}"
    path = tmp_path / "settings.json"
    path.write_text(
        json.dumps(
            {
                "grpc_address": target,
                "http_address": f"127.0.0.1:{http_port}",
                "store": f"sqlite:///{tmp_path / 'mesh.db'}",
                "shutdown_grace_s": 0,
                "dispatch": {"timeout_ms": 30_000},
                "policies": [
                    {"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"}
                ],
                **settings,
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "SVANTIC_SIGNING_KEY"}
    if keep_dispatch_key:
        key = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        env["SVANTIC_DISPATCH_KEY"] = key.decode()
    return Mesh(target, http_port, path, env)


def crm_agent(target: str, handler: Handler) -> ConnectedAgent:
    """The connected ``crm/crm-1`` agent of the walkthrough credential, reconnecting quickly."""
    return ConnectedAgent(
        target,
        client_id="svantic",
        client_secret="your-secret",
        agent_type="crm",
        instance_id="crm-1",
        handler=handler,
        reconnect_delay_s=0.1,
    )


async def ask_to_delete(
    channel: Any, md: Metadata, session_id: str, target_agent: str = "crm", *, init: bool = True
) -> pb.Message:
    """Open ``session_id`` (unless ``init`` is false: it is open) and send it ``m1`` (delete record 7)
    for ``target_agent``; it waits for a human."""
    if init:
        await SessionServiceStub(channel).InitSession(
            session_service_pb2.InitSessionRequest(session_id=session_id), metadata=md
        )
    sent = await MessageServiceStub(channel).SendMessage(
        message_service_pb2.SendMessageRequest(
            session_id=session_id,
            message=message_service_pb2.OutgoingMessage(
                message_id="m1",
                parts=[pb.Part(text="delete record 7"), _data({"target_agent": target_agent})],
            ),
        ),
        metadata=md,
    )
    assert sent.message.state == pb.MESSAGE_STATE_INPUT_REQUIRED, sent.message.state_reason
    return sent.message


async def ended(channel: Any, md: Metadata, session_id: str) -> pb.Message:
    """Message ``m1`` of ``session_id`` once it ended (bounded wait)."""
    messages = MessageServiceStub(channel)

    async def end() -> pb.Message | None:
        got = await messages.GetMessage(
            message_service_pb2.GetMessageRequest(session_id=session_id, message_id="m1"), metadata=md
        )
        return got.message if got.message.state >= pb.MESSAGE_STATE_COMPLETED else None

    done: pb.Message = await _eventually(end, f"the message of {session_id} to end")
    return done
