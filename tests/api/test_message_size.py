"""What the mesh keeps stays readable by a client with gRPC's default 4 MB receive limit (found
from outside: a 2.5 MB send came back as a 5.2 MB answer the sender could not read, and an agent's
artifacts grew a message past 4 MB, after which GetMessage, ListMessages and WatchSession of the
session failed for every default client, for ever).

A sent message carries at most 1 MiB (it is kept twice: its parts and its first turn); a message
carries at most 3 MiB in all, so an agent whose outputs would pass that fails the message, with
a reason, and what it already added stays readable.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from a2a.types import ListTasksRequest
from a2a.utils.constants import TransportProtocol

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.pb import event_types_pb2, message_service_pb2, message_types_pb2, session_service_pb2
from tests._support import Client, error_details
from tests.a2a_ingress_support import a2a_client, call
from tests.agents_connected import data, new_session, running_agent, send

pb = message_types_pb2
MB = 1024 * 1024


async def test_a_send_over_one_mib_is_refused_naming_the_parts(client: Client) -> None:
    session_id = await new_session(client)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(client, session_id, "x" * (MB + 1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(refused)[1] == "message.parts"
    answer = await send(client, session_id, "x" * (MB - 100))  # just under: accepted, and readable
    assert answer.state == pb.MESSAGE_STATE_COMPLETED


async def test_an_agent_cannot_grow_a_message_past_what_a_default_client_reads(client: Client) -> None:
    async def flooding(dispatch: Dispatch, reply: Reply) -> None:
        for index in range(4):
            await reply.artifact("y" * (MB + MB // 2), name=f"chunk-{index}")
        await reply.complete()

    async with running_agent(client, flooding, agent_type="flood", instance_id="flood-1"):
        session_id = await new_session(client)
        ended = await send(client, session_id, "go", data({"target_agent": "flood"}))
        assert ended.state == pb.MESSAGE_STATE_FAILED
        assert "a message carries at most 3145728" in ended.state_reason
        assert ended.ByteSize() < 4 * MB
        # everything about the session stays readable with the default limits
        listed = await client.messages.ListMessages(
            message_service_pb2.ListMessagesRequest(session_id=session_id), metadata=await client.md()
        )
        assert [m.state for m in listed.messages] == [pb.MESSAGE_STATE_FAILED]
        watched = client.sessions.WatchSession(
            session_service_pb2.WatchSessionRequest(session_id=session_id), metadata=await client.md()
        )
        seen: list[event_types_pb2.SessionEvent] = []
        async with asyncio.timeout(5):
            async for response in watched:
                seen.append(response.event)
                if response.event.HasField("message_state_changed") and (
                    response.event.message_state_changed.to_state == pb.MESSAGE_STATE_FAILED
                ):
                    break
        watched.cancel()
        assert seen[-1].message_state_changed.message_id == ended.message_id


async def test_data_parts_count_toward_what_a_message_carries(client: Client) -> None:
    # found from outside: only text and file bytes were counted, so data artifacts grew a message
    # past what a default client reads
    async def flooding(dispatch: Dispatch, reply: Reply) -> None:
        for index in range(4):
            await reply.artifact({"rows": ["z" * 1000] * 1500}, name=f"rows-{index}")
        await reply.complete()

    async with running_agent(client, flooding, agent_type="flood", instance_id="flood-1"):
        session_id = await new_session(client)
        ended = await send(client, session_id, "go", data({"target_agent": "flood"}))
        assert ended.state == pb.MESSAGE_STATE_FAILED
        assert "a message carries at most 3145728" in ended.state_reason
        assert ended.ByteSize() < 4 * MB
        got = await client.messages.GetMessage(
            message_service_pb2.GetMessageRequest(session_id=session_id, message_id=ended.message_id),
            metadata=await client.md(),
        )
        # 1.5 MB of JSON each, sent twice (a Struct and its exact text): the second would pass 3 MiB
        assert len(got.message.artifacts) == 1


async def test_a_page_of_large_messages_ends_early_and_pages_through_them_all(client: Client) -> None:
    # found from outside: 50 ordinary 100 KB messages made a 10 MB ListMessages page (and A2A
    # ListTasks over gRPC the same) that no default client could read
    session_id = await new_session(client)
    sent = [(await send(client, session_id, f"{i:03d}" + "z" * 200_000)).message_id for i in range(24)]
    md = await client.md()
    listed: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await client.messages.ListMessages(
            message_service_pb2.ListMessagesRequest(session_id=session_id, page_token=token), metadata=md
        )  # a default channel: each page must fit its 4 MB limit
        assert page.ByteSize() < 4 * MB
        listed += [m.message_id for m in page.messages]
        pages += 1
        if not (token := page.next_page_token):
            break
    assert listed == sent and pages > 1
    # A2A ListTasks over gRPC, with a2a-sdk's own client (a default channel too), pages the same way.
    tasks: list[str] = []
    token = ""
    async with a2a_client(client.server.http.url, TransportProtocol.GRPC, streaming=False) as a2a:
        while True:
            listed_tasks = await a2a.list_tasks(
                ListTasksRequest(context_id=session_id, page_token=token), context=call(await client.token())
            )
            tasks += [t.id for t in listed_tasks.tasks]
            if not (token := listed_tasks.next_page_token):
                break
    assert tasks == sent
