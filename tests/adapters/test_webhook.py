"""The webhook adapter over real HTTP on loopback: signed notifications out, resolutions in.

A recording receiver stands in for the targets; the adapter's routes run on the mesh's
own HTTP server (``HttpServer``); a fake mesh keeps requests in memory and resolves them with one
compare-and-set, raising the errors the real one raises.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from adapters.webhook import WebhookAdapter
from adapters.webhook._delivery import Deliveries, Retries
from adapters.webhook._settings import WebhookSettings
from svantic_grpc.adapter import parse_adapter_settings
from svantic_grpc.core.clock import Clock, IdGenerator, UuidGenerator
from svantic_grpc.core.errors import AlreadyResolved, InvalidArgument, NotFound, PermissionDenied
from svantic_grpc.core.inputs.checks import checked_resolution
from svantic_grpc.core.inputs.model import (
    Decision,
    Form,
    FormField,
    InputKind,
    InputRequest,
    InputState,
    PlanItem,
    Resolution,
    Surface,
    ToolCall,
)
from tests.adapters.webhook_receiver import Receiver, receiving, serving_routes


def _secret(fill: bytes) -> str:
    return "whsec_" + base64.b64encode(fill * 32).decode()


INBOUND = _secret(b"i")
TARGET_SECRETS = [_secret(b"a"), _secret(b"b")]
FORGED = _secret(b"x")
WAIT = 5.0


# ---------------------------------------------------------------- the fake mesh


class WallClock:
    """Real time, shifted by ``offset`` seconds (standardwebhooks verifies against the wall clock)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


class FakeMesh:
    """An AdapterContext with in-memory requests; ``resolve`` is a compare-and-set."""

    def __init__(self) -> None:
        self.wall = WallClock()
        self.clock: Clock = self.wall
        self.ids: IdGenerator = UuidGenerator()
        self.http_base_url = ""
        self.requests: dict[tuple[str, str], InputRequest] = {}
        self.resolved = 0
        self.kept: dict[str, dict[str, Any]] = {}
        self.signing_key: bytes | None = None
        """The mesh's own signing key (``None``: the development default)."""

    def shared_key(self, purpose: str) -> bytes | None:
        if self.signing_key is None:
            return None
        return hmac.new(self.signing_key, purpose.encode(), "sha256").digest()

    async def remember(
        self,
        key: str,
        value: dict[str, Any],
        *,
        session: tuple[str, str] | None = None,
        if_absent: bool = False,
    ) -> bool:
        if if_absent and key in self.kept:
            return False
        self.kept[key] = dict(value)
        return True

    async def recall(self, key: str) -> dict[str, Any] | None:
        return self.kept.get(key)

    async def forget(self, key: str) -> None:
        self.kept.pop(key, None)

    def add(self, request: InputRequest) -> InputRequest:
        self.requests[(request.tenant_id, request.request_id)] = request
        return request

    def state(self, request_id: str, tenant_id: str = "acme") -> InputRequest:
        return self.requests[(tenant_id, request_id)]

    def as_stored(self, request: InputRequest, resolution: Resolution) -> Resolution:
        return checked_resolution(request, resolution)

    async def get_request(self, *, tenant_id: str, request_id: str) -> InputRequest:
        try:
            return self.requests[(tenant_id, request_id)]
        except KeyError:
            raise NotFound(f"input request {request_id} not found") from None

    async def resolve(
        self, *, tenant_id: str, request_id: str, resolution: Resolution, responder: str, surface: Surface
    ) -> InputRequest:
        current = await self.get_request(tenant_id=tenant_id, request_id=request_id)
        if current.state is not InputState.PENDING:
            won = current.resolution
            who = f" by {won.resolved_by} via {won.surface.value}" if won else ""
            raise AlreadyResolved(f"input request {request_id} was already {current.state.value}{who}")
        if current.allowed_responders and responder not in current.allowed_responders:
            raise PermissionDenied(f"{responder} may not answer input request {request_id}")
        if current.kind is not InputKind.FORM:
            if resolution.decision not in current.allowed_decisions:
                raise InvalidArgument("resolution.decision", "not an allowed decision")
            if resolution.decision is Decision.DENY and not resolution.reason:
                raise InvalidArgument("resolution.reason", "required to deny")
        for f in current.form.fields if current.form else ():
            if f.required and f.name not in resolution.values:
                raise InvalidArgument(f"resolution.values.{f.name}", "required")
        done = replace(resolution, resolved_by=responder, surface=surface, resolved_at=self.clock.now())
        ended = replace(current, state=InputState.RESOLVED, resolution=done, version=current.version + 1)
        self.requests[(tenant_id, request_id)] = ended
        self.resolved += 1
        return ended

    def end(self, request_id: str, state: InputState) -> InputRequest:
        key = ("acme", request_id)
        self.requests[key] = replace(self.requests[key], state=state, outcome_reason=state.value)
        return self.requests[key]


def tool_request(request_id: str = "r1", **overrides: Any) -> InputRequest:
    now = time.time()
    fields: dict[str, Any] = {
        "tenant_id": "acme",
        "request_id": request_id,
        "session_id": "s1",
        "message_id": "m1",
        "kind": InputKind.TOOL_APPROVAL,
        "created_at": now,
        "expires_at": now + 3600,
        "tool_call": ToolCall("delete_rows", {"table": "users", "count": 500}),
        "policy": "bulk-delete",
    }
    fields.update(overrides)
    return InputRequest(**fields)


def login_form_request(request_id: str = "f1") -> InputRequest:
    form = Form(
        title="Database login",
        fields=(
            FormField("user", label="User", required=True, default="admin"),
            FormField(
                "password",
                type="password",
                label="Password",
                required=True,
                sensitive=True,
                default="hunter2",
            ),
        ),
    )
    return tool_request(request_id, kind=InputKind.FORM, tool_call=None, form=form, allowed_decisions=())


# ---------------------------------------------------------------- the harness


@dataclass
class Harness:
    adapter: WebhookAdapter
    mesh: FakeMesh
    receivers: list[Receiver]
    http: aiohttp.ClientSession
    base_url: str

    @property
    def receiver(self) -> Receiver:
        return self.receivers[0]

    async def announce(self, request: InputRequest) -> dict[str, Any]:
        """Tell the adapter about a new request; the first target's notification payload."""
        self.mesh.add(request)
        before = len(self.receiver.deliveries)
        await self.adapter.on_request(request)
        return dict((await self.receiver.wait_for(before + 1))[before].verify(TARGET_SECRETS[0]))

    async def post(self, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, str) else json.dumps(body)
        async with self.http.post(
            self.base_url + "/webhooks/receive", data=data, headers=headers
        ) as response:
            return response.status, await response.json()

    async def post_signed(
        self,
        body: Any,
        *,
        secret: str = INBOUND,
        webhook_id: str | None = None,
        timestamp: float | None = None,
    ) -> tuple[int, dict[str, Any]]:
        text = json.dumps(body)
        msg_id = webhook_id or f"msg_{uuid.uuid4().hex}"
        stamp = int(time.time() if timestamp is None else timestamp)
        signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(stamp, tz=UTC), text)
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(stamp), "webhook-signature": signature}
        return await self.post(text, headers)

    async def settle(self) -> None:
        async with asyncio.timeout(WAIT):
            await self.adapter.drain()


Build = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def build() -> AsyncIterator[Build]:
    """Starts receivers, the adapter and its routes; everything stops after the test."""
    async with AsyncExitStack() as stack:

        async def make(
            *,
            targets: int = 1,
            urls: list[str] | None = None,
            inbound: bool = True,
            extra_env: dict[str, str] | None = None,
            mesh: FakeMesh | None = None,
            **config: Any,
        ) -> Harness:
            receivers = [await stack.enter_async_context(receiving()) for _ in range(targets)]
            env = {f"TARGET_{i}": secret for i, secret in enumerate(TARGET_SECRETS)} | (extra_env or {})
            if inbound:
                env["SVANTIC_WEBHOOK_SECRET"] = INBOUND
            target_urls = urls if urls is not None else [r.url for r in receivers]
            settings = {
                "targets": [{"url": url, "secret_env": f"TARGET_{i}"} for i, url in enumerate(target_urls)],
                "backoff_ms": 10,
                **config,
            }
            mesh = mesh or FakeMesh()  # pass one to stand for a restarted process on the same store
            adapter = WebhookAdapter("webhook", settings, mesh, env, rng=random.Random(7))
            mesh.http_base_url = await stack.enter_async_context(serving_routes(adapter.routes()))
            await adapter.start()
            stack.push_async_callback(adapter.stop)
            http = await stack.enter_async_context(aiohttp.ClientSession())
            return Harness(adapter, mesh, receivers, http, mesh.http_base_url)

        yield make


def answer(request_id: str, token: str | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": request_id, "decision": "approve", **fields}
    if token is not None:
        body["callback_token"] = token
    else:
        body.setdefault("tenant_id", "acme")
    return body


# ---------------------------------------------------------------- outbound


async def test_each_target_gets_a_signed_notification_with_its_own_token(build: Build) -> None:
    h = await build(targets=2)
    await h.adapter.on_request(h.mesh.add(tool_request()))
    (first,) = await h.receivers[0].wait_for(1)
    (second,) = await h.receivers[1].wait_for(1)

    payload = first.verify(TARGET_SECRETS[0])
    second.verify(TARGET_SECRETS[1])
    with pytest.raises(WebhookVerificationError):
        first.verify(TARGET_SECRETS[1])
    assert payload["type"] == "input.required"
    request = payload["request"]
    assert (request["id"], request["tenant"], request["session"], request["message"]) == (
        "r1",
        "acme",
        "s1",
        "m1",
    )
    assert request["kind"] == "tool_approval"
    assert request["summary"] == "approve tool call delete_rows"
    assert request["tool_call"]["name"] == "delete_rows"
    assert request["tool_call"]["arguments"] == {"table": "users", "count": 500}
    assert request["allowed_decisions"] == ["approve", "approve_for_session", "approve_always", "deny"]
    assert request["expires_at"].endswith("Z")
    assert payload["callback"]["url"] == h.base_url + "/webhooks/receive"
    assert payload["callback"]["token"] != second.payload["callback"]["token"]
    assert first.webhook_id != second.webhook_id

    await h.settle()
    assert [len(r.deliveries) for r in h.receivers] == [1, 1]


async def test_plan_steps_are_listed(build: Build) -> None:
    h = await build()
    plan = (PlanItem("look up the invoices", "billing"), PlanItem("refund them", "billing", "refund"))
    payload = await h.announce(tool_request(kind=InputKind.PLAN_APPROVAL, tool_call=None, plan=plan))
    assert payload["request"]["summary"] == "sign off a plan of 2 steps"
    assert [s["description"] for s in payload["request"]["plan"]] == ["look up the invoices", "refund them"]
    assert payload["request"]["plan"][1]["tool_name"] == "refund"


async def test_sensitive_form_never_leaves_with_a_value_or_a_token(build: Build) -> None:
    h = await build()
    payload = await h.announce(login_form_request())
    delivered = h.receiver.deliveries[0].body
    assert "hunter2" not in delivered
    assert payload["callback"] is None
    assert "API or chat" in payload["note"]
    fields = {f["name"]: f for f in payload["request"]["form"]["fields"]}
    assert fields["user"]["default"] == "admin"
    assert "password" not in fields  # not even its label leaves the mesh

    status, body = await h.post_signed(answer("f1", values={"user": "root", "password": "x"}))
    assert status == 422
    assert "API or chat" in body["error"]["message"]
    assert h.mesh.state("f1").state is InputState.PENDING

    resolved = await h.mesh.resolve(
        tenant_id="acme",
        request_id="f1",
        resolution=Resolution(values={"user": "root", "password": "hunter2"}),
        responder="alice",
        surface=Surface.CHAT,
    )
    await h.adapter.on_outcome(resolved)
    (_, outcome) = await h.receiver.wait_for(2)
    assert "hunter2" not in outcome.body
    assert outcome.verify(TARGET_SECRETS[0])["request"]["resolution"]["values"] == {"user": "root"}


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_failed_delivery_is_retried_under_the_same_id(build: Build, status: int) -> None:
    h = await build()
    h.receiver.fail(2, status)
    await h.adapter.on_request(h.mesh.add(tool_request()))
    attempts = await h.receiver.wait_for(3)
    assert len({a.webhook_id for a in attempts}) == 1
    for attempt in attempts:
        attempt.verify(TARGET_SECRETS[0])
    await h.settle()
    assert len(h.receiver.deliveries) == 3


async def test_an_announcement_still_retrying_stops_once_its_request_ended_elsewhere(build: Build) -> None:
    # found from outside: answered on another replica (whose outcome this adapter is never told), the
    # owner's retries went on and input.required reached the receiver after input.resolved
    h = await build(max_attempts=6)
    h.receiver.fail(50, 503)
    await h.adapter.on_request(h.mesh.add(tool_request()))
    await h.receiver.wait_for(2)
    await h.mesh.resolve(
        tenant_id="acme",
        request_id="r1",
        resolution=Resolution(decision=Decision.APPROVE),
        responder="ops",
        surface=Surface.GRPC,
    )
    await h.settle()
    assert len(h.receiver.deliveries) <= 3, [d.payload["type"] for d in h.receiver.deliveries]


async def test_client_errors_are_not_retried(build: Build, caplog: pytest.LogCaptureFixture) -> None:
    h = await build()
    h.receiver.fail(1, 400)
    with caplog.at_level(logging.WARNING, logger="adapters.webhook"):
        await h.adapter.on_request(h.mesh.add(tool_request()))
        await h.settle()
    assert len(h.receiver.deliveries) == 1
    assert "HTTP 400; not retried" in caplog.text


def test_the_default_retries_span_minutes_not_seconds() -> None:
    # found from outside: with the defaults a receiver down for ~8 s never heard of the request
    settings = parse_adapter_settings(WebhookSettings, "webhook", {}, {})
    deliveries = Deliveries(
        Retries(settings.max_attempts, settings.backoff_ms, settings.max_backoff_ms, settings.timeout_ms),
        WallClock(),
        random.Random(7),
    )
    waits = [deliveries._backoff_s(attempt, None) for attempt in range(1, settings.max_attempts)]
    assert 180 <= sum(waits) <= 600, sum(waits)


async def test_delivery_gives_up_after_max_attempts(build: Build, caplog: pytest.LogCaptureFixture) -> None:
    h = await build(max_attempts=3)
    h.receiver.fail(10)
    with caplog.at_level(logging.WARNING, logger="adapters.webhook"):
        await h.adapter.on_request(h.mesh.add(tool_request()))
        await h.settle()
    assert len(h.receiver.deliveries) == 3
    assert "gave up after 3 attempts (last: HTTP 500)" in caplog.text


async def test_unreachable_target_is_retried_then_given_up(
    build: Build, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    h = await build(urls=[f"http://127.0.0.1:{port}/hook"], max_attempts=2)
    with caplog.at_level(logging.WARNING, logger="adapters.webhook"):
        await h.adapter.on_request(h.mesh.add(tool_request()))
        await h.settle()
    assert "gave up after 2 attempts (last: ConnectError" in caplog.text


@pytest.mark.parametrize("state", [InputState.EXPIRED, InputState.CANCELED])
async def test_expiry_and_cancellation_are_reported(build: Build, state: InputState) -> None:
    h = await build()
    token = (await h.announce(tool_request()))["callback"]["token"]
    await h.adapter.on_outcome(h.mesh.end("r1", state))
    (_, outcome) = await h.receiver.wait_for(2)
    payload = outcome.verify(TARGET_SECRETS[0])
    assert payload["type"] == f"input.{state.value}"
    assert payload["request"]["state"] == state.value
    assert payload["request"]["resolution"] is None
    assert payload["request"]["outcome_reason"] == state.value
    status, body = await h.post(answer("r1", token))
    assert status == 409  # the request ended: a late answer is told how, not "invalid token"
    assert state.value in body["error"]["message"]


async def test_resolution_elsewhere_is_reported_and_a_late_token_is_told_who_won(build: Build) -> None:
    h = await build()
    token = (await h.announce(tool_request()))["callback"]["token"]
    resolved = await h.mesh.resolve(
        tenant_id="acme",
        request_id="r1",
        resolution=Resolution(decision=Decision.DENY, reason="too many rows"),
        responder="alice",
        surface=Surface.SLACK,
    )
    await h.adapter.on_outcome(resolved)
    (_, outcome) = await h.receiver.wait_for(2)
    payload = outcome.verify(TARGET_SECRETS[0])
    assert payload["type"] == "input.resolved"
    resolution = payload["request"]["resolution"]
    assert (resolution["decision"], resolution["reason"]) == ("deny", "too many rows")
    assert (resolution["resolved_by"], resolution["surface"]) == ("alice", "slack")

    status, body = await h.post(answer("r1", token))
    assert status == 409
    assert "alice" in body["error"]["message"] and "slack" in body["error"]["message"]
    status, body = await h.post(answer("r1", token))
    assert status == 409  # still only told, never resolved


async def test_outcome_replaces_an_announcement_still_retrying(build: Build) -> None:
    h = await build(backoff_ms=3000)
    h.receiver.fail(1)
    await h.adapter.on_request(h.mesh.add(tool_request()))
    await h.receiver.wait_for(1)  # the announcement failed once and now waits seconds to retry
    await h.adapter.on_outcome(h.mesh.end("r1", InputState.EXPIRED))
    await h.settle()
    assert [d.payload["type"] for d in h.receiver.deliveries] == ["input.required", "input.expired"]


async def test_stop_cancels_pending_deliveries(build: Build) -> None:
    h = await build(backoff_ms=10_000)
    h.receiver.fail(10)
    await h.adapter.on_request(h.mesh.add(tool_request()))
    await h.receiver.wait_for(1)
    async with asyncio.timeout(1):
        await h.adapter.stop()
    await h.adapter.stop()  # idempotent
    await h.adapter.on_request(h.mesh.add(tool_request("r2")))  # after stop: ignored, no error
    await asyncio.sleep(0.05)
    assert len(h.receiver.deliveries) == 1


# ---------------------------------------------------------------- inbound by callback token


async def test_callback_token_resolves_once(build: Build) -> None:
    h = await build()
    token = (await h.announce(tool_request()))["callback"]["token"]

    status, body = await h.post(answer("r1", token, responder="ops@acme"))
    assert status == 200
    assert body["status"] == "resolved"
    assert body["request"]["state"] == "resolved"
    assert body["request"]["resolution"]["surface"] == "webhook"
    stored = h.mesh.state("r1").resolution
    assert stored is not None
    assert (stored.decision, stored.resolved_by, stored.surface) == (
        Decision.APPROVE,
        "ops@acme",
        Surface.WEBHOOK,
    )

    status, body = await h.post(answer("r1", token, decision="deny", reason="changed my mind"))
    assert status == 409  # a token's answer is final
    assert h.mesh.resolved == 1
    assert h.mesh.state("r1").resolution == stored


async def test_responder_defaults_to_webhook(build: Build) -> None:
    h = await build()
    token = (await h.announce(tool_request()))["callback"]["token"]
    status, body = await h.post({"callback_token": token, "decision": "approve_for_session"})
    assert status == 200
    assert body["request"]["resolution"]["resolved_by"] == "webhook"
    assert body["request"]["resolution"]["decision"] == "approve_for_session"


async def test_token_answers_only_its_own_request(build: Build) -> None:
    h = await build()
    token = (await h.announce(tool_request("r1")))["callback"]["token"]
    await h.announce(tool_request("r2"))
    status, _ = await h.post(answer("r2", token))
    assert status == 401
    status, _ = await h.post(answer("r1", token, tenant_id="globex"))
    assert status == 401
    assert h.mesh.state("r2").state is InputState.PENDING
    status, _ = await h.post(answer("r1", token))  # the mismatches did not use it up
    assert status == 200


async def test_expired_token_is_refused(build: Build) -> None:
    h = await build(callback_token_ttl_s=60)
    payload = await h.announce(tool_request())
    h.mesh.wall.offset = 61
    status, body = await h.post(answer("r1", payload["callback"]["token"]))
    assert (status, body["error"]["reason"]) == (401, "CALLBACK_TOKEN_EXPIRED")
    assert h.mesh.state("r1").state is InputState.PENDING


async def test_refused_answer_leaves_the_token_usable(build: Build) -> None:
    h = await build()
    token = (await h.announce(tool_request()))["callback"]["token"]
    status, body = await h.post(answer("r1", token, decision="maybe"))
    assert (status, body["error"]["field"]) == (422, "decision")
    status, body = await h.post(answer("r1", token, decision="deny"))
    assert (status, body["error"]["field"]) == (422, "resolution.reason")
    assert h.mesh.state("r1").state is InputState.PENDING
    # found from outside: a reason holding a lone surrogate escape was recorded, answered 500, and
    # then ended the agent's stream and every replay of the session
    lone = json.dumps(answer("r1", token, decision="deny", reason="LONE")).replace("LONE", "bad \\ud800")
    status, body = await h.post(lone)
    assert status in (400, 422) and "lone surrogate" in body["error"]["message"], body
    assert h.mesh.state("r1").state is InputState.PENDING
    status, body = await h.post(answer("r1", token, decision="deny", reason="no bulk deletes on Fridays"))
    assert status == 200
    assert body["request"]["resolution"]["reason"] == "no bulk deletes on Fridays"


TOKEN_KEY = {"HOOK_TOKEN_KEY": "a-callback-token-key-of-32-bytes-or-more"}


async def test_with_a_token_key_a_token_outlives_the_adapter_that_sent_it(build: Build) -> None:
    before = await build(extra_env=TOKEN_KEY, callback_token_key_env="HOOK_TOKEN_KEY")
    first = (await before.announce(tool_request("r1")))["callback"]["token"]
    second = (await before.announce(tool_request("r2")))["callback"]["token"]
    # A new adapter (as after a restart) on the same mesh, with the same key.
    after = await build(extra_env=TOKEN_KEY, callback_token_key_env="HOOK_TOKEN_KEY", mesh=before.mesh)

    status, _ = await after.post(answer("r2", first))  # still only its own request
    assert status == 401
    status, body = await after.post(answer("r1", first, responder="ops@acme"))
    assert (status, body["request"]["resolution"]["resolved_by"]) == (200, "ops@acme")
    status, body = await after.post(answer("r1", first, responder="ops@acme"))  # a retry: it won
    assert (status, body["repeat"]) == (200, True)
    assert after.mesh.resolved == 1

    await before.post(answer("r2", second, responder="first"))  # answered before the restart...
    status, body = await after.post(answer("r2", second, responder="late"))  # ...then again after it
    assert status == 409 and "first" in body["error"]["message"]
    assert after.mesh.state("r2").resolution.resolved_by == "first"  # type: ignore[union-attr]


async def test_without_a_token_key_a_token_outlives_the_adapter_under_the_meshs_signing_key(
    build: Build,
) -> None:
    # found from outside: each replica (and each restart) signed callback tokens with a key of its
    # own, so two answers in three were refused behind a balancer and a restart killed every token
    mesh = FakeMesh()
    mesh.signing_key = b"the-mesh-signing-key-of-32-bytes-or-more"
    before = await build(mesh=mesh)
    token = (await before.announce(tool_request("r1")))["callback"]["token"]
    after = await build(mesh=mesh)  # another replica, or the restart, with the same signing key
    status, body = await after.post(answer("r1", token, responder="ops@acme"))
    assert (status, body["request"]["resolution"]["resolved_by"]) == (200, "ops@acme")
    other = FakeMesh()
    other.signing_key = b"another-mesh-signing-key-of-32-bytes!!"
    stranger = await build(mesh=other)
    status, body = await stranger.post(answer("r1", token))
    assert (status, body["error"]["reason"]) == (401, "INVALID_CALLBACK_TOKEN")


@pytest.mark.parametrize("signing_key", [b"the-mesh-signing-key-of-32-bytes-or-more", None])
async def test_an_announcement_made_again_is_a_duplicate_only_if_its_token_still_answers(
    build: Build, signing_key: bytes | None
) -> None:
    # found from outside: after a restart on a per-process key the request was announced again under
    # the same webhook-id, which a receiver drops as a duplicate, keeping only the dead token
    mesh = FakeMesh()
    mesh.signing_key = signing_key
    request = tool_request("r1")
    before = await build(mesh=mesh)
    first = (await before.announce(request))["callback"]["token"]
    after = await build(mesh=mesh)  # the restart announces the pending request again
    second = (await after.announce(request))["callback"]["token"]
    ids = [
        before.receiver.deliveries[0].headers["webhook-id"],
        after.receiver.deliveries[0].headers["webhook-id"],
    ]
    first_answers = (await after.post(answer("r1", first)))[0] == 200
    assert first_answers is (signing_key is not None)
    assert (ids[0] == ids[1]) is first_answers  # a receiver that drops the duplicate keeps a live token
    if not first_answers:
        assert (await after.post(answer("r1", second)))[0] == 200


async def test_without_a_token_key_tokens_end_with_the_adapter(build: Build) -> None:
    before = await build()
    token = (await before.announce(tool_request("r1")))["callback"]["token"]
    after = await build(mesh=before.mesh)
    status, body = await after.post(answer("r1", token))
    assert (status, body["error"]["reason"]) == (401, "INVALID_CALLBACK_TOKEN")
    assert before.mesh.state("r1").state is InputState.PENDING


async def test_a_token_signed_with_another_key_or_expired_is_refused(build: Build) -> None:
    other = await build(extra_env={"K": "another-callback-token-key-32-bytes!!"}, callback_token_key_env="K")
    forged = (await other.announce(tool_request("r1")))["callback"]["token"]
    h = await build(
        extra_env=TOKEN_KEY, callback_token_key_env="HOOK_TOKEN_KEY", callback_token_ttl_s=60, mesh=other.mesh
    )
    status, body = await h.post(answer("r1", forged))
    assert (status, body["error"]["reason"]) == (401, "INVALID_CALLBACK_TOKEN")
    mine = (await h.announce(tool_request("r3")))["callback"]["token"]
    later = await build(extra_env=TOKEN_KEY, callback_token_key_env="HOOK_TOKEN_KEY", mesh=other.mesh)
    other.mesh.wall.offset = 61
    status, body = await later.post(answer("r3", mine))
    assert (status, body["error"]["reason"]) == (401, "CALLBACK_TOKEN_EXPIRED")
    assert other.mesh.state("r3").state is InputState.PENDING


# ---------------------------------------------------------------- inbound by signature


async def test_signed_resolution_is_processed_once_per_webhook_id(build: Build) -> None:
    h = await build()
    await h.announce(tool_request())
    status, body = await h.post_signed(answer("r1"), webhook_id="msg_1")
    assert (status, body["status"]) == (200, "resolved")
    status, body = await h.post_signed(answer("r1"), webhook_id="msg_1")
    assert (status, body) == (200, {"status": "duplicate"})
    assert h.mesh.resolved == 1


async def test_a_webhook_id_reused_for_another_body_is_a_conflict_not_a_duplicate(build: Build) -> None:
    """Two messages under one id are the sender's mistake: the second is refused naming the
    header, not dropped as if it had been processed (its answer would be lost in silence)."""
    h = await build()
    await h.announce(tool_request("r1"))
    await h.announce(tool_request("r2"))
    status, _ = await h.post_signed(answer("r1"), webhook_id="msg_1")
    assert status == 200
    status, body = await h.post_signed(answer("r2"), webhook_id="msg_1")
    assert status == 409
    assert (body["error"]["reason"], body["error"]["field"]) == ("WEBHOOK_ID_REUSED", "webhook-id")
    assert h.mesh.state("r2").state is InputState.PENDING
    status, body = await h.post_signed(answer("r2"), webhook_id="msg_2")  # under its own id it is taken
    assert (status, body["status"]) == (200, "resolved")
    assert h.mesh.resolved == 2


async def test_forged_and_stale_signatures_change_nothing(build: Build) -> None:
    h = await build()
    await h.announce(tool_request())
    refusals = [
        await h.post_signed(answer("r1"), secret=FORGED),
        await h.post_signed(answer("r1"), webhook_id="msg_late", timestamp=time.time() - 400),
        await h.post_signed(answer("r1"), timestamp=time.time() + 400),
        await h.post(answer("r1")),  # neither a signature nor a token
        await h.post(answer("r1"), {"webhook-id": "msg_2", "webhook-timestamp": str(int(time.time()))}),
    ]
    assert [status for status, _ in refusals] == [401] * 5
    reasons = [body["error"]["reason"] for _, body in refusals[:3]]
    assert reasons == ["BAD_SIGNATURE", "STALE_TIMESTAMP", "STALE_TIMESTAMP"]
    assert h.mesh.state("r1").state is InputState.PENDING
    assert h.mesh.resolved == 0
    status, _ = await h.post_signed(answer("r1"), webhook_id="msg_late")  # a refusal is not remembered
    assert status == 200


async def test_signature_path_needs_an_inbound_secret(build: Build) -> None:
    h = await build(inbound=False)
    token = (await h.announce(tool_request()))["callback"]["token"]
    status, _ = await h.post_signed(answer("r1"))
    assert status == 401
    status, _ = await h.post(answer("r1", token))
    assert status == 200


async def test_late_answer_is_told_who_won(build: Build) -> None:
    h = await build()
    token = (await h.announce(tool_request()))["callback"]["token"]
    await h.mesh.resolve(
        tenant_id="acme",
        request_id="r1",
        resolution=Resolution(decision=Decision.APPROVE),
        responder="alice",
        surface=Surface.GRPC,
    )
    for status, body in [await h.post_signed(answer("r1")), await h.post(answer("r1", token))]:
        assert status == 409
        assert body["error"]["reason"] == "INPUT_ALREADY_RESOLVED"
        assert "alice" in body["error"]["message"]
    assert h.mesh.resolved == 1


async def test_refusals_map_to_http_statuses(build: Build) -> None:
    h = await build()
    await h.announce(tool_request(allowed_responders=("alice",)))
    cases = {
        "unknown request": (await h.post_signed(answer("nope")), 404),
        "not an allowed responder": (await h.post_signed(answer("r1", responder="mallory")), 403),
        "no tenant with a signature": (await h.post_signed({"request_id": "r1", "decision": "approve"}), 422),
        "malformed JSON": (await h.post("{not json"), 400),
        "not an object": (await h.post("[1, 2]"), 400),
        "NaN in the payload": (await h.post_signed(answer("r1", payload={"score": float("nan")})), 400),
        "an integer beyond 64 bits": (await h.post_signed(answer("r1", payload={"n": 2**64})), 400),
    }
    assert {name: got[0] for name, (got, _) in cases.items()} == {
        name: want for name, (_, want) in cases.items()
    }
    assert cases["no tenant with a signature"][0][1]["error"]["field"] == "tenant_id"
    assert "NaN" in cases["NaN in the payload"][0][1]["error"]["message"]
    assert "64 bits" in cases["an integer beyond 64 bits"][0][1]["error"]["message"]
    assert h.mesh.state("r1").state is InputState.PENDING
    for _ in range(2):  # a refused message is not remembered: its resend is refused again, not a duplicate
        status, _ = await h.post_signed(answer("nope"), webhook_id="msg_unknown")
        assert status == 404


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("config", "env", "key"),
    [
        ({"targets": "http://x"}, {}, "adapters.webhook.targets"),
        ({"targets": [{"url": "ftp://x", "secret_env": "T"}]}, {"T": INBOUND}, "targets[0].url"),
        ({"targets": [{"url": "http://x", "secret_env": "T"}]}, {}, "targets[0].secret_env"),
        ({"targets": [{"url": "http://x", "secret_env": "T"}]}, {"T": "hunter2"}, "targets[0].secret_env"),
        (
            {"targets": [{"url": "http://x", "secret_env": "T"}]},
            {"T": "whsec_c2hvcnQ="},
            "targets[0].secret_env",
        ),
        ({"max_attempts": 0}, {}, "adapters.webhook.max_attempts"),
        ({"backoff_ms": "fast"}, {}, "adapters.webhook.backoff_ms"),
        ({"timeout_ms": True}, {}, "adapters.webhook.timeout_ms"),
        ({"tolerance_s": -1}, {}, "adapters.webhook.tolerance_s"),
        ({"callback_token_ttl_s": 0}, {}, "adapters.webhook.callback_token_ttl_s"),
        ({"callback_token_key_env": "K"}, {"K": "too-short"}, "adapters.webhook.callback_token_key_env"),
        ({"callback_token_key_env": "K"}, {}, "adapters.webhook.callback_token_key_env"),
        ({"callback_token_key_env": 7}, {}, "adapters.webhook.callback_token_key_env"),
        ({"inbound_secret_env": "MISSING"}, {}, "adapters.webhook.inbound_secret_env"),
        ({"target": []}, {}, "adapters.webhook.target"),
    ],
)
def test_bad_config_names_the_key(config: dict[str, Any], env: dict[str, str], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        WebhookAdapter("webhook", config, FakeMesh(), env)


async def test_a_webhook_id_reused_for_another_body_is_a_conflict_on_every_replica(build: Build) -> None:
    """Found from outside (review 7, W3): the ids were this process's only, so behind a balancer the
    same id with another body was refused by one replica and acted on by the next."""
    first = await build()
    second = await build(mesh=first.mesh)  # another replica on the same store
    await first.announce(tool_request("r1"))
    await first.announce(tool_request("r2"))
    status, _ = await first.post_signed(answer("r1"), webhook_id="msg_1")
    assert status == 200
    status, body = await second.post_signed(answer("r2"), webhook_id="msg_1")
    assert status == 409
    assert (body["error"]["reason"], body["error"]["field"]) == ("WEBHOOK_ID_REUSED", "webhook-id")
    assert first.mesh.state("r2").state is InputState.PENDING
    status, body = await second.post_signed(answer("r1"), webhook_id="msg_1")  # the same body again
    assert (status, body["status"], body["repeat"]) == (200, "resolved", True)
    assert first.mesh.resolved == 1
