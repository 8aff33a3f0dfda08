"""Session ownership across replicas on one PostgreSQL schema (three servers in this process).

A session's messages run on the replica that holds its lease; a message sent to another replica
is handed to the owner and answered from the events; a replica whose lease was taken over cannot
write any more; one approval answered at once on three replicas through three surfaces has
exactly one winner and every loser is told.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from a2a.helpers import new_data_part
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState
from grpc import aio

from svantic_grpc.core.dispatch._relay import Relayed, RelayKind
from svantic_grpc.core.events import AgentLeft, MessageStateChanged, StatusChanged
from svantic_grpc.core.inputs.model import InputState, Surface
from svantic_grpc.core.messages.model import MessageState
from svantic_grpc.core.models import SessionStatus
from svantic_grpc.core.ownership import LeaseLost
from svantic_grpc.core.store import Change
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from tests import _postgres
from tests._support import Client, code_of, error_details, running_server
from tests.a2a_ingress_support import a2a_client, call
from tests.adapters.e2e_support import (
    AGENT_TYPE,
    ENV,
    INPUT_REQUIRED,
    POLICIES,
    TENANT,
    ApprovalAgent,
    signed_headers,
    until,
)
from tests.adapters.webhook_receiver import receiving
from tests.agents_connected import (
    data,
    eventually,
    get_message,
    new_session,
    outgoing,
    running_agent,
    send,
    wait_for_state,
)
from tests.agents_inputs import chatting, resolution
from tests.test_metrics import scrape, value

COMPLETED = message_types_pb2.MESSAGE_STATE_COMPLETED


@pytest.fixture
async def replicas() -> AsyncIterator[list[Client]]:
    _postgres.require_postgres()
    schema = _postgres.new_schema()
    try:
        async with receiving() as receiver, AsyncExitStack() as stack:
            settings: dict[str, Any] = {
                "store": _postgres.POSTGRES_DSN,
                "postgres": {"schema_name": schema, "pool_size": 4},
                "replica": {"lease_ms": 2000, "renew_ms": 500},
                "policies": POLICIES,
                "adapters": {
                    "webhook": {
                        "targets": [{"url": receiver.url, "secret_env": "HOOK_OUT"}],
                        "inbound_secret_env": "HOOK_IN",
                        "backoff_ms": 10,
                    }
                },
            }
            yield [await stack.enter_async_context(running_server(env=ENV, **settings)) for _ in range(3)]
    finally:
        await _postgres.drop_schema(schema)


async def _owner(client: Client, session_id: str) -> str | None:
    store = client.server.mesh.store
    conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
    try:
        owner = await conn.fetchval(
            f'SELECT owner FROM "{store.schema}".leases WHERE tenant_id = $1 AND session_id = $2',  # type: ignore[attr-defined]
            TENANT,
            session_id,
        )
    finally:
        await conn.close()
    return str(owner) if owner is not None else None


async def _no_owner(client: Client, session_id: str) -> bool:
    return await _owner(client, session_id) is None


async def _lapse(session_id: str, owner: Client, *bystanders: Client, taker: Client) -> str:
    """``owner`` stops renewing (as if it hung or died) and the session's lease lapses; the
    ``bystanders`` stop sweeping, and so does ``taker`` by itself (it still takes its hand-offs),
    so the sweep a test runs with ``taker``'s ``tick`` is the one that takes it over. Returns the
    schema."""
    for replica in (owner, *bystanders):
        for task in replica.server.mesh.ownership._tasks:  # type: ignore[attr-defined]
            task.cancel()
    for task in taker.server.mesh.ownership._tasks:  # type: ignore[attr-defined]
        if task.get_name() in ("svantic-leases", "svantic-take-over"):
            task.cancel()
    schema = str(owner.server.mesh.store.schema)  # type: ignore[attr-defined]
    conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
    try:
        await conn.execute(f'UPDATE "{schema}".leases SET expires_at = 0 WHERE session_id = $1', session_id)
    finally:
        await conn.close()
    return schema


async def test_a_message_sent_to_another_replica_runs_on_the_owner(replicas: list[Client]) -> None:
    a, b, c = replicas
    session_id = await new_session(a)
    assert await _owner(a, session_id) == a.server.mesh.ownership.replica_id  # the creator owns it
    chat = data({"target_agent": "savant:chat"})
    answered = await send(b, session_id, "hello from b", chat)
    assert answered.state == COMPLETED and answered.history[-1].role == message_types_pb2.ROLE_AGENT
    assert (TENANT, session_id) in a.server.mesh.messages._runtimes  # it ran on a...
    assert (TENANT, session_id) not in b.server.mesh.messages._runtimes  # ...not on b
    # A streaming send on a third replica follows the message on the owner to its end.
    call = c.messages.SendStreamingMessage(
        message_service_pb2.SendStreamingMessageRequest(
            session_id=session_id, message=outgoing("hello from c", chat)
        ),
        metadata=await c.md(),
    )
    states = []
    async for response in call:
        if response.event.HasField("message_state_changed"):
            states.append(response.event.message_state_changed.to_state)
    assert states[0] == message_types_pb2.MESSAGE_STATE_SUBMITTED and states[-1] == COMPLETED
    assert (TENANT, session_id) not in c.server.mesh.messages._runtimes
    assert await _owner(c, session_id) == a.server.mesh.ownership.replica_id


async def _bells(listener: asyncpg.Connection, into: list[str]) -> None:
    """Every payload ``listener`` hears from now on, on whichever channels it listens on, goes to ``into``."""
    for channel in list(listener._listeners):  # type: ignore[attr-defined]
        await listener.add_listener(channel, lambda conn, pid, channel, payload: into.append(payload))


async def test_a_hand_off_or_a_relayed_item_rings_only_the_replica_it_is_for(replicas: list[Client]) -> None:
    a, b, _ = replicas
    names = [r.server.mesh.ownership.replica_id for r in replicas]
    hand_offs: dict[str, list[str]] = {name: [] for name in names}
    relayed: dict[str, list[str]] = {name: [] for name in names}
    for replica, name in zip(replicas, names, strict=True):
        await _bells(replica.server.mesh.ownership._listener, hand_offs[name])  # type: ignore[attr-defined]
        await _bells(replica.server.mesh.relay._listener, relayed[name])  # type: ignore[union-attr]
    session_id = await new_session(a)
    answered = await send(b, session_id, "hello from b", data({"target_agent": "savant:chat"}))
    assert answered.state == COMPLETED
    relay = b.server.mesh.relay
    assert relay is not None
    # An item about no dispatch in flight: the receiver drops it.
    await relay.send(names[0], Relayed(RelayKind.CANCEL, dispatch_id="none", sender=names[1]))
    await until(lambda: relayed[names[0]], "the relayed item rang its replica")
    await asyncio.sleep(0.2)  # a bell on the others would have come by now
    # Only the owner was woken (at three replicas every hand-off and relayed item rang all three).
    assert hand_offs == {names[0]: [names[0]], names[1]: [], names[2]: []}
    assert relayed == {names[0]: [names[0]], names[1]: [], names[2]: []}


async def test_a_replica_whose_lease_was_taken_over_cannot_write(
    replicas: list[Client], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, c = replicas
    session_id = await new_session(a)
    await a.server.mesh.bus.publish(TENANT, session_id, AgentLeft("w", "x1", "a still owns it"))
    # a stops renewing (as if stuck); its lease lapses and b takes the session over.
    await _lapse(session_id, a, c, taker=b)
    changes = "svantic_session_lease_changes_total"
    taken_before = value(await scrape(b), changes, change="taken_over")
    with caplog.at_level(logging.INFO, logger="svantic_grpc"):
        assert await b.server.mesh.ownership.tick() >= 1  # type: ignore[attr-defined]
    assert await _owner(b, session_id) == b.server.mesh.ownership.replica_id
    # The operator sees it: a log line naming the session and the replica it came from, a counter.
    [taken] = [
        r for r in caplog.records if r.getMessage().startswith(f"lease taken over: session {session_id}")
    ]
    assert getattr(taken, "session_id", None) == session_id
    assert getattr(taken, "previous_owner", None) == a.server.mesh.ownership.replica_id
    assert value(await scrape(b), changes, change="taken_over") == taken_before + 1
    before = await a.server.mesh.store.list_events(tenant_id=TENANT, session_id=session_id)
    with pytest.raises(LeaseLost):
        await a.server.mesh.bus.publish(TENANT, session_id, AgentLeft("w", "x2", "a lost it"))
    with pytest.raises(LeaseLost):
        await a.server.mesh.store.write(Change(TENANT, session_id, 0.0, events=(AgentLeft("w", "x3", "no"),)))
    after = await a.server.mesh.store.list_events(tenant_id=TENANT, session_id=session_id)
    assert after == before  # nothing a wrote after losing the lease landed
    # The new owner writes, and a message sent to a now is handed to b.
    await b.server.mesh.bus.publish(TENANT, session_id, AgentLeft("w", "x4", "b owns it"))
    answered = await send(a, session_id, "hello", data({"target_agent": "savant:chat"}))
    assert answered.state == COMPLETED
    assert (TENANT, session_id) in b.server.mesh.messages._runtimes


async def test_one_approval_raced_on_three_replicas_through_three_surfaces(replicas: list[Client]) -> None:
    a, b, c = replicas
    agent = ApprovalAgent()
    winners: list[str] = []
    async with running_agent(a, agent, agent_type=AGENT_TYPE, instance_id="crm-1"):
        for n in range(3):
            agent.hold = asyncio.Event()
            session_id = await new_session(a)
            # Sent to b, run on a (the owner, where the agent is connected): b answers at input-required.
            message = await send(b, session_id, "clean up", data({"target_agent": AGENT_TYPE}))
            assert message.state == INPUT_REQUIRED, (message.state, message.state_reason)
            (request_id,) = message.input_request_ids
            # The three surfaces each on another replica, rotating: gRPC, webhook (signed), chat.
            grpc_on, hook_on, chat_on = replicas[n % 3], replicas[(n + 1) % 3], replicas[(n + 2) % 3]

            async def by_grpc(request_id: str = request_id, client: Client = grpc_on) -> Any:
                try:
                    return await client.messages.ResolveInput(
                        message_service_pb2.ResolveInputRequest(
                            request_id=request_id,
                            resolution=resolution(message_types_pb2.DECISION_APPROVE),
                        ),
                        metadata=await client.md(),
                    )
                except aio.AioRpcError as error:
                    return error

            async def by_hook(request_id: str = request_id, client: Client = hook_on) -> tuple[int, Any]:
                body = json.dumps(
                    {
                        "tenant_id": TENANT,
                        "request_id": request_id,
                        "decision": "approve",
                        "responder": "hook",
                    }
                )
                url = f"http://127.0.0.1:{client.server.http.port}/webhooks/receive"
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(url, data=body, headers=signed_headers(body, ENV["HOOK_IN"])) as r,
                ):
                    return r.status, await r.json()

            async with chatting(chat_on, session_id) as chat:

                async def by_chat(request_id: str = request_id) -> Any:
                    """The chat's error if it lost (it sees the winner's event either way)."""
                    chat.resolve(request_id, decision=message_types_pb2.DECISION_APPROVE)
                    winner = error = None
                    while winner is None or (winner != message_types_pb2.SURFACE_CHAT and error is None):
                        response = await chat.next()
                        kind = response.WhichOneof("payload")
                        if kind == "error":
                            error = response.error
                        resolved = response.event.input_resolved.request
                        if kind == "event" and resolved.request_id == request_id:
                            winner = resolved.resolution.surface
                    return error

                grpc_got, (hook_status, hook_body), chat_got = await asyncio.gather(
                    by_grpc(), by_hook(), by_chat()
                )
                record = await a.server.mesh.inputs.get(TENANT, request_id)
                assert record.state is InputState.RESOLVED and record.resolution is not None
                won = record.resolution.surface
                winners.append(won.value)
                grpc_won = not isinstance(grpc_got, aio.AioRpcError)
                hook_won = hook_status == 200
                chat_won = chat_got is None
                assert [grpc_won, hook_won, chat_won].count(True) == 1, (grpc_got, hook_body, chat_got)
                assert (grpc_won, hook_won, chat_won) == (
                    won is Surface.GRPC,
                    won is Surface.WEBHOOK,
                    won is Surface.CHAT,
                )
                if not grpc_won:
                    assert code_of(grpc_got) == grpc.StatusCode.ABORTED
                    assert error_details(grpc_got)[0] == "INPUT_ALREADY_RESOLVED"
                if not hook_won:
                    assert hook_status == 409 and hook_body["error"]["reason"] == "INPUT_ALREADY_RESOLVED"
                if not chat_won:
                    assert chat_got.reason == "INPUT_ALREADY_RESOLVED", chat_got
            # The owner's waiting message heard the answer given on any replica: one decision, completed.
            await until(lambda s=session_id: agent.decisions.get(s), "the agent's decision")
            agent.hold.set()
            done = await wait_for_state(c, session_id, message.message_id, COMPLETED)
            assert done.state == COMPLETED
            assert agent.decisions[session_id] == [True] and agent.extra_answers[session_id] == 0
            audit = await a.server.mesh.store.list_audit(tenant_id=TENANT, request_id=request_id)
            assert len(audit) == 1
    print(f"winners across replicas: {winners}")


async def test_a_session_closed_on_another_replica_ends_the_work_on_its_owner(replicas: list[Client]) -> None:
    a, b, c = replicas
    agent = ApprovalAgent()
    async with running_agent(a, agent, agent_type=AGENT_TYPE, instance_id="crm-1"):
        session_id = await new_session(a)
        message = await send(c, session_id, "clean up", data({"target_agent": AGENT_TYPE}))
        assert message.state == INPUT_REQUIRED
        (request_id,) = message.input_request_ids
        await b.sessions.CloseSession(
            session_service_pb2.CloseSessionRequest(session_id=session_id), metadata=await b.md()
        )
        # The owner canceled the message and withdrew what it asked before the close returned.
        ended = await get_message(c, session_id, message.message_id)
        assert ended.state == message_types_pb2.MESSAGE_STATE_CANCELED and "closed" in ended.state_reason
        request = await c.server.mesh.inputs.get(TENANT, request_id)
        assert request.state is InputState.CANCELED
        # What the owner withdrew for the close made it active (each write leaves the session as
        # what is pending says), then it closed.
        events = await b.server.mesh.store.list_events(tenant_id=TENANT, session_id=session_id)
        moves = [
            (e.payload.from_status, e.payload.to_status)
            for e in events
            if isinstance(e.payload, StatusChanged)
        ]
        assert moves[-3:] == [
            (SessionStatus.ACTIVE, SessionStatus.PAUSED),
            (SessionStatus.PAUSED, SessionStatus.ACTIVE),
            (SessionStatus.ACTIVE, SessionStatus.CLOSED),
        ]
        # Within a renewal period the owner lets the closed session's lease go.
        await asyncio.wait_for(eventually(lambda: _no_owner(a, session_id)), 10)
        assert (TENANT, session_id) not in a.server.mesh.messages._runtimes


async def test_a_close_on_another_replica_has_the_owner_cancel_running_work_before_it_returns(
    replicas: list[Client],
) -> None:
    a, b, c = replicas
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(dispatch: Any, reply: Any) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with running_agent(a, slow, agent_type=AGENT_TYPE, instance_id="crm-1"):
        session_id = await new_session(a)
        sending = asyncio.create_task(
            send(c, session_id, "work slowly", data({"target_agent": AGENT_TYPE}), message_id="m-slow")
        )
        await asyncio.wait_for(started.wait(), 10)
        await b.sessions.CloseSession(
            session_service_pb2.CloseSessionRequest(session_id=session_id), metadata=await b.md()
        )
        # Already ended when the close returns (not at the owner's next renewal), the agent told.
        message = await get_message(b, session_id, "m-slow")
        assert message.state == message_types_pb2.MESSAGE_STATE_CANCELED, message.state_reason
        assert "session closed" in message.state_reason
        assert (await sending).state == message_types_pb2.MESSAGE_STATE_CANCELED
        await asyncio.wait_for(cancelled.wait(), 10)
        # Its end comes before the close in the session's events.
        events = await b.server.mesh.store.list_events(tenant_id=TENANT, session_id=session_id)
        canceled = [
            e.sequence
            for e in events
            if isinstance(e.payload, MessageStateChanged) and e.payload.to_state is MessageState.CANCELED
        ]
        closed = [
            e.sequence
            for e in events
            if isinstance(e.payload, StatusChanged) and e.payload.to_status is SessionStatus.CLOSED
        ]
        assert len(canceled) == 1 and len(closed) == 1 and canceled[0] < closed[0]


async def test_an_a2a_send_to_another_replica_answers_from_the_owner(replicas: list[Client]) -> None:
    a, b, _ = replicas
    session_id = await new_session(a)
    message = Message(
        message_id="a2a-1",
        role=Role.ROLE_USER,
        parts=[Part(text="hello over A2A"), new_data_part({"target_agent": "savant:chat"})],
        context_id=session_id,
    )
    async with a2a_client(b.server.http.url, streaming=False) as a2a:
        (response,) = [
            e
            async for e in a2a.send_message(
                SendMessageRequest(message=message), context=call(await b.token())
            )
        ]
    assert response.task.status.state == TaskState.TASK_STATE_COMPLETED, response.task.status
    assert (TENANT, session_id) in a.server.mesh.messages._runtimes  # it ran on a, the owner
    assert (TENANT, session_id) not in b.server.mesh.messages._runtimes


async def test_a_message_sent_while_a_take_over_recovers_the_session_runs_once_after_it(
    replicas: list[Client],
) -> None:
    a, b, c = replicas
    session_id = await new_session(a)
    await _lapse(session_id, a, c, taker=b)  # a died
    recovery = b.server.mesh.recovery
    read_messages = recovery._messages_of
    sent: list[asyncio.Task[Any]] = []

    async def racing(tenant_id: str, sid: str) -> Any:
        # A client's message reaches b after b took the lease and before its recovery reads the session.
        sent.append(asyncio.create_task(send(b, sid, "hello", data({"target_agent": "savant:chat"}))))
        for _ in range(100):  # the recovery reads as soon as the message is stored (at most 0.5 s)
            if (await b.server.mesh.store.list_messages(tenant_id=tenant_id, session_id=sid)).messages:
                break
            await asyncio.sleep(0.005)
        return await read_messages(tenant_id, sid)

    recovery._messages_of = racing  # type: ignore[method-assign]
    assert await b.server.mesh.ownership.tick() == 1  # type: ignore[attr-defined]
    [sending] = sent
    answered = await asyncio.wait_for(sending, 10)
    assert answered.state == COMPLETED, answered.state_reason  # not failed as "interrupted"
    stored = await b.server.mesh.store.list_messages(tenant_id=TENANT, session_id=session_id)
    assert [m.state.value for m in stored.messages] == ["completed"]


async def test_a_hand_off_the_owner_fails_to_start_is_kept_and_started_again(replicas: list[Client]) -> None:
    a, b, _ = replicas
    session_id = await new_session(a)
    leases = a.server.mesh.ownership
    start = leases._run  # type: ignore[attr-defined]
    failures: list[str] = []

    async def flaky(hand_off: Any) -> None:
        if not failures:  # the first try fails (say, the database dropped the connection)
            failures.append(hand_off.message_id)
            raise OSError("connection reset")
        await start(hand_off)

    leases._run = flaky  # type: ignore[attr-defined]
    answered = await send(b, session_id, "hello", data({"target_agent": "savant:chat"}))
    assert answered.state == COMPLETED, answered.state_reason  # started again on the next round
    assert failures == [answered.message_id]


async def test_a_take_over_whose_recovery_fails_gives_the_session_back_for_the_next_sweep(
    replicas: list[Client],
) -> None:
    a, b, c = replicas
    session_id = await new_session(a)
    schema = await _lapse(session_id, a, c, taker=b)  # a died
    conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
    try:
        leases = b.server.mesh.ownership
        recover = leases._takeover  # type: ignore[attr-defined]

        async def broken(keys: Any, handed: Any) -> None:
            raise OSError("the database went away during the recovery")

        leases._takeover = broken  # type: ignore[attr-defined]
        await leases.tick()  # type: ignore[attr-defined]
        # Given back: expired again, so the next sweep (on any replica) takes it over afresh.
        expires_at = await conn.fetchval(
            f'SELECT expires_at FROM "{schema}".leases WHERE session_id = $1', session_id
        )
        assert expires_at == 0
        leases._takeover = recover  # type: ignore[attr-defined]
        assert await leases.tick() == 1  # type: ignore[attr-defined]
        answered = await send(b, session_id, "hello", data({"target_agent": "savant:chat"}))
        assert answered.state == COMPLETED, answered.state_reason
        assert await _owner(b, session_id) == leases.replica_id
    finally:
        await conn.close()


async def test_a_message_handed_to_an_owner_that_died_before_taking_it_runs_on_the_replica_that_takes_over(
    replicas: list[Client],
) -> None:
    a, b, c = replicas
    session_id = await new_session(a)
    for task in a.server.mesh.ownership._tasks:  # type: ignore[attr-defined]
        task.cancel()  # a hangs: it takes no hand-offs and renews nothing
    sending = asyncio.create_task(send(c, session_id, "hello", data({"target_agent": "savant:chat"})))
    schema = str(a.server.mesh.store.schema)  # type: ignore[attr-defined]
    conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
    try:
        for _ in range(200):  # c hands the message to a (at most 2 s)
            if await conn.fetchval(
                f'SELECT count(*) FROM "{schema}".handoffs WHERE session_id = $1', session_id
            ):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the message was not handed to the owner")
        await _lapse(session_id, a, c, taker=b)  # a died
        assert await b.server.mesh.ownership.tick() == 1  # type: ignore[attr-defined]
        # The sweep took the hand-off with the lease: b runs it, and the row is gone.
        answered = await asyncio.wait_for(sending, 10)
        assert answered.state == COMPLETED, answered.state_reason
        assert await _owner(b, session_id) == b.server.mesh.ownership.replica_id  # type: ignore[attr-defined]
        left = await conn.fetchval(
            f'SELECT count(*) FROM "{schema}".handoffs WHERE session_id = $1', session_id
        )
        assert left == 0
    finally:
        await conn.close()
