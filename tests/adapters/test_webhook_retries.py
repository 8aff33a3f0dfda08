"""A webhook caller that retries its answer (its response got lost) hears the same thing each time.

Against the real server with both adapters on, on both stores: the same callback
token with the same answer gets the first success again, marked ``"repeat": true``,
however the retry is timed (at once, racing the first, after the adapter heard of
the outcome, after a restart); an answer that lost gets 409 naming the winner.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from svantic_grpc.core.inputs.model import InputState, Surface
from tests.adapters.e2e_support import ApprovalAgent, Surfaces, surfaces
from tests.agents_inputs import ConfirmAgent

GRPC_USER = "acme-full"  # the subject of the test client's token


TOKEN_KEY = {"callback_token_key_env": "HOOK_TOKEN_KEY"}


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory" if request.param == "memory" else f"sqlite:///{tmp_path / 'mesh.db'}"


async def _asked(s: Surfaces) -> tuple[str, str, str, str]:
    """(session, message, request, callback token) of a fresh approval."""
    session_id, message_id, request_id = await s.ask()
    token = (await s.notification(request_id))["callback"]["token"]
    return session_id, message_id, request_id, token


def _won(status: int, body: dict[str, Any], responder: str) -> bool:
    assert status == 200, body
    resolution = body["request"]["resolution"]
    return (resolution["resolved_by"], resolution["surface"]) == (responder, "webhook")


@pytest.mark.parametrize("key", [False, True], ids=["key-in-memory", "key-from-env"])
async def test_a_retried_answer_hears_it_won_every_time(store: str, key: bool) -> None:
    agent = ApprovalAgent()
    async with surfaces(agent, store=store, webhook=TOKEN_KEY if key else None) as s:
        session_id, message_id, request_id, token = await _asked(s)

        status, first = await s.hook_token(token, responder="ops@acme")
        assert _won(status, first, "ops@acme") and not first.get("repeat")

        status, again = await s.hook_token(token, responder="ops@acme")  # at once
        assert _won(status, again, "ops@acme") and again["repeat"] is True
        assert again["request"] == first["request"]

        await s.notification(request_id, "input.resolved")  # the adapter has heard of the outcome
        await s.finished(session_id, message_id)
        status, late = await s.hook_token(token, responder="ops@acme")
        assert _won(status, late, "ops@acme") and late["repeat"] is True
        assert late["request"] == first["request"]

        assert agent.decisions[session_id] == [True]  # the agent heard one answer
        assert len(await s.audit(request_id)) == 1


async def test_copies_racing_each_other_all_hear_they_won(store: str) -> None:
    agent = ApprovalAgent()
    async with surfaces(agent, store=store) as s:
        session_id, message_id, request_id, token = await _asked(s)

        answers = await asyncio.gather(*(s.hook_token(token, responder="ops@acme") for _ in range(5)))

        assert all(_won(status, body, "ops@acme") for status, body in answers), answers
        assert sorted(body["repeat"] for _, body in answers) == [False, True, True, True, True]
        await s.finished(session_id, message_id)
        assert agent.decisions[session_id] == [True]
        assert len(await s.audit(request_id)) == 1


async def test_a_retry_of_an_answer_that_lost_is_told_who_won(store: str) -> None:
    agent = ApprovalAgent()
    async with surfaces(agent, store=store) as s:
        _, _, request_id, token = await _asked(s)
        await s.resolve_grpc(request_id)

        for _ in range(2):  # before and after the adapter hears of the outcome
            status, body = await s.hook_token(token, responder="ops@acme")
            assert (status, body["error"]["reason"]) == (409, "INPUT_ALREADY_RESOLVED")
            assert f"{GRPC_USER} via grpc" in body["error"]["message"]
            await s.notification(request_id, "input.resolved")


async def test_after_a_restart_a_retry_still_hears_it_won(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mesh.db'}"
    async with surfaces(ApprovalAgent(), store=store, webhook=TOKEN_KEY) as s:
        session_id, message_id, request_id, token = await _asked(s)
        status, first = await s.hook_token(token, responder="ops@acme")  # its response gets lost
        assert _won(status, first, "ops@acme")
        await s.finished(session_id, message_id)

    async with surfaces(store=store, webhook=TOKEN_KEY) as s:
        status, again = await s.hook_token(token, responder="ops@acme")
        assert _won(status, again, "ops@acme") and again["repeat"] is True
        assert again["request"]["resolution"] == first["request"]["resolution"]
        record = await s.record(request_id)
        assert record.state is InputState.RESOLVED and record.resolution is not None
        assert record.resolution.surface is Surface.WEBHOOK
        assert len(await s.audit(request_id)) == 1


async def test_a_body_nested_too_deeply_is_refused_400_and_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = ApprovalAgent()
    async with surfaces(agent) as s:
        session_id, _, request_id, token = await _asked(s)
        abyss = '{"a":' * 100_000 + "1" + "}" * 100_000  # no secret, no token: nobody is asked
        deep: Any = 1
        for _ in range(17):
            deep = {"a": deep}
        with caplog.at_level(logging.WARNING):
            status, body = await s.hook(abyss)
            assert (status, body["error"]["reason"]) == (400, "MALFORMED_JSON")
            status, body = await s.hook(json.dumps({"callback_token": token, "decision": "approve", **deep}))
            assert (status, body["error"]["reason"]) == (400, "MALFORMED_JSON")
            assert "16 levels" in body["error"]["message"]
        assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]
        assert await s.pending_ids(session_id) == [request_id]  # nothing was answered


def _credential(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()


@pytest.mark.parametrize("then", ["answered-by-grpc", "still-pending"])
async def test_a_claim_left_by_a_crash_before_the_answer_landed_claims_nothing(store: str, then: str) -> None:
    """A crash between recording the claim and the mesh taking the answer leaves a claim behind."""
    agent = ApprovalAgent()
    async with surfaces(agent, store=store) as s:
        session_id, message_id, request_id, token = await _asked(s)
        left = {"by": _credential(token), "answer": "whatever it was", "responder": "ops@acme"}
        await s.client.server.mesh.store.put_adapter_value("webhook", f"answered/acme/{request_id}", left)

        if then == "answered-by-grpc":
            await s.resolve_grpc(request_id)
            status, body = await s.hook_token(token, responder="ops@acme")
            assert (status, body["error"]["reason"]) == (409, "INPUT_ALREADY_RESOLVED")
            assert f"{GRPC_USER} via grpc" in body["error"]["message"]
        else:
            status, body = await s.hook_token(token, responder="ops@acme")
            assert _won(status, body, "ops@acme") and body["repeat"] is False
            status, body = await s.hook_token(token, responder="ops@acme")
            assert _won(status, body, "ops@acme") and body["repeat"] is True
        await s.finished(session_id, message_id)


@pytest.mark.parametrize("kind", ["approval", "confirmation"])
@pytest.mark.parametrize("record", ["overwritten", "let-go"])
async def test_the_winning_answer_hears_it_won_whatever_became_of_its_claim(
    store: str, record: str, kind: str
) -> None:
    """Found from outside (review 7, W5): two replicas took over a dead one's claim at once (approve
    and deny, with one callback token): the approval won, the denial's replica had overwritten the
    claim with its own and, refused, let it go; the sender's retry of the approval that won then got
    409, told it had lost. What the mesh stored says what won."""
    # A confirmation answered "approve" is stored as confirmed: the retry is compared with what the
    # mesh stored, as the mesh stores it (code review K5).
    agent = ApprovalAgent() if kind == "approval" else ConfirmAgent("crm.delete_records", {"ids": [1]})
    async with surfaces(agent, store=store) as s:
        session_id, message_id, request_id, token = await _asked(s)
        status, first = await s.hook_token(token, responder="ops@acme")
        assert _won(status, first, "ops@acme")
        key = f"answered/acme/{request_id}"
        kept = s.client.server.mesh.store
        if record == "overwritten":  # the losing replica's claim, over the winner's
            denial = {"by": _credential(token), "answer": "the denial's fingerprint", "responder": "ops@acme"}
            await kept.put_adapter_value("webhook", key, denial)
        else:
            await kept.delete_adapter_value("webhook", key)
        status, again = await s.hook_token(token, responder="ops@acme")
        assert _won(status, again, "ops@acme") and again["repeat"] is True, again
        status, body = await s.hook_token(token, responder="ops@acme", decision="deny")
        assert status == 409, body  # another answer still hears it lost
        await s.finished(session_id, message_id)
