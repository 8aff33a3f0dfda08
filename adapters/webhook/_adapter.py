"""The webhook adapter: notifications out, resolutions in, each job in its own module.

Out (``_notifications``, ``_delivery``): ``input.required`` for each new request, then
``input.resolved``, ``input.expired`` or ``input.canceled`` for its outcome, POSTed to
every target, Standard Webhooks-signed (https://www.standardwebhooks.com) and retried
with backoff. An announcement still retrying when the outcome comes is canceled first.

In: ``POST /webhooks/receive`` resolves a request when the body (strict JSON,
``_strict_json``) carries the callback token sent with the notification
(``_callbacks``), or when it is signed with the inbound secret inside the timestamp
window (``_signatures``). The first answer wins (200, ``"repeat": false``); the same
token with the same answer again, say after a lost response, gets that 200 again with
``"repeat": true``, at any time and after a restart; any other answer to an ended
request gets 409 naming who answered. A signed message is processed once per
``webhook-id`` (``_replay``); a replay gets ``{"status": "duplicate"}`` and changes
nothing; the same id with another body is 409 ``WEBHOOK_ID_REUSED``. Refusals are JSON
with a reason (``_http``).

Sensitive forms never leave the mesh: their notifications carry no defaults, no
values and no callback token, and a webhook cannot answer them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from adapters.webhook._answers import Answer
from adapters.webhook._callbacks import CallbackTokens, Winners, fingerprint
from adapters.webhook._delivery import Deliveries, Message, Retries, Target
from adapters.webhook._http import Refused, error, mesh_error
from adapters.webhook._notifications import OUTCOME_TYPES, SENSITIVE_NOTE, dumps, iso, request_json
from adapters.webhook._replay import SeenIds, body_digest
from adapters.webhook._settings import MIN_TOKEN_KEY_BYTES, WebhookSettings, signer
from adapters.webhook._signatures import signature_headers, verify
from adapters.webhook._strict_json import MalformedJson, parse_object
from svantic_grpc.adapter import Adapter, AdapterContext, parse_adapter_settings
from svantic_grpc.core.errors import AlreadyResolved, InvalidArgument, MeshError
from svantic_grpc.core.inputs.model import InputRequest, InputState, Surface

__all__ = ["RECEIVE_PATH", "WebhookAdapter"]

_log = logging.getLogger(__name__)

_CLAIM_WAIT_S = 2.0
"""How long an answer waits for another claim on its request (another replica answering it) to end
before taking that claim for one left by a process that died before its answer reached the mesh."""

RECEIVE_PATH = "/webhooks/receive"

_Key = tuple[str, str]
"""(tenant id, request id)"""


class WebhookAdapter(Adapter):
    """Tells webhook targets about input requests and resolves them from signed or tokened calls.

    Args:
        name: The adapter's key under ``adapters`` in settings.json.
        config: That key's object (see ``WebhookSettings``).
        context: The mesh.
        env: The process environment; secrets come from here.
        rng: Source of retry jitter (tests pass a seeded one).

    Raises:
        AdapterSettingsError: ``config`` is invalid or a secret is missing; each line names the key.
    """

    def __init__(
        self,
        name: str,
        config: Mapping[str, Any],
        context: AdapterContext,
        env: Mapping[str, str],
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name, config, context, env)
        self.settings = parse_adapter_settings(WebhookSettings, name, config, env)
        settings = self.settings
        self._targets = tuple(Target(t.url, signer(env, t.secret_env)) for t in settings.targets)
        self._inbound = settings.inbound(env)
        # Without a key of its own: one derived from the mesh's signing key, so a token outlives a
        # restart and any replica sharing that key takes it (a random one on the development default).
        self._token_key = settings.token_key(env) or context.shared_key("callback tokens")
        self._deliveries = Deliveries(
            Retries(settings.max_attempts, settings.backoff_ms, settings.max_backoff_ms, settings.timeout_ms),
            context.clock,
            rng or random.Random(),
        )
        self._stopped = False
        self._announcing: dict[_Key, set[asyncio.Task[None]]] = {}
        token_key = self._token_key or secrets.token_bytes(MIN_TOKEN_KEY_BYTES)
        self._tokens = CallbackTokens(token_key)
        self._key_tag = hashlib.sha256(token_key).hexdigest()[:8]
        """Names the token key in an announcement's id: made again after a restart under the same key
        (whose tokens still answer), it is a duplicate a receiver may drop; under a new key (the
        development default's, one per process), it is a new message with the token that answers."""
        self._winners = Winners(context)
        self._seen = SeenIds(settings.tolerance_s)

    # -- lifecycle

    def routes(self) -> Sequence[BaseRoute]:
        return (Route(RECEIVE_PATH, self._receive, methods=["POST"]),)

    async def start(self) -> None:
        if self._inbound is None:
            _log.info("webhook adapter %s: no inbound secret; only callback tokens resolve", self.name)
        if self._token_key is None:
            _log.warning(
                "webhook adapter %s: no callback_token_key_env and the development signing key; "
                "callback tokens end with this process",
                self.name,
            )

    async def stop(self) -> None:
        """Cancel pending deliveries and wait for them; idempotent."""
        self._stopped = True
        await self._deliveries.stop()

    async def drain(self) -> None:
        """Wait until every delivery in flight has succeeded, been refused or given up."""
        await self._deliveries.drain()

    # -- outbound

    async def on_request(self, request: InputRequest) -> None:
        try:
            self._announce(request)
        except Exception:
            _log.exception("webhook adapter %s: could not announce %s", self.name, request.request_id)

    async def on_outcome(self, request: InputRequest) -> None:
        """Returns once every target got the outcome, refused it or was given up on; raises when the
        adapter stopped first (the mesh tells the outcome again later)."""
        deliveries = self._report(request)
        if deliveries:
            await asyncio.wait(deliveries)
        if self._stopped or any(task.cancelled() for task in deliveries):
            raise RuntimeError(
                f"webhook adapter {self.name} stopped before {request.request_id}'s outcome went out"
            )

    def _announce(self, request: InputRequest) -> None:
        if self._stopped:
            _log.warning("webhook adapter %s stopped; %s not announced", self.name, request.request_id)
            return
        key = (request.tenant_id, request.request_id)
        data = request_json(request)
        callback_url = self.context.http_base_url.rstrip("/") + RECEIVE_PATH
        for index, target in enumerate(self._targets):
            notification: dict[str, Any] = {"type": "input.required", "request": data, "callback": None}
            if request.sensitive:
                notification["note"] = SENSITIVE_NOTE
            else:
                token, expires_at = self._issue_token(request)
                notification["callback"] = {
                    "url": callback_url,
                    "token": token,
                    "expires_at": iso(expires_at),
                }
            task = self._deliveries.send(
                target,
                self._message(request, notification, index),
                still_news=partial(self._pending, request),
            )
            self._announcing.setdefault(key, set()).add(task)
            task.add_done_callback(partial(self._announced, key))

    async def _once_answered(self, request: InputRequest) -> InputRequest:
        """``request`` once another claim's answer has ended it, or as it is after ``_CLAIM_WAIT_S``."""
        deadline = self.context.clock.now() + _CLAIM_WAIT_S
        current = request
        while current.state is InputState.PENDING and self.context.clock.now() < deadline:
            await asyncio.sleep(0.05)
            current = await self._current(request)
        return current

    async def _pending(self, request: InputRequest) -> bool:
        """Whether ``request`` still waits: an announcement still retrying stops once it ended, on
        this replica or another one (whose outcome this adapter may never hear of)."""
        try:
            return (await self._current(request)).state is InputState.PENDING
        except MeshError:
            return False  # gone (its session deleted)

    async def _current(self, request: InputRequest) -> InputRequest:
        """``request`` as the mesh has it now."""
        return await self.context.get_request(tenant_id=request.tenant_id, request_id=request.request_id)

    def _announced(self, key: _Key, task: asyncio.Task[None]) -> None:
        tasks = self._announcing.get(key)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._announcing[key]

    def _report(self, request: InputRequest) -> list[asyncio.Task[None]]:
        """Send the outcome to every target; the deliveries' tasks."""
        kind = OUTCOME_TYPES.get(request.state)
        if kind is None:
            _log.warning("webhook adapter %s: %s has not ended", self.name, request.request_id)
            return []
        key = (request.tenant_id, request.request_id)
        # An announcement still retrying is moot now; it ends before the outcome goes out.
        earlier = tuple(self._announcing.pop(key, ()))
        for task in earlier:
            task.cancel()
        if self._stopped:
            return []
        notification = {"type": kind, "request": request_json(request)}
        return [
            self._deliveries.send(target, self._message(request, notification, index), after=earlier)
            for index, target in enumerate(self._targets)
        ]

    def _message(self, request: InputRequest, notification: Mapping[str, Any], target: int) -> Message:
        kind = str(notification["type"]).replace(".", "_")
        if "callback" in notification:
            kind += f"_{self._key_tag}"
        return Message(
            # One id per request, kind and target: an announcement made again after a restart (the
            # first may have died with the process) is one its receiver can drop as a duplicate.
            webhook_id=f"msg_{request.request_id}_{kind}_{target}",
            type=str(notification["type"]),
            request_id=request.request_id,
            body=dumps(notification),
        )

    def _issue_token(self, request: InputRequest) -> tuple[str, float]:
        expires_at = request.expires_at
        if self.settings.callback_token_ttl_s is not None:
            expires_at = min(expires_at, self.context.clock.now() + self.settings.callback_token_ttl_s)
        return self._tokens.issue(request, expires_at), expires_at

    # -- inbound

    async def _receive(self, request: Request) -> JSONResponse:
        try:
            text, body = parse_object(await request.body())
        except MalformedJson as exc:
            return error(400, "MALFORMED_JSON", str(exc))
        try:
            signed = signature_headers(request.headers)
            if signed is not None:
                timestamp = verify(
                    self._inbound,
                    text,
                    signed,
                    now=self.context.clock.now(),
                    tolerance_s=self.settings.tolerance_s,
                )
                digest = body_digest(text)
                seen = self._seen.body_of(signed.webhook_id)
                if seen == digest:
                    return JSONResponse({"status": "duplicate"})
                if seen is not None:
                    raise _reused()
                return await self._resolve_signed(body, signed.webhook_id, timestamp, digest)
            if isinstance(body.get("callback_token"), str):
                return await self._resolve_with_token(body)
            raise Refused(401, "UNAUTHENTICATED", "needs a valid webhook-signature or callback_token")
        except Refused as exc:
            return error(exc.status, exc.reason, exc.message, exc.field)
        except MeshError as exc:
            return mesh_error(exc)
        except Exception:
            _log.exception("webhook adapter %s: resolving through %s failed", self.name, RECEIVE_PATH)
            return error(500, "INTERNAL", "the mesh could not take this answer; try again")

    async def _resolve_signed(
        self, body: dict[str, Any], webhook_id: str, timestamp: int, digest: bytes
    ) -> JSONResponse:
        # Remembered before awaiting: a concurrent replay is a duplicate.
        self._seen.remember(webhook_id, timestamp, digest, now=self.context.clock.now())
        try:
            answer = Answer.parse(body)
            if not answer.request_id:
                raise InvalidArgument("request_id", "required")
            if not answer.tenant_id:
                raise InvalidArgument("tenant_id", "required with a signature")
            kept = await self._keep_id(answer.tenant_id, answer.request_id, webhook_id, digest)
            try:
                return await self._resolve(
                    answer.tenant_id, answer.request_id, answer, f"signature:{webhook_id}"
                )
            except Exception:
                if kept:
                    try:  # its own error is what the sender is told, not the store's
                        await self.context.forget(kept)
                    except Exception:
                        _log.warning(
                            "webhook adapter %s: could not let %s go", self.name, kept, exc_info=True
                        )
                raise
        except Exception:
            self._seen.forget(webhook_id)  # refused: nothing changed, so a resend is no duplicate
            raise

    async def _keep_id(self, tenant_id: str, request_id: str, webhook_id: str, digest: bytes) -> str:
        """Keep ``webhook_id`` with its body's digest in the store, for as long as the request's
        session, so that the same id with another body is refused by whichever replica it reaches
        (``SeenIds`` is this process's). Returns the key when this call kept it, "" for a resend of
        the same body (which the answer's own credential then finds answered)."""
        request = await self.context.get_request(tenant_id=tenant_id, request_id=request_id)
        key = f"webhook-id:{webhook_id}"
        value = {"body": digest.hex()}
        session = (tenant_id, request.session_id)
        for _ in range(3):  # kept by another answer, which may be refused and let it go meanwhile
            if await self.context.remember(key, value, session=session, if_absent=True):
                return key
            kept = await self.context.recall(key)
            if kept == value:
                return ""
            if kept is not None:
                raise _reused()
        return ""

    async def _resolve_with_token(self, body: dict[str, Any]) -> JSONResponse:
        grant = self._tokens.check(str(body["callback_token"]))
        if body.get("request_id") not in (None, "", grant.request_id) or body.get("tenant_id") not in (
            None,
            "",
            grant.tenant_id,
        ):
            raise Refused(401, "INVALID_CALLBACK_TOKEN", "callback token is for another request")
        answer = Answer.parse(body)
        return await self._resolve(
            grant.tenant_id, grant.request_id, answer, grant.credential, expires_at=grant.expires_at
        )

    async def _resolve(
        self,
        tenant_id: str,
        request_id: str,
        answer: Answer,
        credential: str,
        *,
        expires_at: float | None = None,
    ) -> JSONResponse:
        """Answer the request once; the same credential and answer again learns that it won."""
        answered = fingerprint(answer.content())
        async with self._winners.hold(tenant_id, request_id):
            current = await self.context.get_request(tenant_id=tenant_id, request_id=request_id)
            pending = current.state is InputState.PENDING
            if pending:
                if expires_at is not None and self.context.clock.now() >= expires_at:
                    raise Refused(401, "CALLBACK_TOKEN_EXPIRED", "callback token expired")
                if current.sensitive:
                    raise Refused(422, "SENSITIVE_INPUT", SENSITIVE_NOTE, "values")
                claim = partial(
                    self._winners.claim,
                    current,
                    credential=credential,
                    answer=answered,
                    responder=answer.responder,
                )
                if not await claim():
                    # Another replica is answering it (the same retry sent to two, say): learn how that
                    # ends. Still pending after a while: a claim left by a process that died first.
                    current = await self._once_answered(current)
                    pending = current.state is InputState.PENDING
                    if pending:
                        await claim(over=True)
            if not pending:
                won = await self._winners.won(current, credential, answered, answer)
                if won == answered:  # a retry of the answer that won: the same success, marked
                    body = {"status": "resolved", "repeat": True, "request": request_json(current)}
                    return JSONResponse(body)
                if won is not None:
                    raise AlreadyResolved(
                        f"input request {request_id!r} was already answered with this callback "
                        "credential, differently; the first answer stands",
                        metadata={"winner": "this credential"},
                    )
                # Otherwise the mesh refuses it below, naming who answered, how and when.
            try:
                resolved = await self.context.resolve(
                    tenant_id=tenant_id,
                    request_id=request_id,
                    resolution=answer.resolution(self.context.clock.now()),
                    responder=answer.responder,
                    surface=Surface.WEBHOOK,
                )
            except MeshError:
                if pending:
                    await self._winners.release(  # refused: it changed nothing
                        tenant_id, request_id, credential=credential, answer=answered
                    )
                raise
        return JSONResponse({"status": "resolved", "repeat": False, "request": request_json(resolved)})


def _reused() -> Refused:
    return Refused(
        409,
        "WEBHOOK_ID_REUSED",
        "this webhook-id was already used for another body: each message needs its own id",
        "webhook-id",
    )
