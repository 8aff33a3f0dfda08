"""A real mesh server with the Slack and webhook adapters on, and the people around it.

``surfaces()`` starts, on loopback only: a fake Slack Web API (``fake_slack``), a
recording webhook receiver (``receiving``), and a real ``MeshServer`` (through
``running_server``) whose adapters are loaded from their entry points and share
the HTTP server on ``http_address`` 127.0.0.1:0. A real ``ConnectedAgent`` asks
for approval of ``crm.delete_records``, which the ``deletes`` policy gates.

``Surfaces`` then acts like the three kinds of people: a Slack user clicking a
button (a correctly signed ``block_actions`` interaction), a system answering the
webhook (callback token or a Standard Webhooks signature), and a gRPC client.
Everything waited on is bounded by ``WAIT``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from google.protobuf import json_format
from slack_sdk.signature import SignatureVerifier
from standardwebhooks import Webhook

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.core.inputs.model import InputRequest
from svantic_grpc.core.store import AuditRecord
from svantic_grpc.pb import message_service_pb2, message_types_pb2
from tests._support import SIGNING_ENV, Client, running_server
from tests.adapters.fake_slack import FakeSlack, fake_slack
from tests.adapters.webhook_receiver import Delivery, Receiver, receiving
from tests.agents_connected import data, new_session, running_agent, send, wait_for_state

WAIT = 3.0
"""Upper bound for anything waited on."""

TENANT = "acme"
AGENT_TYPE = "crm"
TOOL = "crm.delete_records"
ARGUMENTS = {"ids": [1, 2]}
CHANNEL = "#approvals"


def _whsec(fill: bytes) -> str:
    return "whsec_" + base64.b64encode(fill * 32).decode()


SLACK_SIGNING_SECRET = "slack-signing-secret-e2e"
HOOK_OUT = _whsec(b"o")
"""Signs what the mesh sends to the receiver."""
HOOK_IN = _whsec(b"i")
"""Signs resolutions the receiver's side sends back."""
FORGED = _whsec(b"x")
ENV = {
    **SIGNING_ENV,
    "SLACK_BOT_TOKEN": "xoxb-test",
    "SLACK_SIGNING_SECRET": SLACK_SIGNING_SECRET,
    "HOOK_OUT": HOOK_OUT,
    "HOOK_IN": HOOK_IN,
    "HOOK_TOKEN_KEY": "a-callback-token-key-for-the-e2e-tests",
}
POLICIES = [{"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"}]

PENDING = message_types_pb2.INPUT_STATE_PENDING
INPUT_REQUIRED = message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED
COMPLETED = message_types_pb2.MESSAGE_STATE_COMPLETED
FAILED = message_types_pb2.MESSAGE_STATE_FAILED


async def until(condition: Callable[[], Any], what: str, within_s: float = WAIT) -> Any:
    """Poll ``condition()`` until it is truthy; its value."""
    deadline = time.monotonic() + within_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not in time: {what}")
        await asyncio.sleep(0.005)
    return value


# ---------------------------------------------------------------- the agent


@dataclass
class ApprovalAgent:
    """Asks approval of ``crm.delete_records`` and reports the decision as an artifact.

    ``hold`` (when set) keeps each dispatch open after its decision until released, so
    a test can check that no second decision arrives while the race settles.
    """

    decisions: dict[str, list[bool]] = field(default_factory=dict)
    """session id -> decisions received."""
    extra_answers: dict[str, int] = field(default_factory=dict)
    """session id -> answers still queued after the first (must stay 0)."""
    hold: asyncio.Event | None = None

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval(TOOL, ARGUMENTS)
        self.decisions.setdefault(dispatch.session_id, []).append(approved)
        if self.hold is not None:
            await asyncio.wait_for(self.hold.wait(), WAIT)
        # A second answer for this dispatch would be waiting in the reply's queue.
        self.extra_answers[dispatch.session_id] = reply._answers.qsize() if reply._answers else 0
        await reply.artifact(f"decision: {'approved' if approved else 'denied'}", name="decision")
        await reply.complete()


@dataclass
class FormAgent:
    """Asks a form and reports which fields it got back (never the values themselves)."""

    fields: list[message_types_pb2.FormField]
    answers: list[dict[str, Any] | None] = field(default_factory=list)

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        values = await reply.ask_form("Database credentials", self.fields)
        self.answers.append(values)
        got = "none" if values is None else ",".join(sorted(values))
        await reply.artifact(f"form: {got}", name="form")
        await reply.complete()


def form_field(name: str, label: str, type_: str = "text", *, default: Any = None, **kw: Any) -> Any:
    f = message_types_pb2.FormField(name=name, label=label, type=type_, **kw)
    if default is not None:
        json_format.ParseDict(default, f.default_value)
    return f


# ---------------------------------------------------------------- the harness


@dataclass
class Surfaces:
    client: Client
    slack: FakeSlack
    receiver: Receiver
    http: aiohttp.ClientSession

    @property
    def port(self) -> int:
        return self.client.server.http.port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- the mesh, as a gRPC client and as an operator reading its records

    async def ask(self) -> tuple[str, str, str]:
        """Send a message to the agent; (session id, message id, input request id) once it waits."""
        session_id = await new_session(self.client)
        message = await send(self.client, session_id, "clean up the CRM", data({"target_agent": AGENT_TYPE}))
        if message.state != INPUT_REQUIRED:
            message = await wait_for_state(self.client, session_id, message.message_id, INPUT_REQUIRED)
        assert message.state == INPUT_REQUIRED, (message.state, message.state_reason)
        (request_id,) = message.input_request_ids
        return session_id, message.message_id, request_id

    async def pending(self, session_id: str = "") -> list[message_types_pb2.InputRequest]:
        response = await self.client.messages.ListPendingInputs(
            message_service_pb2.ListPendingInputsRequest(session_id=session_id),
            metadata=await self.client.md(),
        )
        return list(response.requests)

    async def pending_ids(self, session_id: str = "") -> list[str]:
        return [r.request_id for r in await self.pending(session_id)]

    async def resolve_grpc(
        self, request_id: str, decision: Any = message_types_pb2.DECISION_APPROVE, **resolution: Any
    ) -> message_types_pb2.InputRequest:
        response: message_service_pb2.ResolveInputResponse = await asyncio.wait_for(
            self.client.messages.ResolveInput(
                message_service_pb2.ResolveInputRequest(
                    request_id=request_id,
                    resolution=message_types_pb2.Resolution(decision=decision, **resolution),
                ),
                metadata=await self.client.md(),
            ),
            WAIT,
        )
        return response.request

    async def record(self, request_id: str) -> InputRequest:
        """The stored request (state, resolution: who, surface, when)."""
        return await self.client.server.mesh.inputs.get(TENANT, request_id)

    async def audit(self, request_id: str) -> list[AuditRecord]:
        return list(await self.client.server.mesh.store.list_audit(tenant_id=TENANT, request_id=request_id))

    async def finished(self, session_id: str, message_id: str, *states: int) -> message_types_pb2.Message:
        return await wait_for_state(self.client, session_id, message_id, *(states or (COMPLETED,)))

    # -- Slack

    def _mentions(self, args: dict[str, Any], request_id: str) -> bool:
        return request_id in json.dumps(args.get("blocks", ""))

    async def slack_post(self, request_id: str) -> dict[str, Any]:
        """The chat.postMessage of the request, once made."""
        return await until(  # type: ignore[no-any-return]
            lambda: next(
                (a for a in self.slack.of("chat.postMessage") if self._mentions(a, request_id)), None
            ),
            f"Slack post of {request_id}",
        )

    def slack_updates(self, request_id: str) -> list[dict[str, Any]]:
        return [a for a in self.slack.of("chat.update") if self._mentions(a, request_id)]

    async def slack_update(self, request_id: str) -> dict[str, Any]:
        """The (single) chat.update of the request, once made."""
        updates = await until(lambda: self.slack_updates(request_id), f"Slack update of {request_id}")
        assert len(updates) == 1, updates
        return updates[0]  # type: ignore[no-any-return]

    def ephemerals(self, user: str) -> list[str]:
        return [a["text"] for a in self.slack.of("chat.postEphemeral") if a.get("user") == user]

    async def slack_interact(
        self, payload: dict[str, Any], *, age_s: int = 0, secret: str = SLACK_SIGNING_SECRET
    ) -> int:
        """POST an interaction the way Slack does (form-encoded, v0-signed); the HTTP status."""
        body = urlencode({"payload": json.dumps(payload)})
        timestamp = str(int(time.time()) - age_s)
        signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Slack-Request-Timestamp": timestamp,
            "X-Slack-Signature": signature or "",
        }
        async with self.http.post(self.base + "/webhooks/receive/slack", data=body, headers=headers) as r:
            return r.status

    async def click(
        self,
        request_id: str,
        action: str = "approve",
        *,
        user: str = "U1",
        age_s: int = 0,
        secret: str = SLACK_SIGNING_SECRET,
        value: str | None = None,
    ) -> int:
        """Click a button of the request's Slack message (its value as posted, unless given)."""
        if value is None:
            posted = await self.slack_post(request_id)
            buttons = [e for b in posted["blocks"] if b["type"] == "actions" for e in b["elements"]]
            value = next(b["value"] for b in buttons if b["action_id"] == f"svantic.{action}")
        posts = [a for a in self.slack.of("chat.postMessage") if self._mentions(a, request_id)]
        message_ts = self.slack.ts_of(posts[0]) if posts else "1.000100"  # the message clicked
        payload = block_actions(action, value, user=user, channel=CHANNEL, message_ts=message_ts)
        return await self.slack_interact(payload, age_s=age_s, secret=secret)

    # -- the webhook receiver and its answers

    def deliveries(self, request_id: str, type_: str = "") -> list[Delivery]:
        return [
            d
            for d in self.receiver.deliveries
            if d.payload["request"]["id"] == request_id and (not type_ or d.payload["type"] == type_)
        ]

    async def notification(self, request_id: str, type_: str = "input.required") -> dict[str, Any]:
        """The (verified) notification of that type about the request, once delivered."""
        delivery = await until(
            lambda: next(iter(self.deliveries(request_id, type_)), None), f"{type_} of {request_id}"
        )
        return dict(delivery.verify(HOOK_OUT))

    async def hook(self, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        text = body if isinstance(body, str) else json.dumps(body)
        async with self.http.post(self.base + "/webhooks/receive", data=text, headers=headers) as r:
            return r.status, await r.json()

    async def hook_token(self, token: str, **fields: Any) -> tuple[int, dict[str, Any]]:
        return await self.hook({"callback_token": token, "decision": "approve", **fields})

    async def hook_signed(
        self, request_id: str, *, secret: str = HOOK_IN, webhook_id: str = "", **fields: Any
    ) -> tuple[int, dict[str, Any]]:
        body = {"tenant_id": TENANT, "request_id": request_id, "decision": "approve", **fields}
        return await self.hook(json.dumps(body), signed_headers(json.dumps(body), secret, webhook_id))


def block_actions(
    action: str, value: str, *, user: str, channel: str, message_ts: str = "1.000100"
) -> dict[str, Any]:
    return {
        "type": "block_actions",
        "team": {"id": "T1"},
        "user": {"id": user, "team_id": "T1"},
        "api_app_id": "A1",
        "channel": {"id": channel},
        "container": {"type": "message", "channel_id": channel, "message_ts": message_ts},
        "trigger_id": f"trigger-{uuid.uuid4().hex[:8]}",
        "actions": [{"type": "button", "action_id": f"svantic.{action}", "value": value}],
    }


def signed_headers(
    text: str, secret: str, webhook_id: str = "", *, timestamp: float | None = None
) -> dict[str, str]:
    msg_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    stamp = int(time.time() if timestamp is None else timestamp)
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(stamp, tz=UTC), text)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature,
    }


def adapter_settings(slack_api: str, hook_url: str, **webhook: Any) -> dict[str, Any]:
    """Both adapters' settings; ``webhook`` adds keys to the webhook adapter's."""
    return {
        "slack": {"channel": CHANNEL, "api_base_url": slack_api},
        "webhook": {
            "targets": [{"url": hook_url, "secret_env": "HOOK_OUT"}],
            "inbound_secret_env": "HOOK_IN",
            "backoff_ms": 10,
            **webhook,
        },
    }


@asynccontextmanager
async def hanging_server() -> AsyncIterator[str]:
    """An HTTP server on loopback that answers nothing until it is stopped; its base URL."""
    released = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await released.wait()
        return web.Response(status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        released.set()  # let held requests end, so cleanup does not wait for them
        await runner.cleanup()


@asynccontextmanager
async def surfaces(
    handler: Any = None,
    *,
    hook_url: str | None = None,
    slack_api: str | None = None,
    webhook: dict[str, Any] | None = None,
    tenants: dict[str, list[str]] | None = None,
    **overrides: Any,
) -> AsyncIterator[Surfaces]:
    """Fake Slack, a receiver, a real server with both adapters, and a connected agent serving ``handler``.

    ``slack_api`` and ``hook_url`` point the adapters elsewhere (a broken Slack or receiver);
    ``webhook`` adds settings of the webhook adapter; ``tenants`` the tenants an adapter serves.
    """
    async with AsyncExitStack() as stack:
        slack = await stack.enter_async_context(fake_slack())
        receiver = await stack.enter_async_context(receiving())
        adapters = adapter_settings(slack_api or slack.base_url, hook_url or receiver.url, **(webhook or {}))
        for name, served in (tenants or {}).items():
            adapters[name]["tenants"] = served
        settings: dict[str, Any] = {
            "http_address": "127.0.0.1:0",
            "adapters": adapters,
            "policies": POLICIES,
        }
        client = await stack.enter_async_context(running_server(env=ENV, **(settings | overrides)))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        if handler is not None:
            await stack.enter_async_context(
                running_agent(client, handler, agent_type=AGENT_TYPE, instance_id="crm-1")
            )
        yield Surfaces(client, slack, receiver, http)
