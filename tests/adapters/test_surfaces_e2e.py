"""End to end: the human-in-the-loop surfaces of a real mesh (SPEC §7-8, issue 4).

A real ``MeshServer`` loads the Slack and webhook adapters from their entry points
and serves them on one HTTP port (``http_address`` 127.0.0.1:0). A real
``ConnectedAgent`` asks approval of ``crm.delete_records``; the ``deletes`` policy
makes that a pending input request. People answer it from Slack (signed
``block_actions`` against a fake Slack Web API), from the webhook (callback token
or Standard Webhooks signature) or over gRPC, and the tests check what each of
them and the agent see. Loopback only; every wait is bounded (see e2e_support).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc import aio

from svantic_grpc.config import SettingsError
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.inputs.model import (
    Decision,
    Form,
    FormField,
    InputKind,
    InputState,
    Resolution,
    Surface,
)
from svantic_grpc.pb import message_types_pb2
from tests._support import code_of, error_details
from tests.adapters.e2e_support import (
    CHANNEL,
    FAILED,
    FORGED,
    HOOK_IN,
    POLICIES,
    TENANT,
    TOOL,
    ApprovalAgent,
    FormAgent,
    Surfaces,
    form_field,
    hanging_server,
    signed_headers,
    surfaces,
    until,
)
from tests.adapters.test_slack_answers import submission
from tests.agents_connected import new_session

T = TypeVar("T")

GRPC_USER = "acme-full"
"""Who a gRPC resolution is recorded as (the token's subject)."""


def action_ids(message: dict[str, Any]) -> list[str]:
    return [e["action_id"] for b in message["blocks"] if b["type"] == "actions" for e in b["elements"]]


def artifacts(message: message_types_pb2.Message) -> list[str]:
    return [p.text for a in message.artifacts for p in a.parts]


def everything_sent_out(s: Surfaces) -> str:
    """Every Slack Web API call's arguments and every webhook delivery, as one text."""
    slack = json.dumps([c.args for c in s.slack.calls])
    hooks = "\n".join(d.body for d in s.receiver.deliveries)
    return slack + "\n" + hooks


async def assert_still_pending(s: Surfaces, session_id: str, request_id: str, agent: ApprovalAgent) -> None:
    assert request_id in await s.pending_ids(session_id)
    record = await s.record(request_id)
    assert record.state is InputState.PENDING and record.resolution is None
    assert await s.audit(request_id) == []
    assert agent.decisions.get(session_id) is None


# ---------------------------------------------------------------- the shared HTTP server


async def test_http_port_zero_serves_both_adapters() -> None:
    async with surfaces() as s:
        assert s.port != 0
        status, body = await s.hook({"decision": "approve"})  # no signature, no token
        assert (status, body["error"]["reason"]) == (401, "UNAUTHENTICATED")
        assert await s.slack_interact({"type": "block_actions"}, secret=FORGED) == 401


async def test_the_callback_url_sent_to_the_receiver_is_where_the_mesh_listens() -> None:
    agent = ApprovalAgent()
    async with surfaces(agent) as s:
        _, _, request_id = await s.ask()
        notification = await s.notification(request_id)
        assert notification["callback"]["url"] == f"{s.base}/webhooks/receive"


# ---------------------------------------------------------------- approved from each surface


async def _approve_from_slack(s: Surfaces, request_id: str, notification: dict[str, Any]) -> tuple[str, str]:
    assert await s.click(request_id, "approve", user="U1") == 200
    return "slack:U1", "<@U1> via slack"


async def _approve_with_token(s: Surfaces, request_id: str, notification: dict[str, Any]) -> tuple[str, str]:
    status, body = await s.hook_token(notification["callback"]["token"], responder="ops@acme")
    assert status == 200, body
    assert body["request"]["resolution"]["surface"] == "webhook"
    return "ops@acme", "`ops@acme` via webhook"


async def _approve_signed(s: Surfaces, request_id: str, notification: dict[str, Any]) -> tuple[str, str]:
    status, body = await s.hook_signed(request_id, responder="hook-bot")
    assert (status, body["status"]) == (200, "resolved"), body
    return "hook-bot", "`hook-bot` via webhook"


async def _approve_grpc(s: Surfaces, request_id: str, notification: dict[str, Any]) -> tuple[str, str]:
    resolved = await s.resolve_grpc(request_id)
    assert resolved.state == message_types_pb2.INPUT_STATE_RESOLVED
    assert resolved.resolution.surface == message_types_pb2.SURFACE_GRPC
    assert resolved.resolution.resolved_by == GRPC_USER
    return GRPC_USER, f"`{GRPC_USER}` via grpc"


@pytest.mark.parametrize(
    ("approve", "surface"),
    [
        (_approve_from_slack, Surface.SLACK),
        (_approve_with_token, Surface.WEBHOOK),
        (_approve_signed, Surface.WEBHOOK),
        (_approve_grpc, Surface.GRPC),
    ],
    ids=["slack", "webhook-callback-token", "webhook-signature", "grpc"],
)
async def test_a_gated_tool_call_approved_from_each_surface(approve: Any, surface: Surface) -> None:
    agent = ApprovalAgent()
    async with surfaces(agent) as s:
        session_id, message_id, request_id = await s.ask()

        # What each surface shows while it waits.
        (pending,) = await s.pending(session_id)
        assert pending.request_id == request_id and pending.policy == "deletes"
        assert pending.tool_call.tool_name == TOOL
        posted = await s.slack_post(request_id)
        assert posted["channel"] == CHANNEL
        assert {c.token for c in s.slack.calls if c.method == "chat.postMessage"} == {"xoxb-test"}
        assert action_ids(posted) == ["svantic.approve", "svantic.approve_for_session", "svantic.deny"]
        for button in (e for b in posted["blocks"] if b["type"] == "actions" for e in b["elements"]):
            assert json.loads(button["value"]) == {"tenant_id": "acme", "request_id": request_id}
        assert TOOL in json.dumps(posted["blocks"])
        notification = await s.notification(request_id)
        assert notification["request"]["tool_call"]["name"] == TOOL
        assert notification["request"]["policy"] == "deletes"
        assert notification["callback"]["token"]

        who, shown = await approve(s, request_id, notification)

        # The agent got the approval, once, and the message completed.
        message = await s.finished(session_id, message_id)
        assert artifacts(message) == ["decision: approved"]
        assert agent.decisions[session_id] == [True]
        assert agent.extra_answers[session_id] == 0
        assert await s.pending_ids() == []
        # The record says who and through which surface.
        record = await s.record(request_id)
        assert record.state is InputState.RESOLVED and record.resolution is not None
        assert (record.resolution.surface, record.resolution.resolved_by) == (surface, who)
        (audit,) = await s.audit(request_id)
        assert (audit.surface, audit.actor, audit.outcome) == (surface.value, who, "approve")
        # Slack's message lost its buttons and says what happened, whichever surface answered.
        update = await s.slack_update(request_id)
        assert update["channel"] == CHANNEL and update["ts"]
        assert action_ids(update) == []
        assert f"Approved by {shown}" in json.dumps(update["blocks"])
        # The receiver was told the outcome.
        resolved = (await s.notification(request_id, "input.resolved"))["request"]
        assert resolved["state"] == "resolved"
        resolution = resolved["resolution"]
        assert (resolution["surface"], resolution["resolved_by"]) == (surface.value, who)
        assert resolution["decision"] == "approve"


async def test_a_denial_reaches_the_agent_and_every_surface() -> None:
    agent = ApprovalAgent()
    async with surfaces(agent) as s:
        session_id, message_id, request_id = await s.ask()
        await s.slack_post(request_id)
        await s.notification(request_id)

        await s.resolve_grpc(request_id, message_types_pb2.DECISION_DENY, reason="not without a backup")

        message = await s.finished(session_id, message_id)
        assert artifacts(message) == ["decision: denied"]
        assert agent.decisions[session_id] == [False]
        update = await s.slack_update(request_id)
        assert action_ids(update) == []
        assert f"Denied by `{GRPC_USER}` via grpc" in json.dumps(update["blocks"])
        assert "not without a backup" in json.dumps(update["blocks"])
        resolution = (await s.notification(request_id, "input.resolved"))["request"]["resolution"]
        assert (resolution["decision"], resolution["reason"]) == ("deny", "not without a backup")


async def test_expiry_updates_slack_and_notifies_the_receiver() -> None:
    agent = ApprovalAgent()
    async with surfaces(agent, input_request_ttl_ms=400) as s:
        session_id, message_id, request_id = await s.ask()
        await s.slack_post(request_id)
        token = (await s.notification(request_id))["callback"]["token"]

        message = await s.finished(session_id, message_id, FAILED)
        assert "expired" in message.state_reason

        record = await s.record(request_id)
        assert record.state is InputState.EXPIRED and record.resolution is None  # never a denial
        (audit,) = await s.audit(request_id)
        assert audit.outcome.startswith("expired") and audit.surface == "mesh"
        assert session_id not in agent.decisions  # its dispatch was withdrawn: no decision, no denial
        update = await s.slack_update(request_id)
        assert action_ids(update) == []
        assert "Expired" in json.dumps(update["blocks"])
        expired = await s.notification(request_id, "input.expired")
        assert expired["request"]["state"] == "expired" and expired["request"]["resolution"] is None
        # Nothing answers it any more.
        status, body = await s.hook_token(token)
        assert (status, body["error"]["reason"]) == (409, "INPUT_ALREADY_RESOLVED")
        status, body = await s.hook_signed(request_id)
        assert (status, body["error"]["reason"]) == (409, "INPUT_ALREADY_RESOLVED")
        assert await s.pending_ids() == []


# ---------------------------------------------------------------- sensitive fields


SECRET_DEFAULT = "hunter2"
SECRET_VALUE = "sk-live-999"
PASSWORD_VALUE = "pw-secret-777"
SENSITIVE_LABEL = "Production API key"


def credentials_form() -> list[message_types_pb2.FormField]:
    return [
        form_field("user", "User name", default="ada-visible"),
        form_field("api_key", SENSITIVE_LABEL, sensitive=True, default=SECRET_DEFAULT),
        form_field("db_password", "Database password", "password", default=SECRET_DEFAULT),
    ]


def answer_values(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


async def _ask_and_answer_credentials(s: Surfaces, agent: FormAgent) -> str:
    """The agent asks the credentials form; answered over gRPC; its request id."""
    session_id, message_id, request_id = await s.ask()
    await s.slack_post(request_id)
    await s.notification(request_id)
    await s.resolve_grpc(
        request_id,
        decision=0,
        values=answer_values(user="ada", api_key=SECRET_VALUE, db_password=PASSWORD_VALUE),
    )
    message = await s.finished(session_id, message_id)
    assert artifacts(message) == ["form: api_key,db_password,user"]
    await s.slack_update(request_id)
    await s.notification(request_id, "input.resolved")
    return request_id


async def test_a_sensitive_form_stays_in_the_mesh_and_only_grpc_answers_it() -> None:
    agent = FormAgent(credentials_form())
    async with surfaces(agent) as s:
        session_id, message_id, request_id = await s.ask()

        # Slack: no buttons, no fields, a pointer to the API or chat.
        posted = await s.slack_post(request_id)
        assert action_ids(posted) == []
        assert "through the API" in json.dumps(posted["blocks"])
        # Webhook: no callback token, a note instead.
        notification = await s.notification(request_id)
        assert notification["callback"] is None and "API or chat" in notification["note"]
        assert notification["request"]["sensitive"] is True

        # The webhook cannot answer it, even correctly signed.
        status, body = await s.hook_signed(request_id, values={"user": "x", "api_key": "y"})
        assert (status, body["error"]["reason"]) == (422, "SENSITIVE_INPUT")
        # Nor can Slack: correctly signed clicks on hand-made buttons get an ephemeral "use the API or chat".
        value = json.dumps({"tenant_id": "acme", "request_id": request_id})
        assert await s.click(request_id, "fill", user="U5", value=value) == 200
        assert await s.click(request_id, "approve", user="U6", value=value) == 200
        (fill_reply,) = await until(lambda: s.ephemerals("U5"), "ephemeral to U5")
        (approve_reply,) = await until(lambda: s.ephemerals("U6"), "ephemeral to U6")
        assert "through the API" in fill_reply
        assert approve_reply.startswith("Not recorded") and "API or the session chat" in approve_reply
        assert s.slack.of("views.open") == []
        assert request_id in await s.pending_ids(session_id)
        assert agent.answers == []

        # gRPC can.
        resolved = await s.resolve_grpc(
            request_id,
            decision=0,
            values=answer_values(user="ada", api_key=SECRET_VALUE, db_password=PASSWORD_VALUE),
        )
        assert resolved.resolution.surface == message_types_pb2.SURFACE_GRPC
        message = await s.finished(session_id, message_id)
        assert artifacts(message) == ["form: api_key,db_password,user"]
        assert agent.answers == [{"user": "ada", "api_key": SECRET_VALUE, "db_password": PASSWORD_VALUE}]
        update = await s.slack_update(request_id)
        assert f"Form submitted by `{GRPC_USER}` via grpc" in json.dumps(update["blocks"])
        await s.notification(request_id, "input.resolved")

        # Nothing secret went out, before or after the answer.
        out = everything_sent_out(s)
        assert SECRET_DEFAULT not in out
        assert SECRET_VALUE not in out
        slack_out = json.dumps([c.args for c in s.slack.calls])
        assert SENSITIVE_LABEL not in slack_out and PASSWORD_VALUE not in slack_out


async def test_a_password_value_never_reaches_the_webhook() -> None:
    agent = FormAgent(credentials_form())
    async with surfaces(agent) as s:
        await _ask_and_answer_credentials(s, agent)
        assert PASSWORD_VALUE not in everything_sent_out(s)


async def test_a_sensitive_fields_label_never_reaches_the_webhook() -> None:
    agent = FormAgent(credentials_form())
    async with surfaces(agent) as s:
        await _ask_and_answer_credentials(s, agent)
        assert SENSITIVE_LABEL not in everything_sent_out(s)


async def test_form_defaults_from_a_connected_agent_reach_the_approval_queue() -> None:
    agent = FormAgent(credentials_form())
    async with surfaces(agent) as s:
        session_id, _, _ = await s.ask()
        (pending,) = await s.pending(session_id)
        user = next(f for f in pending.form.fields if f.name == "user")
        assert user.default_value.string_value == "ada-visible"


async def _raise_form_in_the_core(s: Surfaces, *fields: FormField) -> str:
    """A form request raised by the mesh core itself, with defaults."""
    session_id = await new_session(s.client)
    request = await s.client.server.mesh.inputs.ask(
        tenant_id="acme",
        session_id=session_id,
        message_id="msg-core",
        kind=InputKind.FORM,
        form=Form(title="Database credentials", fields=(FormField("user", default="ada-visible"), *fields)),
    )
    await s.slack_post(request.request_id)
    notification = await s.notification(request.request_id)
    fields_out = {f["name"]: f for f in notification["request"]["form"]["fields"]}
    assert fields_out["user"]["default"] == "ada-visible"  # defaults do reach the receiver
    return request.request_id


async def test_a_sensitive_default_never_leaves_the_mesh() -> None:
    async with surfaces() as s:
        await _raise_form_in_the_core(
            s, FormField("api_key", label=SENSITIVE_LABEL, sensitive=True, default=SECRET_DEFAULT)
        )
        assert SECRET_DEFAULT not in everything_sent_out(s)


async def test_a_password_default_never_leaves_the_mesh() -> None:
    async with surfaces() as s:
        await _raise_form_in_the_core(s, FormField("pw", "password", "Password", default=SECRET_DEFAULT))
        assert SECRET_DEFAULT not in everything_sent_out(s)


# ---------------------------------------------------------------- the race


ROUNDS = 10


@pytest.mark.parametrize("webhook_by", ["callback-token", "signature"])
async def test_grpc_slack_and_webhook_race_exactly_one_wins_and_losers_are_told(webhook_by: str) -> None:
    """Each round, the three surfaces answer one request at once; exactly one wins.

    Every loser is told who won: gRPC by ``ABORTED``, Slack by an ephemeral, the
    webhook by 409, whether it answers by callback token or by signature.
    """
    agent = ApprovalAgent()
    winners: list[Surface] = []
    rng = random.Random(ROUNDS)
    async with surfaces(agent) as s:
        for n in range(ROUNDS):
            agent.hold = asyncio.Event()
            session_id, message_id, request_id = await s.ask()
            value = action_value(await s.slack_post(request_id))
            token = (await s.notification(request_id))["callback"]["token"]
            user = f"U{n}"

            async def grpc_call(request_id: str = request_id) -> Any:
                try:
                    return await s.resolve_grpc(request_id)
                except aio.AioRpcError as error:
                    return error

            hook_call = (
                s.hook_token(token, responder=f"hook-{n}")
                if webhook_by == "callback-token"
                else s.hook_signed(request_id, responder=f"hook-{n}")
            )
            # Each round gives one surface a head start of a few milliseconds (the others still
            # overlap it), so every surface gets to win some rounds and lose others.
            delays = [rng.uniform(0.0, 0.02) for _ in range(3)]
            delays[n % 3] = 0.0
            grpc_got, slack_status, (hook_status, hook_body) = await asyncio.gather(
                after(delays[0], grpc_call()),
                after(delays[1], s.click(request_id, "approve", user=user, value=value)),
                after(delays[2], hook_call),
            )
            assert slack_status == 200  # Slack always gets its ack; the verdict comes as an ephemeral

            record = await s.record(request_id)
            assert record.state is InputState.RESOLVED and record.resolution is not None
            won = record.resolution
            winners.append(won.surface)
            named = f"{won.resolved_by} via {won.surface.value}"

            grpc_won = not isinstance(grpc_got, aio.AioRpcError)
            hook_won = hook_status == 200
            slack_won = won.surface is Surface.SLACK
            assert [grpc_won, slack_won, hook_won].count(True) == 1, (n, grpc_got, hook_status, won)
            assert grpc_won == (won.surface is Surface.GRPC)
            assert hook_won == (won.surface is Surface.WEBHOOK)
            if hook_won:
                assert won.resolved_by == f"hook-{n}"
            if slack_won:
                assert won.resolved_by == f"slack:{user}"
            if grpc_won:
                assert won.resolved_by == GRPC_USER
            # Every loser is told who won.
            if not grpc_won:
                assert code_of(grpc_got) == grpc.StatusCode.ABORTED
                assert error_details(grpc_got)[0] == "INPUT_ALREADY_RESOLVED"
                assert named in grpc_got.details()
            if not hook_won:
                assert hook_status == 409, (n, hook_status, hook_body)
                assert hook_body["error"]["reason"] == "INPUT_ALREADY_RESOLVED"
                assert named in hook_body["error"]["message"]
            if not slack_won:
                (told,) = await until(partial(s.ephemerals, user), f"ephemeral to {user}")
                assert told.startswith("Not recorded") and f"`{won.resolved_by}` via" in told

            # The agent got exactly one decision; the message completes; everyone saw one outcome.
            await until(partial(agent.decisions.get, session_id), "the agent's decision")
            agent.hold.set()
            message = await s.finished(session_id, message_id)
            assert artifacts(message) == ["decision: approved"]
            assert agent.decisions[session_id] == [True]
            assert agent.extra_answers[session_id] == 0
            (audit,) = await s.audit(request_id)
            assert (audit.surface, audit.actor) == (won.surface.value, won.resolved_by)
            update = await s.slack_update(request_id)
            assert action_ids(update) == [] and f"via {won.surface.value}" in json.dumps(update["blocks"])
            resolved = (await s.notification(request_id, "input.resolved"))["request"]["resolution"]
            assert resolved["surface"] == won.surface.value
            if slack_won:
                assert s.ephemerals(user) == []
        await asyncio.sleep(0.05)  # late or duplicate deliveries, if any, would land now
        kinds = [d.payload["type"] for d in s.receiver.deliveries]
        assert sorted(kinds) == ["input.required"] * ROUNDS + ["input.resolved"] * ROUNDS
        assert len(s.slack.of("chat.update")) == ROUNDS
    tally = {surface.value: winners.count(surface) for surface in Surface if surface in winners}
    print(f"race ({webhook_by}) winners: {tally}")


async def after(delay_s: float, call: Awaitable[T]) -> T:
    await asyncio.sleep(delay_s)
    return await call


def action_value(posted: dict[str, Any]) -> str:
    buttons = [e for b in posted["blocks"] if b["type"] == "actions" for e in b["elements"]]
    return str(next(b["value"] for b in buttons if b["action_id"] == "svantic.approve"))


async def test_a_late_callback_token_is_told_who_won() -> None:
    agent = ApprovalAgent()
    async with surfaces(agent) as s:
        _, _, request_id = await s.ask()
        token = (await s.notification(request_id))["callback"]["token"]
        await s.resolve_grpc(request_id)
        await s.notification(request_id, "input.resolved")  # the adapter has heard of the outcome

        status, body = await s.hook_token(token)
        assert (status, body["error"]["reason"]) == (409, "INPUT_ALREADY_RESOLVED")
        assert f"{GRPC_USER} via grpc" in body["error"]["message"]


# ---------------------------------------------------------------- refusals change nothing


async def _forged_slack(s: Surfaces, request_id: str) -> None:
    assert await s.click(request_id, "approve", secret="not-the-signing-secret") == 401


async def _stale_slack(s: Surfaces, request_id: str) -> None:
    assert await s.click(request_id, "approve", age_s=5 * 60 + 30) == 401


async def _forged_webhook(s: Surfaces, request_id: str) -> None:
    status, body = await s.hook_signed(request_id, secret=FORGED)
    assert (status, body["error"]["reason"]) == (401, "BAD_SIGNATURE")


async def _stale_webhook(s: Surfaces, request_id: str) -> None:
    text = json.dumps({"tenant_id": "acme", "request_id": request_id, "decision": "approve"})
    status, body = await s.hook(text, signed_headers(text, HOOK_IN, timestamp=time.time() - 400))
    assert (status, body["error"]["reason"]) == (401, "STALE_TIMESTAMP")


async def _unknown_token(s: Surfaces, request_id: str) -> None:
    status, body = await s.hook_token("not-a-token-we-sent")
    assert (status, body["error"]["reason"]) == (401, "INVALID_CALLBACK_TOKEN")


@pytest.mark.parametrize(
    "refused",
    [_forged_slack, _stale_slack, _forged_webhook, _stale_webhook, _unknown_token],
    ids=[
        "forged-slack-signature",
        "slack-timestamp-over-5-min",
        "forged-webhook-signature",
        "stale-webhook-timestamp",
        "unknown-callback-token",
    ],
)
async def test_a_refused_answer_changes_nothing(refused: Any) -> None:
    agent = ApprovalAgent()
    async with surfaces(agent) as s:
        session_id, message_id, request_id = await s.ask()
        await s.slack_post(request_id)
        await s.notification(request_id)
        slack_calls = len(s.slack.calls)

        await refused(s, request_id)

        await asyncio.sleep(0.05)  # anything the refusal set off would have happened by now
        await assert_still_pending(s, session_id, request_id, agent)
        assert len(s.slack.calls) == slack_calls  # no update, no ephemeral
        assert [d.payload["type"] for d in s.receiver.deliveries] == ["input.required"]
        # And it can still be answered.
        await s.resolve_grpc(request_id)
        await s.finished(session_id, message_id)
        assert agent.decisions[session_id] == [True]


async def test_a_webhook_answer_cannot_speak_for_a_slack_approver() -> None:
    # found from outside: a callback token with "responder": "slack:UBOSS" passed for that Slack
    # user, and the audit said so
    only_boss = [{**POLICIES[0], "approvers": ["slack:UBOSS"]}]
    agent = ApprovalAgent()
    async with surfaces(agent, policies=only_boss) as s:
        session_id, message_id, request_id = await s.ask()
        token = (await s.notification(request_id))["callback"]["token"]
        for answer in (
            s.hook_token(token, responder="slack:UBOSS"),
            s.hook_token(token, responder="x:slack:UBOSS"),  # (found in a second review)
            s.hook_token(token, responder="webhook:slack:UBOSS"),
            s.hook_token(token),
            s.hook_token(token, responder="UBOSS"),
            s.hook_signed(request_id, responder="slack:UBOSS"),
            s.hook_signed(request_id, responder="grpc:acme-full"),
        ):
            status, body = await answer
            assert (status, body["error"]["reason"]) == (403, "RESPONDER_NOT_ALLOWED"), body
        await assert_still_pending(s, session_id, request_id, agent)
        assert await s.audit(request_id) == []
        # The one it names answers from Slack.
        assert await s.click(request_id, user="UBOSS") == 200
        await s.finished(session_id, message_id)
        done = await s.record(request_id)
        assert done.resolution is not None and done.resolution.resolved_by == "slack:UBOSS"
        assert agent.decisions[session_id] == [True]


async def test_an_unqualified_approver_may_answer_through_a_webhook() -> None:
    named = [{**POLICIES[0], "approvers": ["ops@acme"]}]
    agent = ApprovalAgent()
    async with surfaces(agent, policies=named) as s:
        session_id, message_id, request_id = await s.ask()
        token = (await s.notification(request_id))["callback"]["token"]
        status, _ = await s.hook_token(token, responder="ops@acme")
        assert status == 200
        await s.finished(session_id, message_id)
        done = await s.record(request_id)
        assert done.resolution is not None and done.resolution.resolved_by == "ops@acme"


async def test_a_callback_token_reused_for_another_answer_is_refused_and_changes_nothing() -> None:
    agent = ApprovalAgent()
    async with surfaces(agent) as s:
        session_id, message_id, request_id = await s.ask()
        token = (await s.notification(request_id))["callback"]["token"]
        status, _ = await s.hook_token(token, responder="first@acme")
        assert status == 200
        await s.finished(session_id, message_id)
        for _ in range(200):  # the outcome told on both surfaces, and marked told
            before = await s.record(request_id)
            if before.outcome_told:
                break
            await asyncio.sleep(0.01)
        assert before.outcome_told

        status, body = await s.hook_token(token, decision="deny", reason="changed my mind", responder="x")
        assert (status, body["error"]["reason"]) == (409, "INPUT_ALREADY_RESOLVED")
        assert "already answered with this callback credential" in body["error"]["message"]

        assert await s.record(request_id) == before
        assert before.resolution is not None and before.resolution.resolved_by == "first@acme"
        assert len(await s.audit(request_id)) == 1
        assert agent.decisions[session_id] == [True]


# ---------------------------------------------------------------- broken adapters


def closed_port() -> int:
    with socket.socket() as probe:  # nobody listens on it once the probe closes
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    "broken",
    ["slack-500", "slack-hangs", "receiver-down", "receiver-hangs", "slack-500-and-receiver-down"],
)
async def test_a_broken_adapter_never_blocks_the_mesh(broken: str) -> None:
    agent = ApprovalAgent()
    async with AsyncExitStack() as stack:
        hanging = await stack.enter_async_context(hanging_server())
        slack_api = f"{hanging}/api/" if broken == "slack-hangs" else None
        hook_url = {
            "receiver-down": f"http://127.0.0.1:{closed_port()}/hook",
            "slack-500-and-receiver-down": f"http://127.0.0.1:{closed_port()}/hook",
            "receiver-hangs": f"{hanging}/hook",
        }.get(broken)
        s = await stack.enter_async_context(surfaces(agent, hook_url=hook_url, slack_api=slack_api))
        s.slack.failing = broken.startswith("slack-500")
        started = time.monotonic()

        session_id, message_id, request_id = await s.ask()
        assert request_id in await s.pending_ids(session_id)
        await s.resolve_grpc(request_id)

        message = await s.finished(session_id, message_id)
        assert artifacts(message) == ["decision: approved"]
        assert agent.decisions[session_id] == [True]
        assert time.monotonic() - started < 1.5  # no adapter timeout (Slack 10 s, webhook 5 s) was waited on
        if broken.startswith("slack-500"):
            assert s.slack.of("chat.postMessage")  # it was tried, and failed
        # The healthy adapter carries on.
        if broken in ("slack-500", "slack-hangs"):
            assert (await s.notification(request_id, "input.resolved"))["request"]["state"] == "resolved"
        elif broken.startswith("receiver"):
            assert action_ids(await s.slack_update(request_id)) == []


async def test_a_webhook_responder_longer_than_a_name_is_refused_and_changes_nothing() -> None:
    # found from outside: a 5 MB "responder" was kept in the request, its audit entry and its event,
    # and every WatchSession of the session died at that event (over gRPC's 4 MB limit) for good
    agent = ApprovalAgent()
    async with surfaces(agent) as s:
        session_id, message_id, request_id = await s.ask()
        token = (await s.notification(request_id))["callback"]["token"]
        for answer in (
            partial(s.hook_token, token, responder="x" * 100_000),
            partial(s.hook_signed, request_id, responder="y" * 257),
        ):
            status, body = await answer()
            assert (status, body["error"]["field"]) == (422, "responder"), body
            assert "at most 256" in body["error"]["message"]
        await assert_still_pending(s, session_id, request_id, agent)
        assert await s.audit(request_id) == []
        status, _ = await s.hook_token(token, responder="o" * 256)  # the token was not used up
        assert status == 200
        await s.finished(session_id, message_id)
        assert agent.decisions[session_id] == [True]


async def test_the_core_refuses_a_responder_longer_than_a_name_from_any_surface() -> None:
    agent = ApprovalAgent()
    async with surfaces(agent) as s:
        session_id, _, request_id = await s.ask()
        with pytest.raises(InvalidArgument) as refused:
            await s.client.server.mesh.inputs.resolve(
                tenant_id=TENANT,
                request_id=request_id,
                resolution=Resolution(decision=Decision.APPROVE),
                responder="z" * 257,
                surface=Surface.SLACK,
            )
        assert refused.value.field == "responder"
        await assert_still_pending(s, session_id, request_id, agent)


async def test_an_adapter_scoped_to_tenants_neither_shows_nor_answers_another_tenants_requests() -> None:
    # found from outside: every tenant's requests went to the one Slack channel and webhook targets,
    # and whoever answered there answered for every tenant
    agent = ApprovalAgent()
    async with surfaces(agent, tenants={"slack": ["globex"], "webhook": [TENANT]}) as s:
        session_id, message_id, request_id = await s.ask()
        await s.notification(request_id)  # the webhook serves acme: told
        await asyncio.sleep(0.1)
        assert s.slack.of("chat.postMessage") == []  # Slack serves globex only: not shown
        value = json.dumps({"tenant_id": TENANT, "request_id": request_id})
        assert await s.click(request_id, value=value, user="U_GLOBEX") == 200  # a crafted button
        await until(lambda: s.ephemerals("U_GLOBEX"), "the clicker told")
        assert "not found" in s.ephemerals("U_GLOBEX")[0].lower()
        await assert_still_pending(s, session_id, request_id, agent)
        await s.resolve_grpc(request_id)
        await s.finished(session_id, message_id)
        assert agent.decisions[session_id] == [True]


async def test_an_adapters_tenants_must_be_a_list_of_ids() -> None:
    with pytest.raises(SettingsError, match=r"adapters\.slack\.tenants"):
        async with surfaces(tenants={"slack": "acme"}):  # type: ignore[dict-item]
            pass


async def test_an_action_field_is_answered_from_slack_with_the_text_it_names() -> None:
    # found from outside: Slack showed an action field without options as a checkbox, whose True
    # the mesh refuses (an action's value is text, as the console has it): never answerable
    async with surfaces() as s:
        request_id = await _raise_form_in_the_core(s, FormField("go", "action", "Proceed with the migration"))
        assert await s.click(request_id, "fill") == 200
        opened = await until(lambda: s.slack.of("views.open"), "the modal")
        view = opened[0]["view"]
        inputs = [b for b in view["blocks"] if b["type"] == "input"]
        assert [b["element"]["type"] for b in inputs] == ["plain_text_input", "plain_text_input"]
        values = {b["block_id"]: {"value": {"type": "plain_text_input", "value": "yes"}} for b in inputs}
        assert await s.slack_interact(submission(view, values)) == 200
        done = await s.record(request_id)
        assert done.state is InputState.RESOLVED and done.resolution is not None
        assert dict(done.resolution.values) == {"user": "yes", "go": "yes"}


async def test_a_form_too_big_for_a_slack_modal_says_where_to_answer_it() -> None:
    # found from outside: a select of 150 options made a modal Slack refuses (100 at most)
    async with surfaces() as s:
        many = tuple(f"region-{n}" for n in range(150))
        request_id = await _raise_form_in_the_core(s, FormField("region", "select", "Region", options=many))
        posted = await s.slack_post(request_id)
        assert action_ids(posted) == [] and "larger than a Slack modal" in json.dumps(posted["blocks"])


async def test_a_modal_slack_will_not_open_is_said_to_the_clicker() -> None:
    agent = ApprovalAgent()
    async with surfaces(agent) as s:
        session_id, _, request_id = await s.ask()
        s.slack.fail_next("views.open", "expired_trigger_id")
        assert await s.click(request_id, "deny", user="U7") == 200
        told = await until(lambda: s.ephemerals("U7"), "the clicker told")
        assert "could not open" in told[0] and "expired_trigger_id" in told[0]
        await assert_still_pending(s, session_id, request_id, agent)
