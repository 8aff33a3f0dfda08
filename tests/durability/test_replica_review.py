"""What the review of the replica code found, each shown by what a user would notice
(servers in this process on one PostgreSQL schema, as in ``test_session_ownership``):

- a replica starting up keeps the leases it claimed while its recovery runs, however long;
- ``CancelMessage`` sent to a replica that does not own the session reaches the owner's running
  work: the agent is told, the message ends canceled once (and with the owner gone, the replica
  called takes the session and cancels it there);
- the leases' listening connection comes back after it drops, and picks up what was handed
  over meanwhile without waiting for the next renewal;
- a replica holding an agent's stream that stops mid-dispatch tells the session's owner at once;
- a replica whose session was taken over before it noticed stops without an error (found by
  these tests: its refused last writes used to end the stop half way);
- a ``Converse`` stream on a replica that does not own its session goes on taking actions while
  a cancel it sent waits for the owner (it used to hold every later action for up to 30 s).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from a2a.helpers import new_data_part
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState
from a2a.utils.constants import TransportProtocol

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.core.events import MessageStateChanged
from svantic_grpc.core.inputs.model import InputState
from svantic_grpc.core.messages.model import MessageState
from svantic_grpc.core.recovery import Recovery
from svantic_grpc.pb import message_types_pb2, session_service_pb2, session_types_pb2
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
    Surfaces,
    adapter_settings,
)
from tests.adapters.fake_slack import fake_slack
from tests.adapters.webhook_receiver import receiving
from tests.agents_connected import data, eventually, new_session, running_agent, send, wait_for_state
from tests.agents_inputs import ToolAgent, cancel_message, chatting, get_session, resolve
from tests.console._console import DELETES, tool_call_parts
from tests.durability._approvals import Deleting
from tests.durability.test_replica_takeover import PLAN, PLANS

WAIT = 5.0
COMPLETED = message_types_pb2.MESSAGE_STATE_COMPLETED
FAILED = message_types_pb2.MESSAGE_STATE_FAILED
CANCELED = message_types_pb2.MESSAGE_STATE_CANCELED
ACTIVE = session_types_pb2.SESSION_STATUS_ACTIVE


def _settings(schema: str, replica_id: str, *, lease_ms: int, renew_ms: int, **more: Any) -> dict[str, Any]:
    return {
        "store": _postgres.POSTGRES_DSN,
        "postgres": {"schema_name": schema, "pool_size": 4},
        "replica": {"id": replica_id, "lease_ms": lease_ms, "renew_ms": renew_ms},
        **more,
    }


@asynccontextmanager
async def _schema() -> AsyncIterator[str]:
    _postgres.require_postgres()
    schema = _postgres.new_schema()
    try:
        yield schema
    finally:
        await _postgres.drop_schema(schema)


async def _lease(schema: str, session_id: str) -> tuple[str, int] | None:
    """(owner, fence) of the session's lease row."""
    conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
    try:
        row = await conn.fetchrow(
            f'SELECT owner, fence FROM "{schema}".leases WHERE tenant_id = $1 AND session_id = $2',
            TENANT,
            session_id,
        )
    finally:
        await conn.close()
    return None if row is None else (str(row[0]), int(row[1]))


@asynccontextmanager
async def _replicas_a_and_b(schema: str) -> AsyncIterator[tuple[Client, Client]]:
    """Replicas "a" and "b" on ``schema`` with short leases and the approval policies."""
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                running_server(
                    env=ENV, **_settings(schema, name, lease_ms=2000, renew_ms=500, policies=POLICIES)
                )
            )
            for name in ("a", "b")
        ]
        yield a, b


async def _expire(schema: str, session_id: str) -> None:
    """The session's lease runs out now (its owner stopped renewing it)."""
    conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
    try:
        await conn.execute(f'UPDATE "{schema}".leases SET expires_at = 0 WHERE session_id = $1', session_id)
    finally:
        await conn.close()


def _quick_replicas(schema: str, lease_s: float) -> Callable[[str], Any]:
    """Replicas on ``schema`` with a short lease, renewed every 0.2 s: ``replica(name)`` serves one."""
    settings = _settings(schema, "", lease_ms=int(lease_s * 1000), renew_ms=200)

    def replica(replica_id: str) -> Any:
        return running_server(env=ENV, **(settings | {"replica": settings["replica"] | {"id": replica_id}}))

    return replica


async def _hand_over(schema: str, session_id: str, owner: Client, *, to: Client) -> None:
    """``owner`` hangs (it renews nothing), its lease of the session runs out, and ``to`` takes the
    session over at its sweep; neither sweeps by itself afterwards (a test calls ``tick``)."""
    _stop_sweeping(owner)
    _stop_sweeping(to)
    await _expire(schema, session_id)
    assert await to.server.mesh.ownership.tick() == 1  # type: ignore[attr-defined]


async def _asking(owner: Client) -> tuple[str, Any]:
    """A new session on ``owner`` and a message in it that asks a human (the ``crm`` agent's
    approval): its session id and the message, input-required."""
    session_id = await new_session(owner)
    asked = await send(owner, session_id, "clean up", data({"target_agent": "crm"}))
    assert asked.state == INPUT_REQUIRED, asked.state_reason
    return session_id, asked


def _stop_sweeping(client: Client) -> None:
    """The replica no longer renews nor takes over by itself: a test calls ``tick`` on it."""
    for task in client.server.mesh.ownership._tasks:  # type: ignore[attr-defined]
        task.cancel()


async def test_a_replica_keeps_its_leases_while_a_long_start_up_recovery_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease_s = 1.0
    async with _schema() as schema, AsyncExitStack() as stack:
        replica = _quick_replicas(schema, lease_s)

        bystander = await stack.enter_async_context(replica("b"))
        _stop_sweeping(bystander)
        async with replica("a") as first:
            session_id = await new_session(first)
        # "a" stopped and let its lease go; "a" starts again and its recovery of the session is
        # long (three leases): meanwhile "b" sweeps for expired leases.
        recover = Recovery._recover
        swept: list[int] = []
        slow = [True]

        async def long_recovery(self: Recovery, work: Any, handed: Any) -> tuple[int, int]:
            if slow and work is not None and any(s.session_id == session_id for s in work.sessions):
                slow.clear()  # only "a"'s start-up recovery is long
                await asyncio.sleep(3 * lease_s)
                swept.append(await bystander.server.mesh.ownership.tick())  # type: ignore[attr-defined]
            return await recover(self, work, handed)

        monkeypatch.setattr(Recovery, "_recover", long_recovery)
        again = await stack.enter_async_context(replica("a"))
        assert swept == [0]  # nothing had lapsed: "b" took nothing over
        owner, _ = await _lease(schema, session_id) or ("", 0)
        assert owner == "a"
        assert (TENANT, session_id) not in bystander.server.mesh.messages._runtimes
        assert await again.server.mesh.ownership.runs_here(TENANT, session_id)


async def test_a_replica_keeps_its_own_leases_while_it_recovers_sessions_it_took_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # found from outside: the take-over's recovery ran inside the renewal round, so a recovery
    # longer than a lease let every lease of the (live) replica lapse to another one
    lease_s = 1.0
    async with _schema() as schema, AsyncExitStack() as stack:
        replica = _quick_replicas(schema, lease_s)

        dying, taker = [await stack.enter_async_context(replica(name)) for name in ("a", "b")]
        orphan = await new_session(dying)
        own = await new_session(taker)
        recover = Recovery._recover
        slow = [True]

        async def long_recovery(self: Recovery, work: Any, handed: Any, **kw: Any) -> tuple[int, int]:
            if slow and work is not None and any(s.session_id == orphan for s in work.sessions):
                slow.clear()  # only the take-over of "a"'s session is long: three leases
                await asyncio.sleep(3 * lease_s)
            return await recover(self, work, handed, **kw)

        monkeypatch.setattr(Recovery, "_recover", long_recovery)
        _stop_sweeping(dying)  # "a" hangs: its lease runs out and "b" takes the session over
        await _expire(schema, orphan)
        for _ in range(50):
            if not slow:
                break
            await asyncio.sleep(0.1)
        assert not slow, "the take-over never started"
        # While "b" recovers, "c" comes up and sweeps for lapsed leases every 0.2 s.
        bystander = await stack.enter_async_context(replica("c"))
        for _ in range(100):
            if await taker.server.mesh.ownership.runs_here(TENANT, orphan):
                break
            await asyncio.sleep(0.1)
        assert await _lease(schema, orphan) == ("b", 2)
        assert (await _lease(schema, own) or ("", 0))[0] == "b"  # its own session stayed its own
        assert await taker.server.mesh.ownership.runs_here(TENANT, own)
        assert (TENANT, own) not in bystander.server.mesh.messages._runtimes


async def test_a_send_waiting_on_a_replica_that_loses_the_session_is_told_it_moved() -> None:
    # found from outside: the waiting SendMessage got INTERNAL ("ended without a final state")
    async with _schema() as schema, _replicas_a_and_b(schema) as (owner, other):
        working = asyncio.Event()

        async def work(dispatch: Dispatch, reply: Reply) -> None:
            working.set()
            await asyncio.sleep(60)

        async with running_agent(owner, work, agent_type="worker", instance_id="worker-a"):
            session_id = await new_session(owner)
            sending = asyncio.create_task(send(owner, session_id, "work", data({"target_agent": "worker"})))
            await asyncio.wait_for(working.wait(), WAIT)
            await _hand_over(
                schema, session_id, owner, to=other
            )  # "a" hangs; its lease runs out and "b" takes the session
            await owner.server.mesh.ownership.tick()  # type: ignore[attr-defined]  # "a" notices
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await asyncio.wait_for(sending, WAIT)
        assert code_of(excinfo) == grpc.StatusCode.UNAVAILABLE
        assert error_details(excinfo)[0] == "MESSAGE_INTERRUPTED"


async def test_an_answer_delivered_again_after_the_owner_died_does_not_run_the_agents_work_twice() -> None:
    # found from outside: the owner died after the answer reached the agent (on another replica)
    # and before it stored what the agent did with it; the replica that took the session over
    # resumed the message and the agent ran its approved work a second time
    async with _schema() as schema, _replicas_a_and_b(schema) as (owner, other):
        deleting = Deleting()

        async with running_agent(other, deleting, agent_type="crm", instance_id="crm-b"):
            session_id, asked = await _asking(owner)
            # "a" stops hearing from "b" (as if it died now): what the agent says next is lost.
            owner.server.mesh.connections.relayed = lambda item: None  # type: ignore[method-assign]
            await resolve(owner, asked.input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE)
            await asyncio.wait_for(deleting.finished.wait(), WAIT)
            await _hand_over(schema, session_id, owner, to=other)
            done = await wait_for_state(other, session_id, asked.message_id, COMPLETED, FAILED)
            await owner.server.mesh.ownership.tick()  # type: ignore[attr-defined]  # "a" lets go
        assert done.state == COMPLETED, done.state_reason
        assert [p.text for a in done.artifacts for p in a.parts] == ["approved: True"]
        assert deleting.runs == [True]


async def test_an_answer_delivered_again_while_the_agent_still_works_on_it_joins_that_work() -> None:
    async with _schema() as schema, _replicas_a_and_b(schema) as (owner, other):
        go_on = asyncio.Event()
        deleting = Deleting(go_on)  # still at work, reporting nothing, when the owner dies

        async with running_agent(other, deleting, agent_type="crm", instance_id="crm-b"):
            session_id, asked = await _asking(owner)
            await resolve(owner, asked.input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE)
            await asyncio.wait_for(deleting.answered.wait(), WAIT)
            owner.server.mesh.connections.relayed = lambda item: None  # type: ignore[method-assign]
            await _hand_over(schema, session_id, owner, to=other)
            await asyncio.sleep(0.3)  # the resumed dispatch reaches the agent
            await owner.server.mesh.ownership.tick()  # type: ignore[attr-defined]  # "a" lets go
            await asyncio.sleep(0.3)  # and its dispatch's cancel reaches the agent too
            go_on.set()
            done = await wait_for_state(other, session_id, asked.message_id, COMPLETED, FAILED)
        assert done.state == COMPLETED, done.state_reason
        assert [p.text for a in done.artifacts for p in a.parts] == ["approved: True"]
        assert deleting.runs == [True]


async def test_messages_racing_to_one_agent_from_two_replicas_all_complete() -> None:
    # found from outside: 13 of 40 such messages failed with "agent instance 'crm-2' changed
    # concurrently" (two replicas bound it to their sessions at once; the loser's write was refused)
    async with _schema() as schema, _replicas_a_and_b(schema) as (a, b):

        async def echo(dispatch: Dispatch, reply: Reply) -> None:
            await reply.complete("done")

        async with running_agent(b, echo, agent_type="crm", instance_id="crm-b"):
            replicas = [a, b] * 15
            sessions = await asyncio.gather(*(new_session(r) for r in replicas))
            sent = await asyncio.gather(
                *(
                    send(r, s, "go", data({"target_agent": "crm"}))
                    for r, s in zip(replicas, sessions, strict=True)
                )
            )
        assert [m.state for m in sent] == [COMPLETED] * len(sent), {m.state_reason for m in sent}
        agent = await b.server.mesh.store.get_agent(tenant_id=TENANT, instance_id="crm-b")
        assert agent is not None and set(agent.session_ids) == set(sessions)  # every binding kept


async def test_a_cancel_that_loses_to_an_answer_on_the_owner_is_not_ok(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # found from outside: CancelMessage through another replica answered OK with the message
    # COMPLETED (an approval on the owner won the race): the cancel did nothing
    async with _schema() as schema, _replicas_a_and_b(schema) as (owner, other):
        tools = ToolAgent()
        async with running_agent(owner, tools, agent_type="tools", instance_id="tools-a"):
            session_id = await new_session(owner)
            calls = {"calls": [{"tool": "crm.delete_records", "arguments": {"ids": [1]}}]}
            asked = await send(owner, session_id, "clean up", data({"target_agent": "tools", **calls}))
            assert asked.state == INPUT_REQUIRED, asked.state_reason
            monkeypatch.setattr(owner.server.mesh.messages, "cancel_asked", lambda item: None)  # slow owner
            cancelling = asyncio.create_task(cancel_message(other, session_id, asked.message_id))
            await asyncio.sleep(0.3)  # the cancel is on its way to the owner
            await resolve(owner, asked.input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE)
            await wait_for_state(owner, session_id, asked.message_id, COMPLETED)
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await asyncio.wait_for(cancelling, WAIT)
        assert code_of(excinfo) == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(excinfo)[0] == "MESSAGE_TERMINAL"
        assert "completed before the cancel took effect" in excinfo.value.details()


def _dies_without_a_word(monkeypatch: pytest.MonkeyPatch, replica: Client) -> None:
    """``replica`` stops hearing and telling anything through the relay, as if killed now."""
    monkeypatch.setattr(replica.server.mesh.connections, "relayed", lambda item: None)

    async def silent(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(replica.server.mesh.connections.relay, "send", silent)


async def test_an_answer_for_an_agent_whose_replica_died_reaches_it_where_it_is_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # found from outside: the replica holding the agent died (kill -9) while a human thought; the
    # agent reconnected to a live replica, the human answered, and the answer went to the dead
    # replica's dispatch: the message failed at the dispatch timeout, the agent never got it
    async with _schema() as schema, _replicas_a_and_b(schema) as (owner, holder):
        deleting = Deleting()

        async with running_agent(holder, deleting, agent_type="crm", instance_id="crm-1"):
            session_id, asked = await _asking(owner)
            _dies_without_a_word(monkeypatch, holder)
        # The agent comes back on "a"; then the human answers.
        async with running_agent(owner, deleting, agent_type="crm", instance_id="crm-1"):
            await resolve(owner, asked.input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE)
            done = await wait_for_state(owner, session_id, asked.message_id, COMPLETED, FAILED)
        assert done.state == COMPLETED, done.state_reason
        assert deleting.runs == [True]


async def test_an_answer_sent_to_a_replica_that_died_before_taking_it_reaches_the_agent_where_it_is_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # found from outside: answered just after the replica holding the agent died, before the agent
    # had reconnected elsewhere, the answer went to the dead replica: the message failed at the
    # dispatch timeout and the agent never got the human's answer
    async with _schema() as schema, _replicas_a_and_b(schema) as (owner, holder):
        deleting = Deleting()
        async with running_agent(holder, deleting, agent_type="crm", instance_id="crm-1"):
            session_id, asked = await _asking(owner)
            _dies_without_a_word(monkeypatch, holder)
            # The human answers at once, before the agent notices.
            await resolve(owner, asked.input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE)
        # The agent comes back on "a".
        async with running_agent(owner, deleting, agent_type="crm", instance_id="crm-1"):
            done = await wait_for_state(owner, session_id, asked.message_id, COMPLETED, FAILED)
        assert done.state == COMPLETED, done.state_reason
        assert deleting.runs == [True]


async def test_an_agents_work_for_an_owner_that_died_is_cancelled_by_the_replica_holding_its_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # found from outside (review 4, R19): the owner died (kill -9) while the agent, its stream on
    # another replica, worked on a dispatch; the replica that took the session over ended the
    # message as interrupted, but the agent was never told and went on with work nobody would read
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(dispatch: Dispatch, reply: Reply) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with (
        _schema() as schema,
        _replicas_a_and_b(schema) as (owner, holder),
        running_agent(holder, slow, agent_type="crm", instance_id="crm-b"),
    ):
        session_id = await new_session(owner)
        sending = asyncio.create_task(send(owner, session_id, "work", data({"target_agent": "crm"})))
        await asyncio.wait_for(started.wait(), WAIT)
        _dies_without_a_word(monkeypatch, owner)
        await _hand_over(schema, session_id, owner, to=holder)
        messages = await holder.server.mesh.store.unfinished_messages()
        assert [m.session_id for m in messages] == []  # interrupted by the take-over
        await asyncio.wait_for(cancelled.wait(), WAIT)  # and the agent told to stop
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)


async def test_an_agent_waiting_for_a_human_when_its_owner_died_takes_the_answer_where_it_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # found from outside (review 4, R13): the owner died while the agent, its stream on another
    # replica, waited for a human; the replica that took the session over sent the answer with the
    # message again and the handler ran again from the start, doing its work before the question
    # twice. The holder now leaves the waiting dispatch to the agent until its message ends, and
    # the helper gives the answer to the handler that asked.
    before_asking: list[str] = []
    cancelled = asyncio.Event()

    async def asking(dispatch: Dispatch, reply: Reply) -> None:
        before_asking.append(dispatch.dispatch_id)  # work done before the question
        try:
            approved = await reply.ask_approval("crm.delete_records", {"ids": [7]})
        except asyncio.CancelledError:
            cancelled.set()
            raise
        await reply.complete(f"approved: {approved}")

    async with (
        _schema() as schema,
        _replicas_a_and_b(schema) as (owner, holder),
        running_agent(holder, asking, agent_type="crm", instance_id="crm-b"),
    ):
        session_id, asked = await _asking(owner)
        _dies_without_a_word(monkeypatch, owner)
        await _hand_over(schema, session_id, owner, to=holder)
        await asyncio.sleep(1.5)  # three of the holder's checks of the owners: nothing dropped
        await resolve(holder, asked.input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE)
        done = await wait_for_state(holder, session_id, asked.message_id, COMPLETED, FAILED)
        await asyncio.sleep(1.0)  # the holder's checks once the message has ended
    assert done.state == COMPLETED, done.state_reason
    assert "approved: True" in [p.text for t in done.history for p in t.parts], done.history
    assert len(before_asking) == 1, before_asking  # not run again from the start
    assert not cancelled.is_set()


async def test_the_last_two_requests_of_a_session_answered_on_two_replicas_at_once_leave_it_active() -> None:
    # found from outside (review 5, F10): each replica's write read the other request as still
    # pending, so neither made the session active: paused with nothing pending, for good
    async with (
        _schema() as schema,
        _replicas_a_and_b(schema) as (a, b),
        running_agent(a, Deleting(), agent_type="crm", instance_id="crm-a"),
    ):
        for _ in range(6):
            session_id = await new_session(a)
            asked = [
                await send(a, session_id, f"clean up {n}", data({"target_agent": "crm"})) for n in (1, 2)
            ]
            assert [m.state for m in asked] == [INPUT_REQUIRED] * 2
            await asyncio.gather(
                resolve(a, asked[0].input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE),
                resolve(b, asked[1].input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE),
            )
            for message in asked:
                done = await wait_for_state(a, session_id, message.message_id, COMPLETED, FAILED)
                assert done.state == COMPLETED, done.state_reason
            assert (await get_session(a, session_id)).status == ACTIVE


async def test_an_answer_on_one_replica_while_the_owner_takes_a_message_is_not_lost() -> None:
    # found from outside (review 5, F11): the answer lost a race with the owner's write of the
    # session and was refused INPUT_ALREADY_RESOLVED "already ended: pending", the request still
    # pending; the owner's write sometimes failed INTERNAL (a PostgreSQL deadlock)
    async with (
        _schema() as schema,
        _replicas_a_and_b(schema) as (a, b),
        running_agent(a, Deleting(), agent_type="crm", instance_id="crm-a"),
    ):
        for _ in range(6):
            session_id = await new_session(a)
            asked = await send(a, session_id, "clean up", data({"target_agent": "crm"}))
            answered, chatted = await asyncio.gather(
                resolve(b, asked.input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE),
                send(a, session_id, "hello", data({"target_agent": "savant:chat"})),
            )
            assert answered.state == message_types_pb2.INPUT_STATE_RESOLVED
            assert chatted.state == COMPLETED, chatted.state_reason
            done = await wait_for_state(a, session_id, asked.message_id, COMPLETED, FAILED)
            assert done.state == COMPLETED, done.state_reason


async def test_a_close_on_another_replica_racing_a_new_question_leaves_nothing_answerable() -> None:
    # found from outside (review 5, F12): CloseSession through a replica that does not own the
    # session, at the moment the owner took a new message that asked a human: the close answered
    # OK, the new request stayed pending in the closed session, and answering it made the agent run
    # the approved tool after the close
    deleting = Deleting()
    async with (
        _schema() as schema,
        _replicas_a_and_b(schema) as (a, b),
        running_agent(a, deleting, agent_type="crm", instance_id="crm-a"),
    ):
        for n in range(6):
            owner, other = (a, b) if n % 2 == 0 else (b, a)
            session_id = await new_session(owner)
            first = await send(owner, session_id, "clean up 0", data({"target_agent": "crm"}))
            close = other.sessions.CloseSession(
                session_service_pb2.CloseSessionRequest(session_id=session_id), metadata=await other.md()
            )
            results = await asyncio.gather(
                close,
                send(owner, session_id, "clean up 1", data({"target_agent": "crm"})),
                resolve(other, first.input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE),
                return_exceptions=True,
            )
            assert not isinstance(results[0], BaseException), results[0]
            runs_at_close = len(deleting.runs)
            pending = await a.server.mesh.store.list_inputs(
                tenant_id=TENANT, session_id=session_id, states=(InputState.PENDING,), page_size=10
            )
            assert not pending.requests, pending.requests  # nothing pending once the close answered

            async def ended(session_id: str = session_id) -> bool:
                unfinished = await a.server.mesh.store.unfinished_messages()
                return all(m.session_id != session_id for m in unfinished)

            await asyncio.wait_for(eventually(ended), WAIT)  # what asked it ends (canceled)
            assert len(deleting.runs) == runs_at_close  # no work done after the close


async def _terminate(conn: asyncpg.Connection) -> None:
    """The database ends that connection (as a restart, a failover or an idle timeout would)."""
    killer = await asyncpg.connect(_postgres.POSTGRES_DSN)
    try:
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", conn.get_server_pid())
    finally:
        await killer.close()


async def test_the_owner_listens_again_after_its_connection_drops_and_takes_what_was_handed_meanwhile() -> (
    None
):
    # Renewals (and the hand-off polls that go with them) far apart: only the bell is quick.
    async with _schema() as schema, AsyncExitStack() as stack:
        owner, other = [
            await stack.enter_async_context(
                running_server(env=ENV, **_settings(schema, name, lease_ms=60_000, renew_ms=20_000))
            )
            for name in ("a", "b")
        ]
        session_id = await new_session(owner)
        leases = owner.server.mesh.ownership
        listening = leases._listener  # type: ignore[attr-defined]
        await _terminate(listening)
        # Handed to "a" right away: its bell may ring while "a" is not listening.
        answered = await send(other, session_id, "hello", data({"target_agent": "savant:chat"}))
        assert answered.state == COMPLETED, answered.state_reason
        assert (TENANT, session_id) in owner.server.mesh.messages._runtimes  # it ran on "a"
        again = leases._listener  # type: ignore[attr-defined]
        assert again is not listening and not again.is_closed()
        # And the bell works on the new connection.
        answered = await send(other, session_id, "hello again", data({"target_agent": "savant:chat"}))
        assert answered.state == COMPLETED, answered.state_reason


async def test_a_replica_holding_the_agents_stream_that_stops_mid_dispatch_tells_the_owner_at_once() -> None:
    async with _schema() as schema, AsyncExitStack() as stack:
        settings = _settings(
            schema, "", lease_ms=2000, renew_ms=500, dispatch={"timeout_ms": 60_000}, policies=POLICIES
        )
        owner = await stack.enter_async_context(
            running_server(env=ENV, **(settings | {"replica": settings["replica"] | {"id": "a"}}))
        )
        working = asyncio.Event()

        async def work(dispatch: Dispatch, reply: Reply) -> None:
            working.set()
            await asyncio.sleep(60)  # long work: the holder stops meanwhile

        holding = running_server(env=ENV, **(settings | {"replica": settings["replica"] | {"id": "b"}}))
        async with (
            holding as holder,
            running_agent(holder, ApprovalAgent(), agent_type=AGENT_TYPE, instance_id="crm-b"),
            running_agent(holder, work, agent_type="worker", instance_id="worker-b"),
        ):
            # One dispatch waits for a human, the other works; then "b" stops gracefully.
            asking = await new_session(owner)
            asked = await send(owner, asking, "clean up", data({"target_agent": AGENT_TYPE}))
            assert asked.state == INPUT_REQUIRED, asked.state_reason
            (request_id,) = asked.input_request_ids
            busy = await new_session(owner)
            sending = asyncio.create_task(send(owner, busy, "work", data({"target_agent": "worker"})))
            await asyncio.wait_for(working.wait(), WAIT)
            # What a relayed dispatch itself tells its owner is slow to go (a busy database, say):
            # the stop must not depend on it getting through before the dispatch is cancelled.
            relay = holder.server.mesh.relay
            assert relay is not None
            relay_send = relay.send

            async def slow_from_the_dispatch(to_replica: str, item: Any) -> None:
                task = asyncio.current_task()
                if task is not None and task.get_name() == "svantic-relayed-dispatch":
                    await asyncio.sleep(1.0)
                await relay_send(to_replica, item)

            relay.send = slow_from_the_dispatch  # type: ignore[method-assign]
            await holder.server.stop()
            # The owner hears of the work at once, not at the dispatch's timeout.
            await wait_for_state(owner, busy, (await sending).message_id, FAILED)
        # What waits for a human keeps waiting (a rolling deploy of the agent's replica is no
        # reason to drop an approval: found from outside); its answer will go to the agent with
        # the message, wherever the agent is then.
        request = await owner.server.mesh.inputs.get(TENANT, request_id)
        assert request.state is InputState.PENDING
        waiting = await owner.server.mesh.store.get_message(
            tenant_id=TENANT, session_id=asking, message_id=asked.message_id
        )
        assert waiting is not None and waiting.state is MessageState.INPUT_REQUIRED


async def test_a_cancel_sent_to_a_replica_that_does_not_own_the_session_stops_the_owners_work() -> None:
    async with _schema() as schema, _replicas_a_and_b(schema) as (owner, other):
        working, told = asyncio.Event(), asyncio.Event()

        async def work(dispatch: Dispatch, reply: Reply) -> None:
            working.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                told.set()
                raise

        asking = ToolAgent()
        async with (
            running_agent(owner, work, agent_type="worker", instance_id="worker-a"),
            running_agent(owner, asking, agent_type="tools", instance_id="tools-a"),
        ):
            # A message at work on its owner "a", canceled through "b".
            busy = await new_session(owner)
            sending = asyncio.create_task(send(owner, busy, "work", data({"target_agent": "worker"})))
            await asyncio.wait_for(working.wait(), WAIT)
            message_id = (
                (await owner.server.mesh.store.list_messages(tenant_id=TENANT, session_id=busy))
                .messages[0]
                .message_id
            )
            canceled = await cancel_message(other, busy, message_id, reason="not needed after all")
            assert canceled.state == CANCELED and canceled.state_reason == "not needed after all"
            await asyncio.wait_for(told.wait(), WAIT)  # the agent was told to stop
            assert (await sending).state == CANCELED
            # A message waiting for a human on "a", canceled through "b": the request is withdrawn too.
            waiting = await new_session(owner)
            calls = {"calls": [{"tool": "crm.delete_records", "arguments": {"ids": [1]}}]}
            asked = await send(owner, waiting, "clean up", data({"target_agent": "tools", **calls}))
            assert asked.state == INPUT_REQUIRED, asked.state_reason
            (request_id,) = asked.input_request_ids
            canceled = await cancel_message(other, waiting, asked.message_id)
            assert canceled.state == CANCELED
            await asyncio.wait_for(asking.cancelled.wait(), WAIT)
        request = await owner.server.mesh.inputs.get(TENANT, request_id)
        assert request.state is InputState.CANCELED
        for session_id in (busy, waiting):
            log = await owner.server.mesh.store.list_events(
                tenant_id=TENANT, session_id=session_id, limit=1000
            )
            ended = [
                e.payload
                for e in log
                if isinstance(e.payload, MessageStateChanged) and e.payload.to_state.terminal
            ]
            assert [p.to_state for p in ended] == [MessageState.CANCELED]  # once, by the owner


async def test_a_cancel_for_a_session_whose_owner_is_gone_is_done_by_the_replica_that_takes_it() -> None:
    async with (
        _schema() as schema,
        _replicas_a_and_b(schema) as (owner, other),
        running_agent(owner, ToolAgent(), agent_type="tools", instance_id="tools-a"),
    ):
        session_id = await new_session(owner)
        calls = {"calls": [{"tool": "crm.delete_records", "arguments": {"ids": [1]}}]}
        asked = await send(owner, session_id, "clean up", data({"target_agent": "tools", **calls}))
        assert asked.state == INPUT_REQUIRED, asked.state_reason
        (request_id,) = asked.input_request_ids
        # "a" hangs: it renews nothing any more and its lease runs out.
        _stop_sweeping(owner)
        _stop_sweeping(other)  # "b" takes the session for the cancel, not by its own sweep
        await _expire(schema, session_id)
        canceled = await cancel_message(other, session_id, asked.message_id, reason="never mind")
        assert canceled.state == CANCELED and canceled.state_reason == "never mind"
        assert await _lease(schema, session_id) == ("b", 2)  # "b" took the session to do it
        request = await other.server.mesh.inputs.get(TENANT, request_id)
        assert request.state is InputState.CANCELED


async def test_a_converse_stream_answers_while_its_cancel_waits_for_the_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with (
        _schema() as schema,
        _replicas_a_and_b(schema) as (owner, other),
        running_agent(owner, ToolAgent(), agent_type="tools", instance_id="tools-a"),
    ):
        session_id = await new_session(owner)
        calls = {"calls": [{"tool": "crm.delete_records", "arguments": {"ids": [1]}}]}
        asked = await send(owner, session_id, "clean up", data({"target_agent": "tools", **calls}))
        assert asked.state == INPUT_REQUIRED, asked.state_reason
        (request_id,) = asked.input_request_ids
        heard: list[str] = []  # the owner hears the cancel but is slow to act on it
        monkeypatch.setattr(
            owner.server.mesh.messages, "cancel_asked", lambda item: heard.append(item.message_id)
        )
        async with chatting(other, session_id) as chat:
            chat.cancel(asked.message_id, reason="changed my mind")
            chat.resolve(request_id, decision=message_types_pb2.DECISION_APPROVE)
            resolved = await chat.until_event(lambda e: e.WhichOneof("event") == "input_resolved")
            assert resolved.input_resolved.request.request_id == request_id
            await chat.until_event(
                lambda e: (
                    e.WhichOneof("event") == "message_state_changed"
                    and e.message_state_changed.to_state == COMPLETED
                )
            )
        assert heard and set(heard) == {asked.message_id}  # the cancel did go to the owner


async def test_a_replica_whose_session_was_taken_over_before_it_noticed_stops_cleanly() -> None:
    async with _schema() as schema, AsyncExitStack() as stack:
        more = {"policies": [PLANS], "lease_ms": 2000, "renew_ms": 500}
        first = running_server(env=ENV, **_settings(schema, "a", **more))
        owner = await first.__aenter__()
        try:
            other = await stack.enter_async_context(running_server(env=ENV, **_settings(schema, "b", **more)))
            # A plan waiting for its sign-off on "a" (no agent's stream involved).
            session_id = await new_session(owner)
            asked = await send(owner, session_id, "do the plan", data(PLAN))
            assert asked.state == INPUT_REQUIRED, asked.state_reason
            (request_id,) = asked.input_request_ids
            # "a" hangs; "b" takes the session over; "a" is stopped before it noticed.
            await _hand_over(schema, session_id, owner, to=other)
            # Its stop cancels the message still running there; the writes that go with it are
            # refused (the lease moved on), and the stop carries on regardless.
            await owner.server.mesh.messages.close()
        finally:
            await first.__aexit__(None, None, None)
        # What "a" tried to write on its way out was refused: the plan still waits on "b".
        assert await _lease(schema, session_id) == ("b", 2)
        message = await other.server.mesh.store.get_message(
            tenant_id=TENANT, session_id=session_id, message_id=asked.message_id
        )
        assert message is not None and message.state is MessageState.INPUT_REQUIRED
        request = await other.server.mesh.inputs.get(TENANT, request_id)
        assert request.state is InputState.PENDING


async def test_a_replica_whose_start_up_recovery_fails_lets_its_claimed_leases_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease_s = 1.0
    async with _schema() as schema:
        settings = _settings(schema, "a", lease_ms=int(lease_s * 1000), renew_ms=200)
        async with running_server(env=ENV, **settings) as first:
            session_id = await new_session(first)

        async def failing(self: Recovery, *args: Any, **kwargs: Any) -> Any:
            raise asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout")

        monkeypatch.setattr(Recovery, "_recover", failing)
        with pytest.raises(asyncpg.PostgresError):
            async with running_server(env=ENV, **settings):
                pass
        assert not [t for t in asyncio.all_tasks() if "lease" in t.get_name() and not t.done()]
        conn = await asyncpg.connect(_postgres.POSTGRES_DSN)
        try:
            await asyncio.sleep(2 * lease_s)  # a renewal would have pushed the expiry on by now
            left = await conn.fetchval(
                f'SELECT expires_at - extract(epoch from clock_timestamp()) FROM "{schema}".leases '
                "WHERE session_id = $1",
                session_id,
            )
        finally:
            await conn.close()
        assert left is not None and left < 0, "the failed replica still renews the lease"


@pytest.mark.parametrize("streaming", [False, True], ids=["blocking", "streaming"])
async def test_an_a2a_answer_sent_to_a_replica_that_does_not_own_the_session_returns_what_followed(
    streaming: bool,
) -> None:
    # found from outside: the follow-up's reply was the task still input-required (the question's
    # own event reached that replica's bus after the answer), though the answer was recorded
    async with _schema() as schema, AsyncExitStack() as stack:
        owner, asked_on, answered_on = [
            await stack.enter_async_context(
                running_server(
                    env=ENV, **_settings(schema, name, lease_ms=2000, renew_ms=400, policies=POLICIES)
                )
            )
            for name in ("a", "b", "c")
        ]
        agent = ApprovalAgent()
        await stack.enter_async_context(
            running_agent(owner, agent, agent_type=AGENT_TYPE, instance_id="crm-1")
        )
        for n in range(3):
            session_id = await new_session(owner)
            sent = Message(
                message_id=f"m{n}",
                role=Role.ROLE_USER,
                parts=[Part(text="clean"), new_data_part({"target_agent": AGENT_TYPE})],
                context_id=session_id,
            )
            async with a2a_client(asked_on.server.http.url, TransportProtocol.JSONRPC, streaming=False) as c:
                asked = [
                    e
                    async for e in c.send_message(
                        SendMessageRequest(message=sent), context=call(await asked_on.token())
                    )
                ]
            task = asked[-1].task
            assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            answer = Message(
                message_id=f"a{n}",
                role=Role.ROLE_USER,
                parts=[Part(text="approve")],
                task_id=task.id,
                context_id=session_id,
            )
            async with a2a_client(
                answered_on.server.http.url, TransportProtocol.JSONRPC, streaming=streaming
            ) as c:
                got = [
                    e
                    async for e in c.send_message(
                        SendMessageRequest(message=answer), context=call(await answered_on.token())
                    )
                ]
            last = got[-1]
            state = last.task.status.state if last.HasField("task") else last.status_update.status.state
            assert state == TaskState.TASK_STATE_COMPLETED, (n, got)
            assert agent.decisions[session_id] == [True]


async def test_an_always_approval_holds_on_every_replica() -> None:
    # found from outside: approve_always reached only the replica that took the answer and the
    # session's owner; sessions run by any other replica kept asking for the tool until its restart
    async with _schema() as schema, AsyncExitStack() as stack:
        a, b, c = [
            await stack.enter_async_context(
                running_server(
                    env=ENV, **_settings(schema, name, lease_ms=2000, renew_ms=400, policies=[DELETES])
                )
            )
            for name in ("a", "b", "c")
        ]
        tool = ToolAgent()
        await stack.enter_async_context(running_agent(a, tool, agent_type="crm", instance_id="crm-1"))

        async def ask(replica: Client, session_id: str) -> Any:
            sent = await send(replica, session_id, *tool_call_parts("crm.delete_records", {"ids": [7]}))
            return await wait_for_state(replica, session_id, sent.message_id, INPUT_REQUIRED, COMPLETED)

        first = await new_session(a)
        asked = await ask(a, first)
        assert asked.state == INPUT_REQUIRED
        await resolve(b, asked.input_request_ids[0], decision=message_types_pb2.DECISION_APPROVE_ALWAYS)
        await wait_for_state(a, first, asked.message_id, COMPLETED)
        elsewhere = await new_session(
            c
        )  # run by a replica that neither took the answer nor owns that session
        later = await ask(c, elsewhere)
        assert later.state == COMPLETED, later.state_reason
        decided = tool.answers[-1]  # the call was approved by the policy, as the tenant's grant says
        assert decided.resolved_by == "policy:deletes" and "approved always for the tenant" in decided.reason


async def test_the_same_token_answer_sent_to_two_replicas_at_once_wins_once_and_both_learn_it() -> None:
    # found from outside: both replicas claimed, the loser's release deleted the winner's claim, and
    # every later retry of the winning answer was told 409 instead of "repeat": true
    async with _schema() as schema, AsyncExitStack() as stack:
        slack = await stack.enter_async_context(fake_slack())
        receiver = await stack.enter_async_context(receiving())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        adapters = adapter_settings(slack.base_url, receiver.url)
        a, b = [
            await stack.enter_async_context(
                running_server(
                    env=ENV,
                    **_settings(
                        schema, name, lease_ms=2000, renew_ms=500, policies=POLICIES, adapters=adapters
                    ),
                )
            )
            for name in ("a", "b")
        ]
        agent = ApprovalAgent()
        await stack.enter_async_context(running_agent(a, agent, agent_type=AGENT_TYPE, instance_id="crm-1"))
        on_a, on_b = Surfaces(a, slack, receiver, http), Surfaces(b, slack, receiver, http)
        for _ in range(3):
            session_id, message_id, request_id = await on_a.ask()
            token = (await on_a.notification(request_id))["callback"]["token"]
            answers = await asyncio.gather(on_a.hook_token(token), on_b.hook_token(token))
            assert [status for status, _ in answers] == [200, 200], answers
            assert sorted(body["repeat"] for _, body in answers) == [False, True], answers
            status, again = await on_b.hook_token(token)  # the sender's retry, later
            assert (status, again["repeat"]) == (200, True), again
            await on_a.finished(session_id, message_id)
            assert agent.decisions[session_id] == [True]
