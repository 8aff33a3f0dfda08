"""Internal agents are pluggable per role through settings.json."""

from __future__ import annotations

import pytest

from svantic_grpc.config import SettingsError, parse_settings
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.server import MeshServer
from tests._support import SIGNING_ENV, running_server


async def test_a_chat_class_named_in_settings_answers_messages() -> None:
    async with running_server(internal_agents={"chat": "tests.plugins:ShoutingChat"}) as client:
        md = await client.md()
        session = (
            await client.sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=md)
        ).session
        sent = await client.messages.SendMessage(
            message_service_pb2.SendMessageRequest(
                session_id=session.session_id,
                message=message_service_pb2.OutgoingMessage(
                    parts=[message_types_pb2.Part(text="hello mesh")]
                ),
            ),
            metadata=md,
        )
    assert sent.message.state == message_types_pb2.MESSAGE_STATE_COMPLETED
    assert sent.message.agent_type == "savant:chat"
    assert sent.message.history[-1].parts[0].text == "HELLO MESH"


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"poet": "tests.plugins:ShoutingChat"}, "unknown internal agent role 'poet'"),
        ({"chat": "tests.plugins:Missing"}, "cannot load 'tests.plugins:Missing'"),
        ({"chat": "no.such.module:Chat"}, "cannot load 'no.such.module:Chat'"),
        ({"chat": "tests.plugins:NotAnAgent"}, "is not a subclass of Chat"),
        ({"critic": "tests.plugins:ShoutingChat"}, "is not a subclass of Critic"),
    ],
)
def test_a_bad_internal_agent_setting_stops_the_server_with_the_reason(
    overrides: dict[str, str], says: str
) -> None:
    settings = parse_settings({"grpc_address": "127.0.0.1:0", "internal_agents": overrides})
    with pytest.raises(SettingsError) as excinfo:
        MeshServer(settings, env=SIGNING_ENV)
    assert says in str(excinfo.value)
