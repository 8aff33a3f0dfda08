"""GetSession with include_history: the session's messages, oldest first, bounded and marked when cut."""

from __future__ import annotations

import grpc
import pytest

from svantic_grpc.api.session_service import HISTORY_MAX_BYTES, HISTORY_MAX_MESSAGES
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2, session_types_pb2
from tests._support import Client, code_of

CALL_TIMEOUT = 10.0


async def _session(client: Client, session_id: str) -> None:
    await client.sessions.InitSession(
        session_service_pb2.InitSessionRequest(session_id=session_id), metadata=await client.md()
    )


async def _send(client: Client, session_id: str, text: str) -> message_types_pb2.Message:
    response = await client.messages.SendMessage(
        message_service_pb2.SendMessageRequest(
            session_id=session_id,
            message=message_service_pb2.OutgoingMessage(parts=[message_types_pb2.Part(text=text)]),
        ),
        metadata=await client.md(),
        timeout=CALL_TIMEOUT,
    )
    return response.message


async def _get(client: Client, session_id: str, *, include_history: bool = True) -> session_types_pb2.Session:
    response = await client.sessions.GetSession(
        session_service_pb2.GetSessionRequest(session_id=session_id, include_history=include_history),
        metadata=await client.md(),
        timeout=CALL_TIMEOUT,
    )
    return response.session


async def test_history_holds_the_messages_oldest_first_as_get_message_shows_them(client: Client) -> None:
    await _session(client, "hist-1")
    sent = [await _send(client, "hist-1", f"message {i}") for i in range(3)]

    session = await _get(client, "hist-1")

    assert [m.message_id for m in session.history] == [m.message_id for m in sent]
    assert [m.parts[0].text for m in session.history] == ["message 0", "message 1", "message 2"]
    for shown, answered in zip(session.history, sent, strict=True):
        fetched = await client.messages.GetMessage(
            message_service_pb2.GetMessageRequest(session_id="hist-1", message_id=answered.message_id),
            metadata=await client.md(),
        )
        assert shown == fetched.message  # state, turns, artifacts: all of it
    assert not session.history_truncated


async def test_without_include_history_there_is_none(client: Client) -> None:
    await _session(client, "hist-2")
    await _send(client, "hist-2", "hello")
    session = await _get(client, "hist-2", include_history=False)
    assert len(session.history) == 0
    assert not session.history_truncated


async def test_an_empty_session_has_an_empty_complete_history(client: Client) -> None:
    await _session(client, "hist-3")
    session = await _get(client, "hist-3")
    assert len(session.history) == 0
    assert not session.history_truncated


async def test_history_stops_at_the_message_bound_and_says_so(client: Client) -> None:
    await _session(client, "hist-4")
    sent = [await _send(client, "hist-4", f"m{i}") for i in range(HISTORY_MAX_MESSAGES + 1)]

    session = await _get(client, "hist-4")

    assert [m.message_id for m in session.history] == [m.message_id for m in sent[:HISTORY_MAX_MESSAGES]]
    assert session.history_truncated


async def test_history_stops_at_the_byte_bound_and_says_so(client: Client) -> None:
    await _session(client, "hist-5")
    big = "x" * (HISTORY_MAX_BYTES // 3)
    sent = [await _send(client, "hist-5", f"{i}{big}") for i in range(4)]

    session = await _get(client, "hist-5")

    assert 1 <= len(session.history) < len(sent)
    assert [m.message_id for m in session.history] == [m.message_id for m in sent[: len(session.history)]]
    assert session.ByteSize() < 2 * HISTORY_MAX_BYTES
    assert session.history_truncated


async def test_another_tenants_session_has_no_history_to_show(client: Client) -> None:
    await _session(client, "hist-6")
    await _send(client, "hist-6", "private")
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await client.sessions.GetSession(
            session_service_pb2.GetSessionRequest(session_id="hist-6", include_history=True),
            metadata=await client.md("globex-full"),
        )
    assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
