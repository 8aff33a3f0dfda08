"""A bad field is named by its path in the request the client sent, whichever RPC carried it.

The core builds the path once (``message.parts[1].data``, as SendMessage holds the
message); Converse holds the same message under ``send``, so there the path starts
with ``send``. Wire-only checks (a ``data_json`` on a text part) and the core's checks
(a part with no content) are named alike.
"""

from __future__ import annotations

import grpc
import pytest

from svantic_grpc.pb import message_service_pb2, message_types_pb2
from tests._support import Client, error_details
from tests.agents_connected import new_session
from tests.api.test_messages_connected import conversation

TEXT_WITH_JSON = message_types_pb2.Part(text="hi", data_json='{"a": 1}')
EMPTY = message_types_pb2.Part()


@pytest.mark.parametrize(
    ("part", "path"),
    [
        pytest.param(TEXT_WITH_JSON, "parts[1].data_json", id="wire-only"),
        pytest.param(EMPTY, "parts[1]", id="core"),
    ],
)
async def test_send_message_and_converse_name_the_same_part_by_their_own_paths(
    client: Client, part: message_types_pb2.Part, path: str
) -> None:
    session_id = await new_session(client)
    parts = [message_types_pb2.Part(text="first"), part]
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await client.messages.SendMessage(
            message_service_pb2.SendMessageRequest(
                session_id=session_id, message=message_service_pb2.OutgoingMessage(parts=parts)
            ),
            metadata=await client.md(),
        )
    assert error_details(excinfo) == ("INVALID_ARGUMENT", f"message.{path}")

    async with conversation(client) as conv:
        conv.open(session_id)
        conv.send(*parts)
        error = await conv.error()
        assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], f"send.{path}")
