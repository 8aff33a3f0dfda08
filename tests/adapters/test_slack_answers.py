"""What a Slack user is told when their answer is not the one that counts, and bad bodies at the door.

Against the real server with both adapters on, the fake Slack Web API on loopback and
correctly signed interactions: a modal submitted for a request someone else already
answered says so in the modal itself (the winner named as Slack shows people: a
mention for a Slack user, the surface and name otherwise); a losing click gets an
ephemeral naming the winner the same way. Unsigned bodies are refused before they
are read; signed but malformed ones get 400 and no traceback in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from google.protobuf import struct_pb2
from slack_sdk.signature import SignatureVerifier

import adapters.slack as slack_adapter
import tests.adapters.test_slack as unit
from svantic_grpc.core.inputs.model import Decision, InputKind, InputState, Resolution, Surface
from tests.adapters.e2e_support import (
    CHANNEL,
    SLACK_SIGNING_SECRET,
    ApprovalAgent,
    FormAgent,
    Surfaces,
    block_actions,
    form_field,
    surfaces,
    until,
)

GRPC_USER = "acme-full"  # the subject of the test client's token
REASON = {"reason": {"value": {"type": "plain_text_input", "value": "not on a Friday"}}}


async def post_slack(
    s: Surfaces, body: str, *, signed: bool = True, content_type: str = "application/x-www-form-urlencoded"
) -> tuple[int, str]:
    """POST ``body`` to the Slack endpoint (v0-signed unless ``signed`` is false); (status, text)."""
    timestamp = str(int(time.time()))
    headers = {"Content-Type": content_type, "X-Slack-Request-Timestamp": timestamp}
    if signed:
        signature = SignatureVerifier(SLACK_SIGNING_SECRET).generate_signature(timestamp=timestamp, body=body)
        headers["X-Slack-Signature"] = signature or ""
    async with s.http.post(s.base + "/webhooks/receive/slack", data=body.encode(), headers=headers) as r:
        return r.status, await r.text()


async def interact(s: Surfaces, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A signed interaction; (status, the ack's JSON body, {} when empty)."""
    status, text = await post_slack(s, urlencode({"payload": json.dumps(payload)}))
    return status, json.loads(text) if text else {}


async def open_deny(s: Surfaces, request_id: str, user: str = "U1") -> dict[str, Any]:
    """Click Deny; the modal the adapter opened."""
    assert await s.click(request_id, "deny", user=user) == 200
    opened = await until(lambda: s.slack.of("views.open"), "the Deny modal")
    return dict(opened[-1]["view"])


def submission(view: dict[str, Any], values: dict[str, Any], user: str = "U1") -> dict[str, Any]:
    return {
        "type": "view_submission",
        "team": {"id": "T1"},
        "user": {"id": user, "team_id": "T1"},
        "api_app_id": "A1",
        "view": {
            "id": "V1",
            "type": "modal",
            "callback_id": view["callback_id"],
            "private_metadata": view["private_metadata"],
            "state": {"values": values},
        },
    }


def shown(ack: dict[str, Any]) -> str:
    """The text of the view an ack replaced the modal with."""
    assert ack.get("response_action") == "update", ack
    return json.dumps(ack["view"]["blocks"])


async def test_a_deny_modal_that_lost_to_grpc_says_so_in_the_modal() -> None:
    async with surfaces(ApprovalAgent()) as s:
        session_id, message_id, request_id = await s.ask()
        await s.slack_post(request_id)
        view = await open_deny(s, request_id)
        await s.resolve_grpc(request_id)  # while the modal is open

        status, ack = await interact(s, submission(view, REASON))

        assert status == 200
        text = shown(ack)
        assert "Not recorded: this request was already answered" in text
        assert f"Approved by `{GRPC_USER}` via grpc" in text
        record = await s.record(request_id)
        assert record.resolution is not None and record.resolution.surface is Surface.GRPC
        await s.finished(session_id, message_id)
        await s.slack_update(request_id)
        assert s.ephemerals("U1") == []  # told once, in the modal; no note later


async def test_a_deny_modal_that_lost_to_another_slack_user_names_them_as_a_mention() -> None:
    async with surfaces(ApprovalAgent()) as s:
        _, _, request_id = await s.ask()
        await s.slack_post(request_id)
        view = await open_deny(s, request_id, user="U1")
        assert await s.click(request_id, "approve", user="U2") == 200
        await until(lambda: s.slack_updates(request_id), "the outcome in Slack")

        status, ack = await interact(s, submission(view, REASON, user="U1"))

        assert status == 200 and "Approved by <@U2> via slack" in shown(ack)
        assert "slack:U2" not in shown(ack)


async def test_a_deny_modal_that_wins_closes_and_denies() -> None:
    async with surfaces(ApprovalAgent()) as s:
        session_id, message_id, request_id = await s.ask()
        await s.slack_post(request_id)
        view = await open_deny(s, request_id)

        status, ack = await interact(s, submission(view, REASON))

        assert (status, ack) == (200, {})  # the modal closes
        record = await s.record(request_id)
        assert record.resolution is not None and record.resolution.decision is Decision.DENY
        assert (record.resolution.resolved_by, record.resolution.reason) == ("slack:U1", "not on a Friday")
        await s.finished(session_id, message_id)


async def test_a_losing_click_names_a_slack_winner_as_a_mention() -> None:
    async with surfaces(ApprovalAgent()) as s:
        _, _, request_id = await s.ask()
        await s.slack_post(request_id)
        assert await s.click(request_id, "approve", user="U2") == 200
        await until(lambda: s.slack_updates(request_id), "the outcome in Slack")

        assert await s.click(request_id, "approve", user="U1") == 200

        (told,) = await until(lambda: s.ephemerals("U1"), "the ephemeral to U1")
        assert told.startswith("Not recorded: this request was already answered.")
        assert "Approved by <@U2> via slack" in told
        record = await s.record(request_id)
        assert record.state is InputState.RESOLVED and record.resolution is not None
        assert record.resolution.resolved_by == "slack:U2"


async def test_a_click_slack_delivers_again_is_the_answer_recorded_not_a_lost_one() -> None:
    # found from outside: Slack's retry of a click (X-Slack-Retry-Num) told the clicker that their
    # own answer was "Not recorded: this request was already answered ... by <@U1>"
    async with surfaces(ApprovalAgent()) as s:
        _, _, request_id = await s.ask()
        await s.slack_post(request_id)
        assert await s.click(request_id, "approve", user="U1") == 200
        await until(lambda: s.slack_updates(request_id), "the outcome in Slack")
        assert await s.click(request_id, "approve", user="U1") == 200  # delivered again
        assert await s.click(request_id, "approve_for_session", user="U1") == 200  # another answer
        (told,) = await until(lambda: s.ephemerals("U1"), "the ephemeral to U1")
        assert told.startswith("Not recorded: this request was already answered.")  # only that one
        await asyncio.sleep(0.1)
        assert len(s.ephemerals("U1")) == 1
        record = await s.record(request_id)
        assert record.resolution is not None and record.resolution.resolved_by == "slack:U1"
        assert len(await s.audit(request_id)) == 1


# ---------------------------------------------------------------- bad bodies at the door


async def test_an_unsigned_body_is_refused_before_it_is_read(caplog: pytest.LogCaptureFixture) -> None:
    async with surfaces() as s:
        with caplog.at_level(logging.INFO):
            status, _ = await post_slack(s, "payload=%7Bnot-json", signed=False)
        assert status == 401
        assert not [r for r in caplog.records if r.exc_info]


def _click_payload(**changes: Any) -> dict[str, Any]:
    value = json.dumps({"tenant_id": "acme", "request_id": "inp_x"})
    payload = block_actions("approve", value, user="U1", channel=CHANNEL)
    for key, value in changes.items():
        if value is None:
            payload.pop(key)
        else:
            payload[key] = value
    return payload


def _view_payload(view: dict[str, Any]) -> dict[str, Any]:
    return {"type": "view_submission", "user": {"id": "U1"}, "view": view}


MALFORMED = {
    "not-json": "payload=%7Bnot-json",
    "not-an-object": "payload=" + quote("[1, 2]"),
    "json-not-json": "{not json",
    "not-utf8": "payload=%FF%FE",
    "click-without-user": urlencode({"payload": json.dumps(_click_payload(user=None))}),
    "click-user-not-an-object": urlencode({"payload": json.dumps(_click_payload(user="U1"))}),
    "click-actions-not-a-list": urlencode({"payload": json.dumps(_click_payload(actions="approve"))}),
    "click-value-not-json": urlencode(
        {"payload": json.dumps(_click_payload(actions=[{"action_id": "svantic.approve", "value": "{"}]))}
    ),
    "click-value-without-request": urlencode(
        {
            "payload": json.dumps(
                _click_payload(actions=[{"action_id": "svantic.approve", "value": '{"tenant_id": "acme"}'}])
            )
        }
    ),
    "submission-without-metadata": urlencode(
        {"payload": json.dumps(_view_payload({"callback_id": "svantic.deny", "state": {"values": {}}}))}
    ),
    "submission-without-state": urlencode(
        {
            "payload": json.dumps(
                _view_payload(
                    {
                        "callback_id": "svantic.deny",
                        "private_metadata": json.dumps({"tenant_id": "acme", "request_id": "inp_x"}),
                    }
                )
            )
        }
    ),
    "submission-view-not-an-object": urlencode({"payload": json.dumps(_view_payload("V1"))}),  # type: ignore[arg-type]
    "deeply-nested": "payload=" + quote("[" * 100_000 + "]" * 100_000),
}


@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_a_signed_malformed_body_gets_400_and_no_traceback(
    body: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with surfaces() as s:
        with caplog.at_level(logging.INFO):
            status, text = await post_slack(s, body)
        assert status == 400, text
        assert "malformed interaction" in text
        assert not [r for r in caplog.records if r.exc_info], caplog.text
        assert s.slack.of("chat.postEphemeral") == []


ODD = {
    "no-actions": {"type": "block_actions", "actions": [], "user": {"id": "U1"}},
    "suggestion-with-a-number-id": {"type": "block_suggestion", "action_id": 3},
    "other-modal-without-type": {"type": "view_submission", "view": {"callback_id": "theirs"}},
    "shortcut": {"type": "shortcut", "callback_id": 3},
    "slash-command": {"command": 3, "text": 3},
}


@pytest.mark.parametrize("payload", list(ODD.values()), ids=list(ODD))
async def test_signed_interactions_of_other_kinds_get_4xx_and_no_traceback(
    payload: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async with surfaces() as s:
        with caplog.at_level(logging.INFO):
            for body in (urlencode({"payload": json.dumps(payload)}), json.dumps(payload)):
                status, text = await post_slack(s, body)
                assert status in (400, 404), text
        assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_odd_parts_the_adapter_does_not_read_do_not_break_a_click(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with surfaces(ApprovalAgent()) as s:
        session_id, message_id, request_id = await s.ask()
        posted = await s.slack_post(request_id)
        value = next(e["value"] for b in posted["blocks"] if b["type"] == "actions" for e in b["elements"])
        payload = block_actions("approve", value, user="U1", channel=CHANNEL)
        payload |= {"team": 3, "authorizations": "x", "enterprise": 5}
        with caplog.at_level(logging.INFO):
            status, _ = await interact(s, payload)
        assert status == 200
        await until(lambda: s.slack_updates(request_id), "the outcome in Slack")
        record = await s.record(request_id)
        assert record.resolution is not None and record.resolution.resolved_by == "slack:U1"
        await s.finished(session_id, message_id)
        assert not [r for r in caplog.records if r.exc_info], caplog.text


# ---------------------------------------------------------------- forms


def _profile_agent() -> FormAgent:
    return FormAgent(
        [form_field("name", "Name", required=True), form_field("note", "Note")],
    )


async def _open_form(s: Surfaces, request_id: str) -> dict[str, Any]:
    await s.slack_post(request_id)
    assert await s.click(request_id, "fill") == 200
    opened = await until(lambda: s.slack.of("views.open"), "the form modal")
    return dict(opened[-1]["view"])


def answer_values(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _entered(name: str | None, note: str | None = None) -> dict[str, Any]:
    return {
        "f0": {"value": {"type": "plain_text_input", "value": name}},
        "f1": {"value": {"type": "plain_text_input", "value": note}},
    }


async def test_a_form_modal_that_lost_says_so_in_the_modal() -> None:
    async with surfaces(_profile_agent()) as s:
        session_id, message_id, request_id = await s.ask()
        view = await _open_form(s, request_id)
        await s.resolve_grpc(request_id, decision=0, values=answer_values(name="ada"))

        status, ack = await interact(s, submission(view, _entered("grace")))

        assert status == 200
        assert f"Form submitted by `{GRPC_USER}` via grpc" in shown(ack)
        await s.finished(session_id, message_id)


async def test_a_form_value_the_mesh_refuses_is_shown_under_its_input() -> None:
    agent = _profile_agent()
    async with surfaces(agent) as s:
        session_id, message_id, request_id = await s.ask()
        view = await _open_form(s, request_id)

        status, ack = await interact(s, submission(view, _entered(None, "no name")))

        assert status == 200 and ack.get("response_action") == "errors", ack
        assert list(ack["errors"]) == ["f0"] and "required" in ack["errors"]["f0"]
        assert await s.pending_ids(session_id) == [request_id]  # the modal stays open to fix it

        status, ack = await interact(s, submission(view, _entered("ada")))
        assert (status, ack) == (200, {})
        await s.finished(session_id, message_id)
        assert agent.answers == [{"name": "ada"}]


# ---------------------------------------------------------------- a slow mesh


async def test_a_modal_answer_slower_than_slacks_ack_window_reports_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slack gets its ack in time; what the slow answer learned arrives as an ephemeral."""
    monkeypatch.setattr(slack_adapter, "_ACK_WITHIN_S", 0.1)
    async with unit.running() as h:
        request = unit.make_request(InputKind.TOOL_APPROVAL)
        await h.announce(request)
        await h.click(request, "deny", user="U1")
        await until(lambda: h.slack.of("views.open"), "the Deny modal")
        view = h.slack.of("views.open")[0]["view"]
        h.mesh.gate = asyncio.Event()

        async with asyncio.timeout(1):
            assert await h.submit(view, REASON, user="U1") == 200  # acked, the modal closes
        won = replace(
            request,
            state=InputState.RESOLVED,
            resolution=Resolution(decision=Decision.APPROVE, resolved_by="slack:U2", surface=Surface.SLACK),
        )
        h.mesh.requests[(request.tenant_id, request.request_id)] = won  # someone was quicker
        h.mesh.gate.set()

        (told,) = await until(lambda: h.ephemerals("U1"), "the late ephemeral")
        assert told.startswith("Not recorded: this request was already answered.")
        assert "<@U2>" in told


async def test_a_modal_answer_that_fails_says_so_in_the_modal(caplog: pytest.LogCaptureFixture) -> None:
    async with unit.running() as h:
        request = unit.make_request(InputKind.TOOL_APPROVAL)
        await h.announce(request)
        await h.click(request, "deny", user="U1")
        await until(lambda: h.slack.of("views.open"), "the Deny modal")
        view = h.slack.of("views.open")[0]["view"]

        async def broken(**_: Any) -> Any:
            raise RuntimeError("the store is on fire")

        h.mesh.resolve = broken  # type: ignore[method-assign]
        payload = submission(view, REASON)
        body = urlencode({"payload": json.dumps(payload)})
        timestamp = str(int(time.time()))
        signature = SignatureVerifier(unit.SIGNING_SECRET).generate_signature(timestamp=timestamp, body=body)
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Slack-Request-Timestamp": timestamp,
            "X-Slack-Signature": signature or "",
        }
        with caplog.at_level(logging.ERROR):
            async with h.http.post(h.url, data=body, headers=headers) as response:
                assert response.status == 200
                ack = await response.json()
        assert "could not take this answer" in shown(ack)
        assert len([r for r in caplog.records if r.exc_info]) == 1  # logged once, by the adapter
