"""Start-up recovery leaves a consistent mesh, whatever moment a kill interrupted.

The SQLite file is written as a kill at an unlucky moment left it (by earlier versions, whose
related writes were separate transactions), then a real server starts on it:

- a request of a message that was running (recovery fails it ``interrupted``) leaves the
  approval queue, and answering it is refused, not audited as an approval;
- a request of a message that had already ended is withdrawn too;
- a session is paused exactly when something in it is pending, whatever its record said.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc import aio

from svantic_grpc.core.inputs.model import InputKind, InputRequest, InputState, ToolCall
from svantic_grpc.core.messages.model import Message, MessageState, Part, Role
from svantic_grpc.core.models import Session, SessionStatus
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2, session_types_pb2
from svantic_grpc.stores.sqlite import SqliteStore
from tests._support import running_server

TENANT = "acme"
T0 = 1_800_000_000.0


async def _left_by_a_kill(path: Path) -> None:
    store = await SqliteStore.open(path)
    try:

        async def session(session_id: str, status: SessionStatus) -> None:
            await store.create_session(
                Session(TENANT, session_id, status, T0, T0, T0, created_by="acme-full")
            )

        async def message(session_id: str, state: MessageState, *request_ids: str) -> None:
            await store.create_message(
                Message(
                    TENANT,
                    session_id,
                    "m1",
                    Role.USER,
                    (Part(text="delete record 7"),),
                    state,
                    T0,
                    T0,
                    agent_type="crm",
                    instance_id="crm-1",
                    input_request_ids=request_ids,
                )
            )

        async def pending(session_id: str, request_id: str) -> None:
            await store.create_input(
                InputRequest(
                    TENANT,
                    request_id,
                    session_id,
                    "m1",
                    InputKind.TOOL_APPROVAL,
                    T0,
                    T0 + 86_400 * 365 * 10,
                    ToolCall("crm.delete_records"),
                )
            )

        # Running when killed, its request raised but the message not yet input-required.
        await session("running", SessionStatus.PAUSED)
        await message("running", MessageState.WORKING)
        await pending("running", "r-running")
        # Ended (canceled) when killed, before its request was withdrawn.
        await session("ended", SessionStatus.PAUSED)
        await message("ended", MessageState.CANCELED, "r-ended")
        await pending("ended", "r-ended")
        # Waiting for a human, but the session record never got to say so.
        await session("waiting", SessionStatus.ACTIVE)
        await message("waiting", MessageState.INPUT_REQUIRED, "r-waiting")
        await pending("waiting", "r-waiting")
        # Paused with nothing pending any more.
        await session("idle", SessionStatus.PAUSED)
    finally:
        await store.close()


async def test_recovery_withdraws_what_nothing_waits_for_and_derives_paused_from_pending(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mesh.db"
    await _left_by_a_kill(path)
    async with running_server(store=f"sqlite:///{path}") as client:
        md = await client.md()
        queue = await client.messages.ListPendingInputs(
            message_service_pb2.ListPendingInputsRequest(), metadata=md
        )
        assert [r.request_id for r in queue.requests] == ["r-waiting"]

        for request_id in ("r-running", "r-ended"):
            with pytest.raises(aio.AioRpcError) as refused:
                await client.messages.ResolveInput(
                    message_service_pb2.ResolveInputRequest(
                        request_id=request_id,
                        resolution=message_types_pb2.Resolution(decision=message_types_pb2.DECISION_APPROVE),
                    ),
                    metadata=md,
                )
            assert refused.value.code() is grpc.StatusCode.ABORTED  # already ended
            assert "already ended" in (refused.value.details() or "")

        running = await client.messages.GetMessage(
            message_service_pb2.GetMessageRequest(session_id="running", message_id="m1"), metadata=md
        )
        assert running.message.state == message_types_pb2.MESSAGE_STATE_FAILED
        assert running.message.state_reason.startswith("interrupted")

        statuses = {}
        for session_id in ("running", "ended", "waiting", "idle"):
            got = await client.sessions.GetSession(
                session_service_pb2.GetSessionRequest(session_id=session_id), metadata=md
            )
            statuses[session_id] = got.session.status
        assert statuses == {
            "running": session_types_pb2.SESSION_STATUS_ACTIVE,
            "ended": session_types_pb2.SESSION_STATUS_ACTIVE,
            "waiting": session_types_pb2.SESSION_STATUS_PAUSED,
            "idle": session_types_pb2.SESSION_STATUS_ACTIVE,
        }

    store = await SqliteStore.open(path)
    try:
        for request_id in ("r-running", "r-ended"):
            request = await store.get_input(tenant_id=TENANT, request_id=request_id)
            assert request is not None and request.state is InputState.CANCELED
            trail = await store.list_audit(tenant_id=TENANT, request_id=request_id)
            assert [(r.actor, r.outcome) for r in trail] == [("mesh", request.outcome_reason)]
    finally:
        await store.close()
