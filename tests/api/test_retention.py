"""Retention seen from a client: closed sessions go after their retention, long logs keep their
newest events, and resuming from a point that was let go says where to resume instead."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from a2a.types import GetTaskRequest, Message, Part, Role, SendMessageRequest
from a2a.utils.errors import TaskNotFoundError
from grpc import aio

from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.events import AgentLeft
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from tests._support import Client, code_of, error_details, rpc_error, running_server
from tests.a2a_ingress_support import a2a_client, call

HOUR = 3_600  # less than the tokens' lifetime, which the manual clock also ages


def _stores(tmp_path: Path) -> dict[str, str]:
    return {"memory": "memory", "sqlite": f"sqlite:///{tmp_path / 'mesh.db'}"}


@pytest.fixture(params=["memory", "sqlite"])
def store_setting(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _stores(tmp_path)[request.param]


async def _init(client: Client) -> str:
    response = await client.sessions.InitSession(
        session_service_pb2.InitSessionRequest(), metadata=await client.md()
    )
    return response.session.session_id


async def _close(client: Client, session_id: str) -> None:
    await client.sessions.CloseSession(
        session_service_pb2.CloseSessionRequest(session_id=session_id), metadata=await client.md()
    )


async def _exists(client: Client, session_id: str) -> bool:
    try:
        await client.sessions.GetSession(
            session_service_pb2.GetSessionRequest(session_id=session_id), metadata=await client.md()
        )
    except aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc.details()
        return False
    return True


async def _send(client: Client, session_id: str) -> str:
    """A message with no agent to take it (routed to chat): it ends, and stays in the store."""
    request = message_service_pb2.SendMessageRequest(
        session_id=session_id,
        message=message_service_pb2.OutgoingMessage(parts=[message_types_pb2.Part(text="hello")]),
    )
    response = await client.messages.SendMessage(request, metadata=await client.md())
    return response.message.message_id


async def _messages(client: Client, session_id: str) -> list[str]:
    response = await client.messages.ListMessages(
        message_service_pb2.ListMessagesRequest(session_id=session_id), metadata=await client.md()
    )
    return [m.message_id for m in response.messages]


async def _watch(client: Client, session_id: str, after_sequence: int = 0) -> list[Any]:
    call = client.sessions.WatchSession(
        session_service_pb2.WatchSessionRequest(session_id=session_id, after_sequence=after_sequence),
        metadata=await client.md(),
    )
    try:
        return [response.event async for response in call]
    finally:
        call.cancel()


async def test_closed_sessions_go_after_their_retention_with_their_messages(
    store_setting: str, clock: ManualClock
) -> None:
    settings = {"store": store_setting, "retention": {"closed_sessions_s": HOUR}}
    async with running_server(clock=clock, **settings) as client:
        closed, still_open = await _init(client), await _init(client)
        await _send(client, closed)
        await _send(client, still_open)
        await _close(client, closed)
        sweeper = client.server.mesh.retention

        clock.advance(HOUR - 1)
        assert await sweeper.run_once() == 0
        assert await _exists(client, closed) and len(await _messages(client, closed)) == 1

        clock.advance(2)
        assert await sweeper.run_once() == 1
        assert not await _exists(client, closed)
        for gone in (_messages, _watch):  # its messages went with it: the session is not found
            with pytest.raises(aio.AioRpcError) as excinfo:
                await gone(client, closed)
            assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
        # An open session is never swept, however old.
        assert await _exists(client, still_open) and len(await _messages(client, still_open)) == 1


async def test_the_background_sweep_runs_by_itself(clock: ManualClock) -> None:
    settings = {"retention": {"closed_sessions_s": 60, "sweep_interval_s": 0.02}}
    async with running_server(clock=clock, **settings) as client:
        session_id = await _init(client)
        await _close(client, session_id)
        clock.advance(61)
        for _ in range(250):  # at most 5 s
            if not await _exists(client, session_id):
                break
            await asyncio.sleep(0.02)
        assert not await _exists(client, session_id)


async def test_zero_keeps_closed_sessions(clock: ManualClock) -> None:
    async with running_server(clock=clock, retention={"closed_sessions_s": 0}) as client:
        session_id = await _init(client)
        await _close(client, session_id)
        clock.advance(20 * HOUR)
        assert await client.server.mesh.retention.run_once() == 0
        assert await _exists(client, session_id)


async def test_a_long_log_keeps_its_newest_events_and_a_stale_resume_says_where_to_resume(
    store_setting: str,
) -> None:
    cap = 100
    settings = {"store": store_setting, "retention": {"max_events_per_session": cap}}
    async with running_server(**settings) as client:
        session_id = await _init(client)  # 7 events
        bus = client.server.mesh.bus
        for i in range(300):
            await bus.publish("acme", session_id, AgentLeft("worker", f"gone-{i}", "deregistered"))
        last = 307
        kept = await _watch_client_snapshot(client, session_id)
        assert kept[-1] == last
        assert cap <= len(kept) <= cap + 64
        assert kept == list(range(kept[0], last + 1))  # gapless from the oldest kept

        with pytest.raises(aio.AioRpcError) as excinfo:
            await _watch(client, session_id, after_sequence=5)
        assert code_of(excinfo) == grpc.StatusCode.OUT_OF_RANGE
        assert error_details(excinfo)[0] == "EVENTS_NOT_RETAINED"
        details = rpc_error(excinfo).details() or ""
        assert f"after_sequence={kept[0] - 1}" in details

        # Resuming where the error says works, and so does resuming inside what is kept.
        resumed = await _watch_client_snapshot(client, session_id, after_sequence=kept[0] - 1)
        assert resumed == kept
        assert await _watch_client_snapshot(client, session_id, after_sequence=last - 3) == [
            last - 2,
            last - 1,
            last,
        ]


async def _watch_client_snapshot(client: Client, session_id: str, after_sequence: int = 0) -> list[int]:
    """The sequences a watcher reads up to the session's last event (307 in the test above)."""
    call = client.sessions.WatchSession(
        session_service_pb2.WatchSessionRequest(session_id=session_id, after_sequence=after_sequence),
        metadata=await client.md(),
    )
    sequences: list[int] = []
    try:
        last = 307
        while not sequences or sequences[-1] < last:
            event = await asyncio.wait_for(call.read(), timeout=5)
            assert event is not aio.EOF
            sequences.append(event.event.sequence)
    finally:
        call.cancel()
    return sequences


async def test_what_the_a2a_ingress_keeps_about_a_task_goes_with_its_session(
    store_setting: str, clock: ManualClock
) -> None:
    settings = {"store": store_setting, "retention": {"closed_sessions_s": HOUR}}
    async with running_server(clock=clock, **settings) as client:
        session_id = await _init(client)
        token = await client.token("acme-full")
        message = Message(
            message_id="m-a2a", role=Role.ROLE_USER, parts=[Part(text="hello")], context_id=session_id
        )
        async with a2a_client(client.server.http.url, streaming=False) as a2a:
            [sent] = [
                e async for e in a2a.send_message(SendMessageRequest(message=message), context=call(token))
            ]
            task_id = sent.task.id
            assert (await a2a.get_task(GetTaskRequest(id=task_id), context=call(token))).id == task_id
            await _close(client, session_id)
            clock.advance(HOUR + 1)
            assert await client.server.mesh.retention.run_once() == 1
            with pytest.raises(TaskNotFoundError):
                await a2a.get_task(GetTaskRequest(id=task_id), context=call(token))
        # Nothing of it is left behind in the store either.
        assert await client.server.mesh.store.get_adapter_value("a2a", f"acme|{task_id}") is None
