"""One approval answered at once on three real replica processes through three surfaces.

Three ``svantic-grpc serve`` processes share one PostgreSQL schema (``test_replica_takeover``'s
``replicas``), each with the Slack adapter (against a fake Slack Web API on loopback) and the
webhook adapter on. An agent connected to r1 asks approval of a tool call; the message is sent
through r2 (handed to r1, the session's owner). Then, at once: a gRPC ``ResolveInput`` on one
replica, a Standard Webhooks-signed POST on another and a Slack button click on the third,
rotating each round. Exactly one wins; the gRPC loser gets ``ABORTED``/``INPUT_ALREADY_RESOLVED``,
the webhook loser 409 with that reason, the Slack loser an ephemeral "was already answered"; the
agent gets one decision, the request one audit record.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import grpc
import pytest
from grpc import aio
from slack_sdk.signature import SignatureVerifier

from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.core.inputs.model import InputState, Surface
from svantic_grpc.pb import message_types_pb2
from svantic_grpc.stores.postgres import PostgresStore
from tests._support import code_of, error_details
from tests.adapters.e2e_support import (
    ARGUMENTS,
    CHANNEL,
    ENV,
    HOOK_IN,
    TOOL,
    adapter_settings,
    block_actions,
    signed_headers,
)
from tests.adapters.fake_slack import FakeSlack, fake_slack
from tests.adapters.webhook_receiver import receiving
from tests.durability.test_replica_takeover import (
    TENANT,
    WAIT,
    Replica,
    _eventually,
    _schema,
    _store,
    replicas,
)

AGENT_TYPE = "crm"
DELETES = {"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"}
ADAPTER_ENV = {k: ENV[k] for k in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "HOOK_OUT", "HOOK_IN")}
ROUNDS = 3


@dataclass
class HeldApproval:
    """Asks approval of ``crm.delete_records``; holds its dispatch open after the decision until
    ``release`` is set, so that a second answer, if any, would be in its queue by then."""

    decisions: dict[str, list[bool]] = field(default_factory=dict)
    extra_answers: dict[str, int] = field(default_factory=dict)
    release: dict[str, asyncio.Event] = field(default_factory=dict)

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval(TOOL, ARGUMENTS)
        self.decisions.setdefault(dispatch.session_id, []).append(approved)
        await asyncio.wait_for(self.release.setdefault(dispatch.session_id, asyncio.Event()).wait(), WAIT)
        self.extra_answers[dispatch.session_id] = reply._answers.qsize()
        await reply.artifact(f"decision: {'approved' if approved else 'denied'}", name="decision")
        await reply.complete()


async def _by_grpc(replica: Replica, request_id: str) -> Any:
    try:
        return await asyncio.wait_for(replica.resolve(request_id), WAIT)
    except aio.AioRpcError as error:
        return error


async def _by_hook(http: aiohttp.ClientSession, replica: Replica, request_id: str) -> tuple[int, Any]:
    body = json.dumps(
        {"tenant_id": TENANT, "request_id": request_id, "decision": "approve", "responder": "hook"}
    )
    url = f"http://{_http(replica)}/webhooks/receive"
    async with http.post(url, data=body, headers=signed_headers(body, HOOK_IN)) as response:
        return response.status, await response.json()


async def _by_slack(http: aiohttp.ClientSession, replica: Replica, request_id: str, user: str) -> int:
    """A click on the request's approve button as Slack sends it (v0-signed); the HTTP status
    (Slack's ack: 200 whether or not the answer counts; a loser is told by an ephemeral)."""
    value = json.dumps({"tenant_id": TENANT, "request_id": request_id})  # as the adapter's buttons carry
    body = urlencode({"payload": json.dumps(block_actions("approve", value, user=user, channel=CHANNEL))})
    timestamp = str(int(time.time()))
    signature = SignatureVerifier(ENV["SLACK_SIGNING_SECRET"]).generate_signature(
        timestamp=timestamp, body=body
    )
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": signature or "",
    }
    url = f"http://{_http(replica)}/webhooks/receive/slack"
    async with http.post(url, data=body, headers=headers) as response:
        return response.status


def _http(replica: Replica) -> str:
    return str(json.loads(replica.settings.read_text())["http_address"])


def _ephemerals(slack: FakeSlack, user: str) -> list[str]:
    return [a["text"] for a in slack.of("chat.postEphemeral") if a.get("user") == user]


@pytest.mark.timeout(150)
async def test_one_approval_raced_on_three_replica_processes_through_three_surfaces(tmp_path: Path) -> None:
    async with fake_slack() as slack, receiving() as receiver, aiohttp.ClientSession() as http:
        settings = {"policies": [DELETES], "adapters": adapter_settings(slack.base_url, receiver.url)}
        async with replicas(tmp_path, env=ADAPTER_ENV, **settings) as group:
            r1, r2, _ = group
            schema = _schema(r1)
            agent = HeldApproval()
            connected = ConnectedAgent(
                r1.target,
                client_id="svantic",
                client_secret="your-secret",
                agent_type=AGENT_TYPE,
                instance_id="crm-r1",
                handler=agent,
                reconnect_delay_s=0.2,
            )
            serving = asyncio.create_task(connected.run())
            store: PostgresStore | None = None
            winners: list[str] = []
            try:
                await asyncio.wait_for(connected.connected.wait(), WAIT)
                store = await _store(schema)
                for n in range(ROUNDS):
                    session_id, user = f"race{n}", f"U{n}"
                    await r1.open(session_id)  # r1 owns it and holds the agent's stream
                    sent = await r2.send(session_id, "m", "clean up", {"target_agent": AGENT_TYPE})
                    assert sent.state == message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED, sent.state_reason
                    (request_id,) = sent.input_request_ids
                    grpc_on, hook_on, slack_on = group[n % 3], group[(n + 1) % 3], group[(n + 2) % 3]
                    grpc_got, (hook_status, hook_body), slack_status = await asyncio.gather(
                        _by_grpc(grpc_on, request_id),
                        _by_hook(http, hook_on, request_id),
                        _by_slack(http, slack_on, request_id, user),
                    )
                    assert slack_status == 200
                    request = await store.get_input(tenant_id=TENANT, request_id=request_id)
                    assert request is not None and request.state is InputState.RESOLVED
                    assert request.resolution is not None
                    won = request.resolution.surface
                    on = {Surface.GRPC: grpc_on, Surface.WEBHOOK: hook_on, Surface.SLACK: slack_on}
                    assert won in on, won
                    winners.append(f"{won.value} on {on[won].name}")
                    grpc_won = not isinstance(grpc_got, aio.AioRpcError)
                    hook_won = hook_status == 200
                    assert (grpc_won, hook_won) == (won is Surface.GRPC, won is Surface.WEBHOOK), (
                        won,
                        grpc_got,
                        hook_body,
                    )
                    if not grpc_won:
                        assert code_of(grpc_got) == grpc.StatusCode.ABORTED
                        assert error_details(grpc_got)[0] == "INPUT_ALREADY_RESOLVED"
                    if not hook_won:
                        assert hook_status == 409, hook_body
                        assert hook_body["error"]["reason"] == "INPUT_ALREADY_RESOLVED"
                    if won is not Surface.SLACK:  # the Slack user is told, in Slack, that it came too late
                        told = await _until(lambda u=user: _ephemerals(slack, u), f"the ephemeral to {user}")
                        assert len(told) == 1 and "already answered" in told[0], told
                    # The owner's waiting dispatch heard the one answer, wherever it was given.
                    await _until(lambda s=session_id: agent.decisions.get(s), "the agent's decision")
                    agent.release.setdefault(session_id, asyncio.Event()).set()

                    async def completed(s: str = session_id, on: Replica = slack_on) -> bool:
                        message = await on.message(s, "m")
                        return bool(message.state == message_types_pb2.MESSAGE_STATE_COMPLETED)

                    await _eventually(completed, "the message to complete")
                    assert agent.decisions[session_id] == [True]
                    assert agent.extra_answers[session_id] == 0
                    assert len(await store.list_audit(tenant_id=TENANT, request_id=request_id)) == 1
                    if won is Surface.SLACK:
                        assert _ephemerals(slack, user) == []  # the winner is not told it lost
            finally:
                if store is not None:
                    await store.close()
                await connected.stop()
                await asyncio.wait_for(serving, WAIT)
    print(f"winners: {winners}")


async def _until(condition: Callable[[], Any], what: str) -> Any:
    """Poll ``condition()`` (bounded by ``WAIT``) until it is truthy; its value."""

    async def check() -> Any:
        return condition()

    return await _eventually(check, what)
