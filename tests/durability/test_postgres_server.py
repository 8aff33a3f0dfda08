"""The mesh on PostgreSQL (`"store": "postgresql://..."`): what a client sees survives a restart,
and a server that cannot reach the database stops with the reason."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from svantic_grpc.config import SettingsError, parse_settings
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.server import MeshServer
from tests import _postgres
from tests._support import SIGNING_ENV, running_server


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    _postgres.require_postgres()
    name = _postgres.new_schema()
    try:
        yield name
    finally:
        await _postgres.drop_schema(name)


async def test_sessions_messages_and_events_survive_a_restart(schema: str) -> None:
    settings = {"store": _postgres.POSTGRES_DSN, "postgres": {"schema_name": schema, "pool_size": 4}}
    async with running_server(**settings) as client:
        md = await client.md()
        await client.sessions.InitSession(
            session_service_pb2.InitSessionRequest(session_id="s1"), metadata=md
        )
        sent = await client.messages.SendMessage(
            message_service_pb2.SendMessageRequest(
                session_id="s1",
                message=message_service_pb2.OutgoingMessage(parts=[message_types_pb2.Part(text="hello")]),
            ),
            metadata=md,
        )
    async with running_server(**settings) as client:
        md = await client.md()
        got = await client.sessions.GetSession(
            session_service_pb2.GetSessionRequest(session_id="s1", include_agents=True), metadata=md
        )
        assert len(got.session.agents) == 6
        message = await client.messages.GetMessage(
            message_service_pb2.GetMessageRequest(session_id="s1", message_id=sent.message.message_id),
            metadata=md,
        )
        assert message.message.state == sent.message.state
        call = client.sessions.WatchSession(
            session_service_pb2.WatchSessionRequest(session_id="s1"), metadata=md
        )
        first = await call.read()
        call.cancel()
        assert first.event.sequence == 1


async def test_an_unreachable_database_stops_the_server_with_the_reason() -> None:
    settings = parse_settings({"grpc_address": "127.0.0.1:0", "store": "postgresql://mesh:pw@127.0.0.1:1/x"})
    with pytest.raises(SettingsError) as excinfo:
        await MeshServer(settings, env=SIGNING_ENV).start()
    assert "cannot connect to PostgreSQL" in str(excinfo.value) and "pw@" not in str(excinfo.value)
