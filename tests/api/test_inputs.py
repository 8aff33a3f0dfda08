"""Input-required end to end: policies, the approval queue, resolutions, expiry, forms and plans.

A real server per test (``running_server`` with policies, guardrails and an input TTL)
and real agents: ``ConnectedAgent`` handlers in the test's loop that ask for approval,
a form, a confirmation or a free-text answer and report what they got back as an
artifact, and a hosted a2a-sdk agent that goes input-required with an ``input_request``
data part. Assertions are on what users see: SendMessage's answer, GetMessage,
GetSession, WatchSession and Converse events, ListPendingInputs, ResolveInput and its
errors (code, ErrorInfo reason and metadata, BadRequest field), what the agent
received, and the audit trail in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc import aio

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.events import InputEnded, InputRaised
from svantic_grpc.core.inputs.model import Resolution, Surface
from svantic_grpc.pb import (
    message_types_pb2,
    session_types_pb2,
)
from tests._support import Client, closes_failing, error_details, running_server
from tests.agents_connected import (
    WAIT,
    data,
    eventually,
    get_message,
    new_session,
    running_agent,
    send,
    wait_for_state,
)
from tests.agents_inputs import (
    ConfirmAgent,
    FormAgent,
    HostedInputAgent,
    QuestionAgent,
    ToolAgent,
    artifact_texts,
    audit,
    cancel_message,
    chatting,
    close_session,
    error_info,
    get_session,
    hosted_input_agents,
    is_state,
    pending,
    pending_ids,
    refused,
    replay,
    resolve,
    resolved_event,
    seconds,
    settle,
    view,
    watching,
)

pb = message_types_pb2

INPUT_REQUIRED = pb.MESSAGE_STATE_INPUT_REQUIRED
WORKING = pb.MESSAGE_STATE_WORKING
COMPLETED = pb.MESSAGE_STATE_COMPLETED
FAILED = pb.MESSAGE_STATE_FAILED
CANCELED = pb.MESSAGE_STATE_CANCELED
REJECTED = pb.MESSAGE_STATE_REJECTED

PENDING = pb.INPUT_STATE_PENDING
RESOLVED = pb.INPUT_STATE_RESOLVED
EXPIRED = pb.INPUT_STATE_EXPIRED
WITHDRAWN = pb.INPUT_STATE_CANCELED

APPROVE = pb.DECISION_APPROVE
FOR_SESSION = pb.DECISION_APPROVE_FOR_SESSION
ALWAYS = pb.DECISION_APPROVE_ALWAYS
DENY = pb.DECISION_DENY

ACTIVE = session_types_pb2.SESSION_STATUS_ACTIVE
PAUSED = session_types_pb2.SESSION_STATUS_PAUSED
CLOSED = session_types_pb2.SESSION_STATUS_CLOSED

DELETES: dict[str, Any] = {
    "name": "deletes",
    "match": {"tool": "crm.delete_*"},
    "enforcement": "require_approval",
}
DELETE_RECORDS = {"tool": "crm.delete_records", "arguments": {"ids": ["r1", "r2", "r3"]}}
DELETE_ACCOUNTS = {"tool": "crm.delete_accounts", "arguments": {"ids": ["a1"]}}
READ_RECORDS = {"tool": "crm.read_records", "arguments": {"ids": ["r1"]}}
DROP_TABLE = {"tool": "db.drop_table", "arguments": {"table": "customers"}}


# --- helpers ------------------------------------------------------------------------------------


def tool_calls(*calls: dict[str, Any], yolo: bool = False, to: str = "crm") -> list[Any]:
    """Message parts that send ``calls`` to the ``to`` agent (a ToolAgent asks for each)."""
    parts: list[Any] = ["please run these tools", data({"target_agent": to}), data({"calls": list(calls)})]
    if yolo:
        parts.append(data({"yolo_mode": True}))
    return parts


async def ask_tools(
    client: Client, session_id: str, *calls: dict[str, Any], yolo: bool = False, client_id: str = "acme-full"
) -> pb.Message:
    return await send(client, session_id, *tool_calls(*calls, yolo=yolo), md=await client.md(client_id))


@contextlib.asynccontextmanager
async def crm_agent(
    client: Client, *, instance_id: str = "crm-1", client_id: str = "acme-full"
) -> AsyncIterator[ToolAgent]:
    tool = ToolAgent()
    async with running_agent(client, tool, agent_type="crm", instance_id=instance_id, client_id=client_id):
        yield tool


def real_time_clock() -> ManualClock:
    """A manual clock a minute behind the wall clock.

    Dispatch tokens are signed with the mesh's clock and verified by the agents against the
    wall clock: a token issued "in the future" (after ``advance``) would be refused, one
    issued a minute ago is still valid for minutes.
    """
    return ManualClock(time.time() - 60)


# --- a policy-gated tool call, approved -----------------------------------------------------------


async def test_a_policy_gated_tool_call_pauses_the_session_until_approved_then_the_agent_completes() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        async with watching(client, session_id) as watch:
            message = await ask_tools(client, session_id, DELETE_RECORDS)

            # SendMessage returns the message waiting for a human; the session pauses.
            assert message.state == INPUT_REQUIRED, message.state_reason
            assert "approve tool call crm.delete_records" in message.state_reason
            [request_id] = message.input_request_ids
            assert (await get_session(client, session_id)).status == PAUSED
            assert tool.asked.is_set() and tool.answers == []

            # The approval queue shows what is asked, by whom, under which policy, until when.
            [listed] = (await pending(client, session_id)).requests
            assert listed.request_id == request_id
            assert (listed.session_id, listed.message_id) == (session_id, message.message_id)
            assert listed.kind == pb.INPUT_KIND_TOOL_APPROVAL
            assert listed.state == PENDING
            assert listed.tool_call.tool_name == "crm.delete_records"
            assert json_format.MessageToDict(listed.tool_call.arguments) == {"ids": ["r1", "r2", "r3"]}
            assert (listed.tool_call.agent_type, listed.tool_call.instance_id) == ("crm", "crm-1")
            assert listed.policy == "deletes"
            assert list(listed.allowed_decisions) == [APPROVE, FOR_SESSION, ALWAYS, DENY]
            assert list(listed.allowed_responders) == []
            assert seconds(listed.expires_at) - seconds(listed.created_at) == pytest.approx(3600)
            assert abs(seconds(listed.created_at) - time.time()) < 60
            assert not listed.HasField("resolution")
            assert await pending_ids(client) == [request_id]  # tenant-wide

            resolved = await resolve(client, request_id, decision=APPROVE)
            assert resolved.state == RESOLVED
            assert resolved.resolution.decision == APPROVE
            assert resolved.resolution.resolved_by == "acme-full"
            assert resolved.resolution.surface == pb.SURFACE_GRPC
            resolved_at = seconds(resolved.resolution.resolved_at)
            assert abs(resolved_at - time.time()) < 60

            done = await wait_for_state(client, session_id, message.message_id, COMPLETED)
            assert artifact_texts(done) == ["crm.delete_records: approved"]
            assert done.input_request_ids == [request_id]
            assert tool.approved == [True]
            [got] = tool.answers
            assert (got.request_id, got.state, got.decision) == (request_id, RESOLVED, APPROVE)
            assert (got.resolved_by, got.surface) == ("acme-full", pb.SURFACE_GRPC)
            assert (await get_session(client, session_id)).status == ACTIVE
            assert await pending_ids(client, session_id) == []
            assert await pending_ids(client) == []

            await watch.until(is_state(message.message_id, COMPLETED))
            views = watch.views
            mid = message.message_id
            asked = views.index(("input_required", request_id))
            paused = views.index(("status", ACTIVE, PAUSED))
            waiting = views.index(("state", mid, INPUT_REQUIRED))
            answered = views.index(("input_resolved", request_id, RESOLVED))
            resumed = views.index(("status", PAUSED, ACTIVE))
            working_again = views.index(("state", mid, WORKING), waiting)
            completed = views.index(("state", mid, COMPLETED))
            assert asked < paused < answered < resumed < completed
            assert asked < waiting < answered < working_again < completed
            event = watch.events[answered].input_resolved.request
            assert event.resolution.resolved_by == "acme-full"
            assert event.resolution.surface == pb.SURFACE_GRPC
            assert "approved by acme-full" in watch.events[working_again].message_state_changed.reason
            assert watch.events[asked].input_required.request.tool_call.tool_name == "crm.delete_records"

        [record] = await audit(client, request_id)
        assert (record.outcome, record.actor, record.surface) == ("approve", "acme-full", "grpc")
        assert record.time == pytest.approx(resolved_at, abs=1e-3)
        assert (record.session_id, record.message_id, record.kind) == (
            session_id,
            message.message_id,
            "tool_approval",
        )


async def test_the_approval_queue_pages_and_the_session_stays_paused_until_its_last_request_is_answered() -> (
    None
):
    async with running_server(policies=[DELETES]) as client, crm_agent(client):
        first, second = await new_session(client), await new_session(client)
        a1 = (await ask_tools(client, first, DELETE_RECORDS)).input_request_ids[0]
        a2 = (await ask_tools(client, first, DELETE_ACCOUNTS)).input_request_ids[0]
        b1 = (await ask_tools(client, second, DELETE_RECORDS)).input_request_ids[0]

        # Tenant-wide, oldest first, two pages.
        page = await pending(client, page_size=2)
        assert [r.request_id for r in page.requests] == [a1, a2]
        assert page.next_page_token
        rest = await pending(client, page_size=2, page_token=page.next_page_token)
        assert [r.request_id for r in rest.requests] == [b1]
        assert rest.next_page_token == ""
        # Per session.
        assert await pending_ids(client, first) == [a1, a2]
        assert await pending_ids(client, second) == [b1]
        one = await pending(client, first, page_size=1)
        assert [r.request_id for r in one.requests] == [a1] and one.next_page_token
        # A read-only credential sees the queue but cannot answer.
        assert await pending_ids(client, client_id="acme-read") == [a1, a2, b1]
        code, _, _, _ = await refused(resolve(client, a1, client_id="acme-read", decision=APPROVE))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _, _, field = await refused(pending(client, page_size=501))
        assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "page_size")

        await resolve(client, a1, decision=APPROVE)
        assert (await get_session(client, first)).status == PAUSED  # a2 still waits
        assert await pending_ids(client) == [a2, b1]
        await resolve(client, a2, decision=DENY, reason="keep the accounts")
        assert (await get_session(client, first)).status == ACTIVE
        assert (await get_session(client, second)).status == PAUSED
        await resolve(client, b1, decision=APPROVE)
        assert (await get_session(client, second)).status == ACTIVE
        assert await pending_ids(client) == []


# --- deny ----------------------------------------------------------------------------------------


async def test_a_denial_with_a_reason_reaches_the_agent_and_one_without_a_reason_changes_nothing() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS)
        [request_id] = message.input_request_ids

        for answer, field in (
            ({"decision": DENY}, "resolution.reason"),
            ({"decision": DENY, "reason": "   "}, "resolution.reason"),
            ({}, "resolution.decision"),
            ({"values": {"answer": "yes"}}, "resolution.decision"),
            ({"decision": 99}, "resolution.decision"),
        ):
            code, _, _, got_field = await refused(resolve(client, request_id, **answer))
            assert (code, got_field) == (grpc.StatusCode.INVALID_ARGUMENT, field), answer
        for bad_id, field in (("", "request_id"), ("no spaces allowed", "request_id")):
            code, _, _, got_field = await refused(resolve(client, bad_id, decision=APPROVE))
            assert (code, got_field) == (grpc.StatusCode.INVALID_ARGUMENT, field)
        # Nothing changed: still pending, still waiting, still paused, nothing told, nothing audited.
        assert await pending_ids(client, session_id) == [request_id]
        assert (await get_message(client, session_id, message.message_id)).state == INPUT_REQUIRED
        assert (await get_session(client, session_id)).status == PAUSED
        assert tool.answers == []
        assert await audit(client, request_id) == []

        denied = await resolve(client, request_id, decision=DENY, reason="those are customer records")
        assert (denied.state, denied.resolution.decision) == (RESOLVED, DENY)
        assert denied.resolution.reason == "those are customer records"

        # The agent gets a denial with the reason and decides to complete, saying so.
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert artifact_texts(done) == ["crm.delete_records: denied (those are customer records)"]
        assert tool.approved == [False]
        [got] = tool.answers
        assert (got.state, got.decision, got.reason) == (RESOLVED, DENY, "those are customer records")
        [record] = await audit(client, request_id)
        assert (record.outcome, record.actor, record.surface) == (
            "deny: those are customer records",
            "acme-full",
            "grpc",
        )


# --- Converse ------------------------------------------------------------------------------------


async def test_resolving_in_the_session_chat_is_recorded_as_the_chat_surface() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS)
        [request_id] = message.input_request_ids
        async with chatting(client, session_id) as chat:
            # A bad answer is an error on the stream; the stream and the request stay open.
            chat.resolve(request_id, decision=DENY)
            error = await chat.error()
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert error.field.endswith("resolution.reason")
            assert await pending_ids(client, session_id) == [request_id]

            chat.resolve(request_id, decision=APPROVE)
            event = await chat.until_event(resolved_event(request_id))
            answered = event.input_resolved.request
            assert answered.state == RESOLVED
            assert answered.resolution.surface == pb.SURFACE_CHAT
            assert answered.resolution.resolved_by == "acme-full"
            await chat.until_event(is_state(message.message_id, COMPLETED))

            # A second answer from the chat is refused, naming the winner.
            chat.resolve(request_id, decision=DENY, reason="too late")
            late = await chat.error()
            assert late.code == grpc.StatusCode.ABORTED.value[0]
            assert late.reason == "INPUT_ALREADY_RESOLVED"
            assert "acme-full" in late.message and "chat" in late.message

        done = await get_message(client, session_id, message.message_id)
        assert artifact_texts(done) == ["crm.delete_records: approved"]
        assert [a.surface for a in tool.answers] == [pb.SURFACE_CHAT]
        [record] = await audit(client, request_id)
        assert (record.outcome, record.actor, record.surface) == ("approve", "acme-full", "chat")


# --- first resolution wins -----------------------------------------------------------------------


async def test_a_second_resolution_is_aborted_naming_who_resolved_it_and_how_and_when() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS)
        [request_id] = message.input_request_ids
        won = await resolve(client, request_id, decision=APPROVE)

        with pytest.raises(aio.AioRpcError) as excinfo:
            await resolve(client, request_id, client_id="acme-admin", decision=DENY, reason="no")
        code, reason, metadata, _ = error_info(excinfo.value)
        assert (code, reason) == (grpc.StatusCode.ABORTED, "INPUT_ALREADY_RESOLVED")
        assert metadata["resolved_by"] == "acme-full"
        assert metadata["surface"] == "grpc"
        assert metadata["outcome"] == "approve"
        when = won.resolution.resolved_at.ToDatetime().replace(microsecond=0).isoformat()
        assert metadata["resolved_at"].startswith(when)
        details = excinfo.value.details() or ""
        assert "acme-full" in details and "grpc" in details

        # Nothing changed: the first answer stands and reached the agent once.
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert artifact_texts(done) == ["crm.delete_records: approved"]
        assert len(tool.answers) == 1
        assert len(await audit(client, request_id)) == 1


async def test_many_concurrent_resolutions_from_grpc_and_chat_have_exactly_one_winner() -> None:
    rounds, grpc_calls, chat_calls = 6, 18, 2
    async with (
        running_server(policies=[DELETES]) as client,
        crm_agent(client) as tool,
    ):
        session_id = await new_session(client)
        async with chatting(client, session_id, client_id="acme-admin") as chat:
            for round_no in range(rounds):
                message = await ask_tools(client, session_id, DELETE_RECORDS)
                [request_id] = message.input_request_ids

                def attempt(i: int, request_id: str = request_id) -> Any:
                    if i % 2:
                        return resolve(
                            client, request_id, client_id="acme-admin", decision=DENY, reason=f"no {i}"
                        )
                    return resolve(client, request_id, decision=APPROVE)

                start = len(chat.responses)
                racing = asyncio.gather(*(attempt(i) for i in range(grpc_calls)), return_exceptions=True)
                # The chat joins the race first, at once, or a little after the gRPC calls left.
                await asyncio.sleep(0.002 * (round_no % 3))
                for _ in range(chat_calls):
                    chat.resolve(request_id, decision=DENY, reason="from the chat")
                results = await asyncio.wait_for(racing, WAIT)
                winner, chat_errors = await asyncio.wait_for(
                    settle(chat, start, request_id, chat_calls), WAIT
                )
                chat_won = winner.surface == pb.SURFACE_CHAT
                winners = [r for r in results if isinstance(r, pb.InputRequest)]
                losers = [r for r in results if not isinstance(r, pb.InputRequest)]
                assert len(winners) == (0 if chat_won else 1), (round_no, results)
                assert len(losers) == grpc_calls - len(winners)
                expected_by = "acme-admin" if chat_won else winners[0].resolution.resolved_by
                expected_surface = "chat" if chat_won else "grpc"
                assert winner.resolved_by == expected_by
                for loser in losers:
                    assert isinstance(loser, BaseException)
                    code, reason, metadata, _ = error_info(loser)
                    assert (code, reason) == (grpc.StatusCode.ABORTED, "INPUT_ALREADY_RESOLVED")
                    assert (metadata["resolved_by"], metadata["surface"]) == (expected_by, expected_surface)
                # Every chat attempt that lost is told so on the stream, naming the same winner.
                assert len(chat_errors) == chat_calls - (1 if chat_won else 0)
                for error in chat_errors:
                    assert error.reason == "INPUT_ALREADY_RESOLVED"
                    assert f"by {expected_by} via {expected_surface}" in error.message

                done = await wait_for_state(
                    client, session_id, message.message_id, COMPLETED, FAILED, CANCELED
                )
                assert done.state == COMPLETED, done.state_reason
                mine = [a for a in tool.answers if a.request_id == request_id]
                assert len(mine) == 1  # the agent heard exactly one answer: the winner's
                assert mine[0].resolved_by == expected_by
                assert mine[0].decision == winner.decision
                assert len(await audit(client, request_id)) == 1


# --- grants --------------------------------------------------------------------------------------


async def test_approve_for_session_is_not_asked_again_in_that_session_but_is_in_another() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        first = await ask_tools(client, session_id, DELETE_RECORDS)
        [request_id] = first.input_request_ids
        await resolve(client, request_id, decision=FOR_SESSION)
        await wait_for_state(client, session_id, first.message_id, COMPLETED)

        # The same tool, same session: approved at once, no request, no pause.
        again = await ask_tools(client, session_id, DELETE_RECORDS)
        assert again.state == COMPLETED, again.state_reason
        assert artifact_texts(again) == ["crm.delete_records: approved"]
        assert list(again.input_request_ids) == []
        assert await pending_ids(client) == []
        granted = tool.answers[-1]
        assert granted.state == RESOLVED and granted.decision == APPROVE
        assert granted.resolved_by == "policy:deletes"
        assert "approved for this session" in granted.reason
        assert (await get_session(client, session_id)).status == ACTIVE

        # Another tool of the same policy is asked: the grant is for that tool.
        other_tool = await ask_tools(client, session_id, DELETE_ACCOUNTS)
        assert other_tool.state == INPUT_REQUIRED
        await resolve(client, other_tool.input_request_ids[0], decision=DENY, reason="not accounts")

        # Another session is asked again.
        other = await new_session(client)
        elsewhere = await ask_tools(client, other, DELETE_RECORDS)
        assert elsewhere.state == INPUT_REQUIRED, elsewhere.state_reason
        assert await pending_ids(client, other) == list(elsewhere.input_request_ids)
        assert (await get_session(client, other)).status == PAUSED


async def test_approve_always_allows_the_policy_for_the_tenant_but_not_for_another_tenant() -> None:
    async with (
        running_server(policies=[DELETES]) as client,
        crm_agent(client) as tool,
        crm_agent(client, instance_id="crm-g", client_id="globex-full") as globex_tool,
    ):
        session_id = await new_session(client)
        first = await ask_tools(client, session_id, DELETE_RECORDS)
        resolved = await resolve(client, first.input_request_ids[0], decision=ALWAYS)
        assert resolved.resolution.decision == ALWAYS
        await wait_for_state(client, session_id, first.message_id, COMPLETED)

        # Any tool of that policy, in any session of the tenant, is allowed without asking.
        for calls in ((DELETE_RECORDS,), (DELETE_ACCOUNTS,)):
            other = await new_session(client)
            message = await ask_tools(client, other, *calls)
            assert message.state == COMPLETED, message.state_reason
            assert artifact_texts(message) == [f"{calls[0]['tool']}: approved"]
            assert "approved always" in tool.answers[-1].reason
        assert await pending_ids(client) == []

        # globex is still asked.
        globex = await client.md("globex-full")
        globex_session = await new_session(client, md=globex)
        asked = await ask_tools(client, globex_session, DELETE_RECORDS, client_id="globex-full")
        assert asked.state == INPUT_REQUIRED, asked.state_reason
        assert asked.instance_id == "crm-g"
        assert await pending_ids(client, client_id="globex-full") == list(asked.input_request_ids)
        assert globex_tool.answers == []


# --- enforcement without a human -----------------------------------------------------------------


async def test_block_allow_and_audit_policies_decide_without_a_human_and_yolo_never_overrides_block() -> None:
    policies = [
        {"name": "no-drops", "match": {"tool": "db.drop_*"}, "enforcement": "block"},
        {"name": "reads", "match": {"tool": "crm.read_*"}, "enforcement": "allow"},
        {"name": "watched", "match": {"tool": "crm.update_*"}, "enforcement": "audit"},
        DELETES,
    ]
    update = {"tool": "crm.update_records", "arguments": {"ids": ["r1"]}}
    async with running_server(policies=policies) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DROP_TABLE, READ_RECORDS, update)
        assert message.state == COMPLETED, message.state_reason
        assert artifact_texts(message) == [
            "db.drop_table: denied (blocked by policy 'no-drops')",
            "crm.read_records: approved",
            "crm.update_records: approved",
        ]
        assert tool.approved == [False, True, True]
        assert [a.resolved_by for a in tool.answers] == ["policy:no-drops", "policy:reads", "policy:watched"]
        assert [a.decision for a in tool.answers] == [DENY, APPROVE, APPROVE]
        assert list(message.input_request_ids) == []

        # yolo_mode approves what needs approval, never what is blocked.
        yolo = await ask_tools(client, session_id, DELETE_RECORDS, DROP_TABLE, yolo=True)
        assert yolo.state == COMPLETED, yolo.state_reason
        assert artifact_texts(yolo) == [
            "crm.delete_records: approved",
            "db.drop_table: denied (blocked by policy 'no-drops')",
        ]
        assert tool.answers[-2].reason == "yolo_mode"
        assert tool.answers[-2].resolved_by == "policy:deletes"
        assert await pending_ids(client) == []

        # Without yolo_mode the same call is asked again: yolo was for that message only.
        asked = await ask_tools(client, session_id, DELETE_RECORDS)
        assert asked.state == INPUT_REQUIRED
        await resolve(client, asked.input_request_ids[0], decision=DENY, reason="no")
        await wait_for_state(client, session_id, asked.message_id, COMPLETED)

        await close_session(client, session_id)
        views = [view(e) for e in await replay(client, session_id)]
        # Only the one human request ever paused the session or asked anything.
        assert [v for v in views if v[0] == "input_required"] == [
            ("input_required", asked.input_request_ids[0])
        ]
        assert views.count(("status", ACTIVE, PAUSED)) == 1
        assert [v for v in views if v[0] == "state" and v[2] == INPUT_REQUIRED] == [
            ("state", asked.message_id, INPUT_REQUIRED)
        ]


async def test_a_bulk_evaluator_asks_only_above_its_threshold() -> None:
    bulk = {
        **DELETES,
        "name": "bulk-deletes",
        "evaluator": {"type": "bulk", "argument": "ids", "threshold": 2},
    }
    two = {"tool": "crm.delete_records", "arguments": {"ids": ["r1", "r2"]}}
    async with running_server(policies=[bulk]) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        small = await ask_tools(client, session_id, two)
        assert small.state == COMPLETED, small.state_reason
        assert artifact_texts(small) == ["crm.delete_records: approved"]
        assert await pending_ids(client) == []
        assert tool.answers[-1].resolved_by.startswith("policy")

        large = await ask_tools(client, session_id, DELETE_RECORDS)  # three ids
        assert large.state == INPUT_REQUIRED, large.state_reason
        [listed] = (await pending(client, session_id)).requests
        assert listed.policy == "bulk-deletes"
        assert json_format.MessageToDict(listed.tool_call.arguments) == {"ids": ["r1", "r2", "r3"]}


async def test_a_bulk_evaluator_asks_when_it_cannot_count() -> None:
    # found from outside: "all", a filter, or no ids at all counted as 0 items and ran unasked
    bulk = {
        **DELETES,
        "name": "bulk-deletes",
        "evaluator": {"type": "bulk", "argument": "ids", "threshold": 2},
    }
    async with running_server(policies=[bulk]) as client, crm_agent(client):
        for arguments in ({"ids": "all"}, {"ids": {"all": True}}, {"where": "created < 2020"}, {"ids": True}):
            session_id = await new_session(client)
            call = {"tool": "crm.delete_records", "arguments": arguments}
            asked = await ask_tools(client, session_id, call)
            assert asked.state == INPUT_REQUIRED, (arguments, asked.state_reason)
        counted = await ask_tools(
            client, await new_session(client), {"tool": "crm.delete_records", "arguments": {"ids": 2}}
        )
        assert counted.state == COMPLETED, counted.state_reason  # a number is a count


async def test_the_guardrail_budget_denies_the_third_tool_call_of_a_session() -> None:
    reads = [{"tool": "crm.read_records", "arguments": {"ids": [f"r{i}"]}} for i in range(3)]
    async with (
        running_server(guardrails={"max_tool_calls_per_session": 2}) as client,
        crm_agent(client) as tool,
    ):
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, *reads)
        assert message.state == COMPLETED, message.state_reason
        texts = artifact_texts(message)
        assert texts[:2] == ["crm.read_records: approved"] * 2
        assert texts[2].startswith("crm.read_records: denied (guardrail")
        assert "budget of 2 tool calls" in tool.answers[-1].reason
        assert tool.approved == [True, True, False]

        # The budget is spent for this session...
        later = await ask_tools(client, session_id, READ_RECORDS)
        assert artifact_texts(later) == [texts[2]]
        # ...but not for another one.
        other = await new_session(client)
        fresh = await ask_tools(client, other, READ_RECORDS)
        assert artifact_texts(fresh) == ["crm.read_records: approved"]
        assert await pending_ids(client) == []


# --- expiry --------------------------------------------------------------------------------------


async def test_an_unanswered_request_expires_and_fails_the_message_without_being_a_denial() -> None:
    clock = real_time_clock()
    async with (
        running_server(policies=[DELETES], clock=clock, input_request_ttl_ms=60_000) as client,
        crm_agent(client) as tool,
    ):
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS)
        [request_id] = message.input_request_ids
        [listed] = (await pending(client, session_id)).requests
        assert seconds(listed.expires_at) - seconds(listed.created_at) == pytest.approx(60)
        expiry = client.server.mesh.inputs.expiry

        clock.advance(59)
        assert await expiry.run_once() == 0
        assert await pending_ids(client) == [request_id]

        async with watching(client, session_id) as watch:
            clock.advance(2)
            assert await expiry.run_once() == 1
            ended = await watch.until(resolved_event(request_id))
            assert ended.input_resolved.request.state == EXPIRED
            assert not ended.input_resolved.request.HasField("resolution")  # nobody denied it
        failed = await wait_for_state(client, session_id, message.message_id, FAILED, COMPLETED, CANCELED)
        assert failed.state == FAILED
        assert "expired" in failed.state_reason
        assert "denied" not in failed.state_reason and "deny" not in failed.state_reason
        assert await pending_ids(client) == []
        assert (await get_session(client, session_id)).status == ACTIVE
        # The agent's handler was withdrawn, never told "denied".
        await asyncio.wait_for(tool.cancelled.wait(), WAIT)
        assert tool.answers == [] and tool.approved == []

        code, reason, metadata, _ = await refused(resolve(client, request_id, decision=APPROVE))
        assert (code, reason) == (grpc.StatusCode.ABORTED, "INPUT_ALREADY_RESOLVED")
        assert metadata.get("state") == "expired"
        [record] = await audit(client, request_id)
        assert record.outcome.startswith("expired")
        assert (record.actor, record.surface) == ("mesh", "mesh")
        assert record.time == pytest.approx(clock.now())
        assert "deny" not in record.outcome


# --- forms, questions, confirmations ------------------------------------------------------------


FORM_FIELDS = [
    pb.FormField(name="name", label="Name", type="text", required=True),
    pb.FormField(name="count", label="How many", type="number"),
    pb.FormField(name="color", label="Color", type="select", options=["red", "green"]),
    pb.FormField(name="agree", label="I agree", type="checkbox"),
    pb.FormField(name="when", label="When", type="date"),
    pb.FormField(name="notes", label="Notes", type="textarea"),
]


async def test_form_values_are_validated_against_the_form_and_valid_ones_reach_the_agent() -> None:
    form = FormAgent("Export settings", FORM_FIELDS)
    async with (
        running_server() as client,
        running_agent(client, form, agent_type="exporter", instance_id="exp-1"),
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "export", data({"target_agent": "exporter"}))
        assert message.state == INPUT_REQUIRED, message.state_reason
        assert "fill in Export settings" in message.state_reason
        [listed] = (await pending(client, session_id)).requests
        assert listed.kind == pb.INPUT_KIND_FORM
        assert listed.form.title == "Export settings"
        assert [(f.name, f.type, f.required) for f in listed.form.fields] == [
            (f.name, f.type, f.required) for f in FORM_FIELDS
        ]
        assert list(listed.form.fields[2].options) == ["red", "green"]
        assert list(listed.allowed_decisions) == []
        request_id = listed.request_id

        good = {
            "name": "Ada",
            "count": 3,
            "color": "green",
            "agree": True,
            "when": "2026-11-22",
            "notes": "hi",
        }
        for values, field in (
            ({}, "resolution.values.name"),
            ({"count": 3}, "resolution.values.name"),
            ({"name": ""}, "resolution.values.name"),
            ({"name": 5}, "resolution.values.name"),
            ({**good, "count": "many"}, "resolution.values.count"),
            ({**good, "count": True}, "resolution.values.count"),
            ({**good, "color": "blue"}, "resolution.values.color"),
            ({**good, "agree": "yes"}, "resolution.values.agree"),
            ({**good, "when": "tomorrow"}, "resolution.values.when"),
            ({**good, "bogus": 1}, "resolution.values.bogus"),
        ):
            code, _, _, got = await refused(resolve(client, request_id, values=values))
            assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, field), values
        assert await pending_ids(client) == [request_id]
        assert form.answers == []

        resolved = await resolve(client, request_id, values=good)
        assert resolved.state == RESOLVED
        assert json_format.MessageToDict(resolved.resolution.values) == good
        assert resolved.resolution.decision == pb.DECISION_UNSPECIFIED
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert form.values == [good]
        assert len(artifact_texts(done)) == 1 and '"name": "Ada"' in artifact_texts(done)[0]
        [record] = await audit(client, request_id)
        assert (record.outcome, record.kind) == ("form submitted", "form")


async def test_a_sensitive_form_resolves_through_grpc_and_never_through_slack_or_webhooks() -> None:
    fields = [
        pb.FormField(name="api_key", label="API key", type="password", required=True, sensitive=True),
        pb.FormField(name="account", label="Account", type="text"),
    ]
    form = FormAgent("Connect the CRM", fields)
    async with (
        running_server() as client,
        running_agent(client, form, agent_type="exporter", instance_id="exp-1"),
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "connect", data({"target_agent": "exporter"}))
        [listed] = (await pending(client, session_id)).requests
        assert [f.sensitive for f in listed.form.fields] == [True, False]

        # Outside surfaces are refused by the mesh (adapters go through this same call).
        with pytest.raises(InvalidArgument):
            await client.server.mesh.inputs.resolve(
                tenant_id="acme",
                request_id=listed.request_id,
                resolution=Resolution(values={"api_key": "leak"}),
                responder="U123",
                surface=Surface.WEBHOOK,
            )
        assert await pending_ids(client) == [listed.request_id]

        resolved = await resolve(client, listed.request_id, values={"api_key": "sk-123", "account": "ops"})
        assert resolved.state == RESOLVED
        await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert form.values == [{"api_key": "sk-123", "account": "ops"}]  # the agent gets it
        # Found from outside: the session's events (to every watcher, read-only credentials too,
        # and in the stored log) carried the secret.
        await close_session(client, session_id)
        events = await replay(client, session_id)
        [ended] = [e for e in events if e.WhichOneof("event") == "input_resolved"]
        assert json_format.MessageToDict(ended.input_resolved.request.resolution.values) == {"account": "ops"}
        asked = [e for e in events if e.WhichOneof("event") in ("input_required", "input_resolved")]
        assert len(asked) == 2 and "sk-123" not in str(asked)  # (the agent's own artifact echoes it)
        log = await client.server.mesh.store.list_events(tenant_id="acme", session_id=session_id, limit=1000)
        assert "sk-123" not in repr([e for e in log if isinstance(e.payload, InputRaised | InputEnded)])


async def test_a_connected_agents_field_defaults_are_shown_but_never_a_sensitive_one() -> None:
    fields = [
        pb.FormField(name="format", type="text", default_value=struct_pb2.Value(string_value="csv")),
        pb.FormField(
            name="token", type="password", sensitive=True, default_value=struct_pb2.Value(string_value="sk-x")
        ),
    ]
    form = FormAgent("Export", fields)
    async with (
        running_server() as client,
        running_agent(client, form, agent_type="exporter", instance_id="exp-1"),
    ):
        session_id = await new_session(client)
        await send(client, session_id, "export", data({"target_agent": "exporter"}))
        [listed] = (await pending(client, session_id)).requests
        shown, secret = listed.form.fields
        assert shown.HasField("default_value") and shown.default_value.string_value == "csv"
        assert not secret.HasField("default_value")


async def test_a_free_text_question_becomes_a_one_field_form_and_the_answer_reaches_the_agent() -> None:
    question = "Which color should the report use?"
    asker = QuestionAgent(question)
    async with (
        running_server() as client,
        running_agent(client, asker, agent_type="writer", instance_id="w-1"),
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "write the report", data({"target_agent": "writer"}))
        assert message.state == INPUT_REQUIRED, message.state_reason
        assert question in message.state_reason
        assert any(p.text == question for t in message.history for p in t.parts)  # the agent's turn
        [listed] = (await pending(client, session_id)).requests
        assert listed.kind == pb.INPUT_KIND_FORM
        assert listed.form.title == question
        assert [(f.name, f.type, f.required) for f in listed.form.fields] == [("answer", "textarea", True)]

        code, _, _, field = await refused(resolve(client, listed.request_id, values={}))
        assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "resolution.values.answer")
        await resolve(client, listed.request_id, values={"answer": "blue"})
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert artifact_texts(done) == ["answer: blue"]
        assert asker.replies == ["blue"]


async def test_a_confirmation_is_answered_with_confirmed_and_a_payload() -> None:
    confirm = ConfirmAgent("payments.refund", {"order": "o-7"})
    async with (
        running_server() as client,
        running_agent(client, confirm, agent_type="payments", instance_id="p-1"),
    ):
        session_id = await new_session(client)
        to_payments = data({"target_agent": "payments"})
        message = await send(client, session_id, "refund", to_payments)
        assert message.state == INPUT_REQUIRED, message.state_reason
        [listed] = (await pending(client, session_id)).requests
        assert listed.kind == pb.INPUT_KIND_CONFIRMATION
        assert listed.tool_call.tool_name == "payments.refund"
        assert json_format.MessageToDict(listed.tool_call.arguments) == {"order": "o-7"}
        await resolve(client, listed.request_id, confirmed=True, payload={"note": "ok"})
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert artifact_texts(done) == ['confirmed {"note": "ok"}']

        second = await send(client, session_id, "refund again", to_payments)
        resolved = await resolve(client, second.input_request_ids[0], decision=DENY, reason="duplicate")
        assert resolved.resolution.confirmed is False
        done = await wait_for_state(client, session_id, second.message_id, COMPLETED)
        assert artifact_texts(done) == ["not confirmed {}"]


async def test_a_malformed_ask_fails_the_message_naming_the_field_and_asks_nobody() -> None:
    bad = FormAgent("Pick", [pb.FormField(name="choice", type="select")])  # a select without options
    async with (
        running_server() as client,
        running_agent(client, bad, agent_type="picker", instance_id="pk-1"),
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "pick", data({"target_agent": "picker"}))
        assert message.state == FAILED
        assert "input_request.form.fields[0].options" in message.state_reason
        assert await pending_ids(client) == []
        assert (await get_session(client, session_id)).status == ACTIVE
        await asyncio.wait_for(bad.cancelled.wait(), WAIT)


# --- hosted (A2A) agents -------------------------------------------------------------------------


async def test_a_hosted_agent_asks_through_a2a_and_gets_the_decision_on_the_same_task() -> None:
    delete_ask = {
        "kind": "tool_approval",
        "tool_call": {"tool_name": "crm.delete_records", "arguments": {"ids": ["r1", "r2", "r3"]}},
    }
    read_ask = {"kind": "tool_approval", "tool_call": {"tool_name": "crm.read_records", "arguments": {}}}
    async with (
        running_server(policies=[DELETES]) as client,
        hosted_input_agents(
            client.channel,
            HostedInputAgent("crm-h", ask=delete_ask, question="May I delete these?"),
            HostedInputAgent("reader-h", agent_type="hosted-reader", ask=read_ask, question="May I read?"),
            HostedInputAgent("ask-h", agent_type="hosted-ask"),
        ) as hosted,
    ):
        for agent in hosted.agents.values():
            await client.registry.RegisterAgent(
                agent.registration(), metadata=await client.md(), timeout=WAIT
            )
        session_id = await new_session(client)
        to_crm = data({"target_agent": "hosted-crm"})

        message = await send(client, session_id, "clean up", to_crm)
        assert message.state == INPUT_REQUIRED, message.state_reason
        [listed] = (await pending(client, session_id)).requests
        assert listed.kind == pb.INPUT_KIND_TOOL_APPROVAL
        assert listed.policy == "deletes"
        assert (listed.tool_call.agent_type, listed.tool_call.instance_id) == ("hosted-crm", "crm-h")
        assert json_format.MessageToDict(listed.tool_call.arguments) == {"ids": ["r1", "r2", "r3"]}
        await resolve(client, listed.request_id, decision=APPROVE)
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert artifact_texts(done) == ["approved by acme-full"]
        [got] = hosted["crm-h"].resolutions
        assert got["approved"] is True and got["decision"] == "approve"
        assert (got["request_id"], got["resolved_by"]) == (listed.request_id, "acme-full")

        denied = await send(client, session_id, "clean up again", to_crm)
        await resolve(client, denied.input_request_ids[0], decision=DENY, reason="not those records")
        done = await wait_for_state(client, session_id, denied.message_id, COMPLETED)
        assert artifact_texts(done) == ["denied: not those records"]
        assert hosted["crm-h"].resolutions[-1]["approved"] is False

        # A tool no policy gates: answered at once on the same task, nobody asked.
        read = await send(client, session_id, "read", data({"target_agent": "hosted-reader"}))
        assert read.state == COMPLETED, read.state_reason
        assert artifact_texts(read) == ["approved by policy"]

        # A plain question (no input_request part) is a one-field form; the answer goes back.
        asked = await send(client, session_id, "hello", data({"target_agent": "hosted-ask"}))
        assert asked.state == INPUT_REQUIRED, asked.state_reason
        [question] = (await pending(client, session_id)).requests
        assert question.form.title == "What is your name?"
        assert [f.name for f in question.form.fields] == ["answer"]
        await resolve(client, question.request_id, values={"answer": "Ada"})
        done = await wait_for_state(client, session_id, asked.message_id, COMPLETED)
        assert artifact_texts(done) == ["Nice to meet you, Ada"]


# --- plans ---------------------------------------------------------------------------------------


class StepRecorder:
    """Records the text of every dispatch and echoes it."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        self.texts.append(dispatch.text)
        await reply.artifact(f"did: {dispatch.text}")
        await reply.complete()


PLANS = {"name": "plans", "scope": "plan", "match": {"agent_type": "echo"}, "enforcement": "require_approval"}
PLAN = data(
    {
        "action_data": {
            "plan": [
                {"target_agent": "echo", "text": "step one"},
                {"target_agent": "echo", "text": "step two"},
            ]
        }
    }
)


async def test_a_plan_needs_sign_off_before_its_steps_run() -> None:
    steps = StepRecorder()
    async with running_server(policies=[PLANS]) as client, running_agent(client, steps, instance_id="echo-1"):
        session_id = await new_session(client)
        message = await send(client, session_id, "do the plan", PLAN)
        assert message.state == INPUT_REQUIRED, message.state_reason
        assert "sign off a plan of 2 steps" in message.state_reason
        assert steps.texts == []  # nothing runs before sign-off
        [listed] = (await pending(client, session_id)).requests
        assert listed.kind == pb.INPUT_KIND_PLAN_APPROVAL
        assert [(s.description, s.agent_type) for s in listed.plan] == [
            ("step one", "echo"),
            ("step two", "echo"),
        ]
        assert list(listed.allowed_decisions) == [APPROVE, DENY]
        assert listed.policy == "plans"
        code, _, _, field = await refused(resolve(client, listed.request_id, decision=FOR_SESSION))
        assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "resolution.decision")

        await resolve(client, listed.request_id, decision=APPROVE)
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED, FAILED, REJECTED)
        assert done.state == COMPLETED, done.state_reason
        assert steps.texts == ["step one", "step two"]
        assert artifact_texts(done) == ["did: step one", "did: step two"]
        assert (await get_session(client, session_id)).status == ACTIVE


async def test_a_denied_plan_is_rejected_with_the_reason_and_runs_nothing() -> None:
    steps = StepRecorder()
    async with running_server(policies=[PLANS]) as client, running_agent(client, steps, instance_id="echo-1"):
        session_id = await new_session(client)
        message = await send(client, session_id, "do the plan", PLAN)
        [request_id] = message.input_request_ids
        await resolve(client, request_id, decision=DENY, reason="not during the freeze")
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED, FAILED, REJECTED)
        assert done.state == REJECTED
        assert "not during the freeze" in done.state_reason
        assert "acme-full" in done.state_reason
        assert steps.texts == []


# --- cancel and close ----------------------------------------------------------------------------


async def test_cancelling_a_waiting_message_withdraws_its_request() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS)
        [request_id] = message.input_request_ids
        async with watching(client, session_id) as watch:
            canceled = await cancel_message(client, session_id, message.message_id, reason="changed my mind")
            assert canceled.state == CANCELED
            assert canceled.state_reason == "changed my mind"
            ended = await watch.until(resolved_event(request_id))
            assert ended.input_resolved.request.state == WITHDRAWN
            assert not ended.input_resolved.request.HasField("resolution")
        assert await pending_ids(client) == []
        assert (await get_session(client, session_id)).status == ACTIVE
        await asyncio.wait_for(tool.cancelled.wait(), WAIT)
        assert tool.answers == []

        code, reason, metadata, _ = await refused(resolve(client, request_id, decision=APPROVE))
        assert (code, reason, metadata.get("state")) == (
            grpc.StatusCode.ABORTED,
            "INPUT_ALREADY_RESOLVED",
            "canceled",
        )
        [record] = await audit(client, request_id)
        assert "canceled" in record.outcome
        assert (record.actor, record.surface) == ("mesh", "mesh")


async def test_closing_a_session_cancels_its_pending_requests() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        one = await ask_tools(client, session_id, DELETE_RECORDS)
        two = await ask_tools(client, session_id, DELETE_ACCOUNTS)
        other = await new_session(client)
        kept = await ask_tools(client, other, DELETE_RECORDS)
        request_ids = [*one.input_request_ids, *two.input_request_ids]
        assert len(request_ids) == 2

        await close_session(client, session_id)
        assert (await get_session(client, session_id)).status == CLOSED
        assert await pending_ids(client) == list(kept.input_request_ids)  # the other session's stays
        for message in (one, two):
            ended = await wait_for_state(client, session_id, message.message_id, CANCELED, FAILED, COMPLETED)
            assert ended.state == CANCELED
            assert "session closed" in ended.state_reason
        for request_id in request_ids:
            code, _, metadata, _ = await refused(resolve(client, request_id, decision=APPROVE))
            assert (code, metadata.get("state")) == (grpc.StatusCode.ABORTED, "canceled")
        views = [view(e) for e in await replay(client, session_id)]
        for request_id in request_ids:
            assert ("input_resolved", request_id, WITHDRAWN) in views
        # Withdrawing its requests for the close makes it active in the write that ends the last of
        # them, then the close's own write closes it: each write leaves the session as what is
        # pending says, at any crash point (the crash test found paused with nothing pending).
        statuses = [v for v in views if v[0] == "status"]
        assert statuses[-3:] == [
            ("status", ACTIVE, PAUSED),
            ("status", PAUSED, ACTIVE),
            ("status", ACTIVE, CLOSED),
        ]
        assert views[-1] == ("status", ACTIVE, CLOSED)
        await asyncio.wait_for(tool.cancelled.wait(), WAIT)
        assert tool.answers == []


async def test_a_paused_session_whose_close_failed_is_active_again_with_nothing_pending() -> None:
    # Its requests were withdrawn for the close and the session kept paused for it; the close's
    # own write failed, so the open session must not stay paused with nothing pending.
    async with running_server(policies=[DELETES]) as client, crm_agent(client):
        session_id = await new_session(client)
        await ask_tools(client, session_id, DELETE_RECORDS)
        assert (await get_session(client, session_id)).status == PAUSED
        with closes_failing(client), pytest.raises(aio.AioRpcError):
            await close_session(client, session_id)
        assert await pending_ids(client) == []
        deadline = time.monotonic() + WAIT
        while (await get_session(client, session_id)).status != ACTIVE:
            assert time.monotonic() < deadline, "the session stayed paused with nothing pending"
            await asyncio.sleep(0.02)
        await close_session(client, session_id)  # the close, written this time, ends its log
        statuses = [v for v in map(view, await replay(client, session_id)) if v[0] == "status"]
        assert statuses[-3:] == [
            ("status", ACTIVE, PAUSED),
            ("status", PAUSED, ACTIVE),
            ("status", ACTIVE, CLOSED),
        ]


# --- who may answer ------------------------------------------------------------------------------


async def test_only_the_policys_approvers_may_answer() -> None:
    guarded = {**DELETES, "approvers": ["acme-admin"]}
    async with running_server(policies=[guarded]) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS)
        [listed] = (await pending(client, session_id)).requests
        assert list(listed.allowed_responders) == ["acme-admin"]

        code, reason, _, _ = await refused(resolve(client, listed.request_id, decision=APPROVE))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "RESPONDER_NOT_ALLOWED")
        assert await pending_ids(client) == [listed.request_id]
        assert tool.answers == []

        resolved = await resolve(client, listed.request_id, client_id="acme-admin", decision=APPROVE)
        assert resolved.resolution.resolved_by == "acme-admin"
        await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert [a.resolved_by for a in tool.answers] == ["acme-admin"]


async def test_another_tenant_can_neither_see_nor_resolve_the_requests() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client) as tool:
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS)
        [request_id] = message.input_request_ids

        assert await pending_ids(client, client_id="globex-full") == []
        with pytest.raises(aio.AioRpcError) as hidden:  # as if the session were not there at all
            await pending_ids(client, session_id, client_id="globex-full")
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        theirs = await refused(resolve(client, request_id, client_id="globex-full", decision=APPROVE))
        missing = await refused(
            resolve(client, "inp_does_not_exist", client_id="globex-full", decision=APPROVE)
        )
        assert theirs[:2] == missing[:2] == (grpc.StatusCode.NOT_FOUND, "INPUT_NOT_FOUND")

        async with chatting(client, session_id, client_id="globex-full") as chat:
            chat.resolve(request_id, decision=APPROVE)
            with pytest.raises(aio.AioRpcError) as excinfo:
                await chat.next()
            assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND

        # Nothing changed for acme.
        assert await pending_ids(client) == [request_id]
        assert (await get_message(client, session_id, message.message_id)).state == INPUT_REQUIRED
        assert tool.answers == []
        assert await audit(client, tenant_id="globex") == []


# --- the audit trail -----------------------------------------------------------------------------


async def test_the_audit_trail_has_one_record_per_outcome_with_actor_surface_and_time() -> None:
    clock = real_time_clock()
    policies = [{"name": "no-drops", "match": {"tool": "db.drop_*"}, "enforcement": "block"}, DELETES]
    async with (
        running_server(policies=policies, clock=clock, input_request_ttl_ms=30_000) as client,
        crm_agent(client) as tool,
    ):
        session_id = await new_session(client)
        expected: list[tuple[str, str, str, str, float]] = []

        clock.advance(1)
        approved = await ask_tools(client, session_id, DELETE_RECORDS)
        await resolve(client, approved.input_request_ids[0], decision=APPROVE)
        expected.append((approved.input_request_ids[0], "approve", "acme-full", "grpc", clock.now()))
        await wait_for_state(client, session_id, approved.message_id, COMPLETED)

        clock.advance(1)
        blocked = await ask_tools(client, session_id, DROP_TABLE)
        assert blocked.state == COMPLETED
        expected.append(
            (
                tool.answers[-1].request_id,
                "deny: blocked by policy 'no-drops'",
                "policy:no-drops",
                "policy",
                clock.now(),
            )
        )

        clock.advance(1)
        allowed = await ask_tools(client, session_id, READ_RECORDS)  # no policy: allowed
        assert allowed.state == COMPLETED
        expected.append((tool.answers[-1].request_id, "approve", "policy", "policy", clock.now()))

        clock.advance(1)
        denied = await ask_tools(client, session_id, DELETE_RECORDS)
        async with chatting(client, session_id, client_id="acme-admin") as chat:
            chat.resolve(denied.input_request_ids[0], decision=DENY, reason="not now")
            await chat.until_event(resolved_event(denied.input_request_ids[0]))
        expected.append((denied.input_request_ids[0], "deny: not now", "acme-admin", "chat", clock.now()))
        await wait_for_state(client, session_id, denied.message_id, COMPLETED)

        clock.advance(1)
        withdrawn = await ask_tools(client, session_id, DELETE_RECORDS)
        await cancel_message(client, session_id, withdrawn.message_id)
        expected.append((withdrawn.input_request_ids[0], "message canceled", "mesh", "mesh", clock.now()))

        clock.advance(1)
        unanswered = await ask_tools(client, session_id, DELETE_RECORDS)
        clock.advance(31)
        assert await client.server.mesh.inputs.expiry.run_once() == 1
        await wait_for_state(client, session_id, unanswered.message_id, FAILED)
        expected.append(
            (unanswered.input_request_ids[0], "expired: nobody answered in time", "mesh", "mesh", clock.now())
        )

        records = await audit(client)
        got = [(r.request_id, r.outcome, r.actor, r.surface, r.time) for r in records]
        assert [g[:4] for g in got] == [e[:4] for e in expected]
        for (_, _, _, _, at), (*_, want) in zip(got, expected, strict=True):
            assert at == pytest.approx(want)
        assert all(r.session_id == session_id for r in records)
        assert len({r.request_id for r in records}) == len(records)  # one record per request
        assert await audit(client, tenant_id="globex") == []


# --- several asks, priorities, timeouts ---------------------------------------------------------


async def test_one_message_can_wait_for_a_human_several_times() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client):
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS, DELETE_ACCOUNTS)
        [first] = message.input_request_ids
        await resolve(client, first, decision=APPROVE)

        async def asks_again() -> bool:
            current = await get_message(client, session_id, message.message_id)
            return current.state == INPUT_REQUIRED and len(current.input_request_ids) == 2

        await eventually(asks_again)
        waiting = await get_message(client, session_id, message.message_id)
        second = waiting.input_request_ids[1]
        assert "crm.delete_accounts" in waiting.state_reason
        assert await pending_ids(client) == [second]
        assert (await get_session(client, session_id)).status == PAUSED

        await resolve(client, second, decision=DENY, reason="keep the accounts")
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert artifact_texts(done) == [
            "crm.delete_records: approved",
            "crm.delete_accounts: denied (keep the accounts)",
        ]
        assert list(done.input_request_ids) == [first, second]
        assert (await get_session(client, session_id)).status == ACTIVE


async def test_the_lowest_priority_number_wins_and_policies_match_by_agent_type() -> None:
    policies = [
        DELETES,  # priority 100
        {
            "name": "trusted",
            "match": {"tool": "crm.delete_*", "agent_type": "trusted-crm"},
            "enforcement": "allow",
            "priority": 10,
        },
        {
            "name": "rogue",
            "match": {"tool": "crm.delete_*", "agent_type": "rogue-crm"},
            "enforcement": "block",
            "priority": 200,
        },
    ]
    trusted, rogue = ToolAgent(), ToolAgent()
    async with (
        running_server(policies=policies) as client,
        crm_agent(client),
        running_agent(client, trusted, agent_type="trusted-crm", instance_id="t-1"),
        running_agent(client, rogue, agent_type="rogue-crm", instance_id="r-1"),
    ):
        session_id = await new_session(client)
        allowed = await send(client, session_id, *tool_calls(DELETE_RECORDS, to="trusted-crm"))
        assert allowed.state == COMPLETED, allowed.state_reason
        assert trusted.answers[-1].resolved_by == "policy:trusted"

        for agent_type in ("crm", "rogue-crm"):  # 'deletes' (100) beats 'rogue' (200)
            asked = await send(client, session_id, *tool_calls(DELETE_RECORDS, to=agent_type))
            assert asked.state == INPUT_REQUIRED, (agent_type, asked.state_reason)
        listed = (await pending(client, session_id)).requests
        assert [(r.tool_call.agent_type, r.policy) for r in listed] == [
            ("crm", "deletes"),
            ("rogue-crm", "deletes"),
        ]
        assert rogue.answers == []


async def test_the_dispatch_timeout_does_not_run_while_a_human_thinks() -> None:
    async with (
        running_server(policies=[DELETES], dispatch={"timeout_ms": 200}) as client,
        crm_agent(client) as tool,
    ):
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS)
        await asyncio.sleep(0.4)  # twice the dispatch timeout
        assert (await get_message(client, session_id, message.message_id)).state == INPUT_REQUIRED
        await resolve(client, message.input_request_ids[0], decision=APPROVE)
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED, FAILED)
        assert done.state == COMPLETED, done.state_reason
        assert tool.approved == [True]


# --- known bugs ----------------------------------------------------------------------------------


async def test_confirming_for_the_session_does_not_bypass_a_policys_approvers() -> None:
    guarded = {**DELETES, "approvers": ["acme-admin"]}
    confirm = ConfirmAgent("crm.delete_records", {"ids": ["r1"]})
    async with (
        running_server(policies=[guarded]) as client,
        running_agent(client, confirm, agent_type="payments", instance_id="p-1"),
        crm_agent(client) as tool,
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "confirm it", data({"target_agent": "payments"}))
        [request_id] = message.input_request_ids
        # acme-full, who may not approve 'deletes', answers the agent's own confirmation "for the session".
        with contextlib.suppress(aio.AioRpcError):
            await resolve(client, request_id, decision=FOR_SESSION)
        if await pending_ids(client) == [request_id]:  # refused: confirm it plainly instead
            await resolve(client, request_id, confirmed=True)
        await wait_for_state(client, session_id, message.message_id, COMPLETED)

        gated = await ask_tools(client, session_id, DELETE_RECORDS)
        assert gated.state == INPUT_REQUIRED, (gated.state_reason, tool.answers)


async def test_an_answer_after_the_ttl_is_refused_even_before_the_expiry_timer_runs() -> None:
    clock = real_time_clock()
    async with (
        running_server(policies=[DELETES], clock=clock, input_request_ttl_ms=60_000) as client,
        crm_agent(client) as tool,
    ):
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS)
        clock.advance(61)  # past expires_at; the expiry timer has not run
        code, reason, _, _ = await refused(resolve(client, message.input_request_ids[0], decision=APPROVE))
        assert (code, reason) == (grpc.StatusCode.ABORTED, "INPUT_ALREADY_RESOLVED")
        assert tool.answers == []


async def test_a_session_chat_cannot_answer_another_sessions_request() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client) as tool:
        here, there = await new_session(client), await new_session(client)
        message = await ask_tools(client, there, DELETE_RECORDS)
        [request_id] = message.input_request_ids
        async with chatting(client, here) as chat:
            chat.resolve(request_id, decision=APPROVE)
            chat.resolve("inp_missing", decision=APPROVE)  # always an error: marks the end of the first
            errors = [await chat.error()]
            if errors[0].message.find("inp_missing") < 0:
                errors.append(await chat.error())
        assert await pending_ids(client, there) == [request_id]
        assert len(errors) == 2, errors
        assert tool.answers == []


async def test_a_plan_scope_block_policy_stops_the_plan() -> None:
    block = {
        "name": "no-echo-plans",
        "scope": "plan",
        "match": {"agent_type": "echo"},
        "enforcement": "block",
    }
    steps = StepRecorder()
    async with running_server(policies=[block]) as client, running_agent(client, steps, instance_id="echo-1"):
        session_id = await new_session(client)
        message = await send(client, session_id, "do the plan", PLAN)
        assert message.state in (REJECTED, FAILED), message.state_reason
        assert "no-echo-plans" in message.state_reason
        assert steps.texts == []


async def test_yolo_mode_signs_off_a_plan_that_needs_approval() -> None:
    steps = StepRecorder()
    async with running_server(policies=[PLANS]) as client, running_agent(client, steps, instance_id="echo-1"):
        session_id = await new_session(client)
        message = await send(client, session_id, "do the plan", PLAN, data({"yolo_mode": True}))
        assert message.state == COMPLETED, message.state_reason
        assert steps.texts == ["step one", "step two"]


async def test_converse_names_the_offending_field_of_a_resolution_by_its_path_in_the_request() -> None:
    async with running_server(policies=[DELETES]) as client, crm_agent(client):
        session_id = await new_session(client)
        message = await ask_tools(client, session_id, DELETE_RECORDS)
        [request_id] = message.input_request_ids
        async with chatting(client, session_id) as chat:
            chat.resolve(request_id, decision=99)
            error = await chat.error()
            assert error.field == "resolve.resolution.decision"
            assert (error.action, error.subject_id) == ("resolve", request_id)
            chat.resolve(request_id, decision=DENY)
            assert (await chat.error()).field == "resolve.resolution.reason"


async def test_an_agent_that_leaves_while_a_human_thinks_gets_the_answer_when_it_is_back() -> None:
    # found from outside: the agent's stream dropping (its process restarted, or the replica
    # holding it stopped for a deploy) failed the message and withdrew the approval
    runs: list[bool] = []

    async def deleting(dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval("crm.delete_records", {"ids": [7]})
        runs.append(approved)
        await reply.artifact(f"approved: {approved}")
        await reply.complete()

    async with running_server(policies=[DELETES]) as client:
        async with running_agent(client, deleting, agent_type="crm", instance_id="crm-1"):
            session_id = await new_session(client)
            asked = await send(client, session_id, "clean up", data({"target_agent": "crm"}))
            assert asked.state == INPUT_REQUIRED, asked.state_reason
            (request_id,) = asked.input_request_ids
        await asyncio.sleep(0.3)  # the agent is gone, its stream closed
        waiting = await get_message(client, session_id, asked.message_id)
        assert waiting.state == INPUT_REQUIRED, waiting.state_reason
        assert await pending_ids(client) == [request_id]  # the approval is still asked
        async with running_agent(client, deleting, agent_type="crm", instance_id="crm-1"):
            await resolve(client, request_id, decision=APPROVE)
            done = await wait_for_state(client, session_id, asked.message_id, COMPLETED, FAILED)
        assert done.state == COMPLETED, done.state_reason
        assert artifact_texts(done) == ["approved: True"]
        assert runs == [True]  # the agent back got the answer with the message, and did it once


# --- sizes: what a human or an agent sends stays readable by every default client ---------------


async def test_oversized_answers_and_reasons_are_refused_naming_the_field() -> None:
    # found from outside: a 2.5 MB form answer dropped the agent's stream (failing another session's
    # work on it), and after a 1 MB denial every later answer got RESOURCE_EXHAUSTED instead of who won
    form = FormAgent("Export settings", [pb.FormField(name="name", label="Name", type="textarea")])
    async with (
        running_server() as client,
        running_agent(client, form, agent_type="exporter", instance_id="exp-1"),
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "export", data({"target_agent": "exporter"}))
        [request_id] = message.input_request_ids
        for answer, field in (
            ({"values": {"name": "x" * 600_000}}, "resolution.values"),
            ({"values": {"name": "ok"}, "reason": "r" * 5000}, "resolution.reason"),
        ):
            with pytest.raises(aio.AioRpcError) as refused:
                await resolve(client, request_id, **answer)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_details(refused)[1] == field
        assert await pending_ids(client, session_id) == [request_id]  # nothing of it was kept
        await resolve(client, request_id, values={"name": "n" * 400_000})  # big, within bounds
        ended = await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert ended.ByteSize() < 4 * 1024 * 1024
        with pytest.raises(aio.AioRpcError) as lost:  # a later answer is told who won, readably
            await resolve(client, request_id, values={"name": "again"})
        assert lost.value.code() == grpc.StatusCode.ABORTED

        asking = await send(client, session_id, "export", data({"target_agent": "exporter"}))
        with pytest.raises(aio.AioRpcError) as long_cancel:
            await cancel_message(client, session_id, asking.message_id, "c" * 2000)
        assert long_cancel.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(long_cancel)[1] == "reason"


async def test_an_agents_oversized_request_or_reason_fails_its_work_not_the_queue() -> None:
    # found from outside: 1 MB forms made the tenant's whole ListPendingInputs unreadable, and a 3.9 MB
    # failure reason cut every watcher of the session at that event
    huge_form = [pb.FormField(name=f"f{n}", label="l" * 1000, type="text") for n in range(1000)]

    async def agent(dispatch: Dispatch, reply: Reply) -> None:
        if "form" in dispatch.text:
            await reply.ask_form("Huge", huge_form)
        else:
            await reply.fail("e" * 10_000)

    async with running_server() as client, running_agent(client, agent, agent_type="big", instance_id="b-1"):
        session_id = await new_session(client)
        asked = await send(client, session_id, "form", data({"target_agent": "big"}))
        assert asked.state == FAILED and "input_request" in asked.state_reason, asked.state_reason
        assert await pending_ids(client) == []
        failed = await send(client, session_id, "fail", data({"target_agent": "big"}))
        assert failed.state == FAILED and "update.reason" in failed.state_reason
        assert len(failed.state_reason) < 1000


async def test_a_page_of_large_pending_requests_ends_early_and_pages_through_them_all() -> None:
    fields = [pb.FormField(name=f"f{n}", label="l" * 1000, type="text") for n in range(200)]  # ~210 KB
    forms = [FormAgent("Large", fields) for _ in range(12)]
    async with running_server() as client, contextlib.AsyncExitStack() as stack:
        for n, form in enumerate(forms):
            await stack.enter_async_context(
                running_agent(client, form, agent_type=f"l{n}", instance_id=f"l-{n}")
            )
        asked = []
        for n in range(12):
            session_id = await new_session(client)
            message = await send(client, session_id, "go", data({"target_agent": f"l{n}"}))
            assert message.state == INPUT_REQUIRED, message.state_reason
            asked += list(message.input_request_ids)
        seen: list[str] = []
        token, pages = "", 0
        for _ in range(12):
            page = await pending(client, page_size=50, page_token=token)
            assert page.ByteSize() < 4 * 1024 * 1024
            seen += [r.request_id for r in page.requests]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == asked and pages > 1
